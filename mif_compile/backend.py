"""The ``minference`` torch.compile backend.

``torch.compile(model, backend="minference", options={...})`` finds :func:`minference` through the
``torch_dynamo_backends`` entry point. It rewrites provable causal-prefill SDPA sites of the Dynamo
graph into ``torch.ops.mif.sparse_attention`` (see ``passes``), records a report, and hands the
graph to Inductor. :func:`backend` builds the same compiler function from Python arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import torch

from .config import BackendConfig, ConfigError, HeadPattern, Pattern
from .report import CompileReport, _record, register_site

__all__ = ["minference", "backend"]

_graph_ids = itertools.count()


def _make_call(cfg: BackendConfig, graph_id: int, site_ids: list):
    from .ops import encode_heads, encode_mass

    def make_call(graph: torch.fx.Graph, f: dict[str, Any]) -> torch.fx.Node:
        codes, b0, b1 = encode_heads(f["heads"])
        mass = encode_mass(f["heads"])
        site = register_site(graph_id, f["layer"], None)  # where the op records what it ran
        site_ids.append(site)
        args = (f["q"], f["k"], f["v"], f["padding"], f["scale"], codes, b0, b1,
                cfg.min_seq_len, cfg.last_q, cfg.block_m, cfg.impl, cfg.max_density,
                mass if any(mass) else None, site)
        kv = f.get("kv")
        if kv is not None:  # the layer's attention and its compressed cache (mif_compile.kvcache)
            return graph.call_function(torch.ops.mif.sparse_attention_snapkv.default,
                                       args + (kv.budget, kv.window, kv.pool))
        return graph.call_function(torch.ops.mif.sparse_attention.default, args)

    return make_call


def _plan_for(cfg: BackendConfig, tp: Any = None, rank_heads: dict | None = None):
    """``tp``: this rank's tensor-parallel place (``distributed.tp_rank``); the global heads each
    layer's site holds go into ``rank_heads`` (layer -> ``distributed.RankHeads``)."""
    from .distributed import layer_heads

    def plan_for(layer: int | None, num_heads: int, ordinal: int) -> Sequence[HeadPattern] | str:
        plan = cfg.plan
        if layer is None:
            if plan.layers is not None:
                return "cannot tell the layer index from nn_module_stack, and the plan is per layer"
            layer = ordinal
        symbolic = not isinstance(num_heads, int)
        if symbolic:  # dynamic=True on a q/k/v function: check against this call's count, the op re-checks
            hint = getattr(num_heads.node, "hint", None)
            if hint is None:
                return "head count is symbolic without a hint"
            num_heads = int(hint)
        heads, held = layer_heads(plan, layer, num_heads, tp)  # raises ConfigError naming layer/head/value
        if held is not None and rank_heads is not None:
            rank_heads[layer] = held
        if all(hp.pattern is Pattern.DENSE for hp in heads) and cfg.kv_budget is None:
            # with kv_budget the pass still rewrites it where it compresses the cache (the op runs dense)
            return f"the plan makes every head of layer {layer} dense"
        heads = with_mass(heads, cfg.mass)
        if symbolic and plan.layers is None:
            return heads[:1]  # one pattern for every head: the op expands it to the run-time head count
        return heads

    return plan_for


def with_mass(heads: Sequence[HeadPattern], mass: float | str) -> tuple[HeadPattern, ...]:
    """Vertical-slash heads without a mass setting of their own take the backend's ``mass`` (a target,
    or ``"fixed"``)."""
    return tuple(dataclasses.replace(hp, mass=mass) if hp.pattern is Pattern.VERTICAL_SLASH and hp.mass is None
                 else hp for hp in heads)


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


def _kv_settings(cfg: BackendConfig):
    """The pass's KV-cache compression settings, or None when ``kv_budget`` is off. Dynamo guards on
    grad mode, so a graph traced with grad on (training) is compiled without compression."""
    from .passes import KvCompression

    if cfg.kv_budget is None:
        return None
    off = None
    if torch.is_grad_enabled():
        off = "grad mode is on (compression is for inference: run generate() or use torch.no_grad())"
    return KvCompression(cfg.kv_budget, cfg.kv_window_used, cfg.kv_pool_used, off)


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
    from . import kvcache, ops  # noqa: F401  (registers torch.ops.mif.sparse_attention and _snapkv)
    from .distributed import tp_rank
    from .passes import rewrite_sdpa

    rank_heads: dict = {}
    graph_id, site_ids = next(_graph_ids), []
    result = rewrite_sdpa(gm, _plan_for(cfg, tp_rank(example_inputs), rank_heads), _make_call(cfg, graph_id, site_ids),
                          kv=_kv_settings(cfg))
    report = CompileReport(graph_id, result.sites, result.counters, cfg.min_seq_len, cfg.impl, site_ids=site_ids)
    report.rank_heads = rank_heads
    patches = _inductor_patches(mode) if inductor else {}
    off = _cudagraphs_off_reason(report.sites, prefill_cudagraphs) if patches.get("triton.cudagraphs") else None
    if off:
        patches["triton.cudagraphs"] = False
        report.notes.append(off)
    if inductor and cfg.kv_budget is not None and _kv_needs_eager(gm, report.sites):
        inductor = False
        report.notes.append(f"this graph runs its ops without Inductor: with kv_budget, Inductor of torch {torch.__version__} "
                            "fails to compile a padded prefill (its compressed cache's length depends on the data) and "
                            "the decode graphs after it (C++ code generation errors on torch 2.11); torch >= 2.13 compiles them")
    _record(report)
    if not inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    with _dynamic_output_shapes(example_inputs, any(s.kv_compressed for s in report.sites)):
        return compile_fx(gm, example_inputs, config_patches=patches or None)


