"""Command-line errors: one line on stderr that names the flag and the value, exit code 2, and no
traceback unless ``--debug``; checked before any model runs. Also ``MIF_COMPILE_LOG`` values we do
not know, the help texts, and ``examples/search_plan.py`` leaving nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mif_compile import ConfigError, HeadPattern, ModelPlan, save_plan
from mif_compile.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, *argv, code=2) -> tuple[str, str]:
    """Run the CLI, expect exit ``code`` and a single stderr line without a traceback; (line, stdout)."""
    rc, out, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0], out


@pytest.mark.parametrize("argv, needles", [
    (["search", "--model", "random:layers=2,heads=3"], ["--model random:layers=2,heads=3", "hidden=4096",
                                                          "not a multiple of heads=3"]),
    (["search", "--model", "random:heads=4,kv_heads=3,hidden=64"], ["heads=4", "kv_heads=3"]),
    (["search", "--model", "random:layers=0"], ["--model random:layers=0", "layers must be positive"]),
    (["search", "--model", "nosuchmodel"], ["--model 'nosuchmodel'", "does not exist", "local folders"]),
    (["search", "--model", "tiny", "--seq-len", "0"], ["--seq-len", "'0'"]),
    (["search", "--model", "tiny", "--seq-len", "1k"], ["--seq-len", "'1k'"]),
    (["search", "--model", "tiny", "--target", "1.5"], ["--target", "'1.5'", "(0.0, 1.0]"]),
    (["search", "--model", "tiny", "--rows-last", "-1"], ["--rows-last", "'-1'"]),
    (["search", "--model", "tiny", "--candidates", "sliding:3"], ["--candidates", "'sliding:3'", "unknown pattern"]),
    (["search", "--model", "tiny", "--text", "no/such.txt", "--seq-len", "32"], ["--text 'no/such.txt'",
                                                                                "no such file"]),
    (["search", "--model", "tiny", "--seeds", "1"], ["unrecognized arguments: --seeds 1"]),
    (["show", "no/such.json"], ["no/such.json", "cannot read plan file"]),
    (["show", "--head", "3"], ["the following arguments are required: plan"]),
    (["convert", "a.json"], ["dst"]),
    (["eval", "--lengths", "abc"], ["--lengths", "'abc'", "comma-separated integers"]),
    (["eval", "--lengths", "512,-4"], ["--lengths", "'512,-4'"]),
    (["eval", "--depths", "x"], ["--depths", "'x'"]),
    (["eval", "--a-shape", "128"], ["--a-shape", "'128'", "two integers"]),
    (["eval", "--config", "no/such.json"], ["--config 'no/such.json'", "cannot read plan file"]),
    (["eval", "--pattern", "vertical_slash:1k,2"], ["--pattern 'vertical_slash:1k,2'", "integers"]),
    (["eval", "--pattern", "sliding"], ["--pattern 'sliding'", "unknown pattern"]),
    (["eval", "--tasks", "needle,speed"], ["--tasks 'needle,speed'"]),
    (["eval", "--model", "nosuchmodel"], ["--model 'nosuchmodel'", "does not exist", "local folders"]),
    (["eval", "--kv-budget", "4k"], ["--kv-budget", "'4k'", "comma-separated integers"]),
    (["eval", "--kv-budget", "128,0"], ["--kv-budget", "'128,0'", "positive integers"]),
    (["eval", "--kv-budget", "32"], ["--kv-budget 32: kv_budget=32", "smaller than the observation window"]),
    (["eval", "--kv-budget", "96,96"], ["--kv-budget: 96 is given twice"]),
    (["eval", "--score", "greedy"], ["--score", "'greedy'", "teacher", "decode"]),
])
def test_bad_input_is_one_line_naming_flag_and_value(capsys, argv, needles):
    line, out = _one_line_error(capsys, *argv)
    assert line.startswith(f"mif-compile {argv[0]}: error: "), line
    for needle in needles:
        assert needle in line, line
    assert out == ""  # nothing ran


def test_a_folder_that_is_no_model(tmp_path, capsys):
    line, _ = _one_line_error(capsys, "search", "--model", tmp_path, "--seq-len", 32)
    assert f"--model {str(tmp_path)!r}: cannot load the model" in line


def test_eval_with_a_plan_for_another_model_fails_before_the_dense_run(tmp_path, capsys):
    """The built-in model has 2 layers of 8 heads: a 3-layer plan and a 4-head plan are refused at once."""
    for name, plan, needle in [
        ("layers.json", ModelPlan(((HeadPattern.a_shape(16, 64),) * 8,) * 3), "the plan has 3 layers, but the model has 2"),
        ("heads.json", ModelPlan(((HeadPattern.a_shape(16, 64),) * 4,) * 2), "layer 0: the plan gives 4 heads, but the "
                                                                            "model has 8 query heads"),
    ]:
        save_plan(plan, tmp_path / name)
        line, out = _one_line_error(capsys, "eval", "--config", tmp_path / name, "--lengths", 256)
        assert f"--config {str(tmp_path / name)!r} with --model 'builtin': {needle}" in line, line
        assert out == ""  # not a line of the table: the dense run never started


def test_show_head_with_a_plan_for_another_model(tmp_path, capsys):
    """--head loads the model: a plan of other layer counts is refused before anything is drawn."""
    save_plan(ModelPlan(((HeadPattern.dense(),) * 4,) * 3), tmp_path / "p.json")  # tiny: 2 layers of 4 heads
    line, _ = _one_line_error(capsys, "show", tmp_path / "p.json", "--plot", tmp_path / "p.png", "--head", "0:1",
                              "--model", "tiny", "--seq-len", 64)
    assert "with --model tiny: the plan has 3 layers, but the model has 2" in line
    assert not (tmp_path / "p.png").exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["search", "--model", "nosuchmodel", "--debug"])
    with pytest.raises(ConfigError, match="--lengths|--config"):
        main(["eval", "--config", "no/such.json", "--debug"])


def test_unexpected_errors_are_one_line_with_exit_code_1(tmp_path, capsys, monkeypatch):
    import mif_compile.cli as cli

    def broken(path):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "load_plan", broken)
    line, _ = _one_line_error(capsys, "convert", tmp_path / "a.json", tmp_path / "b.json", code=1)
    assert line == "mif-compile convert: error: RuntimeError: boom second line (run with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        main(["convert", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--debug"])


@pytest.mark.parametrize("argv, usage", [
    ([], "usage: mif-compile [-h]"),
    (["search"], "usage: mif-compile search"),
    (["show"], "usage: mif-compile show"),
    (["convert"], "usage: mif-compile convert"),
    (["eval"], "usage: mif-compile eval"),
])
def test_help_names_the_command_without_rst(capsys, argv, usage):
    code, out, _ = _run(capsys, *argv, "--help")
    assert code == 0 and out.startswith(usage), out[:200]
    assert "``" not in out
    if argv:
        assert "--debug" in out


def test_evaluate_module_keeps_its_own_name(capsys):
    from mif_compile.evaluate import main as eval_main

    assert eval_main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m mif_compile.evaluate")


def test_unknown_log_level_is_reported():
    env = dict(os.environ, MIF_COMPILE_LOG="verbose")
    proc = subprocess.run([sys.executable, "-c", "import mif_compile"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "MIF_COMPILE_LOG='verbose' is not one of info, debug, warning" in proc.stderr
    env["MIF_COMPILE_LOG"] = "Info"  # known levels in any case stay silent at import
    proc = subprocess.run([sys.executable, "-c", "import mif_compile"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""


def test_search_plan_example_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """Without --out the example writes its plan and state into a temporary folder it removes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_plan_example", os.path.join(ROOT, "examples", "search_plan.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    seen = []

    def fake_run(args, out):  # what search() would leave: the plan and OUT.search/
        os.makedirs(out + ".search")
        save_plan(ModelPlan(((HeadPattern.dense(),),)), out)
        seen.append(out)

    monkeypatch.setattr(example, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["search_plan.py"])
    example.main()
    assert len(seen) == 1 and not os.path.exists(seen[0]) and not os.path.exists(os.path.dirname(seen[0]))
    assert os.listdir(tmp_path) == [] and "not kept" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["search_plan.py", "--out", "kept.json"])
    example.main()
    assert sorted(os.listdir(tmp_path)) == ["kept.json", "kept.json.search"]


def test_cuda_device_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    line, _ = _one_line_error(capsys, "search", "--model", "tiny", "--device", "cuda")
    assert "--device 'cuda': this torch sees no CUDA device" in line
