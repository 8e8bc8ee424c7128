"""Public kernel API: validate (outside compilation only), then dispatch to the reference or Triton.

impl = "reference" | "triton" | "auto" ("triton" for CUDA tensors, "reference" otherwise).
Triton modules are imported lazily here, so importing mif_compile.kernels neither imports triton
nor initialises CUDA. Block-sparse estimation and build_bs_index have no Triton kernel: their
torch code is vectorised, free of host syncs, and used for both impls.
"""

from __future__ import annotations

import math

import torch

from . import reference as _ref
from .reference import BLOCK_N, SparseIndex

_IMPLS = ("reference", "triton", "auto")
_MAX_HEAD_DIM = 256  # Triton: any head dim up to this (tiles are padded to the next power of two)


def _resolve(impl: str, t: torch.Tensor) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if t.is_cuda else "reference"
    if impl == "triton" and not (t.is_cuda or _interpreting()):
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {t.device}")
    return impl


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validating() -> bool:
    return not torch.compiler.is_compiling()


def _check_qk(q, k, v=None, key_padding=None) -> None:
    _check(q.dim() == 4 and k.dim() == 4, f"q and k must be [B, H, N, D] and [B, Hkv, N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, N, D = q.shape
    _check(k.shape[0] == B and k.shape[2] == N and k.shape[3] == D,
           f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, length, head_dim)")
    _check(k.shape[1] > 0 and H % k.shape[1] == 0, f"query heads {H} not a multiple of kv heads {k.shape[1]}")
    _check(q.dtype == k.dtype, f"q dtype {q.dtype} != k dtype {k.dtype}")
    _check(q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
           f"unsupported dtype {q.dtype}")
    _check(N >= 1, f"sequence length must be >= 1, got {N}")
    if v is not None:
        _check(v.dim() == 4 and v.shape[:3] == k.shape[:3] and v.dtype == k.dtype,
               f"v must be [B, Hkv, N, Dv] like k {tuple(k.shape)} {k.dtype} (Dv may differ), got {tuple(v.shape)} {v.dtype}")
    if key_padding is not None:
        _check(key_padding.shape == (B, N) and key_padding.dtype == torch.bool,
               f"key_padding must be bool [B, N] = [{B}, {N}], got {key_padding.dtype} {tuple(key_padding.shape)}")


def _check_triton(q, v=None) -> None:
    for name, t in (("head_dim", q), ("value head_dim", v)):
        if t is not None:
            _check(1 <= t.shape[-1] <= _MAX_HEAD_DIM,
                   f"impl='triton' supports {name} 1..{_MAX_HEAD_DIM}, got {t.shape[-1]}")
    _check(q.dtype != torch.float64, "impl='triton' does not support float64; use impl='reference'")


def _check_blocks(block_m: int, block_n: int) -> None:
    _check(block_n == BLOCK_N, f"block_n must be {BLOCK_N}, got {block_n}")
    _check(block_m in (64, 128), f"block_m must be 64 or 128, got {block_m}")


def _per_head(x, H: int, name: str, device) -> torch.Tensor:
    """Per-head int64 [H]; device None keeps a tensor where it is (sequences go to the CPU)."""
    t = torch.as_tensor(x) if device is None else torch.as_tensor(x, device=device)
    if t.dim() == 0:
        t = t.expand(H)
    if _validating():
        _check(t.shape == (H,), f"{name} must have one entry per head ({H}), got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def vertical_slash_scores(q, k, *, last_q: int, scale: float, key_padding=None, impl: str = "auto", probe_end=None):
    """fp32 (col, diag) [B, H, N]: column / diagonal sums of the last queries' softmax; ``probe_end``
    (int [B], or None: N) ends each row's probe at its last real query (right padding)."""
    if _validating():
        _check_qk(q, k, key_padding=key_padding)
        _check(last_q >= 1, f"last_q must be >= 1, got {last_q}")
    if _resolve(impl, q) == "triton":
        if _validating():
            _check_triton(q)
            _check(min(last_q, q.shape[2]) <= 128, f"impl='triton' supports last_q <= 128, got {last_q}")
        from .estimate import vertical_slash_scores as fn

        return fn(q, k, last_q=last_q, scale=scale, key_padding=key_padding, probe_end=probe_end)
    return _ref.vertical_slash_scores(q, k, last_q=last_q, scale=scale, key_padding=key_padding, probe_end=probe_end)


def vertical_slash_topk(col, diag, v_count, s_count, *, n_force_v: int = 30, n_force_s: int = 100,
                        v_max: int | None = None, s_max: int | None = None, sink_start=None):
    """int32 (v_idx [B, H, Vmax], s_off [B, H, Smax]); -1 = unused. Pure torch.

    top-k needs k = max budget as a Python int: give ``v_max``/``s_max`` with CUDA budget tensors
    (the op does: its budgets come from a static plan); ints, sequences and CPU tensors need none.
    """
    H = col.shape[1]
    v_count = _per_head(v_count, H, "v_count", None)
    s_count = _per_head(s_count, H, "s_count", None)
    if _validating():
        _check(col.shape == diag.shape and col.dim() == 3, f"col {tuple(col.shape)} and diag {tuple(diag.shape)} must be [B, H, N]")
        for name, cnt in (("v_count", v_count), ("s_count", s_count)):
            if not cnt.is_cuda:  # value checks never synchronise a device
                _check(bool((cnt >= 0).all()), f"{name} must be >= 0, got {cnt.tolist()}")
    return _ref.vertical_slash_topk(col, diag, v_count, s_count, n_force_v=n_force_v, n_force_s=n_force_s,
                                    v_max=v_max, s_max=s_max, sink_start=sink_start)


def vertical_slash_select(col, diag, v_count, s_count, mass, *, last_q: int, n_force_v: int = 30,
                          n_force_s: int = 100, v_max: int | None = None, s_max: int | None = None,
                          sink_start=None, probe_end=None):
    """(v_idx [B, H, Vc], s_off [B, H, Gc * 64], reached [B, H]): the adaptive, mass-targeted choice of
    columns and 64-diagonal slash groups (see kernels/select.py); -1 = unused; ``reached``: the target
    was met within the caps. Pure torch.

    ``mass``: fp32 [H] targets in [0, 1]; ``v_count``/``s_count`` the caps; like
    :func:`vertical_slash_topk`, CUDA cap tensors need ``v_max``/``s_max``.
    """
    from .select import vertical_slash_select as fn

    H = col.shape[1]
    v_count = _per_head(v_count, H, "v_count", None)
    s_count = _per_head(s_count, H, "s_count", None)
    mass_t = torch.as_tensor(mass, dtype=torch.float32)
    if mass_t.dim() == 0:
        mass_t = mass_t.expand(H)
    if _validating():
        _check(col.shape == diag.shape and col.dim() == 3, f"col {tuple(col.shape)} and diag {tuple(diag.shape)} must be [B, H, N]")
        _check(mass_t.shape == (H,), f"mass must have one entry per head ({H}), got shape {tuple(mass_t.shape)}")
        _check(last_q >= 1, f"last_q must be >= 1, got {last_q}")
        if not mass_t.is_cuda:
            _check(bool(((mass_t >= 0) & (mass_t <= 1)).all()), f"mass must be in [0, 1], got {mass_t.tolist()}")
        for name, cnt in (("v_count", v_count), ("s_count", s_count)):
            if not cnt.is_cuda:
                _check(bool((cnt >= 0).all()), f"{name} must be >= 0, got {cnt.tolist()}")
    v_max = _ref.budget_max(v_count, v_max, "v_max")
    s_max = _ref.budget_max(s_count, s_max, "s_max")
    return fn(col, diag, v_count, s_count, mass_t, last_q=last_q, n_force_v=n_force_v, n_force_s=n_force_s,
              v_max=v_max, s_max=s_max, sink_start=sink_start, probe_end=probe_end)


def block_sparse_topk(q, k, top_k, *, key_padding=None, k_max: int | None = None, impl: str = "auto"):
    """int32 [B, H, NB, Kmax] top-k 64-token key blocks per 64-query block; -1 = unused."""
    top_k = _per_head(top_k, q.shape[1], "top_k", None)
    if _validating():
        _check_qk(q, k, key_padding=key_padding)
        if not top_k.is_cuda:  # value checks never synchronise a device
            _check(bool((top_k >= 0).all()), f"top_k must be >= 0, got {top_k.tolist()}")
    _resolve(impl, q)
    return _ref.block_sparse_topk(q, k, top_k, key_padding=key_padding, k_max=k_max)


def build_vs_index(v_idx, s_off, n_sink, *, seq_len: int, block_m: int, block_n: int = BLOCK_N,
                   cap_s: int, cap_v: int, impl: str = "auto", sink_start=None) -> SparseIndex:
    """Unified index for vertical_slash (n_sink 0), a_shape and dense (n_sink N) heads.

    ``sink_start``: int [B] (or None: 0), each row's first real key; a left-padded row's sink is its
    first ``n_sink`` real keys, ``[sink_start, sink_start + n_sink)``, and the windows of a head with a
    sink start there too (the keys before it are pads, which attend to nothing)."""
    H = s_off.shape[1]
    n_sink = _per_head(n_sink, H, "n_sink", s_off.device)
    if _validating():
        _check_blocks(block_m, block_n)
        _check(v_idx.dim() == 3 and s_off.dim() == 3 and v_idx.shape[:2] == s_off.shape[:2],
               f"v_idx {tuple(v_idx.shape)} and s_off {tuple(s_off.shape)} must be [B, H, *]")
        _check(cap_s >= 1 and cap_v >= 1, f"cap_s and cap_v must be >= 1, got {cap_s}, {cap_v}")
        _check(seq_len >= 1, f"seq_len must be >= 1, got {seq_len}")
        if sink_start is not None:
            _check(sink_start.dim() == 1 and sink_start.shape[0] in (1, s_off.shape[0]),
                   f"sink_start must be [B] = [{s_off.shape[0]}], got {tuple(sink_start.shape)}")
    if _resolve(impl, s_off) == "triton":
        from .index import build_vs_index as fn

        return SparseIndex(*fn(v_idx, s_off, n_sink, seq_len=seq_len, block_m=block_m, block_n=block_n,
                               cap_s=cap_s, cap_v=cap_v, sink_start=sink_start))
    return _ref.build_vs_index(v_idx, s_off, n_sink, seq_len=seq_len, block_m=block_m, block_n=block_n,
                               cap_s=cap_s, cap_v=cap_v, sink_start=sink_start)


def build_bs_index(blk, *, seq_len: int, block_m: int, block_n: int = BLOCK_N, cap_s: int,
                   impl: str = "auto") -> SparseIndex:
    """Unified index from 64-token key blocks (union over the 64-row sub-blocks)."""
    if _validating():
        _check_blocks(block_m, block_n)
        _check(blk.dim() == 4 and blk.shape[2] == math.ceil(seq_len / BLOCK_N),
               f"blk must be [B, H, ceil(N/64), K] for N = {seq_len}, got {tuple(blk.shape)}")
        _check(cap_s >= 1, f"cap_s must be >= 1, got {cap_s}")
    _resolve(impl, blk)
    return _ref.build_bs_index(blk, seq_len=seq_len, block_m=block_m, block_n=block_n, cap_s=cap_s)


def sparse_attention(q, k, v, index: SparseIndex, *, scale: float, block_m: int, block_n: int = BLOCK_N,
                     key_padding=None, impl: str = "auto"):
    """out [B, H, N, Dv] (dtype of q): causal attention over the keys kept by the index (v: [B, Hkv, N, Dv])."""
    if _validating():
        _check_qk(q, k, v, key_padding)
        _check_blocks(block_m, block_n)
        B, H, N, _ = q.shape
        NM = math.ceil(N / block_m)
        bc, bo, cc, ci = index
        _check(bc.shape == (B, H, NM) and cc.shape == (B, H, NM),
               f"index counts must be [B, H, NM] = {(B, H, NM)} for block_m {block_m}, got {tuple(bc.shape)}, {tuple(cc.shape)}")
        _check(bo.shape[:3] == (B, H, NM) and ci.shape[:3] == (B, H, NM),
               f"index offsets must be [B, H, NM, cap] with NM = {NM}, got {tuple(bo.shape)}, {tuple(ci.shape)}")
        _check(all(t.dtype == torch.int32 for t in index), "index tensors must be int32")
    if _resolve(impl, q) == "triton":
        if _validating():
            _check_triton(q, v)
        from .attention import sparse_attention as fn

        return fn(q, k, v, index, scale=scale, block_m=block_m, block_n=block_n, key_padding=key_padding)
    return _ref.sparse_attention(q, k, v, index, scale=scale, block_m=block_m, block_n=block_n,
                                 key_padding=key_padding)


def max_blocks_per_row(seq_len: int, block_n: int = BLOCK_N) -> int:
    """A cap_s that always suffices: blocks are disjoint and start below N."""
    return math.ceil(seq_len / block_n)
