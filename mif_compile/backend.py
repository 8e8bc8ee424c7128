"""The ``minference`` torch.compile backend.

``torch.compile(model, backend="minference", options={...})`` finds :func:`minference` through the
``torch_dynamo_backends`` entry point. It rewrites provable causal-prefill SDPA sites of the Dynamo
graph into ``torch.ops.mif.sparse_attention`` (see ``passes``), records a report, and hands the
graph to Inductor. :func:`backend` builds the same compiler function from Python arguments.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch

from .config import BackendConfig, HeadPattern, Pattern
from .report import CompileReport, _record, register_site

__all__ = ["minference", "backend"]

_graph_ids = itertools.count()


def _make_call(cfg: BackendConfig, graph_id: int, site_ids: list):
    from .ops import encode_heads

    def make_call(graph: torch.fx.Graph, f: dict[str, Any]) -> torch.fx.Node:
        codes, b0, b1 = encode_heads(f["heads"])
        site = register_site(graph_id, f["layer"], None)  # where the op records what it ran
        site_ids.append(site)
        return graph.call_function(
            torch.ops.mif.sparse_attention.default,
            (f["q"], f["k"], f["v"], f["padding"], f["scale"], codes, b0, b1,
             cfg.min_seq_len, cfg.last_q, cfg.block_m, cfg.impl, cfg.max_density, site),
        )

    return make_call


def _plan_for(cfg: BackendConfig):
    def plan_for(layer: int | None, num_heads: int, ordinal: int) -> Sequence[HeadPattern] | str:
        plan = cfg.plan
        if layer is None:
            if plan.layers is not None:
                return "cannot tell the layer index from nn_module_stack, and the plan is per layer"
            layer = ordinal
        heads = plan.heads_for(layer, num_heads)  # raises ConfigError naming layer/head/value
        if all(hp.pattern is Pattern.DENSE for hp in heads):
            return f"the plan makes every head of layer {layer} dense"
        return heads

    return plan_for


def _cudagraphs_off_reason(sites: list, prefill_cudagraphs: bool) -> str | None:
    """Why a graph under a CUDA-graph mode is compiled without them, or None for a decode graph
    (every SDPA site has query length 1, over a cache that is not grown by torch.cat) or a graph
    without attention."""
    if any(s.kv_cat for s in sites):
        return (
            "CUDA graphs off for this graph: its keys come from torch.cat (a cache that grows, such as "
            "DynamicCache), whose new tensors cudagraph trees would overwrite at the next step; a static "
            "cache initialised before the first call (StaticCache.early_initialization) keeps them"
        )
    lengths = sorted({"symbolic" if s.q_len is None else str(s.q_len) for s in sites if s.q_len != 1})
    if not lengths or prefill_cudagraphs:
        return None
    return (
        f"CUDA graphs off for this graph (attention query length {', '.join(lengths)}; "
        "prefill_cudagraphs=False): a prompt is one long launch sequence, cudagraph trees would record "
        "it again for every new length and keep its activations and any cache it creates in their "
        "pool; decode graphs (query length 1) keep them"
    )


def _inductor_patches(mode: str | None) -> dict:
    if not mode:
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def compile_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: BackendConfig, *, mode: str | None = None,
    inductor: bool = True, prefill_cudagraphs: bool = False,
) -> Callable:
    """Rewrite ``gm`` in place, record a report, then compile with Inductor (or run it as is).

    Under a mode with CUDA graphs (``reduce-overhead``, ``max-autotune``) only decode graphs (every
    SDPA query of length 1) and graphs without attention get them; prefill graphs, rewritten or not,
    are compiled without them unless ``prefill_cudagraphs``, and the report says so.
    """
    from . import ops  # noqa: F401  (registers torch.ops.mif.sparse_attention)
    from .passes import rewrite_sdpa

    graph_id, site_ids = next(_graph_ids), []
    result = rewrite_sdpa(gm, _plan_for(cfg), _make_call(cfg, graph_id, site_ids))
    report = CompileReport(graph_id, result.sites, result.counters, cfg.min_seq_len, cfg.impl, site_ids=site_ids)
    patches = _inductor_patches(mode) if inductor else {}
    off = _cudagraphs_off_reason(report.sites, prefill_cudagraphs) if patches.get("triton.cudagraphs") else None
    if off:
        patches["triton.cudagraphs"] = False
        report.notes.append(off)
    _record(report)
    if not inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None)


def minference(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
               options: dict | None = None, **kwargs: Any) -> Callable:
    """The ``torch_dynamo_backends`` entry point (``backend="minference"``)."""
    opts = dict(options or {})
    opts.update(kwargs)
    inductor = bool(opts.pop("inductor", True))
    prefill_cudagraphs = bool(opts.pop("prefill_cudagraphs", False))
    # torch.compile takes mode= or options=, not both: options may carry the Inductor mode too
    mode = opts.pop("mode", mode)
    cfg = BackendConfig.from_options(opts)
    return compile_graph(gm, example_inputs, cfg, mode=mode, inductor=inductor, prefill_cudagraphs=prefill_cudagraphs)


def backend(config: Any = None, *, inductor: bool = True, mode: str | None = None, prefill_cudagraphs: bool = False,
            **settings: Any) -> Callable:
    """A compiler function for ``torch.compile(model, backend=mif_compile.backend(...))``.

    ``config``: a :class:`BackendConfig`, a :class:`ModelPlan`, a path to a plan JSON (ours or
    MInference's), or None; ``settings``: ``min_seq_len``, ``default_pattern``, ``last_q``,
    ``block_m``, ``impl``, ``max_density``. ``inductor=False`` skips Inductor (the rewritten graph
    runs eagerly); ``mode`` is Inductor's; ``prefill_cudagraphs=True`` lets a mode with CUDA graphs
    capture prefill graphs too (by default only decode graphs, whose queries have length 1).
    Bad settings fail here, before anything is traced.
    """
    if isinstance(config, BackendConfig):
        cfg = BackendConfig.from_options({"config": config, **settings})
    else:
        cfg = BackendConfig.from_options({"plan": config, **settings} if config is not None else settings)

    def compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        return compile_graph(gm, example_inputs, cfg, mode=kwargs.get("mode", mode), inductor=inductor,
                             prefill_cudagraphs=prefill_cudagraphs)

    compiler.config = cfg  # type: ignore[attr-defined]
    return compiler
