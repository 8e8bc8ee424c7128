"""CPU smoke check of benchmarks/bench_snapkv.py (issue 14's benchmark): every run gives a row, the
compressed runs keep their budget, the full-cache runs keep every key, and ``--dense-estimate`` times dense
from one layer and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_snapkv.py")


def _run(tmp_path, *extra):
    cmd = [sys.executable, SCRIPT, "--tiny", "--lengths", "384", "--budgets", "64", "--decode-tokens", "2",
           "--out", str(tmp_path), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    with open(tmp_path / "bench_snapkv.json") as f:
        return {r["run"]: r for r in json.load(f)}


def test_rows_budgets_and_dense_estimate(tmp_path):
    rows = _run(tmp_path, "--dense-estimate")
    assert set(rows) == {"dense", "sparse", "sparse+snapkv"}
    dense, full, kept = rows["dense"], rows["sparse"], rows["sparse+snapkv"]
    assert dense["ttft_estimated"] == "1-layer model x layers" and dense["ttft_s"] > 0
    assert dense["error"].startswith("not attempted: --dense-estimate")
    assert full["cache_keys_per_layer"] == 384 and full["ttft_estimated"] is False
    assert kept["cache_keys_per_layer"] == 64 and kept["kv_budget"] == 64
    assert kept["cache_gb"] < full["cache_gb"]
    for r in (full, kept):
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["error"] is None and r["decode_sdpa"] == "default"


def test_dense_measured_without_the_flag(tmp_path):
    rows = _run(tmp_path, "--skip", "sparse", "--decode-sdpa", "cudnn")
    assert set(rows) == {"dense", "sparse+snapkv"}
    assert rows["dense"]["ttft_estimated"] is False and rows["dense"]["error"] is None
    assert rows["dense"]["cache_keys_per_layer"] == 384 and rows["dense"]["decode_sdpa"] == "cudnn"
