"""Find the ``scaled_dot_product_attention`` calls of a Dynamo graph and rewrite causal prefills.

A site is rewritten into ``torch.ops.mif.sparse_attention`` only when it is provably a causal
prefill: no dropout, q_len == kv_len (or, where compile time cannot tell, checked by the op at
run time: it computes the original top-left causal SDPA when they differ), and either ``is_causal=True`` without a mask or a mask that
:func:`passes.mask.prove_causal_mask` proves causal (its cone is then removed, so no L x L tensor is
built) or causal AND key padding (the op then gets the (B, L) padding mask). A float
mask proven to be 0 / -inf of such a condition counts too. A symbolic head count (``dynamic=True``
on a plain q/k/v function) is fine: the op expands a uniform plan to the run-time heads and checks
a per-head one. Nothing the op reads instead of the original (the padding tensor, k/v before
``repeat_kv``) may be written in place anywhere in the graph. Everything else stays as it was, with
the reason recorded in a :class:`Site`.

With KV-cache compression (:class:`KvCompression`, the backend's ``kv_budget``), a rewritten prefill
whose keys and values are a Hugging Face cache layer's ``torch.cat`` results that the graph returns
(``DynamicLayer.update``; Dynamo writes them back to the cache) gets the op that also returns the kept
k/v, and the graph returns those instead; each site's ``kv`` line says what was done, or why not.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .mask import MaskProof, mutation_reason, prove_causal_mask

__all__ = ["Site", "SdpaRewrite", "KvCompression", "rewrite_sdpa", "is_sdpa", "layer_index"]

_SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_LAYER_RE = re.compile(r"(?:^|[._])(?:layers?|h|blocks?)[._](\d+)(?:$|[._])")


@dataclasses.dataclass
class Site:
    """One SDPA call: where it is, and what the pass did with it."""

    node: str
    module: str | None
    layer: int | None
    rewritten: bool
    reason: str  # why it was left dense, or the kind of prefill it was proven to be
    num_heads: int | None = None
    num_kv_heads: int | None = None
    patterns: tuple = ()  # HeadPattern per head when rewritten
    q_len: int | None = None  # the query length when static (1 in decode graphs), else None
    kv_cat: bool = False  # the keys are a torch.cat result (a growing cache, e.g. DynamicCache)
    kv: str | None = None  # KV-cache compression (kv_budget): what it does here, or why not
    kv_compressed: bool = False


@dataclasses.dataclass(frozen=True)
class KvCompression:
    """KV-cache compression settings for :func:`rewrite_sdpa` (the backend's ``kv_budget`` etc.);
    ``off``: why no site of this graph is compressed (e.g. grad mode is on)."""

    budget: int
    window: int
    pool: int
    off: str | None = None

    def describe(self) -> str:
        return (f"cache compressed to min(N, {self.budget}) keys per kv head (+ the batch's largest pad count when "
                f"padded; window {self.window}, pool {self.pool})")


@dataclasses.dataclass
class SdpaRewrite:
    sites: list[Site]
    counters: Counter

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA_TARGETS


def _meta(n: Any) -> Any:
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return n


def _static_true(expr: Any) -> bool:
    if isinstance(expr, bool):
        return expr
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(expr))


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return re.sub(r"^L\['self'\]\.?", "", str(path)) or None


def layer_index(node: fx.Node) -> int | None:
    """Layer number from ``nn_module_stack`` (e.g. ``model.layers.12.self_attn`` -> 12)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else value
        path = re.sub(r"\['([^']*)'\]", r".\1", str(path))  # L['self'].layers['3'] -> .layers.3
        found = _LAYER_RE.findall(path)
        if found:
            return int(found[-1])
    return None


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _unrepeat_kv(node: fx.Node, num_heads: int) -> fx.Node:
    """``reshape(expand(x[:, :, None], (B, Hkv, n_rep, L, D)), (B, H, L, D))`` -> x (GQA repeat_kv)."""
    if not (node.op == "call_method" and node.target == "reshape"):
        return node
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and exp.op == "call_method" and exp.target == "expand"):
        return node
    unsq = exp.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.op == "call_function" and unsq.target is operator.getitem):
        return node
    src, idx = unsq.args
    full = slice(None, None, None)
    if idx != (full, full, None, full, full) and idx != (full, full, None):
        return node
    src_val, out_val = _meta(src), _meta(node)
    if not isinstance(src_val, torch.Tensor) or src_val.dim() != 4 or out_val is None:
        return node
    hkv = src_val.shape[1]
    if not isinstance(hkv, int) or num_heads % hkv:
        return node
    if not all(_static_true(a == b) for i, (a, b) in enumerate(zip(src_val.shape, out_val.shape)) if i != 1):
        return node
    return src


