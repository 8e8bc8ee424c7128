"""Comparison helpers for kernel tests: judge a low-precision result against float64.

`assert_close_to_ref64(out, out_pt, ref64)` checks
  max|out - ref64| <= 2 * max|out_pt - ref64| + atol      (out_pt: same-precision PyTorch result)
  ||out - ref64|| / ||ref64|| <= rtol_norm[dtype]
and that `out` holds no NaN/inf. Tolerances: bf16 ~1e-2, fp16 2e-3, fp32 1e-5 (3e-4 on CUDA,
where fp32 dots run in TF32).
"""

from __future__ import annotations

import torch

_NORM = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}
_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def tolerances(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(relative-norm tolerance, atol) for results of this dtype computed on this device."""
    norm, atol = _NORM[dtype], _ATOL[dtype]
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        norm, atol = 3e-4, 1e-3
    return norm, atol


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    diff = (out.double() - ref64.double()).norm()
    den = ref64.double().norm()
    return float(diff / den) if den > 0 else float(diff)


def assert_close_to_ref64(out: torch.Tensor, out_pt: torch.Tensor, ref64: torch.Tensor, *,
                          rtol_norm: float | None = None, atol: float | None = None) -> None:
    """Raise AssertionError with the measured errors when `out` is not as close as it should be."""
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"non-finite values in output: {int((~torch.isfinite(out)).sum())}"
    norm_tol, atol_d = tolerances(out.dtype, out.device)
    norm_tol = norm_tol if rtol_norm is None else rtol_norm
    atol = atol_d if atol is None else atol
    ref = ref64.double().to(out.device)
    err = (out.double() - ref).abs().max().item()
    err_pt = (out_pt.double().to(out.device) - ref).abs().max().item()
    assert err <= 2 * err_pt + atol, f"max error {err:.3e} > 2 * {err_pt:.3e} (same-precision PyTorch) + {atol:.1e}"
    rel = rel_err(out, ref)
    assert rel <= norm_tol, f"relative norm error {rel:.3e} > {norm_tol:.1e} for {out.dtype}"
