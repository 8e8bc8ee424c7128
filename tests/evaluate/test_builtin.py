"""The shipped retrieval model (mif_compile/data/retrieval-llama, trained by train/train_retrieval.py on an
H100): dense retrieval is high on CPU, and the backend with a budget covering every key equals dense."""

import json
import os

import pytest
import torch

from mif_compile import BackendConfig, HeadPattern
from mif_compile.evaluate import BUILTIN, Run, _Runner, evaluate, load_model, main
from mif_compile.tasks import multikey_sample


@pytest.fixture(scope="module")
def builtin():
    torch.manual_seed(0)
    return load_model("builtin", "cpu", torch.float32)


def test_dense_retrieval_is_high(builtin):
    model, fmt, tok = builtin
    res = evaluate(model, fmt, tok, [Run("dense")], [1024], depths=3, samples=4, keys=16, ppl_samples=1,
                   log=lambda _: None)
    (row,) = res["rows"]
    assert row["multikey"] >= 0.9, row  # 64 queried keys
    assert row["needle"] >= 0.9, row
    assert row["ppl"] < 3.0, row  # bytes of Python source


def test_full_coverage_backend_matches_dense(builtin):
    model, fmt, tok = builtin
    cfg = BackendConfig(default_pattern=HeadPattern.vertical_slash(1000, 6096), min_seq_len=0, max_density=1.0,
                        impl="reference")
    sample = multikey_sample(fmt, tok.encode(open(os.path.join(BUILTIN, "..", "..", "tasks.py")).read() * 4), 768, 8, 0)
    ids = torch.tensor([sample.ids])
    dense = _Runner(model, Run("dense"), inductor=False).hidden(ids)
    ours_runner = _Runner(model, Run("ours", cfg), inductor=False)
    ours = ours_runner.hidden(ids)
    assert "2 sparse" in ours_runner.report
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings()
    assert torch.equal(head(ours).argmax(-1), head(dense).argmax(-1))


def test_cli_writes_table_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--model", "builtin", "--lengths", "512", "--depths", "2", "--samples", "1", "--keys", "4",
               "--ppl-samples", "1", "--baselines", "a_shape", "--a-shape", "16,64", "--fixed", "off",
               "--match-density", "off", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "min_seq_len=0 and max_density=1.0" in printed and "a_shape" in printed
    assert printed.count("needle multikey") == 1, printed  # the table is printed once, row by row
    assert "3 runs (dense, ours, a_shape) x 2,048 tokens each" in printed  # 2 needles + 1 multi-key + 1 ppl
    assert "6.14k/6.14k" in captured.err or "6144/6144" in captured.err, captured.err  # tqdm's progress
    res = json.loads((out / "results.json").read_text())
    assert res["runs"]["ours"]["sparse_settings"]["impl"] == "reference"  # CPU: "auto" would run dense
    assert [r["run"] for r in res["rows"]] == ["dense", "ours", "a_shape"]
    a_shape = res["rows"][2]
    assert a_shape["density"] < res["rows"][1]["density"] == 1.0 and res["runs"]["a_shape"]["density_per_layer"]["512"]
    assert (out / "needle.png").stat().st_size > 1000 and (out / "table.txt").exists() and (out / "table.md").exists()


def test_cli_out_without_matplotlib(tmp_path, capsys, monkeypatch):
    import sys

    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as when it is not installed
    out = tmp_path / "eval"
    rc = main(["--model", "builtin", "--lengths", "256", "--depths", "2", "--samples", "1", "--tasks", "needle",
               "--baselines", "", "--fixed", "off", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "needle.png not drawn: it needs matplotlib (pip install matplotlib)" in printed
    assert "wrote results.json, table.txt, table.md to" in printed
    assert json.loads((out / "results.json").read_text())["rows"] and (out / "table.txt").exists()
    assert not (out / "needle.png").exists()


def test_cli_rejects_unknown_baseline(capsys):
    assert main(["--model", "builtin", "--baselines", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
