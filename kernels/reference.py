"""Pure-PyTorch twins of the sparse-attention kernels: the test oracle and the CPU path.

Every function here follows docs/kernel-contract.md literally and favours clarity over speed:
the index builders are vectorised over (batch, head, query block) but allocate tensors of
size O(B * H * NM * windows); sparse attention gathers the kept keys of a chunk of query blocks
at a time. Math runs in float32 (float64 for float64 inputs), so calling these on `.double()`
inputs gives the float64 reference of the tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BLOCK_N = 64
_BIG = 1 << 30
_STEP_ELEMS = 1 << 22  # elements of the largest temporary per step (scores, probabilities): bounded memory


class SparseIndex(NamedTuple):
    """The unified sparse index; NM = ceil(N / BLOCK_M)."""

    block_count: torch.Tensor  # [B, H, NM] int32
    block_offset: torch.Tensor  # [B, H, NM, CAP_S] int32, starts of BLOCK_N-wide key runs
    column_count: torch.Tensor  # [B, H, NM] int32
    column_index: torch.Tensor  # [B, H, NM, CAP_V] int32, single key columns


def budget_max(counts, given: int | None, name: str) -> int:
    """The largest per-head budget as a Python int (top-k needs k on the host).

    ``given`` (the caller knows it: the op derives budgets from its static plan) costs nothing;
    otherwise ints, sequences and CPU tensors are read directly. A CUDA tensor without ``given`` is
    refused: reading it would synchronise the device.
    """
    if given is not None:
        return int(given)
    if not torch.is_tensor(counts):
        return int(max(counts)) if hasattr(counts, "__len__") else int(counts)
    if counts.is_cuda:
        raise ValueError(f"pass {name}= with CUDA budget tensors: reading their max would synchronise the device")
    return int(counts.max()) if counts.numel() else 0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    # k: [B, Hkv, N, D] -> [B, H, N, D]; query head h reads kv head h // (H // Hkv)
    groups = num_heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1) if groups > 1 else k


# ---------------------------------------------------------------------------------------------
# 1. vertical-slash estimation


def vertical_slash_scores(q, k, *, last_q: int, scale: float, key_padding=None, probe_end=None):
    """col[b, h, j] and diag[b, h, o] (fp32 [B, H, N]) from the softmax of the last queries: the
    ``last_q`` rows before ``probe_end[b]`` (int [B], each row's last real query + 1; None: N).

    Heads go a few at a time, so at most about ``_STEP_ELEMS`` probabilities are held.
    """
    B, H, N, _ = q.shape
    ql = min(last_q, N)
    cd = _compute_dtype(q)
    end = (torch.full((B,), N, device=q.device, dtype=torch.int64) if probe_end is None
           else probe_end.to(q.device, torch.int64).expand(B))
    rows = end[:, None] - ql + torch.arange(ql, device=q.device)  # [B, ql]; < 0 for a row shorter than ql
    keys = torch.arange(N, device=q.device)
    valid = (keys[None, None, :] <= rows[:, :, None])[:, None]  # [B, 1, ql, N]
    if key_padding is not None:
        valid = valid & key_padding[:, None, None, :].bool()
    idx = rows[:, None, :, None] - keys  # [B, 1, ql, N]: key of offset o for row r
    ok = idx >= 0
    idx = idx.clamp(min=0)
    q_rows = q.gather(2, rows.clamp(min=0)[:, None, :, None].expand(B, H, ql, q.shape[-1]))  # [B, H, ql, D]
    groups = H // k.shape[1]
    step = max(1, _STEP_ELEMS // (B * ql * N))
    col = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    diag = torch.empty_like(col)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        heads = torch.arange(h0, h1, device=q.device) // groups
        kx = k[:, heads].to(cd)
        s = torch.einsum("bhrd,bhnd->bhrn", q_rows[:, h0:h1].to(cd), kx) * scale  # [B, h, ql, N]
        s = s.masked_fill(~valid, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no valid key contributes 0
        col[:, h0:h1] = p.sum(dim=2)
        # diag[o] = sum_r p[r, row_r - o]
        g = torch.gather(p, 3, idx.expand(B, h1 - h0, ql, N)) * ok
        diag[:, h0:h1] = g.sum(dim=2)
    return col, diag


def vertical_slash_topk(col, diag, v_count, s_count, *, n_force_v: int = 30, n_force_s: int = 100,
                        v_max: int | None = None, s_max: int | None = None, sink_start=None):
    """Per-head top-v columns and top-s diagonal offsets; int32 [B, H, Vmax] / [B, H, Smax], -1 unused.

    Pure torch, shared by both implementations. Forced entries get +inf before one topk with
    k = max budget; entries of head h at positions >= its count become -1. No host sync except
    the Python ints k (taken from the budgets, which live wherever the caller keeps them).
    The forced columns are the first ``n_force_v`` real keys, from ``sink_start`` [B] (left padding).
    """
    N = col.shape[-1]
    vmax = min(N, budget_max(v_count, v_max, "v_max"))
    smax = min(N, budget_max(s_count, s_max, "s_max"))
    v_count = torch.as_tensor(v_count).to(col.device, torch.int64, non_blocking=True)
    s_count = torch.as_tensor(s_count).to(col.device, torch.int64, non_blocking=True)
    return (
        _topk_forced(col, v_count, vmax, n_force_v, sink_start),
        _topk_forced(diag, s_count, smax, n_force_s),
    )


def force_first(score, n_force: int, start=None):
    """``score`` with +inf at the first ``n_force`` positions of each row, from ``start`` [B] where
    given (a left-padded row's first real key)."""
    if start is None:
        score = score.clone()
        score[..., :n_force] = float("inf")
        return score
    j = torch.arange(score.shape[-1], device=score.device)
    s0 = start.to(score.device, torch.int64).view(-1, 1, 1)
    return torch.where((j >= s0) & (j < s0 + n_force), float("inf"), score)


def _topk_forced(score, count, kmax: int, n_force: int, start=None):
    score = force_first(score, n_force, start)
    idx = torch.topk(score, kmax, dim=-1, sorted=True).indices.to(torch.int32)  # [B, H, kmax]
    slot = torch.arange(kmax, device=score.device)
    keep = slot[None, None, :] < count[None, :, None]
    return torch.where(keep, idx, torch.full_like(idx, -1))


# ---------------------------------------------------------------------------------------------
# 2. block-sparse estimation


def _pool(x, key_padding, n_blocks: int):
    # x: [B, H, N, D] -> block means [B, H, NB, D] (fp32) and a [B, NB] "has a real token" flag
    B, H, N, D = x.shape
    pad = n_blocks * BLOCK_N - N
    w = torch.ones(B, N, device=x.device, dtype=torch.float32)
    if key_padding is not None:
        w = key_padding.float()
    xs = torch.nn.functional.pad(x.float() * w[:, None, :, None], (0, 0, 0, pad))
    ws = torch.nn.functional.pad(w, (0, pad)).view(B, n_blocks, BLOCK_N).sum(-1)  # [B, NB]
    sums = xs.view(B, H, n_blocks, BLOCK_N, D).sum(3)
    return sums / ws.clamp(min=1)[:, None, :, None], ws > 0


def block_sparse_topk(q, k, top_k, *, key_padding=None, k_max: int | None = None, chunk: int | None = None):
    """Top-k key blocks (64 tokens) per 64-query block; int32 [B, H, NB, Kmax], -1 unused."""
    B, H, N, _ = q.shape
    NB = math.ceil(N / BLOCK_N)
    kmax = min(NB, budget_max(top_k, k_max, "k_max"))
    top_k = torch.as_tensor(top_k).to(q.device, torch.int64, non_blocking=True)
    qp, _ = _pool(q, key_padding, NB)  # [B, H, NB, D]
    kp, kreal = _pool(_expand_kv(k, H), key_padding, NB)
    out = torch.empty(B, H, NB, kmax, dtype=torch.int32, device=q.device)
    kb = torch.arange(NB, device=q.device)
    # the sink block is the one that holds the row's first real key (block 0 without left padding)
    sink_blk = (torch.zeros(B, 1, 1, 1, dtype=torch.int64, device=q.device) if key_padding is None
                else (key_padding.to(torch.int8).argmax(-1) // BLOCK_N).view(B, 1, 1, 1))
    chunk = chunk or max(1, _STEP_ELEMS // (B * H * NB))
    for c0 in range(0, NB, chunk):  # bounded memory: [B, H, chunk, NB]
        qb = torch.arange(c0, min(c0 + chunk, NB), device=q.device)
        s = qp[:, :, qb] @ kp.transpose(-1, -2)
        s = s.masked_fill(~kreal[:, None, None, :], float("-inf"))
        s = s.masked_fill(kb[None, :] > qb[:, None], float("-inf"))
        forced = ((kb == sink_blk) & (kb[None, :] <= qb[:, None])) | (kb[None, :] == qb[:, None])  # [B, 1, c, NB]
        s = s.masked_fill(forced, float("inf"))
        val, idx = torch.topk(s, kmax, dim=-1)
        idx = idx.to(torch.int32)
        n_ok = torch.minimum(top_k[None, :, None], qb[None, None, :] + 1)  # [1, H, c]
        # a pick at -inf is a block of pads or a future block (a row with fewer real causal blocks than
        # its budget, e.g. under left padding): never kept, so the index stays causal
        ok = (torch.arange(kmax, device=q.device)[None, None, None, :] < n_ok[..., None]) & (val > float("-inf"))
        out[:, :, qb] = torch.where(ok, idx, torch.full_like(idx, -1))
    return out


# ---------------------------------------------------------------------------------------------
# 3. index building


def _emit_runs(start, end, valid, m0, *, seq_len, block_m, block_n, cap_s):
    """Merge windows (sorted by start) into runs and emit BLOCK_N-wide blocks.

    start/end/valid: [..., W] with W windows per row, m0: [NM]. Returns counts [...] and
    offsets [..., cap_s], plus the run starts/covered ends used for column filtering.
    """
    start = torch.where(valid, start, torch.full_like(start, _BIG))
    end = torch.where(valid, end, torch.full_like(end, -_BIG))
    start, order = start.sort(dim=-1, stable=True)
    end = end.gather(-1, order)
    valid = valid.gather(-1, order)
    run_max = end.cummax(dim=-1).values
    prev = torch.cat([torch.full_like(run_max[..., :1], -_BIG), run_max[..., :-1]], dim=-1)
    new_run = valid & (start >= prev + block_n)
    run_id = new_run.cumsum(-1) - 1  # [..., W]
    W = start.shape[-1]
    # run starts: first start of each run; run ends: max end over its windows
    rid = torch.where(valid, run_id, torch.full_like(run_id, W))
    r_start = torch.full(start.shape[:-1] + (W + 1,), _BIG, dtype=start.dtype, device=start.device)
    r_start.scatter_reduce_(-1, rid, start, reduce="amin")
    r_end = torch.full_like(r_start, -_BIG)
    r_end.scatter_reduce_(-1, rid, end, reduce="amax")
    r_start, r_end = r_start[..., :W], r_end[..., :W]
    limit = torch.clamp(m0 + block_m, max=seq_len)[:, None]  # [NM, 1]
    stop = torch.minimum(r_end, limit)
    n_blk = torch.where(r_start < stop, (stop - r_start + block_n - 1) // block_n, 0)
    cum = n_blk.cumsum(-1)
    count = cum[..., -1].clamp(max=cap_s)
    slot = torch.arange(cap_s, device=start.device)
    run_of_slot = torch.searchsorted(cum.contiguous(), slot.expand(cum.shape[:-1] + (cap_s,)).contiguous(), right=True)
    run_of_slot = run_of_slot.clamp(max=W - 1)
    before = torch.where(run_of_slot > 0, cum.gather(-1, (run_of_slot - 1).clamp(min=0)), 0)
    offs = r_start.gather(-1, run_of_slot) + (slot - before) * block_n
    offs = torch.where(slot < count[..., None], offs, -1)
    covered_end = torch.where(n_blk > 0, r_start + n_blk * block_n, -_BIG)
    return count, offs, r_start, covered_end


def _columns(v_idx, m0, r_start, covered_end, *, cap_v):
    """Keep sorted, distinct verticals c < m0 that no block of the row covers."""
    B, H = v_idx.shape[:2]
    NM = m0.shape[0]
    v = torch.where(v_idx >= 0, v_idx.long(), _BIG).sort(dim=-1).values  # [B, H, V]
    dup = torch.cat([torch.zeros_like(v[..., :1], dtype=torch.bool), v[..., 1:] == v[..., :-1]], -1)
    v = v[:, :, None, :].expand(B, H, NM, v.shape[-1])
    ok = (v < m0[:, None]) & ~dup[:, :, None, :]
    if r_start.shape[-1] > 0:
        rs = torch.where(covered_end > -_BIG, r_start, _BIG).sort(dim=-1)
        ce = covered_end.gather(-1, rs.indices)
        r = torch.searchsorted(rs.values.contiguous(), v.contiguous(), right=True) - 1
        inside = (r >= 0) & (v < ce.gather(-1, r.clamp(min=0)))
        ok &= ~inside
    pos = ok.long().cumsum(-1) - 1
    count = ok.sum(-1).clamp(max=cap_v)
    out = torch.full((B, H, NM, cap_v + 1), -1, dtype=torch.int64, device=v.device)
    out.scatter_(-1, torch.where(ok & (pos < cap_v), pos, cap_v), v)
    out = torch.where(out >= _BIG, -1, out)[..., :cap_v]
    return count.to(torch.int32), out.to(torch.int32)


def build_vs_index(v_idx, s_off, n_sink, *, seq_len: int, block_m: int, block_n: int = BLOCK_N, cap_s: int, cap_v: int,
                   sink_start=None):
    """Unified index for vertical_slash / a_shape / dense heads (see the contract, section 3).

    ``sink_start`` [B] (optional): each row's first real key (left padding); the sink of a row is
    ``[sink_start, sink_start + n_sink)``, and a head with a sink clips its windows there (the keys
    before it are pads)."""
    B, H, S = s_off.shape
    dev = s_off.device
    NM = math.ceil(seq_len / block_m)
    m0 = torch.arange(NM, device=dev, dtype=torch.int64) * block_m  # [NM]
    o = s_off.long()[:, :, None, :]  # [B, H, 1, S]
    sink = torch.as_tensor(n_sink, device=dev, dtype=torch.int64).expand(H)[None, :, None, None]
    s0 = (torch.zeros(B, dtype=torch.int64, device=dev) if sink_start is None
          else sink_start.to(device=dev, dtype=torch.int64).expand(B))[:, None, None, None]  # [B, 1, 1, 1]
    floor = torch.where(sink > 0, s0, 0)  # [B, H, 1, 1]
    s_start = torch.maximum(m0[:, None] - o, floor)
    s_end = m0[:, None] + block_m - o
    s_valid = (o >= 0) & (s_end > s_start)
    k_start = s0.expand(B, H, NM, 1)
    k_end = (s0 + sink).expand(B, H, NM, 1)
    start = torch.cat([k_start, s_start.expand(B, H, NM, S)], -1)
    end = torch.cat([k_end, s_end.expand(B, H, NM, S)], -1)
    valid = torch.cat([sink.expand(B, H, NM, 1) > 0, s_valid.expand(B, H, NM, S)], -1)
    count, offs, r_start, covered_end = _emit_runs(
        start, end, valid, m0, seq_len=seq_len, block_m=block_m, block_n=block_n, cap_s=cap_s
    )
    c_count, c_idx = _columns(v_idx, m0, r_start, covered_end, cap_v=cap_v)
    return SparseIndex(count.to(torch.int32), offs.to(torch.int32), c_count, c_idx)


def build_bs_index(blk, *, seq_len: int, block_m: int, block_n: int = BLOCK_N, cap_s: int):
    """Unified index from 64-token key blocks: union over the 64-row sub-blocks, ascending."""
    B, H, NB, K = blk.shape
    dev = blk.device
    NM = math.ceil(seq_len / block_m)
    sub = block_m // BLOCK_N
    pad = NM * sub - NB
    b = torch.nn.functional.pad(blk.long(), (0, 0, 0, pad), value=-1).view(B, H, NM, sub * K)
    b = torch.where(b >= 0, b, _BIG).sort(dim=-1).values
    dup = torch.cat([torch.zeros_like(b[..., :1], dtype=torch.bool), b[..., 1:] == b[..., :-1]], -1)
    ok = (b < _BIG) & ~dup
    pos = ok.long().cumsum(-1) - 1
    count = ok.sum(-1).clamp(max=cap_s)
    out = torch.full((B, H, NM, cap_s + 1), -1, dtype=torch.int64, device=dev)
    out.scatter_(-1, torch.where(ok & (pos < cap_s), pos, cap_s), b * BLOCK_N)
    zeros = torch.zeros(B, H, NM, dtype=torch.int32, device=dev)
    cols = torch.full((B, H, NM, 1), -1, dtype=torch.int32, device=dev)
    return SparseIndex(count.to(torch.int32), out[..., :cap_s].to(torch.int32), zeros, cols)


# ---------------------------------------------------------------------------------------------
# 4. sparse attention


def _kept_keys(index: SparseIndex, ms: torch.Tensor, seq_len: int, block_n: int):
    """Key positions [B, H, len(ms), P] and their validity for the query blocks ms."""
    bc, bo, cc, ci = (t[:, :, ms].long() for t in index)
    cap_s, cap_v = bo.shape[-1], ci.shape[-1]
    j = torch.arange(block_n, device=bo.device)
    bpos = (bo[..., None] + j).flatten(-2)  # [B, H, mc, cap_s * BLOCK_N]
    bok = (torch.arange(cap_s, device=bo.device)[:, None] < bc[..., None, None]).expand(
        *bc.shape, cap_s, block_n
    ).flatten(-2)
    cok = torch.arange(cap_v, device=bo.device) < cc[..., None]
    pos = torch.cat([bpos, ci], -1)
    ok = torch.cat([bok, cok], -1) & (pos >= 0) & (pos < seq_len)
    return pos.clamp(0, seq_len - 1), ok


def sparse_attention(q, k, v, index: SparseIndex, *, scale: float, block_m: int, block_n: int = BLOCK_N,
                     key_padding=None):
    """out[b, h, i] = softmax over K(i) of scale * q_i . k_j, times v; empty rows give 0.

    q, k: [B, H(kv), N, D]; v: [B, Hkv, N, Dv] -> out [B, H, N, Dv]. NaN/inf propagate as in dense
    attention: a NaN in q_i or in a key of K(i) makes row i NaN; keys outside K(i) never reach it.
    """
    NM = math.ceil(q.shape[2] / block_m)
    return sparse_attention_blocks(q, k, v, index, 0, NM, scale=scale, block_m=block_m, block_n=block_n,
                                   key_padding=key_padding)


def sparse_attention_blocks(q, k, v, index: SparseIndex, m_lo: int, m_hi: int, *, scale: float, block_m: int,
                            block_n: int = BLOCK_N, key_padding=None):
    """Rows [m_lo * BLOCK_M, min(m_hi * BLOCK_M, N)) of :func:`sparse_attention` (differentiable in q, k, v).

    ``q`` holds all N rows or only those rows. Memory: the scores of at most ``_STEP_ELEMS`` (query,
    slot) pairs at a time, whatever the index's capacity: the kept keys of a chunk of query blocks are
    visited a slice of slots at a time with an online softmax (max, sum, weighted values in fp32).
    """
    B, H, N = q.shape[0], q.shape[1], k.shape[2]
    D, Dv = q.shape[-1], v.shape[-1]
    cd = _compute_dtype(q)
    r_lo, r_hi = m_lo * block_m, min(m_hi * block_m, N)
    if q.shape[2] == N and (r_lo, r_hi) != (0, N):
        q = q[:, :, r_lo:r_hi]
    kx, vx = _expand_kv(k, H).to(cd), _expand_kv(v, H).to(cd)
    n_rows = (m_hi - m_lo) * block_m
    qpad = torch.nn.functional.pad(q.to(cd), (0, 0, 0, n_rows - (r_hi - r_lo))).view(B, H, m_hi - m_lo, block_m, D)
    cap = index.block_offset.shape[-1] * block_n + index.column_index.shape[-1]
    per_block = B * H * block_m
    n_slot = max(1, min(cap, _STEP_ELEMS // per_block))
    per = max(1, min(m_hi - m_lo, _STEP_ELEMS // (per_block * n_slot)))
    kp_all = key_padding.bool()[:, None, :].expand(B, H, N) if key_padding is not None else None
    # written in place (not a list of chunk results to concatenate): small live results between the
    # freed step temporaries fragment glibc's heap, which then grows by ~1 GB at 32K tokens
    out = torch.empty(B, H, m_hi - m_lo, block_m, Dv, dtype=cd, device=q.device)
    for c0 in range(m_lo, m_hi, per):  # chunks of query blocks, all heads at once
        ms = torch.arange(c0, min(c0 + per, m_hi), device=q.device)
        mc = ms.shape[0]
        pos, ok = _kept_keys(index, ms, N, block_n)  # [B, H, mc, P]
        qb = qpad[:, :, c0 - m_lo : c0 - m_lo + mc]  # [B, H, mc, BM, D]
        rows = ms[:, None] * block_m + torch.arange(block_m, device=q.device)  # [mc, BM]
        m_i = torch.full((B, H, mc, block_m), float("-inf"), dtype=cd, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(B, H, mc, block_m, Dv, dtype=cd, device=q.device)
        for p0 in range(0, pos.shape[-1], n_slot):
            ps, oks = pos[..., p0 : p0 + n_slot], ok[..., p0 : p0 + n_slot]
            P = ps.shape[-1]
            flat = ps.reshape(B, H, mc * P, 1)
            kg = torch.gather(kx, 2, flat.expand(-1, -1, -1, D)).view(B, H, mc, P, D)
            vg = torch.gather(vx, 2, flat.expand(-1, -1, -1, Dv)).view(B, H, mc, P, Dv)
            s = torch.einsum("bhmrd,bhmpd->bhmrp", qb, kg) * scale
            mask = oks[:, :, :, None, :] & (ps[:, :, :, None, :] <= rows[None, None, :, :, None])
            if kp_all is not None:
                mask = mask & torch.gather(kp_all, 2, flat[..., 0]).view(B, H, mc, 1, P)
            # duplicated key positions (never produced by the builders) would count twice: like the kernel
            s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))  # NaN scores make the row max NaN: the row stays NaN
            m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m_i - m_use)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("bhmrp,bhmpd->bhmrd", p, vg)
            m_i = m_new
        out[:, :, c0 - m_lo : c0 - m_lo + mc] = acc / torch.where(l_i == 0, 1.0, l_i)[..., None]  # no key: 0
    out = out.view(B, H, n_rows, Dv)[:, :, : r_hi - r_lo]
    return out.to(q.dtype).contiguous()


def index_to_dense_mask(index: SparseIndex, seq_len: int, block_m: int, block_n: int = BLOCK_N):
    """bool [B, H, N, N]: key j kept for query i (causal applied). Tests only: O(N^2)."""
    B, H, NM = index.block_count.shape
    ms = torch.arange(NM, device=index.block_count.device)
    pos, ok = _kept_keys(index, ms, seq_len, block_n)  # [B, H, NM, P]
    hits = torch.zeros(B, H, NM, seq_len, dtype=torch.int32, device=pos.device)
    hits.scatter_add_(-1, pos, ok.int())
    rows = (hits > 0).repeat_interleave(block_m, dim=2)[:, :, :seq_len]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=pos.device).tril()
    return rows & causal


def count_kept_pairs(index: SparseIndex, seq_len: int, block_m: int, block_n: int = BLOCK_N) -> torch.Tensor:
    """Number of (query, key) pairs the kernel computes, per (b, h): int64 [B, H].

    Closed form per block, O(B * H * NM * CAP_S) memory; used to count FLOPs honestly
    (4 * D * pairs). Assumes every key is real (no padding).
    """
    bc, bo, cc, ci = (t.long() for t in index)
    NM = bc.shape[-1]
    m0 = torch.arange(NM, device=bo.device) * block_m
    r1 = torch.clamp(m0 + block_m, max=seq_len)[:, None]  # [NM, 1]
    m0 = m0[:, None]
    w = torch.clamp(torch.clamp(bo + block_n, max=seq_len) - bo, min=0)

    def ramp(x):  # sum over rows i < x of clamp(i + 1 - start, 0, w)
        t = torch.clamp(x - bo, min=0)
        t = torch.minimum(t, w)
        return t * (t + 1) // 2 + torch.clamp(x - bo - w, min=0) * w

    per_block = ramp(r1) - ramp(m0)
    valid = torch.arange(bo.shape[-1], device=bo.device) < bc[..., None]
    pairs = torch.where(valid, per_block, 0).sum((-1, -2))
    pairs = pairs + (cc * (r1[:, 0] - m0[:, 0])).sum(-1)
    return pairs
