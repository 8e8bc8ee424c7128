"""SnapKV-style KV-cache compression after a causal prefill: which keys each kv head keeps.

SnapKV (Li et al., 2024) keeps, per kv head, the keys of an observation window (the last ``window``
positions) and the prefix keys that the window's queries attend most: the softmax of the window's
queries against every key, summed over the window's rows (and here over the query heads of a GQA
group), max-pooled along the keys with a kernel of ``pool`` (so neighbours of a strong key come
along), top-k. The column sums are exactly what the vertical-slash estimation computes from its
last ``last_q`` queries (``vertical_slash_scores``' ``col``), so with ``window == last_q`` the op
reuses them and reads the keys no second time.

Rules, stated once (the tests hold a float64 reference to them):

- ``keep`` keys per (batch row, kv head), in their original order; the window is always kept.
- Ties of the pooled votes go to the earlier position (a stable sort), so the choice is a function
  of the votes alone.
- Left padding (row b's first ``P_b`` positions are pads, the rest real): the pads keep their
  slots, the first ``P_b`` of the ``keep``, and are never chosen as real keys; the row's other
  ``keep - P_b`` slots are its window and its top-voted real prefix keys. Hugging Face builds the
  decode mask as ``attention_mask[b, :cache_len + 1]``, whose first ``P_b`` entries are zeros: this
  layout keeps that mask right. Any other padding (a pad after a real key) is refused.

Pure torch (no host sync except where the caller sizes ``keep``), used for every impl.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_votes", "kept_length", "check_left_padding", "snapkv_indices", "gather_kept"]


def group_votes(col: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """col: fp32 [B, H, N] (window rows' softmax summed per query head) -> [B, Hkv, N], summed over
    the query heads of each GQA group (query head h reads kv head h // (H / Hkv))."""
    B, H, N = col.shape
    return col.view(B, num_kv_heads, H // num_kv_heads, N).sum(2)


def kept_length(n: int, budget: int, key_padding: torch.Tensor | None) -> int:
    """Keys each row keeps: ``min(n, budget)``, or with padding ``min(n, budget + max_b P_b)`` so that
    every row keeps at least ``budget`` real keys (or all it has). Reads the pad count (host sync)."""
    if key_padding is None:
        return min(n, budget)
    p_max = int((~key_padding.to(torch.bool)).sum(1).max()) if key_padding.numel() else 0
    return min(n, budget + p_max)


def check_left_padding(key_padding: torch.Tensor) -> int | None:
    """The first row whose padding is not left padding (a pad after a real key), or None (host sync)."""
    real = key_padding.to(torch.int8)
    bad = (real[:, 1:] < real[:, :-1]).any(1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def snapkv_indices(votes: torch.Tensor, keep: int, window: int, pool: int,
                   key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, Hkv, keep], ascending: the positions each (row, kv head) keeps.

    votes: [B, Hkv, N] (the window's attention per key, :func:`group_votes`); ``keep`` >= ``window``
    (plus the row's pads, see the module docstring) and < N; key_padding: bool [B, N], True = real,
    left padding only.
    """
    B, Hkv, N = votes.shape
    prefix = N - window
    s = votes[..., :prefix].float()
    if pool > 1:
        s = F.max_pool1d(s.reshape(B * Hkv, 1, prefix), pool, stride=1, padding=pool // 2).view(B, Hkv, prefix)
    if key_padding is not None:
        # pads first, in order: they hold the slots the decode mask reads as zeros
        s = s.masked_fill(~key_padding[:, None, :prefix].to(torch.bool), float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : keep - window]
    win = torch.arange(prefix, N, device=votes.device).expand(B, Hkv, window)
    return torch.cat([order.sort(dim=-1).values, win], dim=-1)


def gather_kept(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, N, D], idx: [B, Hkv, K] -> [B, Hkv, K, D] (contiguous)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1])).contiguous()
