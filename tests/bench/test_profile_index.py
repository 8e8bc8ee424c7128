"""CPU check of benchmarks/profile_index.py: its stages are the op's own pipeline (their index is the
one ``build_layer_index`` builds), and it writes a row per (N, mode) with stage times and kernels."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import profile_index  # noqa: E402
from structured import structured_qkv  # noqa: E402

from mif_compile import HeadPattern  # noqa: E402


def test_stages_rebuild_the_ops_index():
    q, k, _ = structured_qkv("mixed", heads=2, kv_heads=1, seq_len=2048, head_dim=32, dtype=torch.float32)
    calls = profile_index.stage_calls(q, k, HeadPattern.vertical_slash(64, 256, mass="fixed"), scale=32 ** -0.5,
                                      last_q=64, block_m=128, impl="reference")
    assert "select" not in calls  # fixed budgets have no selection stage
    for a, b in zip(calls["build"](), calls["index"]()):
        assert torch.equal(a, b)
    adaptive = profile_index.stage_calls(q, k, HeadPattern.vertical_slash(64, 256, mass=1.0), scale=32 ** -0.5,
                                         last_q=64, block_m=128, impl="reference")
    v_idx, s_off, share = adaptive["select"]()
    assert v_idx.shape[:2] == s_off.shape[:2] == share.shape == (1, 2)


def test_quick_run_writes_rows(tmp_path):
    rows = profile_index.main(["--quick", "--modes", "fixed,1.0", "--out", str(tmp_path), "--tag", "_t"])
    assert [r["mode"] for r in rows] == ["fixed", "1.0"]
    fixed, adaptive = rows
    assert fixed["stage_ms"]["select"] is None and adaptive["stage_ms"]["select"] > 0
    for r in rows:
        assert r["index_ms"] > 0 and r["launches"] > 0 and r["kernels"]
        assert [x["us"] for x in r["kernels"]] == sorted((x["us"] for x in r["kernels"]), reverse=True)
    assert json.loads((tmp_path / "profile_index_t.json").read_text()) == rows
