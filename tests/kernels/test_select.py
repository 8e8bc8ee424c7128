"""The adaptive (mass-targeted) vertical-slash selection against a per-head loop that states the rule.

The rule (kernels/select.py): the top columns within the cap are all kept (ranked by, and credited
with, the column score minus the mean over the offsets where the key meets the probe rows of the
group maxima of the diagonal scores), and so are the groups of the 100 nearest diagonals; then
64-diagonal groups (mass = the group's diagonal scores less what the kept columns put there, cost 64
keys, or 192 when both neighbours hold less) by mass / cost, while the mass kept so far is below
mass * total, within the group cap (at 8 row positions; one whose rows reach less than R_FLOOR of the
probe's mass is not held to it). The third output is the kept share of the estimated mass at the
position where it is lowest; ``target_outcome`` turns it into (target reached, selection used).
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mif_compile import kernels as K
from mif_compile.kernels.reference import build_vs_index
from mif_compile.kernels.select import R_FLOOR, adaptive_cap_s, slash_group_count


def _loop_select(col, diag, v_count, s_count, mass, last_q, n_force_v=30, n_force_s=100):
    """Set of kept columns and groups per (b, h), one candidate at a time."""
    B, H, N = col.shape
    G = math.ceil(N / 64)
    nfg = min(G, math.ceil(n_force_s / 64))
    ql = min(last_q, N)
    out = {}
    for b in range(B):
        for h in range(H):
            dd = diag[b, h].double().tolist() + [0.0] * (G * 64 - N)
            env = [max(dd[64 * (o // 64): 64 * (o // 64) + 64]) for o in range(N)]  # group maxima
            cm = [max(0.0, float(col[b, h, j]) - sum(env[max(0, N - ql - j): N - j]) / ql) for j in range(N)]
            c_top = sorted(range(N), key=lambda j: (j >= n_force_v, -(cm[j] + float(col[b, h, j]) * 2.0 ** -20), j))
            c_top = c_top[: min(N, int(v_count[h]))]
            slash = dd[:N]
            for j in c_top:  # a column's own mass leaves the diagonals where it meets the probe rows
                lo, hi = max(0, N - ql - j), N - j
                for o in range(lo, hi):
                    slash[o] -= cm[j] / (hi - lo)
            d = [max(0.0, x) for x in slash] + [0.0] * (G * 64 - N)
            gm = [sum(d[64 * g: 64 * g + 64]) for g in range(G)]
            # mass held to the target at 8 row positions p: a group serves rows >= its offsets, a column
            # at key j rows >= j
            R = min(8, N)
            pks = [(r * N) // R - 1 for r in range(1, R + 1)]
            total = [sum(d[: p + 1]) + sum(cm[j] for j in c_top if j <= p) for p in pks]
            # a position whose rows reach less than R_FLOOR of the probe's mass is not held to the target
            total = [t if t >= R_FLOOR * total[-1] else 0.0 for t in total]
            cands = []  # (forced, ratio, masses per position, kind, id)
            g_ratio = []
            for g in range(G):
                lft = gm[g - 1] if g > 0 else -math.inf
                rgt = gm[g + 1] if g + 1 < G else -math.inf
                cost = 192.0 if (lft < gm[g] and rgt < gm[g]) else 64.0
                g_ratio.append((g < nfg, math.inf if g < nfg else gm[g] / cost, g))
            g_top = sorted(g_ratio, key=lambda t: (not t[0], -t[1], t[2]))[: min(G, slash_group_count(int(s_count[h]), n_force_s))]
            for f, r, g in g_top:
                cands.append((f, r, [sum(d[64 * g: min(64 * g + 64, N, p + 1)]) for p in pks], "g", g))
            for j in c_top:  # every column within the cap is kept
                cands.append((True, cm[j], [cm[j] if j <= p else 0.0 for p in pks], "c", j))
            cands.sort(key=lambda t: (not t[0], -t[1] if not t[0] else 0.0))
            kept = set()
            acc, kept_mass = [0.0] * R, [0.0] * R
            for f, r, m, kind, i in cands:
                need = any(acc[x] < float(mass[h]) * total[x] and m[x] > 0 for x in range(R))
                if f or need or float(mass[h]) >= 1.0:
                    kept.add((kind, i))
                    kept_mass = [a + b for a, b in zip(kept_mass, m)]
                acc = [a + b for a, b in zip(acc, m)]
            out[b, h] = kept
            out["mass", b, h] = {(kind, i): (math.inf if f and kind == "g" else max(m)) for f, r, m, kind, i in cands}
            out["share", b, h] = min(1.0, min(kept_mass[x] / total[x] if total[x] > 0 else 1.0 for x in range(R)))
    return out


def _as_sets(v_idx, s_off):
    B, H = v_idx.shape[:2]
    out = {}
    for b in range(B):
        for h in range(H):
            cs = {("c", int(j)) for j in v_idx[b, h] if j >= 0}
            gs = {("g", int(o) // 64) for o in s_off[b, h] if o >= 0}
            out[b, h] = cs | gs
    return out


def _scores(B, H, N, seed, spiky):
    g = torch.Generator().manual_seed(seed)
    col = torch.rand(B, H, N, generator=g)
    diag = torch.rand(B, H, N, generator=g)
    if spiky:  # a few heavy entries, like real attention: distinct values, no ties
        col = col ** 8 * 10
        diag = diag ** 8 * 10
    return col, diag


@settings(deadline=None, max_examples=30)
@given(N=st.integers(1, 700), H=st.integers(1, 3), seed=st.integers(0, 10**6),
       v=st.integers(30, 200), s=st.integers(50, 400), m=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
       last_q=st.sampled_from([1, 16, 64]), spiky=st.booleans())
@example(N=1, H=1, seed=0, v=30, s=50, m=1.0, last_q=64, spiky=False)
@example(N=130, H=2, seed=1, v=30, s=50, m=0.5, last_q=64, spiky=True)
def test_select_matches_the_rule(N, H, seed, v, s, m, last_q, spiky):
    col, diag = _scores(2, H, N, seed, spiky)
    vc = torch.tensor([min(N, v + 7 * h) for h in range(H)])
    sc = torch.tensor([min(N, s + 33 * h) for h in range(H)])
    mass = torch.tensor([m * (1 - 0.1 * h) for h in range(H)], dtype=torch.float32)
    v_idx, s_off, share = K.vertical_slash_select(col, diag, vc, sc, mass, last_q=last_q)
    got, want = _as_sets(v_idx, s_off), _loop_select(col, diag, vc, sc, mass, last_q)
    for key in want:
        if key[0] == "share":
            _, b, h = key
            assert float(share[b, h]) == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        elif key[0] != "mass":
            # candidates of equal (zero) mass may be cut by the caps in either order: compare the rest
            m = want["mass", *key]
            assert {x for x in got[key] if m.get(x, 0) > 0} == {x for x in want[key] if m[x] > 0}, key
            assert len(got[key]) == len(want[key]), key
    # the outputs are what the index builder takes: offsets < N, groups whole, columns distinct
    assert ((s_off == -1) | ((s_off >= 0) & (s_off < N))).all()
    assert ((v_idx == -1) | ((v_idx >= 0) & (v_idx < N))).all()


def test_more_mass_keeps_a_superset():
    col, diag = _scores(1, 2, 2000, 3, True)
    prev = None
    for m in (0.1, 0.5, 0.9, 0.99, 1.0):
        sets = _as_sets(*K.vertical_slash_select(col, diag, 500, 2000, m, last_q=64)[:2])
        if prev is not None:
            assert all(prev[k] <= sets[k] for k in sets)
        prev = sets


def test_forced_candidates_always_kept_and_caps_hold():
    col, diag = _scores(1, 1, 3000, 5, True)
    v_idx, s_off, _ = K.vertical_slash_select(col, diag, 40, 200, 0.0, last_q=64)
    assert set(range(30)) <= set(v_idx[v_idx >= 0].tolist()) and int((v_idx >= 0).sum()) == 40
    assert set((s_off[s_off >= 0] // 64).tolist()) == {0, 1}
    v_idx, s_off, _ = K.vertical_slash_select(col, diag, 40, 200, 1.0, last_q=64)
    assert int((v_idx >= 0).sum()) <= 40
    assert len(set((s_off[s_off >= 0] // 64).tolist())) <= slash_group_count(200)


def test_stops_at_the_target_on_concentrated_mass():
    """Mass on the first 4 diagonal groups and one distant group: 0.95 keeps those, not the caps."""
    N = 4096
    diag = torch.full((1, 1, N), 1e-6)
    diag[..., :256] = 1.0
    diag[..., 2048:2112] = 0.5
    col = torch.full((1, 1, N), 1e-6)
    col[..., 700] = 3.0
    v_idx, s_off, _ = K.vertical_slash_select(col, diag, 1000, 4096, 0.95, last_q=64)
    groups = set((s_off[s_off >= 0] // 64).tolist())
    assert groups == {0, 1, 2, 3, 32}
    assert 700 in v_idx.tolist()[0][0]
    assert int((v_idx >= 0).sum()) == 1000  # columns are cheap: all within the cap


@settings(deadline=None, max_examples=25)
@given(N=st.integers(64, 1500), seed=st.integers(0, 10**6), s=st.integers(50, 1500), block_m=st.sampled_from([64, 128]))
def test_adaptive_cap_s_never_truncates(N, seed, s, block_m):
    """The op sizes block_offset with adaptive_cap_s: the index must never need more."""
    col, diag = _scores(1, 2, N, seed, False)
    sc = min(N, s)
    v_idx, s_off, _ = K.vertical_slash_select(col, diag, 30, sc, 1.0, last_q=64)
    cap = adaptive_cap_s(slash_group_count(sc), block_m)
    big = build_vs_index(v_idx, s_off, torch.zeros(2, dtype=torch.int64), seq_len=N, block_m=block_m,
                         cap_s=math.ceil(N / 64) + 1, cap_v=30)
    assert int(big.block_count.max()) <= cap


@pytest.mark.parametrize("impl", ["reference"])
def test_validation_names_the_argument(impl):
    col, diag = _scores(1, 2, 100, 0, False)
    with pytest.raises(ValueError, match="mass"):
        K.vertical_slash_select(col, diag, 30, 50, [0.5, 1.5], last_q=64)
    with pytest.raises(ValueError, match="one entry per head"):
        K.vertical_slash_select(col, diag, 30, 50, [0.5, 0.5, 0.5], last_q=64)


def test_target_outcome_keeps_the_selection_above_the_structure_floor():
    """Short of the target but above STRUCTURE_FLOOR: the head keeps its selection (every candidate within
    its caps); below the floor (too little structure for the caps) it runs the fixed choice."""
    from mif_compile.kernels.select import STRUCTURE_FLOOR, target_outcome

    share = torch.tensor([[1.0, 0.985, STRUCTURE_FLOOR - 0.01, 0.5, 0.3]])
    mass = torch.tensor([0.99, 0.99, 0.99, 0.5, 0.5])
    reached, selected = target_outcome(share, mass)
    assert reached.tolist() == [[True, False, False, True, False]]
    assert selected.tolist() == [[True, True, False, True, False]]


def test_share_separates_structure_from_noise():
    """Concentrated scores: the caps hold nearly all the estimated mass; flat (random-like) scores: a
    small share, under the floor, so such a head runs the fixed choice."""
    from mif_compile.kernels.select import STRUCTURE_FLOOR

    N = 8192
    diag = torch.full((1, 1, N), 1e-7)
    diag[..., :512] = 1.0
    col = torch.full((1, 1, N), 1e-7)
    col[..., 0] = 5.0
    *_, share = K.vertical_slash_select(col, diag, 100, 1024, 1.0, last_q=64)
    assert float(share) > 0.99
    col, diag = _scores(1, 1, N, 7, False)
    *_, share = K.vertical_slash_select(col, diag, 100, 1024, 1.0, last_q=64)
    assert float(share) < STRUCTURE_FLOOR


def test_rows_that_reach_no_mass_do_not_buy_groups(monkeypatch):
    """A head whose mass is one distant diagonal (the planted RoPE head of the search tests, offset 700 of
    2048): the rows before the diagonal reach only the probe's noise (~1e-9 of its mass). Holding them to
    the target bought low-mass groups to cover a share of that noise; they are not held to it now, so every
    target keeps the forced groups and the diagonal's, and the noise's groups come back without the floor."""
    import os
    import sys

    from mif_compile.kernels import select

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "search"))
    import planted

    q, k = planted._rope(planted.N, torch.Generator().manual_seed(0))
    q = (q * math.sqrt(planted.D))[None, None]
    col, diag = K.vertical_slash_scores(q, k[None, None], last_q=64, scale=planted.D ** -0.5, impl="reference")

    def groups(m):
        _, s_off, share = select.vertical_slash_select(col, diag, torch.tensor([48]), torch.tensor([6096]),
                                                       torch.tensor([m]), last_q=64, v_max=48, s_max=6096)
        return set((s_off[s_off >= 0] // 64).tolist()), float(share)

    diagonal = {0, 1, planted.ROPE_SLASH // 64}  # the forced groups (100 nearest diagonals) and the diagonal's
    for m in (0.9, 0.95, 0.99):
        kept, share = groups(m)
        assert kept == diagonal and share >= m
    monkeypatch.setattr(select, "R_FLOOR", 0.0)
    assert groups(0.99)[0] > diagonal


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), rows=st.integers(1, 3), chunk=st.sampled_from([1, 7, 64, 1024]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
@example(n=131072, rows=2, chunk=1024, dtype=torch.float32, seed=0)
@example(n=16, rows=1, chunk=7, dtype=torch.float64, seed=0)  # a heavy piece after a light one (CI, s14)
def test_prefix_sum_is_a_float64_scan(n, rows, chunk, dtype, seed):
    """The selection's chunked scan: float64 cumsum's values in the input's dtype (within one rounding of
    the result and float64's summation error), rows independent, on lengths that are and are not a
    multiple of the chunk."""
    from mif_compile.kernels.select import prefix_sum

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=g, dtype=torch.float64).to(dtype)
    x[0, :: max(1, n // 3)] = 0.0  # zeros and a heavy entry, as scores have
    x[-1, n // 2] = 1e3
    out = prefix_sum(x, chunk=chunk)
    want = x.double().cumsum(-1)
    assert out.shape == x.shape and out.dtype == dtype
    # one rounding to the output dtype (float32) plus float64's accumulated error of any summation order
    tol = want.abs() * (torch.finfo(dtype).eps * (dtype == torch.float32) + n * torch.finfo(torch.float64).eps)
    assert ((out.double() - want).abs() <= tol).all()
    if dtype == torch.float32:  # the CPU's own float32 scan accumulates in float64: the same values
        assert (prefix_sum(x) == x.cumsum(-1)).float().mean() > 0.999
