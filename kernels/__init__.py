"""Sparse-attention kernels of mif-compile: estimation, index building, attention.

Each public function takes impl="reference" | "triton" | "auto" (see docs/kernel-contract.md).
Importing this package loads only torch code; Triton kernels are imported on first use.
"""

from .api import (
    block_sparse_topk,
    build_bs_index,
    build_vs_index,
    max_blocks_per_row,
    sparse_attention,
    vertical_slash_scores,
    vertical_slash_select,
    vertical_slash_topk,
)
from .reference import BLOCK_N, SparseIndex, count_kept_pairs, index_to_dense_mask

__all__ = [
    "BLOCK_N",
    "SparseIndex",
    "block_sparse_topk",
    "build_bs_index",
    "build_vs_index",
    "count_kept_pairs",
    "index_to_dense_mask",
    "max_blocks_per_row",
    "sparse_attention",
    "vertical_slash_scores",
    "vertical_slash_select",
    "vertical_slash_topk",
]
