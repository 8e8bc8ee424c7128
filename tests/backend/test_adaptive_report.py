"""The adaptive index in what the backend tells: the report's mode per site (fixed budgets, mass target,
or both) and ``ops.collect_stats()`` rows per layer (kept density, dense fallback, heads whose target
was missed), on a model with structured heads (the search's planted model) and on random weights."""

from __future__ import annotations

import torch

import mif_compile
from mif_compile import HeadPattern as HP
from mif_compile import ModelPlan, ops
from mif_compile.report import vs_mode
from tests.backend.models import tiny_llama
from tests.search.planted import PlantedModel

N = 1024


def _planted():
    model = PlantedModel([("rope", "vertical"), ("rope", "a_shape")], n=N).eval()
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(0))
    return model, ids


def _compile(model, **options):
    opts = dict(min_seq_len=0, max_density=1.0, impl="reference", inductor=False)
    opts.update(options)
    return torch.compile(model, backend="minference", options=opts)


def test_vs_mode_names_fixed_mass_and_mixed():
    assert vs_mode([HP.a_shape(), HP.dense()]) == ""
    assert vs_mode([HP.vertical_slash(mass="fixed"), HP.a_shape()]) == "; vertical-slash: fixed budgets"
    assert vs_mode([HP.vertical_slash(mass=0.95)] * 2) == "; vertical-slash: mass target 0.95 (adaptive)"
    assert vs_mode([HP.vertical_slash(mass="fixed"), HP.vertical_slash(30, 800, mass=0.99),
                    HP.vertical_slash(mass=0.9)]) == (
        "; vertical-slash: 1 fixed budgets, 1 mass target 0.9, 1 mass target 0.99")


def test_report_and_stats_per_layer_in_the_adaptive_mode():
    model, ids = _planted()
    plan = ModelPlan(((HP.vertical_slash(48, 2048, mass=0.95), HP.vertical_slash(48, 160, mass="fixed")),
                      (HP.vertical_slash(48, 2048, mass=0.99), HP.a_shape(64, 256))))
    with torch.no_grad():
        fixed = _compile(model, config=plan.without_mass())
        with ops.collect_stats() as fixed_rows:
            out_fixed = fixed(ids)
        torch._dynamo.reset()
        comp = _compile(model, config=plan)
        with ops.collect_stats() as rows:
            out = comp(ids)
    text = str(mif_compile.last_report())
    assert "[layer 0, causal]: 1 x vertical_slash(v=48, s=2048, mass=0.95), 1 x vertical_slash(v=48, s=160, mass=fixed); " \
           "vertical-slash: 1 fixed budgets, 1 mass target 0.95" in text, text
    assert "vertical-slash: mass target 0.99 (adaptive)" in text, text
    assert "mass target reached by 1/1 adaptive head(s)" in text, text
    assert [(r["layer"], r["mode"], r["adaptive_heads"], r["target_missed"], r["fell_back_to_dense"]) for r in rows] == [
        (0, "mass", 1, 0, False), (1, "mass", 1, 0, False)], rows
    assert [(r["layer"], r["mode"]) for r in fixed_rows] == [(0, "fixed"), (1, "fixed")] and \
        all("target_missed" not in r for r in fixed_rows)
    # the structured heads need few tiles: the adaptive layers keep fewer pairs than the same caps as fixed
    # budgets (2048 diagonals: every one), and so compute something else. (At 1024 tokens the target,
    # held at 8 row positions down to row 127, keeps most of the short rows' keys: 0.82 vs 0.90.)
    for r, f in zip(rows, fixed_rows):
        assert r["density"] < 0.95 * f["density"], (rows, fixed_rows)
    assert not torch.allclose(out, out_fixed, atol=1e-3) and torch.isfinite(out).all()


def test_stats_count_missed_targets_and_dense_fallback_on_random_weights():
    """Random weights: no structure, so the targets are missed (those heads run the fixed choice of
    their caps) and, with max_density, the layers fall back to dense; both are in the rows and the report."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 640), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        comp = _compile(model, default_pattern=HP.vertical_slash(30, 128, mass=0.999), max_density=0.3)
        with ops.collect_stats() as rows:
            out = comp(ids).logits
    assert [r["layer"] for r in rows] == [0, 1], rows
    assert all(r["mode"] == "mass" and r["adaptive_heads"] == 4 and r["target_missed"] > 0 and
               r["ran_fixed"] > 0 for r in rows), rows
    assert all(r["fell_back_to_dense"] == (r["density"] > 0.3) for r in rows) and any(r["fell_back_to_dense"] for r in rows)
    text = str(mif_compile.last_report())
    assert "ran the fixed choice of their caps" in text and "density above max_density" in text, text
    if all(r["fell_back_to_dense"] for r in rows):
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_run_line_tells_short_heads_from_fixed_ones():
    from mif_compile.report import SiteRuns

    r = SiteRuns(0, 3, None, calls=1, sparse=1, last_seq_len=65536, last_density=0.1, last_missed=(3, 4, 1))
    line = r.format()
    assert "mass target reached by 1/4 adaptive head(s) (2 kept every candidate within their caps; " \
           "1 ran the fixed choice of their caps)" in line, line
    r.last_missed = (0, 4, 0)
    assert r.format().endswith("mass target reached by 4/4 adaptive head(s)"), r.format()
