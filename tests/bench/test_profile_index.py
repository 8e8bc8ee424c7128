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


def test_op_and_kernel_stages_are_the_ops_own():
    """``attn`` runs the kernel on the stage's index and ``op`` the whole op as the backend calls it: the
    same output where the index is kept, dense SDPA where it keeps more than max_density of the pairs."""
    from mif_compile import BackendConfig, ops

    q, k, v = structured_qkv("mixed", heads=2, kv_heads=1, seq_len=2048, head_dim=32, dtype=torch.float32)
    for caps in ((64, 256), (16, 64)):
        calls = profile_index.stage_calls(q, k, HeadPattern.vertical_slash(*caps, mass=1.0), scale=32 ** -0.5,
                                          last_q=64, block_m=128, impl="reference", v=v)
        density = float(ops.kept_density(calls["index"](), 2048, 128))
        ran_sparse = density <= BackendConfig().max_density
        want = calls["attn"]() if ran_sparse else ops.dense_attention(q, k, v, None, 32 ** -0.5)
        torch.testing.assert_close(calls["op"](), want, rtol=0, atol=0)
        if caps == (16, 64):
            assert ran_sparse, density  # small caps: the op keeps the index


def test_quick_run_writes_rows(tmp_path):
    rows = profile_index.main(["--quick", "--modes", "fixed,1.0", "--out", str(tmp_path), "--tag", "_t"])
    assert [r["mode"] for r in rows] == ["fixed", "1.0"]
    fixed, adaptive = rows
    assert fixed["stage_ms"]["select"] is None and adaptive["stage_ms"]["select"] > 0
    for r in rows:
        assert r["index_ms"] > 0 and r["launches"] > 0 and r["kernels"] and r["attn_ms"] > 0 and r["op_ms"] > 0
        assert [x["us"] for x in r["kernels"]] == sorted((x["us"] for x in r["kernels"]), reverse=True)
    assert json.loads((tmp_path / "profile_index_t.json").read_text()) == rows
