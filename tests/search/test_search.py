"""The search end to end on a model with planted head shapes: capture through the backend, recovery
of each head's pattern, saved plans, resuming after an interruption, and state errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import mif_compile
from mif_compile import HeadPattern as HP
from mif_compile import ModelPlan, load_plan
from mif_compile.search import SearchError, SearchSettings, capture_backend, capture_qk, search
from tests.search.planted import EXPECTED, LAYOUT, N, PlantedModel

# Candidates at N = 2048: each planted shape has exactly one family that reaches 95% recall cheaply.
CANDS = (HP.a_shape(64, 256), HP.a_shape(128, 512), HP.vertical_slash(48, 100), HP.vertical_slash(48, 160),
         HP.vertical_slash(200, 400), HP.block_sparse(4), HP.block_sparse(8), HP.block_sparse(16))
SETTINGS = SearchSettings(candidates=CANDS, cost="pairs")


def test_capture_goes_through_the_backend(planted):
    model, ids = planted
    with torch.no_grad():
        ref = model(ids)
        with capture_qk(store=True) as cap:
            out = torch.compile(model, backend=capture_backend(2, 4))(ids)
    report = mif_compile.last_report()
    assert report.counters["rewritten"] == 2
    assert cap.layers == [0, 1]
    for i, layer in enumerate(model.layers):  # the layer index is the one of nn_module_stack
        q, k, scale = cap.records[i]
        assert torch.equal(q, layer.q) and torch.equal(k, layer.k) and scale == pytest.approx(128 ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # capture returns dense attention


def test_capture_in_call_order_without_counts(planted):
    model, ids = planted
    with torch.no_grad(), capture_qk(store=True) as cap:
        torch.compile(model, backend=capture_backend())(ids[:, :300])
        torch.compile(model, backend=capture_backend())(ids[:, :300])  # same graph, numbering continues
    assert cap.layers == [0, 1, 2, 3]
    assert torch.equal(cap.records[1][0], model.layers[1].q[:, :, :300])


def test_capture_leaves_other_plans_alone(planted):
    model, ids = planted
    compiled = torch.compile(model, backend=mif_compile.backend(default_pattern=HP.a_shape(64, 256), min_seq_len=0,
                                                                max_density=1.0, inductor=False, impl="reference"))
    with torch.no_grad(), capture_qk() as cap:
        out = compiled(ids[:, :512])
    assert cap.layers == []
    with torch.no_grad():
        assert not torch.allclose(out, model(ids[:, :512]), atol=1e-3)  # the sparse op ran, not dense


def test_search_recovers_planted_patterns(planted, tmp_path):
    model, ids = planted
    out = tmp_path / "plan.json"
    result = search(model, ids, settings=SETTINGS, out=out, num_layers=2, num_heads=4, progress=False)
    got = [[hp.pattern.value for hp in layer] for layer in result.plan.layers]
    want = [[EXPECTED[kind] for kind in layer] for layer in LAYOUT]
    assert got == want, "\n".join(
        f"layer {i} head {h} ({LAYOUT[i][h]}): " + ", ".join(
            f"{c.describe()} {r:.3f}/{co:.3f}" for c, r, co in zip(CANDS, sc.recall[h], sc.cost[h]))
        for i, sc in result.scores.items() for h in range(4))
    for layer in result.plan.layers:
        for hp in layer:
            assert hp.score >= 0.95
    # the cheapest tier of the family wins: a bigger budget of the same family costs more
    assert result.plan.layers[0][0].budget == (64, 256)
    assert result.plan.layers[0][3].budget == (4,)
    # the saved plan is the returned one, in both formats
    assert load_plan(out) == result.plan
    mi = tmp_path / "mi.json"
    mif_compile.save_plan(result.plan, mi, minference_format=True)
    assert load_plan(mi).layers == result.plan.layers
    # changing the rule re-chooses from the stored tables, without a prefill
    again = search(model, ids, settings=SearchSettings(candidates=CANDS, cost="pairs", rule="budget", max_cost=0.25),
                   out=tmp_path / "plan.json", num_layers=2, num_heads=4, progress=False)
    assert again.resumed == [0, 1]
    assert {hp.pattern.value for layer in again.plan.layers for hp in layer} <= {"vertical_slash", "block_sparse"}


class Stop(Exception):
    pass


def test_interrupted_search_resumes_without_redoing_layers(planted, tmp_path):
    model, ids = planted
    out = tmp_path / "plan.json"
    done: list[int] = []

    def stop_after_first(scores):
        done.append(scores.layer)
        raise Stop

    with pytest.raises(Stop):
        search(model, ids, settings=SETTINGS, out=out, num_layers=2, num_heads=4, progress=False,
               on_layer_done=stop_after_first)
    assert done == [0] and not out.exists()
    assert sorted(os.listdir(str(out) + ".search")) == ["layer_000.json", "meta.json"]

    scored: list[int] = []
    result = search(model, ids, settings=SETTINGS, out=out, num_layers=2, num_heads=4, progress=False,
                    on_layer_done=lambda s: scored.append(s.layer))
    assert scored == [1] and result.resumed == [0]
    fresh = search(model, ids, settings=SETTINGS, num_layers=2, num_heads=4, progress=False)
    assert result.plan == fresh.plan and load_plan(out) == fresh.plan

    # finished: no prefill at all
    def boom(*a, **k):
        raise AssertionError("the model ran again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", boom)
        last = search(model, ids, settings=SETTINGS, out=out, num_layers=2, num_heads=4, progress=False)
    assert last.resumed == [0, 1] and last.plan == fresh.plan


def test_state_with_other_settings_or_input_is_refused(planted, tmp_path):
    model, ids = planted
    short = ids[:, :600]
    search(model, short, settings=SETTINGS, state_dir=tmp_path / "st", num_layers=2, num_heads=4, progress=False)
    with pytest.raises(SearchError, match=r"other settings \(candidates \[a_shape\(n_init=64, n_local=256\), .*\] -> \[a_shape\(n_init=64, n_local=256\), a_shape\(n_init=128, n_local=512\), vertical_slash\(v=48, s=100, mass=fixed\)\]\)"):
        search(model, short, settings=SearchSettings(candidates=CANDS[:3]), state_dir=tmp_path / "st",
               num_layers=2, num_heads=4, progress=False)
    with pytest.raises(SearchError, match=r"input_sha1"):
        search(model, short.flip(-1), settings=SETTINGS, state_dir=tmp_path / "st", num_layers=2, num_heads=4,
               progress=False)


def test_malformed_state_file_names_file_layer_and_head(planted, tmp_path):
    model, ids = planted
    st = tmp_path / "st"
    search(model, ids[:, :600], settings=SETTINGS, state_dir=st, num_layers=2, num_heads=4, progress=False)
    layer1 = st / "layer_001.json"
    obj = json.loads(layer1.read_text())
    obj["recall"][2] = obj["recall"][2][:-1]
    layer1.write_text(json.dumps(obj))
    with pytest.raises(SearchError, match=r"layer_001.json: layer 1, head 2: expected 8 scores"):
        search(model, ids[:, :600], settings=SETTINGS, state_dir=st, num_layers=2, num_heads=4, progress=False)
    layer1.write_text('{"layer": 1,\n "recall": [}')
    with pytest.raises(SearchError, match=r"layer_001.json: invalid JSON at line 2"):
        search(model, ids[:, :600], settings=SETTINGS, state_dir=st, num_layers=2, num_heads=4, progress=False)


def test_layers_the_backend_leaves_dense_stay_dense(tmp_path):
    """A layer that is not a causal prefill is never captured: dense in the plan, with a warning."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([PlantedModel([("vertical",)], n=512).layers[0] for _ in range(2)])

        def forward(self, x):
            x = self.layers[0](x)
            b, n, _ = x.shape
            q = self.layers[1].q[:, :, :n]
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # not causal: left dense
            return x + out.mean()

    model = Mixed().eval()
    x = torch.randn(1, 512, 32)
    result = search(model, x, settings=SETTINGS, num_layers=2, num_heads=1, progress=False)
    assert result.missing == [1]
    assert result.plan.layers[1] == (HP.dense(),)
    assert result.plan.layers[0][0].pattern.value != "dense" and result.plan.layers[0][0].score >= 0.95
    assert isinstance(result.plan, ModelPlan)


