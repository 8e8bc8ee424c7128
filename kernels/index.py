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


@triton.jit
def _vs_runs_kernel(O, VIDX, RUNID, RFIRST, RLO, NS, NR, NV, S, V, GAP, BLOCK: tl.constexpr):
    # the prologue of one (batch * head): offsets sorted descending (-1 = unused, last) cut into runs
    # (consecutive offsets closer than GAP = BLOCK_M + BLOCK_N share a window), walked in BLOCK pieces
    bh = tl.program_id(0).to(tl.int64)
    o_ptr = O + bh * S
    i = tl.arange(0, BLOCK)
    runs = 0
    valid_n = 0
    for s0 in range(0, S, BLOCK):
        p = s0 + i
        live = p < S
        o = tl.load(o_ptr + p, mask=live, other=-1)
        prev = tl.load(o_ptr + p - 1, mask=live & (p > 0), other=-1)
        nxt = tl.load(o_ptr + p + 1, mask=(p + 1) < S, other=-1)
        valid = o >= 0
        first = valid & ((p == 0) | ((prev - o) >= GAP))
        last = valid & ((nxt < 0) | ((o - nxt) >= GAP))  # the next offset is unused or starts a run
        rid = runs + tl.cumsum(first.to(tl.int32), 0) - 1
        tl.store(RUNID + bh * S + p, rid, mask=live)
        tl.store(RFIRST + bh * S + rid, p, mask=first)
        tl.store(RLO + bh * S + rid, o, mask=last)
        runs += tl.sum(first.to(tl.int32), 0)
        valid_n += tl.sum(valid.to(tl.int32), 0)
    for s0 in range(0, S, BLOCK):  # slots past the last run: 0, as the torch prologue leaves them
        p = s0 + i
        z = tl.zeros([BLOCK], tl.int32)
        tl.store(RFIRST + bh * S + p, z, mask=(p < S) & (p >= runs))
        tl.store(RLO + bh * S + p, z, mask=(p < S) & (p >= runs))
    nv = 0
    for v0 in range(0, V, BLOCK):
        p = v0 + i
        c = tl.load(VIDX + bh * V + p, mask=p < V, other=-1)
        nv += tl.sum((c >= 0).to(tl.int32), 0)
    tl.store(NS + bh, valid_n)
    tl.store(NR + bh, runs)
    tl.store(NV + bh, nv)


def vs_runs_reference(o, v_idx, *, block_m: int, block_n: int = 64):
    """The pure-torch twin of ``_vs_runs_kernel`` (same outputs): for offsets ``o`` [B, H, S] sorted
    descending (-1 last) and columns ``v_idx`` [B, H, V] (-1 unused), int32 (run_id [B, H, S], rfirst
    [B, H, S], rlo [B, H, S], ns, nr, nv [B, H]): each offset's run, each run's first position and
    smallest offset (0 past the last run), the counts of offsets, runs and columns."""
    B, H, S = o.shape
    valid = o >= 0
    ns = valid.sum(-1, dtype=torch.int32)
    gap_cut = torch.ones_like(valid)
    gap_cut[..., 1:] = (o[..., :-1] - o[..., 1:]) >= block_m + block_n
    first = gap_cut & valid
    run_id = first.cumsum(-1, dtype=torch.int32) - 1
    nr = first.sum(-1, dtype=torch.int32)
    last = torch.ones_like(valid)
    last[..., :-1] = first[..., 1:] | ~valid[..., 1:]
    last &= valid
    pos = torch.arange(S, device=o.device, dtype=torch.int32).expand(B, H, S)
    rfirst = torch.zeros(B, H, S + 1, dtype=torch.int32, device=o.device)
    rfirst.scatter_(-1, torch.where(first, run_id, S).long(), pos)
    rlo = torch.zeros(B, H, S + 1, dtype=torch.int32, device=o.device)
    rlo.scatter_(-1, torch.where(last, run_id, S).long(), o.to(torch.int32))
    nv = (v_idx >= 0).sum(-1, dtype=torch.int32)
    return run_id, rfirst[..., :S].contiguous(), rlo[..., :S].contiguous(), ns, nr, nv


def vs_runs(o, v_idx, *, block_m: int, block_n: int = 64):
    """``vs_runs_reference`` in one launch (it was ~30 small torch kernels, ~4 us of device time each)."""
    B, H, S = o.shape
    V = v_idx.shape[-1]
    dev = o.device
    o = o.to(torch.int32).contiguous()
    v_idx = v_idx.to(torch.int32).contiguous()
    run_id = torch.empty(B, H, S, dtype=torch.int32, device=dev)
    rfirst, rlo = torch.empty_like(run_id), torch.empty_like(run_id)
    ns, nr, nv = (torch.empty(B, H, dtype=torch.int32, device=dev) for _ in range(3))
    _vs_runs_kernel[(B * H,)](o, v_idx, run_id, rfirst, rlo, ns, nr, nv, S, V, block_m + block_n,
                              BLOCK=1024, num_warps=4)
    return run_id, rfirst, rlo, ns, nr, nv


def _log2_ceil(x: int) -> int:
    return max(1, math.ceil(math.log2(x + 1)))


def build_vs_index(v_idx, s_off, n_sink, *, seq_len, block_m, block_n=64, cap_s, cap_v, sink_start=None):
    """Launcher; inputs are validated by mif_compile.kernels.api. Returns the SparseIndex fields."""
    B, H, S = s_off.shape
    V = v_idx.shape[-1]
    dev = s_off.device
    NM = math.ceil(seq_len / block_m)
    # prologue on [B, H, S]: offsets sorted descending and cut into runs; verticals ascending, INT32_MAX
    # for unused
    o = s_off.to(torch.int32).sort(dim=-1, descending=True).values.contiguous()
    from .fallback import run

    run_id, rfirst, rlo, ns, nr, nv = run("_vs_runs_kernel", (), vs_runs, vs_runs_reference, o, v_idx,
                                          block_m=block_m, block_n=block_n)
    vs = torch.where(v_idx >= 0, v_idx.to(torch.int32), _INT32_MAX).sort(dim=-1).values.contiguous()
    nsink = torch.as_tensor(n_sink, device=dev).to(torch.int32).expand(H).contiguous()
    sink0 = (torch.zeros(B, dtype=torch.int32, device=dev) if sink_start is None
             else sink_start.to(device=dev, dtype=torch.int32).expand(B).contiguous())

    bc = torch.empty(B, H, NM, dtype=torch.int32, device=dev)
    cc = torch.empty_like(bc)
    bo = torch.empty(B, H, NM, cap_s, dtype=torch.int32, device=dev)
    ci = torch.empty(B, H, NM, cap_v, dtype=torch.int32, device=dev)
    _vs_index_kernel[(NM, B * H)](
        o, run_id, rfirst, rlo, ns, nr, vs, nv, nsink, sink0,
        bc, bo, cc, ci,
        # caps and their log2 are run-time values, so a new prompt length does not compile the kernel again
        seq_len, H, NM, S, max(V, 1), cap_s, cap_v, _log2_ceil(S), _log2_ceil(cap_s),
        BLOCK_M=block_m, BLOCK_N=block_n, EMIT=64, VT=256,
        num_warps=4,
    )
    return bc, bo, cc, ci
