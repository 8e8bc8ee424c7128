"""CPU smoke check of benchmarks/profile_model.py: every run gives a row with its wall time and its
profiled time split by kind, and the compiled run is our op (it reports a kept density)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import profile_model  # noqa: E402


def test_kinds_name_the_kernels():
    assert profile_model.kind("cudnn_generated_fort_native_sdpa_sm90_knob_7") == "sdpa"
    assert profile_model.kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "sdpa"
    assert profile_model.kind("_sparse_attn_kernel") == "ours_attn"
    assert profile_model.kind("_col_diag_kernel") == "ours_index"
    assert profile_model.kind("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert profile_model.kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "inductor"
    assert profile_model.kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_tiny_run_profiles_dense_and_ours(tmp_path):
    rows = profile_model.main(["--tiny", "--layers", "1", "--lengths", "512", "--modes", "default", "--repeats", "1",
                               "--out", str(tmp_path), "--tag", "_t"])
    sdpa = [r for r in rows if r["part"] == "sdpa"]
    assert {r["layout"] for r in sdpa} == {"contiguous", "transposed"} and all(r["ms"] > 0 for r in sdpa)
    model = {r["run"]: r for r in rows if r["part"] == "model"}
    assert set(model) == {"dense_cudnn", "dense_default", "ours_default"}
    for r in model.values():
        assert r["wall_ms"] > 0 and r["launches"] > 0 and sum(r["kind_ms"].values()) > 0
    assert model["dense_default"]["density"] is None
    assert 0 < model["ours_default"]["density"] <= 1.0  # the op ran (sparse path, reference impl)
    assert (tmp_path / "profile_model_t.json").exists()
