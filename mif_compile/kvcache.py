"""``torch.ops.mif.sparse_attention_snapkv``: a layer's causal prefill plus its compressed KV cache.

With ``kv_budget`` set, the pass puts this op where it would put ``mif.sparse_attention`` at a causal
prefill whose keys and values the graph stores in a cache (``DynamicLayer.update``'s ``torch.cat``
results, graph outputs that Dynamo writes back to the cache object), and makes the graph store the
op's compressed k/v instead. So each layer's full k/v die with the layer and peak memory holds at
most one layer's full k/v on top of the compressed cache.

The attention output is exactly ``mif.sparse_attention``'s. The kept keys are SnapKV's
(``kernels/snapkv.py``): the observation window plus the prefix keys the window's queries vote for.
The votes are the column sums of the window's softmax, which the vertical-slash estimation computes
anyway: when the layer runs the sparse path with ``kv_window == last_q`` the same scores serve both;
otherwise (dense run, other patterns, a smaller window) the estimation kernel computes them once more
(``last_q`` queries against every key, O(window * N) per head).

Inference only: no autograd formula (the pass uses this op only when grad mode is off).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops as _ops
from . import report as _report
from .config import Pattern

__all__ = ["sparse_attention_snapkv", "run_layer_snapkv"]


def _wants_scores(n: int, patterns, min_seq_len: int, impl: str, device: torch.device) -> bool:
    """Whether the sparse path will run its vertical-slash estimation (sparse_index's early exits)."""
    if n < max(min_seq_len, 2) or (impl == "auto" and device.type == "cpu"):
        return False
    return any(c == Pattern.VERTICAL_SLASH.code for c in patterns)


def run_layer_snapkv(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                     max_density, mass, site, kv_budget: int, kv_window: int, kv_pool: int):
    """(out, k_kept, v_kept): :func:`mif_compile.ops.run_layer`'s output and the layer's cache after
    SnapKV compression. q, k: [B, H(kv), N, D]; v: [B, Hkv, N, Dv]; k_kept, v_kept: [B, Hkv, K, D(v)]
    with K = ``kernels.snapkv.kept_length`` (N when nothing is dropped: then copies of k and v)."""
    from . import kernels as K
    from .kernels import snapkv as S

    q, k, v, key_padding, patterns, budget0, budget1, mass, top_left = _ops._run_time_guard(
        q, k, v, key_padding, patterns, budget0, budget1, mass)
    if top_left:  # the pass compresses only where q_len == kv_len is proven
        raise ValueError(f"mif.sparse_attention_snapkv: q_len {q.shape[2]} != kv_len {k.shape[2]}; compression "
                         "is only for a whole prefill")
    n = q.shape[2]
    keep = S.kept_length(n, kv_budget, key_padding) if key_padding is None or not _ops._capturing(q) else None
    if keep is None:
        raise ValueError("mif.sparse_attention_snapkv: a padded batch needs a host read of its pad count, which a "
                         "CUDA graph capture forbids (prefill_cudagraphs=True with kv_budget and padding)")
    if keep < n and key_padding is not None:
        row = S.check_left_padding(key_padding)
        if row is not None:
            raise ValueError(
                f"kv_budget={kv_budget}: batch row {row} has a pad after a real token (right padding?). The "
                "compressed cache keeps a row's pads in its first slots, as left padding (what generate() uses for "
                "decoder-only models) puts them; pad on the left (tokenizer.padding_side = 'left')")
    window = min(kv_window, n)
    scores = None
    if keep < n and min(last_q, n) == window and _wants_scores(n, patterns, min_seq_len, impl, q.device):
        scores = K.vertical_slash_scores(q, k, last_q=last_q, scale=scale, key_padding=key_padding, impl=impl)
    out = _ops._attend(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                       max_density, mass, site, vs_scores=scores)
    _report.record_kv(site, n, keep)
    if keep >= n:
        return out, k.contiguous().clone(), v.contiguous().clone()
    col = scores[0] if scores is not None else K.vertical_slash_scores(
        q, k, last_q=window, scale=scale, key_padding=key_padding, impl=impl)[0]
    idx = S.snapkv_indices(S.group_votes(col, k.shape[1]), keep, window, kv_pool, key_padding)
    return out, S.gather_kept(k, idx), S.gather_kept(v, idx)


@torch.library.custom_op("mif::sparse_attention_snapkv", mutates_args=())
def sparse_attention_snapkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    patterns: list[int],
    budget0: list[int],
    budget1: list[int],
    min_seq_len: int,
    last_q: int,
    block_m: int,
    impl: str,
    max_density: float,
    mass: Optional[list[float]],
    site: int,
    kv_budget: int,
    kv_window: int,
    kv_pool: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mif.sparse_attention``'s arguments plus the compression's; returns (out, k_kept, v_kept)
    (see :func:`run_layer_snapkv`). Not differentiable."""
    q, k, v, key_padding = _ops.broadcast_batch(q, k, v, key_padding)
    out, kc, vc = run_layer_snapkv(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q,
                                   block_m, impl, max_density, mass, site, kv_budget, kv_window, kv_pool)
    return out, kc, vc


@sparse_attention_snapkv.register_fake
def _sparse_attention_snapkv_fake(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q,
                                  block_m, impl, max_density, mass, site, kv_budget, kv_window, kv_pool):
    b, n = _ops._out_batch(q, k, v), q.shape[2]
    if key_padding is None:
        kept = torch.sym_min(n, kv_budget) if not isinstance(n, int) else min(n, kv_budget)
    else:  # budget + the batch's largest pad count: known only from the data
        kept = torch.library.get_ctx().new_dynamic_size()
    out = q.new_empty(b, q.shape[1], n, v.shape[-1])
    return out, k.new_empty(b, k.shape[1], kept, k.shape[-1]), v.new_empty(b, v.shape[1], kept, v.shape[-1])
