"""mif-compile eval's settings and baselines: the op's default settings pass nothing else to the op,
baselines at a matched kept density get budgets that reach it, and the results carry what was run."""

import dataclasses
import json

import pytest
import torch

import mif_compile
from mif_compile import BackendConfig, HeadPattern, ModelPlan
from mif_compile.config import ConfigError
from mif_compile.evaluate import (_density_of, _resolved, default_runs, format_markdown, main, match_budget,
                                  op_settings, overrides)
from mif_compile.ops import build_layer_index, encode_heads, kept_density

CFG = BackendConfig()


def _density(head, q, k):
    codes, b0, b1 = encode_heads((head,) * q.shape[1])
    index = build_layer_index(q, k, None, q.shape[-1] ** -0.5, codes, b0, b1, CFG.last_q, CFG.block_m, "reference")
    return float(kept_density(index, q.shape[2], CFG.block_m))


@pytest.mark.parametrize("target", [0.2, 0.35, 0.6, 0.9])
def test_a_shape_budget_reaches_the_target_density(target):
    n = 4096
    head, dens = match_budget(HeadPattern.a_shape(128, 3968), target, n, CFG)
    assert head.pattern.value == "a_shape" and head.budget[0] == 128
    q = torch.randn(1, 2, n, 16)  # A-shape does not read q/k: any input, the same density
    assert dens == pytest.approx(_density(head, q, q[:, :1]), abs=1e-12)
    # one 64-key tile more or less on every 128-query block moves the density by 64 * 128 * 32 pairs
    step = 64 * 128 * (n // 128) / (n * (n + 1) / 2)
    assert abs(dens - target) <= step / 2 + 1e-9, (head, dens)
    for other in (head.budget[1] - 64, head.budget[1] + 64):  # no budget a tile away is closer
        if 1 <= other <= n:
            assert abs(_density(HeadPattern.a_shape(128, other), q, q[:, :1]) - target) >= abs(dens - target) - 1e-12


@pytest.mark.parametrize("target", [0.15, 0.4, 0.75])
def test_block_sparse_budget_reaches_the_target_density_on_the_calibration_input(target):
    torch.manual_seed(0)
    n = 2048
    qk = [(torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), 0.25), (torch.randn(1, 4, n, 16),
                                                                       torch.randn(1, 2, n, 16), 0.25)]
    head, dens = match_budget(HeadPattern.block_sparse(100), target, n, CFG, qk=qk)
    k = head.budget[0]
    assert dens == pytest.approx(_density_of(head, qk, CFG, "reference"))
    assert abs(dens - target) < 0.04, (head, dens)
    for other in (k - 1, k + 1):  # the closest budget
        if 1 <= other <= n // 64:
            assert abs(_density_of(HeadPattern.block_sparse(other), qk, CFG, "reference") - target) >= abs(dens - target)


def test_full_density_takes_the_full_budget():
    head, dens = match_budget(HeadPattern.a_shape(128, 3968), 1.0, 1024, CFG)
    assert dens == 1.0 and head.budget == (128, 1024)  # not the smallest budget whose tiles cover all pairs


def test_match_budget_rejects_what_it_cannot_match():
    with pytest.raises(ValueError, match="captured q/k"):
        match_budget(HeadPattern.block_sparse(10), 0.3, 1024, CFG)
    with pytest.raises(ConfigError, match="not vertical_slash"):
        match_budget(HeadPattern.vertical_slash(), 0.3, 1024, CFG)


def test_default_settings_override_nothing():
    assert op_settings("auto", [65536, 131072]) == "default"
    assert op_settings("auto", [16384, 65536]) == "forced"  # 16K would run dense under the defaults
    assert op_settings("forced", [65536]) == "forced" and op_settings("default", [1024]) == "default"
    runs = {r.name: r for r in default_runs(BackendConfig(), op_defaults=True, adaptive=0.99, fixed=True, match="ours")}
    assert list(runs) == ["dense", "ours", "ours_adaptive", "ours_fixed", "a_shape", "block_sparse"]
    assert runs["ours"].cfg == BackendConfig() and overrides(runs["ours"].cfg) == {}
    assert overrides(_resolved(runs["ours"].cfg, "cuda")) == {}  # "auto" stays "auto" on a GPU
    assert overrides(_resolved(runs["ours"].cfg, "cpu")) == {"impl": "reference"}  # CPU "auto" would run dense
    assert overrides(runs["ours_adaptive"].cfg) == {"mass": 0.99}
    assert overrides(runs["ours_fixed"].cfg) == {"mass": "fixed"}  # ours is the default, mass=1.0
    assert runs["a_shape"].match == runs["block_sparse"].match == "ours"
    assert overrides(runs["a_shape"].cfg) == {"default_pattern": "a_shape(n_init=128, n_local=3968)"}
    assert runs["a_shape"].cfg.min_seq_len == 32768
    forced = {r.name: r for r in default_runs(BackendConfig(), adaptive=None)}
    assert "ours_adaptive" not in forced and "ours_fixed" not in forced
    assert overrides(forced["ours"].cfg) == {"min_seq_len": 0, "max_density": 1.0}
    # a run that would change no head is left out: ours already fixed (a MInference plan's heads are)
    assert "ours_fixed" not in [r.name for r in default_runs(BackendConfig(mass="fixed"), fixed=True)]
    mi = BackendConfig(plan=ModelPlan.from_json([{"0": ["vertical_and_slash", 30, 800]}]))
    assert [r.name for r in default_runs(mi, fixed=True, adaptive=0.99, a_shape=None, block_sparse=None)] == [
        "dense", "ours"]
    with pytest.raises(ConfigError, match="--match-density 'ours_adaptive': no such run"):
        default_runs(BackendConfig(), adaptive=None, match="ours_adaptive")
    # no vertical-slash head: the adaptive index would change nothing, so there is no such run
    a = BackendConfig(default_pattern=HeadPattern.a_shape())
    assert "ours_adaptive" not in [r.name for r in default_runs(a, adaptive=0.99)]


