"""Naive, loop-based oracles written straight from docs/kernel-contract.md (small shapes only)."""

from __future__ import annotations

import math

import torch


def naive_vs_rows(v_idx, s_off, n_sink, *, seq_len, block_m, block_n=64, sink_start=None):
    """For each (b, h, m): (list of block starts, list of columns), by the contract's words."""
    B, H, _ = s_off.shape
    NM = math.ceil(seq_len / block_m)
    out = {}
    for b in range(B):
        for h in range(H):
            offs = [int(o) for o in s_off[b, h] if o >= 0]
            verts = sorted({int(c) for c in v_idx[b, h] if c >= 0})
            sink = int(n_sink[h])
            s0 = 0 if sink_start is None else int(sink_start[b if sink_start.numel() > 1 else 0])
            floor = s0 if sink > 0 else 0  # a head with a sink starts at the row's first real key
            for m in range(NM):
                m0 = m * block_m
                wins = []
                for o in offs:
                    a, e = max(m0 - o, floor), m0 + block_m - o
                    if e > a:
                        wins.append((a, e))
                if sink > 0:
                    wins.append((s0, s0 + sink))
                wins.sort()
                runs = []
                for a, e in wins:
                    if runs and a < runs[-1][1] + block_n:
                        runs[-1][1] = max(runs[-1][1], e)
                    else:
                        runs.append([a, e])
                blocks = []
                for a, e in runs:
                    s = a
                    while s < min(e, m0 + block_m, seq_len):
                        blocks.append(s)
                        s += block_n
                cols = [c for c in verts if c < m0 and not any(s <= c < s + block_n for s in blocks)]
                out[b, h, m] = (blocks, cols)
    return out


def naive_scores(q, k, *, last_q, scale, key_padding=None, probe_end=None):
    """(col, diag) float64 by explicit loops over rows (the ``last_q`` before ``probe_end[b]``, else N)."""
    B, H, N, _ = q.shape
    g = H // k.shape[1]
    ql = min(last_q, N)
    col = torch.zeros(B, H, N, dtype=torch.float64)
    diag = torch.zeros(B, H, N, dtype=torch.float64)
    for b in range(B):
        end = N if probe_end is None else int(probe_end[b])
        for h in range(H):
            for row in range(max(end - ql, 0), end):
                s = (k[b, h // g].double() @ q[b, h, row].double()) * scale
                ok = torch.arange(N) <= row
                if key_padding is not None:
                    ok &= key_padding[b]
                if not ok.any():
                    continue
                p = torch.softmax(s.masked_fill(~ok, float("-inf")), 0)
                col[b, h] += p
                for o in range(row + 1):
                    diag[b, h, o] += p[row - o]
    return col, diag


def snapkv_reference(q, k, *, keep, window, pool, scale, key_padding=None):
    """SnapKV's kept positions, dense in float64, a loop over (row, kv head): int64 [B, Hkv, keep].

    The window's queries (the last ``window`` rows) against every key, causal and padding-masked,
    softmax over the keys, summed over the window's rows and the GQA group's query heads; the
    prefix's votes max-pooled (kernel ``pool``, centred, edges padded with -inf); a left-padded
    row's pads first, then its top votes (ties: earlier position), then the window.
    """
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.empty(B, Hkv, keep, dtype=torch.int64)
    rows = torch.arange(N - window, N)
    for b in range(B):
        real = torch.ones(N, dtype=torch.bool) if key_padding is None else key_padding[b].bool()
        for j in range(Hkv):
            votes = torch.zeros(N, dtype=torch.float64)
            for h in range(j * G, (j + 1) * G):
                s = (q[b, h, N - window:].double() @ k[b, j].double().T) * scale  # [window, N]
                ok = (torch.arange(N)[None, :] <= rows[:, None]) & real[None, :]
                p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
                votes += p.sum(0)
            prefix = N - window
            pooled = torch.tensor([max(votes[max(0, i - pool // 2): i + pool // 2 + 1][: prefix - max(0, i - pool // 2)])
                                   for i in range(prefix)], dtype=torch.float64)
            pads = [i for i in range(prefix) if not real[i]]
            cand = sorted((i for i in range(prefix) if real[i]), key=lambda i: (-float(pooled[i]), i))
            chosen = sorted(pads + cand[: keep - window - len(pads)])
            out[b, j] = torch.tensor(chosen + list(range(prefix, N)))
    return out