_CAT = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}


def _key_from_cat(key: Any, num_heads: Any) -> bool:
    """True when the keys are made by ``torch.cat`` (possibly then made contiguous or repeated for
    GQA): a cache that grows by concatenation, whose new tensors are graph outputs."""
    node = _unrepeat_kv(key, num_heads) if isinstance(key, fx.Node) and isinstance(num_heads, int) else key
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("contiguous", "to"):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in _CAT) or (node.op == "call_method" and node.target == "cat")


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _is_cat(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _CAT) or (node.op == "call_method" and node.target == "cat"))


def _cache_write(graph: fx.Graph, key: Any, value: Any, num_heads: Any) -> tuple[fx.Node, fx.Node] | None:
    """(k, v) when the keys and values an SDPA reads (before ``repeat_kv``) are ``torch.cat`` results
    that the graph returns: a cache that grows by concatenation, written back by Dynamo."""
    if isinstance(num_heads, int):
        key, value = _unrepeat_kv(key, num_heads), _unrepeat_kv(value, num_heads)
    if not (_is_cat(key) and _is_cat(value)):
        return None
    outs = _output_node(graph).args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    if any(o is key for o in outs) and any(o is value for o in outs):
        return key, value
    return None


_FRAME_RE = re.compile(r'File "([^"]+)", line \d+, in (\w+)')


def _from_cache_update(node: fx.Node) -> bool:
    """The node was made in a Hugging Face cache layer's ``update`` (``transformers/cache_utils.py``):
    its stored keys or values."""
    frames = _FRAME_RE.findall(node.meta.get("stack_trace") or "")
    return bool(frames) and frames[-1][0].replace("\\", "/").endswith("transformers/cache_utils.py") and frames[-1][1] == "update"


def _all_dense(heads: Any) -> bool:
    return not isinstance(heads, str) and all(getattr(getattr(h, "pattern", None), "value", None) == "dense" for h in heads)


def _static_len(n: Any) -> int | None:
    return n if isinstance(n, int) else None


def classify(node: fx.Node) -> tuple[str | None, dict[str, Any]]:
    """Return (reason to stay dense or None, facts about the site)."""
    a = _sdpa_args(node)
    facts: dict[str, Any] = {"args": a}
    q, k, v = _meta(a["query"]), _meta(a["key"]), _meta(a["value"])
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "query/key/value shapes unknown", facts
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"not 4-D attention (q is {q.dim()}-D)", facts
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    facts.update(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D)
    if not _static_true(k.shape[-1] == D):  # the value's head dim may differ (MLA): the kernels take d_v
        return "head_dim of key differs from query's", facts
    p = a["dropout_p"]
    if isinstance(p, fx.Node) or p != 0.0:
        return f"dropout_p={p} (training)", facts
    if isinstance(Lq, int) and Lq == 1:
        return "decode (q_len == 1)", facts
    if _static_true(Lq != Lk):
        return "q_len != kv_len (decode with a cache, chunked prefill or cross-attention)", facts
    facts["len_checked_at_run_time"] = not _static_true(Lq == Lk)
    if not _static_true(H == Hkv):
        if a.get("enable_gqa") is not True:
            return f"{H} query heads with {Hkv} kv heads but enable_gqa is not set", facts
        if isinstance(H, int) and isinstance(Hkv, int) and H % Hkv:
            return f"{H} query heads is not a multiple of {Hkv} kv heads", facts
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {k.dtype} not supported", facts
    mask = a["attn_mask"]
    causal = a["is_causal"]
    if isinstance(causal, fx.Node):
        return "is_causal is not a constant", facts
    if mask is None:
        if not causal:
            return "not causal (is_causal=False and no mask)", facts
        facts["proof"] = MaskProof("causal", None, frozenset())
        return None, facts
    if causal:
        return "both a mask and is_causal=True", facts
    mv = _meta(mask)
    if not isinstance(mv, torch.Tensor) or (mv.dtype != torch.bool and mv.dtype != q.dtype):
        return f"additive mask (dtype {getattr(mv, 'dtype', None)}) is not proven causal", facts
    proof = prove_causal_mask(mask, Lq, Lk, B)
    if isinstance(proof, str):
        return proof, facts
    facts["proof"] = proof
    return None, facts


