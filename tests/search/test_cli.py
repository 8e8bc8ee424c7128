"""``mif-compile search / show / convert``: the built-in tiny Llama end to end, plan files in both
formats, errors that name the line, layer and head, and the plots (when matplotlib is there)."""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib.metadata import entry_points

import pytest
import torch

from mif_compile import HeadPattern as HP
from mif_compile import ModelPlan, load_plan, save_plan
from mif_compile.cli import calibration_ids, load_model, main, synthetic_text

CANDS = ["a_shape:64,128", "vertical_slash:30,100", "block_sparse:2", "dense"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_entry_point():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "mif-compile"]
    assert ep.value == "mif_compile.cli:main"


def test_search_tiny_llama_then_show_and_resume(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["search", "--model", "tiny", "--seq-len", 384, "--out", out, "--candidates", *CANDS, "--no-progress",
            "--minference-out", tmp_path / "mi.json"]
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    plan = load_plan(out)
    assert len(plan.layers) == 2 and all(len(layer) == 4 for layer in plan.layers)  # GQA 4/2: query heads
    assert all(hp.score is not None and 0 < hp.score <= 1 for layer in plan.layers for hp in layer)
    assert "recall mean" in stdout and "2 layers, 8 heads" in stdout
    assert load_plan(tmp_path / "mi.json").layers == plan.layers
    assert sorted(p.name for p in (tmp_path / "plan.json.search").iterdir()) == ["layer_000.json", "layer_001.json",
                                                                                   "meta.json"]
    code, stdout, err = _run(capsys, *args)
    assert code == 0 and "resumed: layer(s) [0, 1]" in stdout and load_plan(out) == plan

    code, stdout, _ = _run(capsys, "show", out)
    assert code == 0 and stdout.count("layer ") >= 2 and "recall mean" in stdout


def test_show_and_convert_minference_format(tmp_path, capsys):
    mi = [{"0": ["vertical_and_slash", 1000, 6096, 0.97], "1": ["stream_llm", 100, 800, 0.91]},
          {"0": ["block_sparse", 16, 0, 0.99], "1": ["vertical_and_slash", 30, 800, 0.95]}]
    src = tmp_path / "mi.json"
    src.write_text(json.dumps(mi))
    code, stdout, _ = _run(capsys, "show", src)
    assert code == 0
    # MInference's vertical-slash heads are fixed budgets
    assert "layer   0: 1 x vertical_slash(v=1000, s=6096, mass=fixed), 1 x a_shape(n_init=100, n_local=800)" in stdout
    assert "recall mean 0.940 min 0.910" in stdout
    code, _, _ = _run(capsys, "convert", src, tmp_path / "ours.json")
    assert code == 0
    ours = load_plan(tmp_path / "ours.json")
    assert ours.layers[1] == (HP(HP.block_sparse(16).pattern, (16,), 0.99),
                              HP(HP.vertical_slash().pattern, (30, 800), 0.95, "fixed"))
    assert '"mass": "fixed"' in (tmp_path / "ours.json").read_text()  # our format says it, the backend obeys
    code, _, _ = _run(capsys, "convert", tmp_path / "ours.json", tmp_path / "back.json", "--to", "minference")
    assert code == 0 and json.loads((tmp_path / "back.json").read_text()) == mi


def test_show_calls_raw_minference_scores_score_not_recall(tmp_path, capsys):
    """Llama-3-8B-262k's file holds raw search scores (336, 12982, ...) in the 4th field: not a recall."""
    raw = [{"0": ["vertical_and_slash", 1000, 6096, 336], "1": ["vertical_and_slash", 30, 800, 12982]},
           {"0": ["vertical_and_slash", 100, 800, 0.5], "1": ["stream_llm", 100, 800, 7.25]}]
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(raw))
    code, stdout, _ = _run(capsys, "show", src)
    assert code == 0 and "recall" not in stdout.replace("not a recall", "")
    assert "| score mean 6659 min 336" in stdout and "| score mean 3.875 min 0.5" in stdout
    assert "not a recall" in stdout
    code, _, _ = _run(capsys, "convert", src, tmp_path / "ours.json")  # the same in our format
    code, stdout, _ = _run(capsys, "show", tmp_path / "ours.json")
    assert code == 0 and "score mean 6659" in stdout and "recall mean" not in stdout