def _kv_needs_eager(gm: torch.fx.GraphModule, sites: Sequence[Any]) -> bool:
    """On torch < 2.13 with kv_budget: True for a graph with a padded ``mif.sparse_attention_snapkv`` (a
    data-dependent output size) and for decode graphs (query length 1). Inductor's C++ code generation of
    torch 2.11 fails on both (CI's oldest run); their ops then run as they are (the path tested on 2.11)."""
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) >= (2, 13):
        return False
    if any(getattr(s, "q_len", None) == 1 for s in sites):
        return True
    target = torch.ops.mif.sparse_attention_snapkv.default
    return any(n.op == "call_function" and n.target is target and n.args[3] is not None for n in gm.graph.nodes)


@contextlib.contextmanager
def _dynamic_output_shapes(example_inputs: Sequence[Any], on: bool):
    """Let the fake tensors of this graph's compilation have data-dependent sizes: with padding, the
    compressed cache's length is the budget plus the batch's largest pad count, known only from the
    data (``mif.sparse_attention_snapkv``'s fake makes it an unbacked size). Dynamo allows such sizes
    only with ``capture_dynamic_output_shape_ops`` (read when its shape environment is made); this
    graph's environment gets the setting while Inductor compiles it, and its own value back after."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs) if on else None
    env = getattr(mode, "shape_env", None)
    settings = getattr(env, "settings", None)
    if settings is None or getattr(settings, "allow_dynamic_output_shape_ops", True):
        yield
        return
    env.settings = dataclasses.replace(settings, allow_dynamic_output_shape_ops=True)
    try:
        yield
    finally:
        env.settings = settings


# -- options -----------------------------------------------------------------------------------
# torch.compile(model, backend="minference", options={...}) calls the entry point only at the first
# forward, inside Dynamo, which wraps a backend's exception in BackendCompilerFailed (a message that
# starts "backend='minference' raised:" and ends by asking to report a PyTorch bug). Errors of our
# settings are raised as BackendConfigError instead: a ConfigError that is also a
# BackendCompilerFailed, which Dynamo passes on unwrapped (it re-raises its own ShortenTraceback
# errors), so the message is ours, the option and value first, with our frame as the traceback.
# (torch < 2.7, without ShortenTraceback, wraps it like any error: our text follows Dynamo's line.)
# mif_compile.backend(...) validates at once, before anything is traced.

@functools.cache
def _error_class() -> type:
    """BackendConfigError, made at first use: its base class would import torch._dynamo with us."""
    from torch._dynamo.exc import BackendCompilerFailed

    class BackendConfigError(ConfigError, BackendCompilerFailed):
        """A bad setting or plan found while the backend compiles a graph (see the comment above)."""

        def __init__(self, message: str, backend_name: str = "minference", frame: Any = None) -> None:
            ValueError.__init__(self, message)
            self.message = message
            self.backend_name = backend_name
            self.inner_exception = self
            self.first_useful_frame = frame
            self._torch_dynamo_tracer_output = None
            self.frame_exec_strategy = None

        def __str__(self) -> str:  # Dynamo appends its notes to args[0]; they are not about a setting
            return self.message

        def remove_dynamo_frames(self):  # Dynamo's own asserts when the frame is not in the traceback
            tb = self.__traceback__
            while tb is not None and tb.tb_frame is not self.first_useful_frame:
                tb = tb.tb_next
            return self if tb is None or torch._dynamo.config.verbose else self.with_traceback(tb)

    BackendConfigError.__module__ = __name__
    BackendConfigError.__qualname__ = "BackendConfigError"
    return BackendConfigError


def __getattr__(name: str) -> Any:
    if name == "BackendConfigError":
        return _error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_flags(mode: Any, inductor: Any, prefill_cudagraphs: Any) -> None:
    for name, value in (("inductor", inductor), ("prefill_cudagraphs", prefill_cudagraphs)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: must be True or False")
    if mode is None:
        return
    from torch._inductor import list_mode_options

    known = list(list_mode_options())
    if not isinstance(mode, str) or mode not in known:
        raise ConfigError(f"mode={mode!r}: must be None or one of Inductor's modes {known}")


def _config_from(opts: dict, flags: Sequence[str]) -> BackendConfig:
    """BackendConfig.from_options, with an unknown option's message listing the backend's own settings
    (``flags``: ``mode``, ``inductor``... taken before the rest reach BackendConfig) among the known ones."""
    try:
        return BackendConfig.from_options(opts)
    except ConfigError as e:
        known = {f.name for f in dataclasses.fields(BackendConfig)} | {"config"}
        unknown = sorted(set(opts) - known)
        if not str(e).startswith("unknown option(s)") or not unknown:
            raise
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known | set(flags))}") from None


def _plan_label(value: Any) -> str:
    """How an error names the plan option: ``config='plan.json'`` or ``config=<ModelPlan, 3 layers>``."""
    import os

    if value is None:
        return "config=None"
    if isinstance(value, (str, os.PathLike)):
        return f"config={os.fspath(value)!r}"
    plan = getattr(value, "plan", value)
    layers = getattr(plan, "num_layers", None)
    return f"config=<{type(value).__name__}{f', {layers} layers' if layers is not None else ''}>"


def _compile_checked(gm, example_inputs, cfg: BackendConfig, label: str, name: str, frame: Any, **kwargs: Any):
    """compile_graph, with a plan that does not fit the graph reported as BackendConfigError."""
    try:
        return compile_graph(gm, example_inputs, cfg, **kwargs)
    except ConfigError as e:
        if isinstance(e, _error_class()):
            raise
        raise _error_class()(f"{label}: {e}", name, frame) from None


def minference(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
               options: dict | None = None, **kwargs: Any) -> Callable:
    """The ``torch_dynamo_backends`` entry point (``backend="minference"``)."""
    import inspect

    frame = inspect.currentframe()
    try:
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"options={options!r}: expected a dict of settings, like {{'config': 'plan.json'}}")
        opts = dict(options or {})
        opts.update(kwargs)
        inductor = opts.pop("inductor", True)
        prefill_cudagraphs = opts.pop("prefill_cudagraphs", False)
        # torch.compile takes mode= or options=, not both: options may carry the Inductor mode too
        mode = opts.pop("mode", mode)
        _check_flags(mode, inductor, prefill_cudagraphs)
        label = _plan_label(opts.get("config", opts.get("plan")))
        cfg = _config_from(opts, ("inductor", "mode", "prefill_cudagraphs"))
    except ConfigError as e:
        raise _error_class()(f"{e} (options of backend='minference')", "minference", frame) from None
    return _compile_checked(gm, example_inputs, cfg, label, "minference", frame, mode=mode, inductor=inductor,
                            prefill_cudagraphs=prefill_cudagraphs)


def backend(config: Any = None, *, inductor: bool = True, mode: str | None = None, prefill_cudagraphs: bool = False,
            model: Any = None, **settings: Any) -> Callable:
    """A compiler function for ``torch.compile(model, backend=mif_compile.backend(...))``.

    ``config``: a :class:`BackendConfig`, a :class:`ModelPlan`, a path to a plan JSON (ours or
    MInference's), or None; ``settings``: ``min_seq_len``, ``default_pattern``, ``last_q``,
    ``block_m``, ``impl``, ``max_density``. ``inductor=False`` skips Inductor (the rewritten graph
    runs eagerly); ``mode`` is Inductor's; ``prefill_cudagraphs=True`` lets a mode with CUDA graphs
    capture prefill graphs too (by default only decode graphs, whose queries have length 1).
    ``model``: a Hugging Face model (or config) to check a per-layer plan against here, every layer
    and head count (:meth:`ModelPlan.check_model`); without it each graph checks only its own layers.
    Bad settings fail here, before anything is traced, with a :class:`ConfigError`.
    """
    _check_flags(mode, inductor, prefill_cudagraphs)
    flags = ("inductor", "mode", "prefill_cudagraphs", "model")
    if isinstance(config, BackendConfig):
        cfg = _config_from({"config": config, **settings}, flags)
    else:
        cfg = _config_from({"config": config, **settings} if config is not None else settings, flags)
    label = _plan_label(config)
    if model is not None:
        try:
            cfg.plan.check_model(model)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None

    def compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        import inspect

        return _compile_checked(gm, example_inputs, cfg, label, "compiler", inspect.currentframe(),
                                mode=kwargs.get("mode", mode), inductor=inductor, prefill_cudagraphs=prefill_cudagraphs)

    compiler.config = cfg  # type: ignore[attr-defined]
    return compiler
