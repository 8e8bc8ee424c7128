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


MASS_CANDS = (HP.vertical_slash(40, 600, mass=0.9), HP.vertical_slash(3, 300, mass=0.99),
              HP.vertical_slash(40, 120, mass=1.0))


@pytest.mark.parametrize("block_m", [64, 128])
def test_mass_candidates_recall_cost_and_index_are_the_ops(monkeypatch, block_m):
    """An adaptive candidate is scored on the index the op builds with its mass target (the brute-force
    recall and pair count of that index), and differs from the same caps as fixed budgets."""
    n = 700
    from tests.backend.test_adaptive import structured_qk

    q, k, v = structured_qk(1, 4, 2, n, 16, slash=300, heavy=(100,))
    scale = 0.25
    st = SearchSettings(candidates=MASS_CANDS + (HP.vertical_slash(40, 600),), modes=("fixed", "mass"), masses=(),
                        mass_caps=(), n_last=20, n_spread=30, min_row=10, block_m=block_m, cost="pairs")
    got = score_layer(q, k, None, scale, st)
    assert got.candidates == st.candidates
    kx = k.repeat_interleave(2, dim=1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(((q @ kx.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf")), -1)[0]
    rows = sample_rows(n, 20, 30, 10)
    seen = {}
    monkeypatch.setattr(K, "sparse_attention", lambda q, k, v, index, **kw: seen.update(index=index) or torch.zeros_like(q))
    masks = []
    for c, cand in enumerate(st.candidates):
        index = candidate_index(q, k, cand, scale=scale, block_m=block_m)
        mask = K.index_to_dense_mask(index, n, block_m)[0] & causal
        masks.append(mask)
        torch.testing.assert_close(torch.tensor([got.recall[h][c] for h in range(4)], dtype=torch.float32),
                                   (p * mask)[:, rows].sum(-1).mean(-1), atol=1e-5, rtol=0)
        want_cost = (mask.sum((-1, -2)).double() + S._estimation_pairs(cand, n, 64)) / (n * (n + 1) / 2)
        torch.testing.assert_close(torch.tensor([got.cost[h][c] for h in range(4)], dtype=torch.float64), want_cost,
                                   atol=1e-9, rtol=0)
        codes, b0, b1 = ops.encode_heads([cand] * 4)
        ops.run_layer(q, k, v, None, scale, codes, b0, b1, 0, 64, block_m, "reference", 1.0, ops.encode_mass([cand] * 4))
        assert torch.equal(K.index_to_dense_mask(seen["index"], n, block_m)[0] & causal, mask)
    # not vacuous: the target changes the index, and mass 0.9 keeps fewer pairs than the same caps fixed
    assert not torch.equal(masks[0], masks[3])
    assert all(got.cost[h][0] < got.cost[h][3] for h in range(4)), got.cost


def test_modes_decide_the_scored_candidates():
    fixed = SearchSettings()
    assert fixed.modes == ("fixed",) and fixed.scored == S.DEFAULT_CANDIDATES  # the search as it was
    assert fixed.scoring_key()["candidates"] == [c.to_json() for c in S.DEFAULT_CANDIDATES]
    both = SearchSettings(modes=("fixed", "mass"))
    extra = both.scored[len(S.DEFAULT_CANDIDATES):]
    assert both.scored[:len(S.DEFAULT_CANDIDATES)] == S.DEFAULT_CANDIDATES
    assert extra == tuple(HP.vertical_slash(v, s, mass=m) for v, s in S.DEFAULT_MASS_CAPS
                          for m in sorted(S.DEFAULT_MASSES, reverse=True))
    only = SearchSettings(modes="mass", masses=(0.95,), mass_caps=((100, 2000),))
    assert only.scored == tuple(c for c in S.DEFAULT_CANDIDATES if c.pattern.value != "vertical_slash") + (
        HP.vertical_slash(100, 2000, mass=0.95),)
    given = SearchSettings(candidates=(HP.dense(), HP.vertical_slash(30, 800, mass=0.9)), modes=("fixed", "mass"),
                           masses=(0.9,), mass_caps=((30, 800), (100, 800)))
    assert given.scored == (HP.dense(), HP.vertical_slash(30, 800, mass=0.9), HP.vertical_slash(100, 800, mass=0.9))
    with pytest.raises(ValueError, match=r"have a mass target, but modes \['fixed'\] leave out 'mass'"):
        SearchSettings(candidates=(HP.vertical_slash(30, 800, mass=0.9),))
    with pytest.raises(ValueError, match="modes must be distinct names"):
        SearchSettings(modes=("fixed", "adaptive"))
    with pytest.raises(ValueError, match=r"mass target must be a number in \(0, 1\]"):
        SearchSettings(modes=("mass",), masses=(1.5,))
    with pytest.raises(ValueError, match=r"mass cap \(10,\)"):
        SearchSettings(modes=("mass",), mass_caps=((10,),))
    with pytest.raises(ValueError, match="mode 'mass' needs at least one mass target and one cap"):
        SearchSettings(candidates=(HP.vertical_slash(),), modes=("mass",), masses=(), mass_caps=())
    with pytest.raises(ValueError, match="no candidate to score"):
        SearchSettings(candidates=())
    # parsing, and the chosen head keeps its target
    assert S.parse_candidates(["vertical_slash:100,6096,mass=0.95", "vertical_slash:mass=0.9"]) == (
        HP.vertical_slash(100, 6096, mass=0.95), HP.vertical_slash(mass=0.9))
    with pytest.raises(ValueError, match="only named field is mass="):
        S.parse_candidates(["vertical_slash:100,600,gamma=0.9"])
    with pytest.raises(ValueError, match="vertical_slash heads only"):
        S.parse_candidates(["a_shape:64,128,mass=0.9"])
    sc = S.LayerScores(0, 100, (HP.dense(), HP.vertical_slash(30, 800, mass=0.99)), [[1.0, 0.97]], [[1.0, 0.2]],
                       "pairs")
    assert S.choose_layer(sc, given) == (HP("vertical_slash", (30, 800), 0.97, 0.99),)