def test_convert_round_trip_keeps_the_plan(tmp_path, capsys):
    """ours -> MInference's -> ours gives the same plan, default included, for a plan as the search writes it."""
    plan = ModelPlan(((HP(HP.a_shape().pattern, (64, 128), 0.9), HP("dense", (), 1.0)),) * 2, HP.dense())
    save_plan(plan, tmp_path / "plan.json")
    assert _run(capsys, "convert", tmp_path / "plan.json", tmp_path / "mi.json", "--to", "minference")[0] == 0
    code, _, err = _run(capsys, "convert", tmp_path / "mi.json", tmp_path / "back.json")
    assert code == 0 and err == "" and load_plan(tmp_path / "back.json") == plan
    # a default that MInference's format cannot hold is said, not dropped silently
    save_plan(ModelPlan(plan.layers, HP.a_shape()), tmp_path / "other.json")
    code, _, err = _run(capsys, "convert", tmp_path / "other.json", tmp_path / "mi2.json", "--to", "minference")
    assert code == 0 and "no default pattern" in err and "a_shape(n_init=128, n_local=3968)" in err


@pytest.mark.parametrize("text, where", [
    ('{"format": "mif-compile/v1",\n "layers": [\n  [{"pattern": "dense"},]\n]}', "invalid JSON at line 3"),
    ('{"layers": [[{"pattern": "dense"}], [{"pattern": "dense"}, {"pattern": "dense"},'
     ' {"pattern": "vertical_slash", "v": -3, "s": 10}]]}', "layer 1, head 2: vertical_slash budget v must be positive"),
    ('[{"0": ["vertical_and_slash", 10, 20, 0.5]}, {"0": ["sliding", 1, 2, 0.1]}]', "layer 1, head 0: unknown pattern"),
    ('[{"0": ["vertical_and_slash", 10, 20, 0.5], "2": ["stream_llm", 1, 2, 0.1]}]', "layer 0: heads must be numbered"),
])
def test_malformed_plan_names_line_layer_head(tmp_path, capsys, text, where):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    code, _, err = _run(capsys, "show", bad)
    assert code == 2
    assert str(bad) in err and where in err


def test_search_option_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "search", "--model", "tiny", "--candidates", "vertical_slash:10", "--out", tmp_path / "p.json")
    assert code == 2 and "candidate 'vertical_slash:10'" in err
    code, _, err = _run(capsys, "search", "--model", "random:layerz=2", "--out", tmp_path / "p.json", "--seq-len", 64)
    assert code == 2 and "unknown key 'layerz'" in err


def test_calibration_inputs(tmp_path):
    model, tok = load_model("random:layers=1,heads=2,kv_heads=1,head_dim=16,hidden=32,vocab=50", "cpu", torch.float32)
    assert model.config.num_hidden_layers == 1 and tok is None
    ids = calibration_ids(model, None, 100, None)
    assert ids.shape == (1, 100) and int(ids.max()) < 50
    text = tmp_path / "t.txt"
    text.write_text("abc")
    ids = calibration_ids(model, None, 10, str(text))  # bytes modulo the vocabulary, repeated
    assert ids.tolist() == [[b % 50 for b in b"abcabcabca"]]
    t = synthetic_text(5, seed=1)
    assert t.count('": "') == 5 and t.endswith("is: ") and synthetic_text(5, seed=1) == t


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    plan = tmp_path / "p.json"
    save_plan(ModelPlan(((HP.dense(),),)), plan)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, _, err = _run(capsys, "show", plan, "--plot", tmp_path / "p.png")
    assert code == 2 and "needs matplotlib" in err and "pip install matplotlib" in err


