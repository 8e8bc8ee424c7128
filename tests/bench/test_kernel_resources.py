"""benchmarks/kernel_resources.py compiles the kernel for sm_90 on this (GPU-less) machine and reads the
cubin's resource usage: numbers that change with the variant as the kernel's code says they must."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import kernel_resources  # noqa: E402


def test_variants_compile_offline_and_report_their_resources(tmp_path):
    out = tmp_path / "r.json"
    rows = kernel_resources.main(["--head-dim", "64", "--variants", "single/0/0", "pair/0/0", "single+tma/0/2",
                                  "--out", str(out)])
    r = {row["variant"]: row for row in rows}
    assert all("error" not in row for row in rows), rows
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["stack_bytes"] >= 0 and row["shared_bytes"] > 0
    # a paired tile stages twice the keys: more shared memory than single tiles at the same stage count
    assert r["pair/0/0"]["shared_bytes"] > r["single/0/0"]["shared_bytes"]
    assert r["single+tma/0/2"]["num_stages"] == 2 and r["single/0/0"]["num_warps"] == 8  # default_config(128, 64)
    assert out.exists()


def test_the_index_kernels_compile_for_sm90_within_the_h100s_limits():
    """The index's small kernels (run cutting, the selection's two steps) compile for a Hopper target with
    the op's largest compile-time sizes (the keep kernel: 2048 candidates) and fit its shared memory."""
    rows = kernel_resources.main(["--index"])
    assert [row["kernel"] for row in rows] == list(kernel_resources.INDEX_KERNELS)
    assert all("error" not in row for row in rows), rows
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["shared_bytes"] <= kernel_resources.H100_SHARED
