"""Recall and cost of candidates against brute force (the N x N softmax and the dense mask of the
index), the candidates' indexes against the op's own, and the choice rules."""

from __future__ import annotations

import pytest
import torch

import mif_compile.kernels as K
from mif_compile import HeadPattern as HP
from mif_compile import ops, search as S
from mif_compile.search import SearchSettings, candidate_index, choose, sample_rows, score_layer

CANDS = (HP.a_shape(30, 70), HP.vertical_slash(40, 120), HP.vertical_slash(3, 60), HP.block_sparse(2),
         HP.block_sparse(3), HP.dense())


def _qk(n, h=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, n, d, generator=g) * 2
    k = torch.randn(1, hkv, n, d, generator=g)
    k[:, :, 5] += 3 * q[:, ::2].mean(2)  # a vertical that everyone likes
    return q, k


@pytest.mark.parametrize("n, block_m", [(300, 64), (257, 128), (64, 64)])
def test_recall_and_cost_match_brute_force(monkeypatch, n, block_m):
    monkeypatch.setattr(S, "_CHUNK_ELEMS", 4 * n * 7)  # several row chunks
    q, k = _qk(n)
    scale = 0.25
    st = SearchSettings(candidates=CANDS, n_last=20, n_spread=30, min_row=10, block_m=block_m, cost="pairs")
    got = score_layer(q, k, None, scale, st)

    kx = k.repeat_interleave(2, dim=1)
    s = (q @ kx.transpose(-1, -2)) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)[0]  # [H, N, N]
    rows = sample_rows(n, 20, 30, 10)
    assert rows.min() >= min(10, n - 1) and rows.max() == n - 1 and rows.numel() == rows.unique().numel()
    for c, cand in enumerate(CANDS):
        index = candidate_index(q, k, cand, scale=scale, block_m=block_m)
        mask = torch.ones(1, 4, n, n, dtype=torch.bool) if index is None else K.index_to_dense_mask(index, n, block_m)
        mask = mask[0] & causal
        want = (p * mask)[:, rows].sum(-1).mean(-1)
        recall = torch.tensor([got.recall[h][c] for h in range(4)], dtype=torch.float32)
        torch.testing.assert_close(recall, want, atol=1e-5, rtol=0)
        est = S._estimation_pairs(cand, n, st.last_q)
        cost = torch.tensor([got.cost[h][c] for h in range(4)], dtype=torch.float64)
        want_cost = (mask.sum((-1, -2)).double() + est) / (n * (n + 1) / 2)
        torch.testing.assert_close(cost, want_cost, atol=1e-9, rtol=0)
    # not vacuous: past one block some candidates lose mass; dense never does
    assert all(abs(row[-1] - 1) < 1e-6 for row in got.recall)
    if n > 128:
        assert min(r for row in got.recall for r in row) < 0.9


@pytest.mark.parametrize("cand", CANDS[:-1], ids=lambda c: c.describe())
@pytest.mark.parametrize("block_m", [64, 128])
def test_candidate_index_is_the_ops_index(monkeypatch, cand, block_m):
    """The search scores what the op would run: its index for a uniform plan of the candidate."""
    n, h = 333, 4
    q, k = _qk(n, h)
    v = torch.randn_like(k)
    seen = {}

    def record(q, k, v, index, **kw):
        seen["index"] = index
        return torch.zeros_like(q)

    monkeypatch.setattr(K, "sparse_attention", record)
    codes, b0, b1 = ops.encode_heads([cand] * h)
    ops.run_layer(q, k, v, None, 0.25, codes, b0, b1, 0, 64, block_m, "reference", 1.0)
    ours = candidate_index(q, k, cand, scale=0.25, block_m=block_m)
    assert torch.equal(K.index_to_dense_mask(seen["index"], n, block_m), K.index_to_dense_mask(ours, n, block_m))


def test_choose_rules():
    recall = [0.99, 0.96, 0.90, 0.97]
    cost = [0.50, 0.20, 0.05, 0.20]
    st = SearchSettings(candidates=CANDS[:4])
    assert choose(recall, cost, st) == 3  # cheapest reaching 0.95; tie in cost -> higher recall
    assert choose(recall, cost, SearchSettings(candidates=CANDS[:4], target=0.995)) == 0  # none reaches: best recall
    assert choose(recall, cost, SearchSettings(candidates=CANDS[:4], rule="budget", max_cost=0.25)) == 3
    assert choose(recall, cost, SearchSettings(candidates=CANDS[:4], rule="budget", max_cost=0.01)) == 2  # none fits: cheapest
    assert choose(recall, cost, SearchSettings(candidates=CANDS[:4], rule="tradeoff", lam=1.0)) == 2  # 0.85 best
    assert choose(recall, cost, SearchSettings(candidates=CANDS[:4], rule="tradeoff", lam=0.1)) == 3


def test_settings_and_candidate_parsing_errors():
    assert S.parse_candidates(["a_shape:64,256 vertical_slash:1000,6096", "block_sparse:8;dense"]) == (
        HP.a_shape(64, 256), HP.vertical_slash(1000, 6096), HP.block_sparse(8), HP.dense())
    assert S.parse_candidates(["block_sparse"]) == (HP.block_sparse(100),)
    with pytest.raises(ValueError, match=r"candidate 'vertical_slash:10,x'"):
        S.parse_candidates(["vertical_slash:10,x"])
    with pytest.raises(ValueError, match=r"candidate 'vertical_slash:10'.*takes 2 budget"):
        S.parse_candidates(["vertical_slash:10"])
    with pytest.raises(ValueError, match="unknown pattern 'sliding'"):
        S.parse_candidates(["sliding:4"])
    with pytest.raises(ValueError, match="duplicate"):
        SearchSettings(candidates=(HP.dense(), HP.dense()))
    with pytest.raises(ValueError, match="target recall"):
        SearchSettings(target=1.5)


def test_kernel_aware_cost_splits_measured_time_by_kept_pairs():
    """cost "time": the candidate's measured time (all heads) over dense's, shared by kept pairs."""
    q, k = _qk(300)
    v = torch.randn_like(k)
    times = iter([10.0, 3.0, 6.0, 2.0, 4.0, 5.0])  # dense first, then the sparse candidates in order
    ran = []

    def bench(fn):
        out = fn()  # the timed function really runs the op's path
        ran.append(out.shape if out is not None else None)
        return next(times)

    st = SearchSettings(candidates=CANDS, cost="time", n_last=16, n_spread=16)
    got = score_layer(q, k, v, 0.25, st, bench=bench)
    assert got.cost_kind == "time" and len(ran) == 6 and ran[1] == q.shape
    cost = torch.tensor(got.cost, dtype=torch.float64)
    torch.testing.assert_close(cost.mean(0), torch.tensor([0.3, 0.6, 0.2, 0.4, 0.5, 1.0], dtype=torch.float64))
    for c, cand in enumerate(CANDS[:-1]):  # per head: in proportion to its kept pairs
        pairs = K.count_kept_pairs(candidate_index(q, k, cand, scale=0.25), 300, 64)[0].double()
        torch.testing.assert_close(cost[:, c] / cost[:, c].sum(), pairs / pairs.sum())