def rewrite_sdpa(
    gm: fx.GraphModule,
    plan_for: Callable[[int | None, int, int], Sequence | str],
    make_call: Callable[[fx.Graph, dict[str, Any]], fx.Node],
    kv: KvCompression | None = None,
) -> SdpaRewrite:
    """Rewrite provable causal prefills of ``gm`` in place.

    ``plan_for(layer, num_heads, ordinal)`` returns the layer's head patterns, or a string (the
    reason to leave it dense). ``make_call(graph, site_facts)`` inserts the op call and returns it;
    with ``site_facts["kv"]`` set (KV-cache compression of this site) the call returns
    ``(out, k_kept, v_kept)`` and the graph returns the kept k/v where it returned the cache's.

    With ``kv``, a causal prefill whose keys and values are a cache layer's ``torch.cat`` results
    returned by the graph (``DynamicLayer.update``) is compressed; every cache layer of a graph is
    compressed or none is (decode builds one mask length for them all). A layer whose plan is all
    dense is then rewritten too (its op runs dense SDPA and compresses the cache).
    """
    graph = gm.graph
    sites: list[Site] = []
    counters: Counter = Counter()
    dead: set[fx.Node] = set()
    found = []
    ordinal = 0
    for node in list(graph.nodes):
        if not is_sdpa(node):
            continue
        counters["sdpa_sites"] += 1
        reason, facts = classify(node)
        heads: Sequence | str = ()
        layer = layer_index(node)
        if reason is None:
            heads = plan_for(layer, facts["H"], ordinal)
        ordinal += 1
        write = _cache_write(graph, facts["args"]["key"], facts["args"]["value"], facts.get("H")) if "args" in facts else None
        found.append((node, layer, reason, facts, heads, write))
    kv_plan = _kv_plan(found, kv)
    for (node, layer, reason, facts, heads, write), kv_note in zip(found, kv_plan):
        mod = module_path(node)
        compress = kv_note is not None and kv_note[0]
        if reason is None and isinstance(heads, str):
            reason = heads
        elif reason is None and _all_dense(heads) and not compress:
            reason = f"the plan makes every head of layer {layer} dense"
        note = kv_note[1] if kv_note is not None else None
        if reason is not None:
            counters["left_dense"] += 1
            sites.append(Site(node.name, mod, layer, False, reason, _static_len(facts.get("H")), _static_len(facts.get("Hkv")),
                              q_len=_static_len(facts.get("Lq")),
                              kv_cat=_key_from_cat(facts["args"]["key"], facts.get("H")), kv=note))
            continue
        a, proof = facts["args"], facts["proof"]
        k_src = _unrepeat_kv(a["key"], facts["H"])
        v_src = _unrepeat_kv(a["value"], facts["H"])
        if (k_src is a["key"]) != (v_src is a["value"]):
            k_src, v_src = a["key"], a["value"]
        # the op reads k/v at the SDPA instead of where repeat_kv copied them: no write in between
        # (the padding is part of the mask's cone, checked by the prover)
        mutated = None
        for src, orig in ((k_src, a["key"]), (v_src, a["value"])):
            if src is not orig and mutated is None:
                mutated = mutation_reason([src], after=orig.args[0].args[0], before=node)
        if mutated:
            counters["left_dense"] += 1
            sites.append(Site(node.name, mod, layer, False, mutated.replace("mask mutated", "tensor mutated"),
                              _static_len(facts.get("H")), _static_len(facts.get("Hkv")),
                              q_len=_static_len(facts.get("Lq")), kv_cat=_key_from_cat(a["key"], facts.get("H")),
                              kv=note))
            continue
        hkv = _meta(k_src).shape[1]
        scale = a["scale"]
        padding = proof.padding
        with graph.inserting_before(node):
            if scale is None:
                d = facts["D"]
                if isinstance(d, int):
                    scale = 1.0 / math.sqrt(d)
                else:  # symbolic head_dim: SDPA's default 1/sqrt(D), computed at run time
                    dim = graph.call_method("size", (a["query"], -1))
                    scale = graph.call_function(operator.truediv, (1.0, graph.call_function(torch._sym_sqrt, (dim,))))
            if padding is not None and _meta(padding).dtype != torch.bool:
                # the proof is about padding != 0; the op takes a bool mask
                padding = graph.call_method("to", (padding,), {"dtype": torch.bool})
                padding.meta["example_value"] = _meta(proof.padding).to(torch.bool)
        call_facts = dict(
            q=a["query"], k=k_src, v=v_src, padding=padding, scale=scale, heads=tuple(heads),
            layer=layer, num_heads=facts["H"], num_kv_heads=hkv, kv=kv if compress else None,
        )
        with graph.inserting_before(node):
            new = make_call(graph, call_facts)
            out = new
            if compress:
                out = graph.call_function(operator.getitem, (new, 0))
                kept = {write[0]: graph.call_function(operator.getitem, (new, 1)),
                        write[1]: graph.call_function(operator.getitem, (new, 2))}
        for n in (new, out):
            n.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        ev = _meta(node)
        if ev is not None:
            out.meta["example_value"] = ev
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if compress:  # the graph now returns the kept k/v where it returned the cache's
            output = _output_node(graph)
            outs = output.args[0]
            output.args = (type(outs)(kept.get(o, o) if isinstance(o, fx.Node) else o for o in outs),)
            counters["kv_compressed"] += 1
        dead.update(proof.nodes)
        for kvn, src in ((a["key"], k_src), (a["value"], v_src)):
            if kvn is not src:
                dead.add(kvn)
        counters["rewritten"] += 1
        counters[f"rewritten_{proof.kind}"] += 1
        if not _static_true(hkv == facts["H"]):
            counters["gqa_native"] += 1
        if facts.get("len_checked_at_run_time"):
            counters["len_checked_at_run_time"] += 1
        sites.append(Site(node.name, mod, layer, True, proof.kind, _static_len(facts["H"]), _static_len(hkv), tuple(heads),
                          q_len=_static_len(facts.get("Lq")), kv_cat=_key_from_cat(k_src, facts["H"]), kv=note,
                          kv_compressed=compress))
    _erase_unused(graph, dead)
    graph.lint()
    gm.recompile()
    return SdpaRewrite(sites, counters)


