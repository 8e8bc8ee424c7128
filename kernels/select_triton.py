"""Triton part of the adaptive selection (kernels/select.py): the columns' own mass in one launch.

The torch twin (``select.column_scores_reference``, same signature) computes, for every key, the part
of its column score that the diagonal scores do not explain, with ~20 small kernels over [B, H, N]; each
costs a few microseconds of device time however little it does, and such kernels are most of the
index's time. Here one program covers BLOCK keys of one (batch * head). It reads the groups' envelope
(the largest diagonal score of each group of 64 offsets, ``gmax`` [B, H, G]) and its exclusive prefix
sum in float64 (``gcum`` [B, H, G + 1], made once by the caller for both), so the envelope's sum over any
key range is two loads on each side, in the same float64 operations as the twin's: the same results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import GROUP


@triton.jit
def _envelope_sum(GC, GM, t, G, GROUP: tl.constexpr):
    # the envelope summed over keys [0, t): the groups before t's, then t % GROUP keys of its own
    g = t // GROUP
    gc = tl.load(GC + g)
    gm = tl.load(GM + g, mask=g < G, other=0.0).to(tl.float64)
    return gc * GROUP + (t % GROUP).to(tl.float64) * gm


@triton.jit
def _col_score_kernel(COL, GC, GM, END, SINK0, CS, CM, N, G, H, QL, N_FORCE, TIE,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr, HAS_SINK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = j < N
    e = tl.load(END + b)
    ql_b = tl.maximum(tl.minimum(e, QL), 1).to(tl.float64)
    # key j meets the probe rows at offsets [e - QL - j, e - j) (clipped at 0)
    hi = tl.maximum(e - j, 0)
    lo = tl.maximum(e - QL - j, 0)
    gc, gm = GC + bh * (G + 1), GM + bh * G
    explained = ((_envelope_sum(gc, gm, hi, G, GROUP) - _envelope_sum(gc, gm, lo, G, GROUP)) / ql_b).to(tl.float32)
    c = tl.load(COL + bh * N + j, mask=live, other=0.0)
    cm = tl.maximum(c - explained, 0.0)
    score = cm + c * TIE
    s0 = tl.load(SINK0 + b) if HAS_SINK else 0
    score = tl.where((j >= s0) & (j < s0 + N_FORCE), float("inf"), score)
    tl.store(CS + bh * N + j, score, mask=live)
    tl.store(CM + bh * N + j, cm, mask=live)


def column_scores(col, gmax, gcum, end, sink0, *, last_q: int, n_force: int, tie: float):
    """The launcher of ``select.column_scores_reference`` (same arguments, same results)."""
    B, H, N = col.shape
    G = gmax.shape[-1]
    col = col.contiguous()
    c_score, cm = torch.empty_like(col), torch.empty_like(col)
    end = end.to(col.device, torch.int64).expand(B).contiguous()
    has_sink = sink0 is not None
    s0 = sink0.to(col.device, torch.int64).expand(B).contiguous() if has_sink else end
    BLOCK = 1024
    _col_score_kernel[(B * H, triton.cdiv(N, BLOCK))](
        col, gcum.contiguous(), gmax.contiguous(), end, s0, c_score, cm, N, G, H, min(last_q, N), n_force, tie,
        GROUP=GROUP, BLOCK=BLOCK, HAS_SINK=has_sink, num_warps=4,
    )
    return c_score, cm
