"""Tensor parallelism: which global heads this rank's attention holds, and the plan slice for them.

Under tensor parallelism (transformers' ``tp_plan="auto"`` under ``torchrun``, or
``torch.distributed.tensor.parallel.parallelize_module`` with column-wise q/k/v and row-wise o
projections) each rank's attention sees only its own heads: the SDPA site in the Dynamo graph has
H / tp query heads and Hkv / tp kv heads, as plain local tensors. Rank r holds the global heads
r * H/tp .. (r+1) * H/tp - 1. A plan written for the whole model (H heads per layer) is sliced to
those; a plan whose layer gives exactly the local count is taken as the rank's own.

Which rank and how many: the DTensor parameters among the graph's inputs name their device mesh;
the mesh dimension called ``"tp"`` (transformers' name), else the only mesh dimension the inputs are
sharded along, gives the rank's coordinate and the TP size. Without DTensor inputs (weights sliced
by hand into plain tensors), ``torch.distributed``'s world rank and size are used when a process
group is running. A plan is sliced only when its head count is exactly local * tp, so a wrong guess
of the world (data parallel x tensor parallel without DTensor) ends in the error below, never in a
wrong slice.

Caveat: heads are assumed split evenly and in order (``Shard`` on the head dimension), as
transformers and ``ColwiseParallel`` do; other layouts need a per-rank plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .config import ConfigError, HeadPattern, ModelPlan

__all__ = ["TPRank", "RankHeads", "tp_rank", "layer_heads", "parallelize_llama"]


@dataclasses.dataclass(frozen=True)
class TPRank:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int
    source: str  # how it was found, for messages

    def describe(self) -> str:
        return f"tensor-parallel rank {self.rank} of {self.size} ({self.source})"


@dataclasses.dataclass(frozen=True)
class RankHeads:
    """The global query heads ``start .. stop - 1`` of ``total`` that one layer's site holds."""

    rank: int
    size: int
    start: int
    stop: int
    total: int
    plan: str  # "sliced" (a plan of ``total`` heads), "per rank" (a plan of the local heads) or "uniform"

    def describe(self) -> str:
        return (f"tp rank {self.rank}/{self.size}: global heads {self.start}-{self.stop - 1} of {self.total}, "
                f"plan {self.plan}")


def _mesh_rank(inputs: Sequence[Any]) -> TPRank | None:
    from torch.distributed.tensor import DTensor

    found: set[tuple[int, int, str]] = set()
    for t in inputs:
        if not isinstance(t, DTensor):
            continue
        mesh = t.device_mesh
        names = mesh.mesh_dim_names or ()
        if "tp" in names:
            dim = names.index("tp")
            return TPRank(mesh.get_local_rank(dim), mesh.size(dim), "DTensor mesh dimension 'tp'")
        for dim, p in enumerate(t.placements):
            if p.is_shard():
                label = f"DTensor mesh dimension {names[dim]!r}" if names else f"DTensor mesh dimension {dim}"
                found.add((mesh.get_local_rank(dim), mesh.size(dim), label))
    if len(found) == 1:
        return TPRank(*found.pop())
    return None  # no DTensor, or sharded along several mesh dimensions: no safe guess


def tp_rank(example_inputs: Sequence[Any]) -> TPRank | None:
    """This rank's TP coordinate for a graph with these inputs, or None without parallelism."""
    if not torch.distributed.is_available():
        return None
    inputs = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    tp = _mesh_rank(inputs)
    if tp is not None:
        return tp if tp.size > 1 else None
    dist = torch.distributed
    if dist.is_initialized() and dist.get_world_size() > 1:
        return TPRank(dist.get_rank(), dist.get_world_size(), "torch.distributed world; no DTensor among the graph's inputs")
    return None


def layer_heads(
    plan: ModelPlan, layer: int, num_heads: int, tp: TPRank | None
) -> tuple[tuple[HeadPattern, ...], RankHeads | None]:
    """The patterns of one layer's ``num_heads`` (local) query heads, and which global heads they are.

    A per-layer plan may give the global head count (sliced to this rank's heads) or the local one
    (used as it is); any other count raises :class:`ConfigError` naming both counts and the rank.
    """
    if tp is None:
        return plan.heads_for(layer, num_heads), None
    total = num_heads * tp.size
    start = tp.rank * num_heads
    if plan.layers is None:
        return plan.heads_for(layer, num_heads), _known(tp, start, num_heads, total, "uniform")
    if 0 <= layer < len(plan.layers) and len(plan.layers[layer]) == total:
        heads = plan.heads_for(layer, total)[start:start + num_heads]
        return heads, RankHeads(tp.rank, tp.size, start, start + num_heads, total, "sliced")
    if 0 <= layer < len(plan.layers) and len(plan.layers[layer]) != num_heads:
        raise ConfigError(
            f"layer {layer}: the plan gives {len(plan.layers[layer])} heads, but under {tp.describe()} this "
            f"rank's attention has {num_heads} query heads of {total}: give {total} heads per layer (the whole "
            f"model; each rank takes its slice) or {num_heads} (this rank's own)"
        )
    return plan.heads_for(layer, num_heads), _known(tp, start, num_heads, total, "per rank")


def _known(tp: TPRank, start: int, num_heads: int, total: int, plan: str) -> RankHeads | None:
    """The global heads are known only when the rank came from a DTensor mesh; the world of a
    process group may be data parallel, where every rank holds all heads."""
    if not tp.source.startswith("DTensor"):
        return None
    return RankHeads(tp.rank, tp.size, start, start + num_heads, total, plan)


def parallelize_llama(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """Shard a Hugging Face decoder over a 1-D TP ``mesh`` with ``parallelize_module``, following the
    model's own ``config.base_model_tp_plan`` ("colwise" q/k/v/gate/up, "rowwise" o/down), for where
    ``from_pretrained(..., tp_plan="auto")`` is not available (it needs ``accelerate``). Returns the
    model; embeddings and the head stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    tp_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    unknown = sorted({v for v in tp_plan.values() if v not in styles})
    if not tp_plan or unknown:
        raise ValueError(f"{type(model).__name__}: base_model_tp_plan {tp_plan!r} has no plain colwise/rowwise "
                         f"plan (unknown styles {unknown}); load it with tp_plan='auto' instead")
    prefix = model.base_model_prefix
    parallelize_module(model, mesh, {f"{prefix}.{k}": styles[v]() for k, v in tp_plan.items()})
    return model
