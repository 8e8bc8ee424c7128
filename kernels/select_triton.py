"""Triton part of the adaptive selection (kernels/select.py): the columns' own mass in one launch.

The torch twin (``select.column_scores_reference``, same signature) computes, for every key, the part
of its column score that the diagonal scores do not explain, with ~20 small kernels over [B, H, N]; each
costs a few microseconds of device time however little it does, and such kernels are most of the
index's time. Here one program covers BLOCK keys of one (batch * head). It reads the groups' envelope
(the largest diagonal score of each group of 64 offsets, ``gmax`` [B, H, G]) and its exclusive prefix
sum in float64 (``gcum`` [B, H, G + 1], made once by the caller for both), so the envelope's sum over any
key range is two loads on each side, in the same float64 operations as the twin's: the same results.

Both kernels launch with ``enable_fp_fusion=False``: with fusion (triton 3.6's default on the GPU) a product
and a sum become one fused multiply-add, rounded once where the twin rounds twice, and a ratio one ulp
apart can reorder two candidates (the first GPU run, session 16, failed the twin test at 128K, not at 20K).
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
        GROUP=GROUP, BLOCK=BLOCK, HAS_SINK=has_sink, num_warps=4, enable_fp_fusion=False,
    )
    return c_score, cm


@triton.jit
def _candidate(k, bh, h, CR, CI, GR, GI, VC, SC, KC, KG, NFG, GROUP: tl.constexpr):
    # candidate k of a head: the first KC are its top columns, the next KG its top slash groups. Returns its
    # sort ratio (forced: +inf, outside the caps: -inf), whether it is within the caps, forced, a column,
    # and its key (column) or group index
    is_col = k < KC
    kk = k - KC
    is_grp = (kk >= 0) & (kk < KG)
    cr = tl.load(CR + bh * KC + k, mask=is_col, other=float("-inf"))
    ci = tl.load(CI + bh * KC + k, mask=is_col, other=0)
    gr = tl.load(GR + bh * KG + kk, mask=is_grp, other=float("-inf"))
    gi = tl.load(GI + bh * KG + kk, mask=is_grp, other=0)
    g_cap = tl.maximum((tl.load(SC + h) + GROUP - 1) // GROUP, NFG)
    ok = (is_col & (k < tl.load(VC + h))) | (is_grp & (kk < g_cap))
    ratio = tl.where(is_col, cr, gr)
    forced = ok & ((ratio == float("inf")) | is_col)
    ratio = tl.where(ok, tl.where(forced, float("inf"), ratio), float("-inf"))
    return ratio, ok, forced, is_col, is_grp, ci, gi


@triton.jit
def _keep_kernel(CR, CI, CMASS, GR, GI, SCUM, VC, SC, MASS, END, KEEP, VOUT, SOUT, SHARE,
                 N, H, KC, KG, NFG, R, R_FLOOR,
                 KP: tl.constexpr, RP: tl.constexpr, GROUP: tl.constexpr, SB: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    e = tl.load(END + b)
    k = tl.arange(0, KP)
    ratio, ok, forced, is_col, is_grp, ci, gi = _candidate(k, bh, h, CR, CI, GR, GI, VC, SC, KC, KG, NFG, GROUP)
    # sort: ratio descending, ties by candidate ascending (a stable sort), as one int64 key ascending.
    # The ratios are >= 0 (or +-inf): their bits order them; -0.0 counts as 0.0 (torch's comparison)
    bits = ratio.to(tl.int32, bitcast=True)
    mag = (bits & 0x7FFFFFFF).to(tl.int64)
    half = tl.full([KP], 2147483648, tl.int64)  # 2**31 (int64 constants: a literal above 2**31 would be uint32)
    ukey = tl.where((bits >= 0) | (mag == 0), half + mag, half - 1 - mag)  # in [0, 2**32), increases with the ratio
    key = ((2 * half - 1 - ukey) << 32) | k.to(tl.int64)
    ks = (tl.sort(key) & (2 * half - 1)).to(tl.int32)  # candidates in keeping order
    r_s, ok_s, forced_s, col_s, grp_s, ci_s, gi_s = _candidate(ks, bh, h, CR, CI, GR, GI, VC, SC, KC, KG, NFG, GROUP)

    # masses at R row positions p_r = E (r + 1) / R - 1: a column serves rows >= its key, a group the rows
    # past its offsets; the totals are every candidate's plus the slash scores the rows can reach
    rr = tl.arange(0, RP)
    pk = ((rr + 1) * e) // R - 1  # [RP]
    r_live = rr < R
    c_own = tl.load(CMASS + bh * KC + ks, mask=col_s, other=0.0)
    m_col = tl.where((col_s & ok_s)[:, None] & (ci_s[:, None] <= pk[None, :]), c_own[:, None], 0.0)
    g_lo = gi_s * GROUP
    lo = tl.minimum(g_lo[:, None], pk[None, :] + 1)
    hi = tl.minimum(tl.minimum(g_lo + GROUP, N)[:, None], pk[None, :] + 1)
    sc = SCUM + bh * (N + 1)
    gmask = (grp_s & ok_s)[:, None] & r_live[None, :]
    m_grp = tl.maximum(tl.load(sc + hi, mask=gmask, other=0.0) - tl.load(sc + lo, mask=gmask, other=0.0), 0.0)
    m = tl.where(col_s[:, None], m_col, tl.where(gmask, m_grp, 0.0))
    m = tl.where(r_live[None, :], m, 0.0)  # [KP, RP], in keeping order
    reach = tl.load(sc + pk + 1, mask=r_live, other=0.0)
    total = reach + tl.sum(tl.where(col_s[:, None], m, 0.0).to(tl.float64), 0).to(tl.float32)
    probe = tl.sum(tl.where(rr == R - 1, total, 0.0), 0)
    total = tl.where(r_live & (total >= R_FLOOR * probe), total, 0.0)
    mass_h = tl.load(MASS + h)
    target = mass_h * total
    before = tl.cumsum(m.to(tl.float64), 0).to(tl.float32) - m
    need = tl.max(((before < target[None, :]) & (m > 0)).to(tl.int32), 1) > 0
    every = (tl.zeros([KP], tl.float32) + mass_h) >= 1.0  # mass 1: every candidate within the caps
    keep = need | (every & (r_s > float("-inf"))) | forced_s
    kept = tl.sum(tl.where(keep[:, None], m, 0.0).to(tl.float64), 0).to(tl.float32)
    share = tl.where(total > 0, tl.math.div_rn(kept, tl.maximum(total, 1e-30)), 1.0)
    share = tl.minimum(tl.min(tl.where(r_live, share, 1.0), 0), 1.0)
    tl.store(SHARE + bh, share)

    # back to candidate order: columns -> v_idx, groups -> their 64 offsets each
    tl.store(KEEP + bh * KP + ks, keep.to(tl.int8))
    tl.debug_barrier()
    kept_c = tl.load(KEEP + bh * KP + k, mask=is_col, other=0) != 0
    tl.store(VOUT + bh * KC + k, tl.where(kept_c, ci, -1).to(tl.int32), mask=is_col)
    j = tl.arange(0, GROUP)
    for g0 in range(0, KG, SB):
        gg = g0 + tl.arange(0, SB)
        live = gg < KG
        kept_g = tl.load(KEEP + bh * KP + KC + gg, mask=live, other=0) != 0
        offs = tl.load(GI + bh * KG + gg, mask=live, other=0)[:, None] * GROUP + j[None, :]
        val = tl.where(kept_g[:, None] & (offs < N), offs, -1).to(tl.int32)
        tl.store(SOUT + bh * KG * GROUP + gg[:, None] * GROUP + j[None, :], val, mask=live[:, None])


def keep_candidates(c_ratio, c_idx, c_mass, g_ratio, g_idx, scum, v_count, s_count, mass, end, *, n_forced_groups: int):
    """The launcher of ``select.keep_candidates_reference`` (same arguments and results; ``share`` within
    an ulp: its sums over the candidates run in another order)."""
    from .select import R_FLOOR, R_ROWS

    B, H, KC = c_idx.shape
    KG = g_idx.shape[-1]
    N = scum.shape[-1] - 1
    dev = scum.device
    KP = triton.next_power_of_2(KC + KG)
    c_ratio, c_idx, c_mass, g_ratio, g_idx = (x.contiguous() for x in (c_ratio, c_idx, c_mass, g_ratio, g_idx))
    end = end.to(dev, torch.int64).expand(B).contiguous()
    keep = torch.empty(B, H, KP, dtype=torch.int8, device=dev)
    v_idx = torch.empty(B, H, KC, dtype=torch.int32, device=dev)
    s_off = torch.empty(B, H, KG * GROUP, dtype=torch.int32, device=dev)
    share = torch.empty(B, H, dtype=torch.float32, device=dev)
    _keep_kernel[(B * H,)](
        c_ratio, c_idx, c_mass, g_ratio, g_idx, scum.contiguous(), v_count.to(dev, torch.int64).contiguous(),
        s_count.to(dev, torch.int64).contiguous(), mass.to(dev, torch.float32).contiguous(), end, keep, v_idx, s_off,
        share, N, H, KC, KG, n_forced_groups, min(R_ROWS, N), R_FLOOR,
        KP=KP, RP=R_ROWS, GROUP=GROUP, SB=16, num_warps=16,  # 2048 candidates x 8 positions: 8 warps spill more
        enable_fp_fusion=False,
    )
    return v_idx, s_off, share