def test_cli_default_settings_pass_no_overrides_to_the_op(monkeypatch, capsys, tmp_path):
    """--op-settings default: the backend gets BackendConfig() (impl="reference" on CPU only); at a
    length below the op's min_seq_len it runs dense, and the results say so."""
    seen = []
    real = mif_compile.backend
    monkeypatch.setattr(mif_compile, "backend", lambda cfg, **kw: seen.append(cfg) or real(cfg, **kw))
    rc = main(["--model", "builtin", "--lengths", "256", "--depths", "1", "--samples", "1", "--tasks", "needle",
               "--baselines", "", "--op-settings", "default", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert seen == [dataclasses.replace(BackendConfig(), impl="reference"),
                    dataclasses.replace(BackendConfig(), impl="reference", mass="fixed")], seen
    assert "sparse runs use the op's default settings" in out and "lengths below 32768 run dense" in out
    assert "settings changed from the op's defaults: impl=reference;" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["runs"]["ours"]["overrides"] == {"impl": "reference"}
    assert res["runs"]["ours_fixed"]["overrides"] == {"impl": "reference", "mass": "fixed"}
    ours = next(r for r in res["rows"] if r["run"] == "ours")
    assert ours["density"] == 1.0 and ours["fallback"] == 1.0  # below min_seq_len: dense


def test_cli_matched_baselines_write_their_budgets(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--model", "builtin", "--lengths", "1024", "--depths", "1", "--samples", "1", "--keys", "4",
               "--ppl-samples", "1", "--tasks", "needle,multikey,ppl", "--pattern", "vertical_slash:64,64",
               "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert "choosing the budget" in printed.err  # the progress bar says what it is doing
    res = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "ours", "ours_fixed", "a_shape", "block_sparse"]
    for r in rows.values():
        assert {"needle", "multikey", "ppl", "time_s", "fwd_ms", "forwards", "budget"} <= set(r), r
    target = rows["ours"]["density"]
    assert 0.2 < target < 0.9, rows["ours"]  # really sparse: matching means something
    a, b = rows["a_shape"], rows["block_sparse"]
    assert a["target_density"] == b["target_density"] == target
    assert a["density"] == pytest.approx(a["calibration_density"], abs=1e-9)  # A-shape: input-independent
    assert abs(a["density"] - target) < 0.07  # half a tile step at 1K (64 * 128 * 8 pairs / N^2/2)
    assert abs(b["calibration_density"] - target) < 0.07 and abs(b["density"] - target) < 0.1
    assert a["budget"].startswith("a_shape(n_init=128, n_local=") and b["budget"].startswith("block_sparse(top_k=")
    assert res["runs"]["a_shape"]["matches"] == "ours" and res["runs"]["a_shape"]["budget"]["1024"] == a["budget"]
    assert res["runs"]["ours"]["overrides"] == {"default_pattern": "vertical_slash(v=64, s=64)", "min_seq_len": 0,
                                                "impl": "reference", "max_density": 1.0}
    md = (out / "table.md").read_text()
    assert md.count("\n| 1K |") == 5 and f"at the density of ours ({target:.3f})" in md
    assert md == f"Model `builtin`.\n\n{format_markdown(res)}"
    assert (out / "needle.png").exists() and "block_sparse" in (out / "table.txt").read_text()


def test_merge_results_joins_lengths():
    from mif_compile.evaluate import merge_results

    def part(n, acc):
        rows = [{"length": n, "run": "dense", "needle": acc, "ppl": 2.0, "fwd_ms": 1.0, "time_s": 1.0},
                {"length": n, "run": "ours", "needle": acc, "ppl": 2.1, "fwd_ms": 0.5, "time_s": 1.0, "density": 0.1,
                 "budget": "vertical_slash(v=1000, s=6096)"}]
        runs = {"dense": {"density_per_layer": {}, "budget": {}, "wall_s": 1.0},
                "ours": {"density_per_layer": {str(n): [0.1, 0.1]}, "budget": {str(n): "vs"}, "wall_s": 2.0,
                         "matches": None}}
        return {"lengths": [n], "depths": [0.0, 1.0], "rows": rows, "runs": runs, "keys": 16, "samples": 1,
                "device": "x", "torch": "t", "needle": {"dense": [[acc], [acc]], "ours": [[acc], [1.0]]}}

    a, b = part(65536, 1.0), part(262144, 0.5)
    res = merge_results([a, b])
    assert res["lengths"] == [65536, 262144] and len(res["rows"]) == 4
    assert res["needle"]["ours"] == [[1.0, 0.5], [1.0, 1.0]] and a["needle"]["ours"] == [[1.0], [1.0]]  # a copy
    assert set(res["runs"]["ours"]["density_per_layer"]) == {"65536", "262144"} and res["runs"]["ours"]["wall_s"] == 4.0
    md = format_markdown(res)
    assert "| 64K | ours |" in md and "| 256K | ours |" in md and "2.1000 (+5.00%)" in md
    with pytest.raises(ValueError, match="more than one result"):
        merge_results([a, a])