def _kv_plan(found: list, kv: KvCompression | None) -> list:
    """Per site: None (compression off, or a decode site), or (compress?, report line)."""
    if kv is None:
        return [None] * len(found)
    notes = []
    for node, layer, reason, facts, heads, write in found:
        if facts.get("Lq") == 1:
            notes.append(None)  # decode: nothing to compress, not worth a line
            continue
        why = None
        if kv.off:
            why = kv.off
        elif write is None:
            why = ("the keys are not a cache's torch.cat that the graph stores (no cache, use_cache=False, or a cache "
                   "written in place such as StaticCache: kept full)")
        elif not (_from_cache_update(write[0]) and _from_cache_update(write[1])):
            why = "the stored keys do not come from a transformers cache layer's update() (only DynamicCache layers)"
        elif reason is not None:
            why = f"not a provable causal prefill ({reason})"
        elif isinstance(heads, str):
            why = heads
        elif facts.get("len_checked_at_run_time"):
            why = "q_len == kv_len is not proven at compile time (a cache that may hold earlier tokens)"
        notes.append([why is None, why])
    blocked = [(found[i][1], n[1]) for i, n in enumerate(notes)
               if n is not None and not n[0] and found[i][5] is not None]
    if blocked and any(n is not None and n[0] for n in notes):
        layer, why = blocked[0]
        for n in notes:
            if n is not None and n[0]:
                n[0], n[1] = False, (f"not compressed: layer {layer}'s cache cannot be ({why}), and decode needs one "
                                     "cache length for every layer")
    out = []
    for n in notes:
        if n is None:
            out.append(None)
        elif n[0]:
            out.append((True, kv.describe()))
        else:
            out.append((False, n[1] if n[1].startswith("not compressed") else f"cache not compressed: {n[1]}"))
    return out


def _erase_unused(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase candidate nodes (and their now-unused inputs among candidates) that nothing uses."""
    changed = True
    alive = {n for n in candidates if n.graph is graph and n.op != "placeholder"}
    while changed:
        changed = False
        for n in list(alive):
            if not n.users:
                inputs = [i for i in n.all_input_nodes]
                graph.erase_node(n)
                alive.discard(n)
                for i in inputs:
                    if i.op != "placeholder" and not i.users and i not in alive and i.op in ("call_function", "call_method") and _is_pure_index_op(i):
                        alive.add(i)
                changed = True


def _is_pure_index_op(n: fx.Node) -> bool:
    """Nodes outside the proven cone that only fed it (e.g. the repeat_kv getitem/expand)."""
    if n.op == "call_method":
        return n.target in ("expand", "reshape", "unsqueeze", "view", "to")
    return n.target in (operator.getitem,)
