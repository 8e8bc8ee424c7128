"""CPU check of benchmarks/index_quality.py: it measures the op's index (reference path) on structured
inputs, and what it reports follows the adaptive rule: heads of a structured input keep their selection,
heads of random q/k (their caps hold a small share of the estimated mass) run the fixed choice."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import index_quality  # noqa: E402

from mif_compile.kernels.select import STRUCTURE_FLOOR  # noqa: E402


def test_index_quality_reports_the_rule(tmp_path, capsys):
    path = tmp_path / "iq.json"
    index_quality.main(["--seq-len", "8192", "--mix", "mixed,random", "--mass", "0.99", "--rows", "16",
                        "--heads", "2", "--kv-heads", "1", "--budgets", "100,1024", "--oracle", "0.99",
                        "--json", str(path)])
    runs = {r["mix"]: r for r in json.loads(path.read_text())}
    for run in runs.values():
        for row in run["results"]:
            assert 0 < row["density"] <= 1 and 0 <= row["err"] < 10 and 0 < row["kept_mean"] <= 1 + 1e-6, row
    mixed = {r["name"]: r for r in runs["mixed"]["results"]}
    assert mixed["mass0.99"]["heads_fixed"] == 0 and min(mixed["mass0.99"]["est_share"]) >= STRUCTURE_FLOOR
    assert mixed["mass0.99"]["err"] < 0.05 and mixed["oracle0.99"]["kept_mean"] > 0.95
    rnd = {r["name"]: r for r in runs["random"]["results"]}
    assert rnd["mass0.99"]["heads_fixed"] == 2 and max(rnd["mass0.99"]["est_share"]) < STRUCTURE_FLOOR
    # the fixed choice is what random heads run: the same index as the fixed budgets
    assert rnd["mass0.99"]["density"] == rnd["fixed"]["density"]
    assert "heads short of the target" in capsys.readouterr().out


def test_index_quality_on_the_shipped_model(tmp_path):
    """--model: q, k, v of both layers of the shipped retrieval model, recorded in one prefill, and the
    same measurements on them (no planted structure, so no sink/heavy column)."""
    layers = index_quality.model_layers(2048)
    assert len(layers) == 2
    for q, k, v, scale in layers:
        assert q.shape == (1, 8, 2048, 32) and k.shape == v.shape == (1, 4, 2048, 32) and 0 < scale < 1
    path = tmp_path / "m.json"
    index_quality.main(["--model", "--seq-len", "2048", "--mass", "1.0", "--rows", "8", "--budgets", "64,256",
                        "--json", str(path)])
    runs = json.loads(path.read_text())
    assert [r["mix"] for r in runs] == ["builtin layer 0", "builtin layer 1"]
    for run in runs:
        rows = {r["name"]: r for r in run["results"]}
        assert set(rows) == {"fixed", "mass1.0"} and "sink+heavy" not in rows["fixed"]["missed"]
        assert len(rows["mass1.0"]["est_share"]) == 8 and rows["fixed"]["err"] < 0.5