# Mode "mass": the planted ``rope`` head has one distant diagonal (offset 700) that a fixed slash budget
# can hold only by also taking scattered low-mass diagonals; the adaptive index keeps the diagonal's
# group and stops. Rows before the diagonal's offset have no structure, so the sampled rows start past it.
ROPE_LAYOUT = (("rope", "a_shape", "vertical", "block"),)
MASS = dict(modes=("fixed", "mass"), mass_caps=((48, 6096),), min_row=1024)


def test_search_with_mass_candidates_picks_an_adaptive_head_below_the_fixed_cost(tmp_path, capsys):
    from mif_compile.cli import main

    torch.manual_seed(0)
    model = PlantedModel(ROPE_LAYOUT).eval()
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(0))
    fixed = search(model, ids, settings=SearchSettings(candidates=CANDS, cost="pairs", min_row=1024),
                   num_layers=1, num_heads=4, progress=False)
    out = tmp_path / "plan.json"
    st = SearchSettings(candidates=CANDS, cost="pairs", **MASS)
    both = search(model, ids, settings=st, out=out, num_layers=1, num_heads=4, progress=False)
    sc = both.scores[0]
    # fixed first (the vertical-slash ones marked fixed, as the plan writes them), then the adaptive
    assert sc.candidates == st.scored and sc.candidates[:len(CANDS)] == st.candidates
    assert [c.mass for c in st.candidates if c.pattern.value == "vertical_slash"] == ["fixed"] * 3
    head = both.plan.layers[0][0]
    assert head.pattern.value == "vertical_slash" and head.mass is not None and head.budget == (48, 6096)
    c = sc.candidates.index(dataclasses.replace(head, score=None))
    assert sc.recall[0][c] >= 0.95 and head.score == round(sc.recall[0][c], 4)
    fixed_ok = [sc.cost[0][i] for i, cand in enumerate(sc.candidates) if cand.mass is None and sc.recall[0][i] >= 0.95]
    assert fixed_ok and sc.cost[0][c] < 0.8 * min(fixed_ok), (sc.cost[0][c], fixed_ok)
    # the targets give the same index on this input: the highest one is taken (more margin on others)
    same = [i for i, cand in enumerate(sc.candidates) if cand.mass is not None and sc.cost[0][i] == sc.cost[0][c]]
    assert head.mass == max(sc.candidates[i].mass for i in same)
    # --modes fixed is the search as it was: the same candidates and choices; mode mass only changed head 0
    assert fixed.scores[0].candidates == st.candidates and fixed.plan.layers[0][0].mass == "fixed"
    assert fixed.plan.layers[0][0].pattern.value == "vertical_slash"
    assert both.plan.layers[0][1:] == fixed.plan.layers[0][1:]
    assert [hp.pattern.value for hp in both.plan.layers[0]] == [EXPECTED[k] for k in ROPE_LAYOUT[0]]
    # the plan round-trips with its mass target, and show says so
    assert load_plan(out) == both.plan and load_plan(out).layers[0][0].mass == head.mass
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"vertical_slash(v=48, s=6096, mass={head.mass:g})" in text
    assert "adaptive index (mass target): 1 of 2 vertical-slash heads" in text
    # MInference's format cannot hold it: refused, or dropped when asked
    with pytest.raises(mif_compile.ConfigError, match="layer 0, head 0: MInference's format has no mass target"):
        mif_compile.save_plan(both.plan, tmp_path / "mi.json", minference_format=True)
    assert main(["convert", str(out), str(tmp_path / "mi.json"), "--to", "minference"]) == 2
    assert "--drop-mass" in capsys.readouterr().err
    assert main(["convert", str(out), str(tmp_path / "mi.json"), "--to", "minference", "--drop-mass"]) == 0
    assert "mass target of 1 head(s) is not written" in capsys.readouterr().err
    assert load_plan(tmp_path / "mi.json").layers == both.plan.without_mass().layers
    # resuming with other modes is refused (the scored candidates differ), with the same re-chooses
    with pytest.raises(SearchError, match="other settings"):
        search(model, ids, settings=SearchSettings(candidates=CANDS, cost="pairs", min_row=1024), out=out,
               num_layers=1, num_heads=4, progress=False)
    again = search(model, ids, settings=dataclasses.replace(st, target=0.9), out=out, num_layers=1, num_heads=4,
                   progress=False)
    assert again.resumed == [0]
