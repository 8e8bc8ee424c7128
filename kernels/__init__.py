"""Sparse-attention kernels of mif-compile: estimation, index building, attention.

Each public function takes impl="reference" | "triton" | "auto" (see docs/kernel-contract.md).
Importing this package loads only torch code; Triton kernels are imported on first use.
"""


def _give_name_to_hub_kernels() -> bool:
    """True when this module, imported by the top-level name ``kernels``, has handed it to the
    installed Hugging Face package of that name.

    This source folder is on sys.path only when Python runs in a checkout's root (pytest, ``python -c``
    or ``python -m`` there), where it shadows the Hugging Face ``kernels`` package, which transformers
    >= 5.25 requires and imports. mif-compile never imports this name (its modules are
    ``mif_compile.kernels``), so when that package is installed it takes the name: a module may
    replace itself in ``sys.modules``, and the import statement returns the replacement.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    return True


if __name__ == "kernels" and _give_name_to_hub_kernels():
    pass  # `import kernels` now yields the Hugging Face package; nothing of ours is defined
else:
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
