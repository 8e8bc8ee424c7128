"""Triton vertical-slash estimation (contract section 1): column and diagonal sums of the softmax
of the last `last_q` queries, without the [last_q, N] score matrix.

Two launches, both gridded (batch * head, key tiles) with the head index fastest, so the
query heads of one GQA group read the same K tile while it is in L2:
  pass 1 (_row_stats_kernel): per split of the keys, the row max and row sum (log2 domain);
  pass 2 (_col_diag_kernel): combine the splits, then tile t owns the diagonal offsets
          [64 t, 64 t + 64) and the key columns [N - 64 (t + 1), N - 64 t). It recomputes the
          probabilities of the KW = next_pow2(BQ + 64) keys that end at N - 64 t, sums the
          last 64 columns, and skews the tile with tl.gather so each diagonal is a column sum:
          no atomics, every output written exactly once.
Head dims that are not a power of two (MLA's 192) are padded to one (at least 16) with masked loads.
Caveat: pass 2 computes QK^T for KW keys per 64 outputs, so K is read about three times in all.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_TILE_O = 64


@triton.jit
def _scores(q, K, kk, rows, ql_rows_ok, N, PAD, b, stride_kn, offs_d, qk_scale, D_QK, HAS_PADDING: tl.constexpr):
    # scores of the query tile against keys kk (log2 domain); -inf where a key is not visible
    kin = (kk >= 0) & (kk < N)
    k = tl.load(K + kk[None, :].to(tl.int64) * stride_kn + offs_d[:, None], mask=kin[None, :] & (offs_d[:, None] < D_QK),
                other=0.0)
    s = tl.dot(q, k) * qk_scale
    ok = kin[None, :] & (kk[None, :] <= rows[:, None]) & ql_rows_ok[:, None]
    if HAS_PADDING:
        real = tl.load(PAD + b * N + kk, mask=kin, other=0)
        ok = ok & (real[None, :] != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _last_queries(Q, K, PEND, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, N, QL, H, D_QK,
                  GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BQ: tl.constexpr):
    # program (batch * head) -> its batch, the tile of the QL queries before the row's probe end (its
    # last real query + 1: N but for right padding), and its K head's base
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    pend = tl.load(PEND + b)
    r = tl.arange(0, BQ)
    rows = pend - QL + r
    rok = (r < QL) & (rows >= 0)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=rok[:, None] & (offs_d[None, :] < D_QK), other=0.0)
    Kb = K + b * stride_kb + (h // GROUPS) * stride_kh
    return bh, b, r, rows, rok, offs_d, q, Kb, pend


@triton.jit
def _row_stats_kernel(
    Q, K, PAD, PEND, Mx, Lx,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    qk_scale, N, QL, H, keys_per_split,
    D_QK: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    SPLIT: tl.constexpr, HAS_PADDING: tl.constexpr,
):
    sp = tl.program_id(1)
    bh, b, r, rows, rok, offs_d, q, Kb, pend = _last_queries(
        Q, K, PEND, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, N, QL, H, D_QK, GROUPS, HEAD_DIM, BQ)
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    k_lo = sp * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, N)
    for k0 in range(k_lo, k_hi, BK):
        s = _scores(q, Kb, k0 + tl.arange(0, BK), rows, rok, N, PAD, b, stride_kn, offs_d, qk_scale, D_QK, HAS_PADDING)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    out = (bh * SPLIT + sp) * BQ + r
    tl.store(Mx + out, m_i)
    tl.store(Lx + out, l_i)


@triton.jit
def _col_diag_kernel(
    Q, K, PAD, PEND, Mx, Lx, Col, Diag,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    qk_scale, N, QL, H,
    D_QK: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BQ: tl.constexpr, KW: tl.constexpr,
    TILE_O: tl.constexpr, SPLIT: tl.constexpr, HAS_PADDING: tl.constexpr,
):
    t = tl.program_id(1)
    bh, b, r, rows, rok, offs_d, q, Kb, pend = _last_queries(
        Q, K, PEND, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, N, QL, H, D_QK, GROUPS, HEAD_DIM, BQ)
    # combine the row statistics of the splits
    sp = tl.arange(0, SPLIT)
    st = (bh * SPLIT + sp[:, None]) * BQ + r[None, :]
    ms = tl.load(Mx + st)
    ls = tl.load(Lx + st)
    m_row = tl.max(ms, 0)
    m_use = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_row = tl.sum(ls * tl.math.exp2(ms - m_use[None, :]), 0)
    inv_l = tl.where(l_row > 0.0, 1.0 / tl.where(l_row > 0.0, l_row, 1.0), 0.0)

    o0 = t * TILE_O
    c = tl.arange(0, KW)
    kk = pend - o0 - KW + c  # tiles count back from the probe end (keys past it are pads: never written)
    s = _scores(q, Kb, kk, rows, rok, N, PAD, b, stride_kn, offs_d, qk_scale, D_QK, HAS_PADDING)
    p = tl.math.exp2(s - m_use[:, None]) * inv_l[:, None]  # [BQ, KW]; masked entries are 0
    # columns: the last TILE_O keys of the tile
    csum = tl.sum(p, 0)
    out_bh = bh.to(tl.int64) * N
    tl.store(Col + out_bh + kk, csum, mask=(c >= KW - TILE_O) & (kk >= 0))
    # diagonals: offset o0 + j of row r sits at column KW - QL + r - j
    j = tl.arange(0, TILE_O)
    idx = KW - QL + r[:, None] - j[None, :]
    idx = tl.minimum(tl.maximum(idx, 0), KW - 1)  # only rows r >= QL (all-zero p) are clamped
    g = tl.gather(p, idx, 1)  # [BQ, TILE_O]
    dsum = tl.sum(g, 0)
    tl.store(Diag + out_bh + o0 + j, dsum, mask=(o0 + j) < N)


def vertical_slash_scores(q, k, *, last_q, scale, key_padding=None, probe_end=None, num_warps=4):
    """Launcher; inputs are validated by mif_compile.kernels.api. Returns fp32 (col, diag) [B, H, N]."""
    B, H, N, D = q.shape
    ql = min(last_q, N)
    BQ = max(16, triton.next_power_of_2(ql))
    KW = triton.next_power_of_2(BQ + _TILE_O)
    BK = 64
    groups = H // k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    # enough splits to fill the GPU in pass 1; SPLIT is a compile-time constant, so it depends on B * H
    # only and a new prompt length does not compile again (at short N the trailing splits are empty,
    # which the combine step allows)
    split = max(1, min(64, triton.next_power_of_2(max(1, 512 // max(1, B * H)))))
    keys_per_split = math.ceil(math.ceil(N / split) / BK) * BK
    dev = q.device
    mx = torch.empty(B * H * split * BQ, dtype=torch.float32, device=dev)
    lx = torch.empty_like(mx)
    # with a probe end before N the columns past it (pads) are never written: they start at 0
    col = (torch.empty if probe_end is None else torch.zeros)(B, H, N, dtype=torch.float32, device=dev)
    diag = torch.empty_like(col)
    pend = (torch.full((B,), N, dtype=torch.int32, device=dev) if probe_end is None
            else probe_end.to(device=dev, dtype=torch.int32).expand(B).contiguous())
    pad = key_padding.to(torch.int8).contiguous() if key_padding is not None else col
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    qk_scale = scale * _LOG2E
    _row_stats_kernel[(B * H, split)](
        q, k, pad, pend, mx, lx, *strides, qk_scale, N, ql, H, keys_per_split,
        D_QK=D, GROUPS=groups, HEAD_DIM=max(16, triton.next_power_of_2(D)), BQ=BQ, BK=BK, SPLIT=split, HAS_PADDING=key_padding is not None,
        num_warps=num_warps, enable_fp_fusion=True,  # as measured (triton 3.6's default; triton 3.10 turns it off)
    )
    _col_diag_kernel[(B * H, math.ceil(N / _TILE_O))](
        q, k, pad, pend, mx, lx, col, diag, *strides, qk_scale, N, ql, H,
        D_QK=D, GROUPS=groups, HEAD_DIM=max(16, triton.next_power_of_2(D)), BQ=BQ, KW=KW, TILE_O=_TILE_O, SPLIT=split,
        HAS_PADDING=key_padding is not None, num_warps=num_warps, enable_fp_fusion=True,
    )
    return col, diag
