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
