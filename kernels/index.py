"""Triton builder of the vertical-slash index (contract section 3), no host sync, graph-capturable.

Key fact: every slash window of a query block has the same width BLOCK_M, so two windows with
offsets o > o' (consecutive once sorted) merge iff o - o' < BLOCK_M + BLOCK_N, whatever the
query block. A short torch prologue ([B, H, S] tensors only) sorts the offsets descending, cuts
them into runs once per head and records each run's first index and smallest offset. Then one
program per (query block, batch * head):
  - binary-searches the first offset whose window is not empty (o < m0 + BLOCK_M); the run that
    holds it starts at that offset, later runs are unchanged;
  - streams the runs in ascending key order, merging with the sink [s0, s0 + n_sink) (and with each
    other, which only the sink can cause), and writes each merged run as BLOCK_N-wide blocks; s0 is
    the row's first real key (0 without padding): a left-padded row's sink is its first real tokens,
    and a head with a sink clips its windows at s0 (the keys before it are pads);
  - keeps the sorted, distinct verticals c < m0 that no written block covers (a vectorised
    binary search over the blocks it just wrote), compacted with a prefix sum.
Worst case: a head whose slashes are all >= BLOCK_M + BLOCK_N apart has S runs, walked one by one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_INT32_MAX = 2**31 - 1


@triton.jit
def _vs_index_kernel(
    ODESC, RUNID, RFIRST, RLO, NS, NR, VS, NV, NSINK, SINK0,
    BC, BO, CC, CI,
    N, H, NM, S, V, cap_s, cap_v, log_s, log_cap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMIT: tl.constexpr, VT: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    m0 = m * BLOCK_M
    row_end = tl.minimum(m0 + BLOCK_M, N)
    row = bh * NM + m
    bo_ptr = BO + row.to(tl.int64) * cap_s
    ci_ptr = CI + row.to(tl.int64) * cap_v
    o_ptr = ODESC + bh.to(tl.int64) * S
    ns = tl.load(NS + bh)
    nr = tl.load(NR + bh)
    nsink = tl.load(NSINK + h)
    # the sink starts at the row's first real key (left padding); so do the windows of a head with a sink:
    # the keys before it are pads
    s0 = tl.load(SINK0 + bh // H)
    floor = tl.where(nsink > 0, s0, 0)

    # first slash whose window is not empty: offsets are descending, find the first o < m0 + BLOCK_M
    lo = 0
    hi = ns
    for _ in range(log_s):
        live = lo < hi
        mid = (lo + hi) // 2
        om = tl.load(o_ptr + mid, mask=live, other=0)
        go = live & (om >= m0 + BLOCK_M)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(live & ~go, mid, hi)
    p = lo
    r0 = tl.load(RUNID + bh.to(tl.int64) * S + p, mask=p < ns, other=0)
    r0 = tl.where(p < ns, r0, nr)

    j = tl.arange(0, EMIT)
    cnt = 0
    cur_s = s0
    cur_e = s0 + nsink
    have = nsink > 0
    for r in range(r0, nr):
        first = tl.maximum(tl.load(RFIRST + bh.to(tl.int64) * S + r), p)
        o_hi = tl.load(o_ptr + first)
        o_lo = tl.load(RLO + bh.to(tl.int64) * S + r)
        s_r = tl.maximum(m0 - o_hi, floor)  # a window that lies in the pads is empty: it merges with the sink
        e_r = m0 + BLOCK_M - o_lo
        merge = have & (s_r < cur_e + BLOCK_N)
        # emit the current run unless this one joins it
        stop = tl.minimum(cur_e, row_end)
        nb = tl.where(have & ~merge & (stop > cur_s), (stop - cur_s + BLOCK_N - 1) // BLOCK_N, 0)
        nb = tl.minimum(nb, cap_s - cnt)
        for e0 in range(0, nb, EMIT):
            tl.store(bo_ptr + cnt + e0 + j, cur_s + (e0 + j) * BLOCK_N, mask=(e0 + j) < nb)
        cnt += nb
        cur_s = tl.where(merge, cur_s, s_r)
        cur_e = tl.where(merge, tl.maximum(cur_e, e_r), e_r)
        have = e_r > -1  # always true; keeps the loop-carried type an i1 tensor
    stop = tl.minimum(cur_e, row_end)
    nb = tl.where(have & (stop > cur_s), (stop - cur_s + BLOCK_N - 1) // BLOCK_N, 0)
    nb = tl.minimum(nb, cap_s - cnt)
    for e0 in range(0, nb, EMIT):
        tl.store(bo_ptr + cnt + e0 + j, cur_s + (e0 + j) * BLOCK_N, mask=(e0 + j) < nb)
    cnt += nb
    for e0 in range(cnt, cap_s, EMIT):
        tl.store(bo_ptr + e0 + j, tl.full([EMIT], -1, tl.int32), mask=(e0 + j) < cap_s)
    tl.store(BC + row, cnt)
    tl.debug_barrier()  # the column filter reads the blocks written above

    # verticals: sorted ascending (INT32_MAX pads), keep distinct c < m0 outside every block
    nv = tl.load(NV + bh)
    v_ptr = VS + bh.to(tl.int64) * V
    vj = tl.arange(0, VT)
    ccount = 0
    for c0 in range(0, nv, VT):
        idx = c0 + vj
        live = idx < nv
        c = tl.load(v_ptr + idx, mask=live, other=0)
        prev = tl.load(v_ptr + idx - 1, mask=live & (idx > 0), other=-1)
        keep = live & (c < m0) & (c != prev)
        blo = tl.zeros([VT], tl.int32)
        bhi = tl.zeros([VT], tl.int32) + cnt
        for _ in range(log_cap):
            blive = blo < bhi
            mid = (blo + bhi) // 2
            sm = tl.load(bo_ptr + mid, mask=blive, other=0)
            go = blive & (sm <= c)
            blo = tl.where(go, mid + 1, blo)
            bhi = tl.where(blive & ~go, mid, bhi)
        sb = tl.load(bo_ptr + blo - 1, mask=blo > 0, other=0)
        keep = keep & ~((blo > 0) & (c < sb + BLOCK_N))
        pos = ccount + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(ci_ptr + pos, c, mask=keep & (pos < cap_v))
        ccount += tl.sum(keep.to(tl.int32), 0)
    ccount = tl.minimum(ccount, cap_v)
    for e0 in range(ccount, cap_v, VT):
        tl.store(ci_ptr + e0 + vj, tl.full([VT], -1, tl.int32), mask=(e0 + vj) < cap_v)
    tl.store(CC + row, ccount)


def _log2_ceil(x: int) -> int:
    return max(1, math.ceil(math.log2(x + 1)))


def build_vs_index(v_idx, s_off, n_sink, *, seq_len, block_m, block_n=64, cap_s, cap_v, sink_start=None):
    """Launcher; inputs are validated by mif_compile.kernels.api. Returns the SparseIndex fields."""
    B, H, S = s_off.shape
    V = v_idx.shape[-1]
    dev = s_off.device
    NM = math.ceil(seq_len / block_m)
    # prologue on [B, H, S]: sort offsets descending, cut into runs
    o = s_off.to(torch.int32).sort(dim=-1, descending=True).values.contiguous()
    valid = o >= 0
    ns = valid.sum(-1, dtype=torch.int32)
    gap_cut = torch.ones_like(valid)
    gap_cut[..., 1:] = (o[..., :-1] - o[..., 1:]) >= block_m + block_n
    first = gap_cut & valid
    run_id = (first.cumsum(-1, dtype=torch.int32) - 1).contiguous()
    nr = first.sum(-1, dtype=torch.int32)
    last = torch.ones_like(valid)
    last[..., :-1] = first[..., 1:] | ~valid[..., 1:]
    last &= valid
    pos = torch.arange(S, device=dev, dtype=torch.int32).expand(B, H, S)
    rfirst = torch.zeros(B, H, S + 1, dtype=torch.int32, device=dev)
    rfirst.scatter_(-1, torch.where(first, run_id, S).long(), pos)
    rlo = torch.zeros(B, H, S + 1, dtype=torch.int32, device=dev)
    rlo.scatter_(-1, torch.where(last, run_id, S).long(), o)
    # verticals ascending, INT32_MAX for unused
    vs = torch.where(v_idx >= 0, v_idx.to(torch.int32), _INT32_MAX).sort(dim=-1).values.contiguous()
    nv = (v_idx >= 0).sum(-1, dtype=torch.int32)
    nsink = torch.as_tensor(n_sink, device=dev).to(torch.int32).expand(H).contiguous()
    sink0 = (torch.zeros(B, dtype=torch.int32, device=dev) if sink_start is None
             else sink_start.to(device=dev, dtype=torch.int32).expand(B).contiguous())

    bc = torch.empty(B, H, NM, dtype=torch.int32, device=dev)
    cc = torch.empty_like(bc)
    bo = torch.empty(B, H, NM, cap_s, dtype=torch.int32, device=dev)
    ci = torch.empty(B, H, NM, cap_v, dtype=torch.int32, device=dev)
    _vs_index_kernel[(NM, B * H)](
        o, run_id, rfirst[..., :S].contiguous(), rlo[..., :S].contiguous(), ns, nr, vs, nv, nsink, sink0,
        bc, bo, cc, ci,
        # caps and their log2 are run-time values, so a new prompt length does not compile the kernel again
        seq_len, H, NM, S, max(V, 1), cap_s, cap_v, _log2_ceil(S), _log2_ceil(cap_s),
        BLOCK_M=block_m, BLOCK_N=block_n, EMIT=64, VT=256,
        num_warps=4,
    )
    return bc, bo, cc, ci