def test_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plan = tmp_path / "plan.json"
    save_plan(ModelPlan(((HP(HP.a_shape().pattern, (64, 128), 0.9), HP.vertical_slash(30, 100)) * 2,
                         (HP.block_sparse(2), HP.dense(), HP.dense(), HP(HP.block_sparse().pattern, (3,), 0.99)))), plan)
    png = tmp_path / "map.png"
    code, stdout, err = _run(capsys, "show", plan, "--plot", png, "--head", "0:2", "--model", "tiny", "--seq-len", 300)
    assert code == 0, err
    for path in (png, tmp_path / "map_L0_H2.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    code, _, err = _run(capsys, "show", plan, "--plot", png, "--head", "5:0", "--model", "tiny")
    assert code == 2 and "no layer 5, head 0" in err


def test_head_maps_overlay_matches_the_index():
    """The picture's data: attention tiles sum to one per row; the kept overlay is the index."""
    from mif_compile.plot import head_maps
    from tests.search.planted import PlantedModel

    import mif_compile.kernels as K
    from mif_compile.search import candidate_index

    layer = PlantedModel([("vertical", "block")], n=640).layers[0]
    q, k = layer.q[:, :1], layer.k[:, :1]
    scale = 128 ** -0.5
    hp = HP.vertical_slash(40, 100)
    attn, kept, tile = head_maps(q, k, hp, scale=scale, max_px=640)  # one pixel per (query, key)
    assert tile == 1
    mask = K.index_to_dense_mask(candidate_index(q, k, hp, scale=scale), 640, 64)[0, 0]
    assert torch.equal(kept > 0, mask) and torch.equal(kept[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
    torch.testing.assert_close(attn.sum(1), torch.ones(640, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float((attn * kept)[64:].sum(1).mean()) > 0.95  # the vertical head's mass is kept
    attn4, kept4, tile = head_maps(q, k, hp, scale=scale, max_px=160)  # 4 x 4 tiles: means of the above
    assert tile == 4
    torch.testing.assert_close(attn4, attn.view(160, 4, 160, 4).sum(3).mean(1))
    causal = torch.ones(640, 640, dtype=torch.float64).tril()
    torch.testing.assert_close(kept4, kept.view(160, 4, 160, 4).sum((1, 3)) / causal.view(160, 4, 160, 4).sum((1, 3)).clamp(min=1))
    _, kept_dense, _ = head_maps(q, k, HP.dense(), scale=scale, max_px=160)
    assert torch.equal(kept_dense > 0, torch.ones(160, 160).tril() > 0)


def test_search_modes_fixed_mass_and_minference_out(tmp_path, capsys):
    out = tmp_path / "plan.json"
    base = ["search", "--model", "tiny", "--seq-len", 384, "--out", out, "--candidates", *CANDS, "--no-progress"]
    # checked before the model loads: MInference's format cannot hold the mass targets
    code, _, err = _run(capsys, *base, "--modes", "fixed,mass", "--minference-out", tmp_path / "mi.json")
    assert code == 2 and "--minference-out" in err and "--drop-mass" in err and "--modes fixed" in err
    for bad, what in ((["--modes", "fixed,adaptive"], "argument --modes: expected fixed, mass or fixed,mass"),
                      (["--masses", "0.9,1.5"], "argument --masses: expected numbers in (0, 1]"),
                      (["--mass-caps", "100"], "argument --mass-caps: expected a cap V,S"),
                      (["--candidates", "vertical_slash:30,100,mass=0.9"], "leave out 'mass'")):
        code, _, err = _run(capsys, *base, *bad)
        assert code == 2 and what in err, err
    code, stdout, err = _run(capsys, *base, "--modes", "fixed,mass", "--masses", "1.0,0.9", "--mass-caps", "30,100",
                             "--minference-out", tmp_path / "mi.json", "--drop-mass", "--target", 0.5)
    assert code == 0, err
    scores = json.loads((tmp_path / "plan.json.search" / "layer_000.json").read_text())
    assert [HP.from_json(c) for c in scores["candidates"]][-2:] == [HP.vertical_slash(30, 100, mass=1.0),
                                                                     HP.vertical_slash(30, 100, mass=0.9)]
    plan = load_plan(out)
    n_mass = plan.count_mass()
    assert "adaptive index (mass target): " in stdout
    assert load_plan(tmp_path / "mi.json").layers == plan.without_mass().layers
    assert ("mass target of" in err) == (n_mass > 0)


def test_show_and_plot_a_plan_with_mass_targets(tmp_path, capsys):
    plan = ModelPlan(((HP("vertical_slash", (100, 6096), 0.97, 0.95), HP("vertical_slash", (30, 800), 0.96, "fixed")) * 2,
                      (HP("vertical_slash", (100, 6096), 0.99, 0.99), HP("a_shape", (64, 128), 0.95)) * 2))
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    code, stdout, _ = _run(capsys, "show", path)
    assert code == 0
    assert "layer   0: 2 x vertical_slash(v=100, s=6096, mass=0.95), 2 x vertical_slash(v=30, s=800, mass=fixed)" \
        in stdout
    assert "adaptive index (mass target): 4 of 6 vertical-slash heads (mass=0.95 x2, mass=0.99 x2), 2 fixed budgets\n" \
        in stdout
    fixed = tmp_path / "fixed.json"
    save_plan(plan.without_mass(), fixed)
    code, stdout, _ = _run(capsys, "show", fixed)
    assert "adaptive index (mass target): none of 6 vertical-slash heads, 6 fixed budgets\n" in stdout
    # heads without a mass setting run the backend's (the adaptive index by default), and show says so
    inherit = tmp_path / "inherit.json"
    save_plan(ModelPlan(((HP.vertical_slash(), HP.vertical_slash(mass="fixed"), HP.a_shape()),)), inherit)
    code, stdout, _ = _run(capsys, "show", inherit)
    assert ("adaptive index (mass target): none of 2 vertical-slash heads, 1 fixed budgets, 1 take the backend's "
            "mass setting (default 1.0, the adaptive index)\n") in stdout, stdout
    # ... and MInference's format cannot say "inherit": exporting them says they come back fixed
    code, _, err = _run(capsys, "convert", inherit, tmp_path / "inherit_mi.json", "--to", "minference")
    assert code == 0 and "1 vertical-slash head(s) take the backend's mass setting" in err, err
    assert "read back as mass='fixed'" in err
    assert load_plan(tmp_path / "inherit_mi.json").layers[0][0].mass == "fixed"
    code, _, err = _run(capsys, "convert", path, tmp_path / "mi.json", "--to", "minference")
    assert code == 2 and "layer 0, head 0: MInference's format has no mass target" in err and "4 head(s)" in err
    code, _, err = _run(capsys, "convert", path, tmp_path / "ours.json", "--drop-mass")
    assert code == 2 and "--drop-mass applies to --to minference only" in err
    if importlib.util.find_spec("matplotlib") is None:
        return
    png = tmp_path / "map.png"
    code, stdout, err = _run(capsys, "show", path, "--plot", png, "--head", "0:0", "--model", "tiny", "--seq-len", 300)
    assert code == 0, err
    for p in (png, tmp_path / "map_L0_H0.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_plan_marks_the_adaptive_heads():
    pytest.importorskip("matplotlib")
    from mif_compile import plot

    plan = ModelPlan(((HP.vertical_slash(mass=0.95), HP.vertical_slash()),))
    assert [plot._category(hp) for hp in plan.layers[0]] == [plot._MASS, HP.vertical_slash().pattern]
    assert plot._ORDER.index(plot._MASS) != plot._ORDER.index(HP.vertical_slash().pattern)
