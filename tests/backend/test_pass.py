"""The SDPA pass through the backend: which sites are rewritten, which stay dense and why.

Small hand-written models compiled with ``mif_compile.backend(inductor=False, min_seq_len=10**9)``:
the op always takes its dense branch (the exact original computation), so no kernel runs and every
compiled output must equal eager, whatever the pass decided. A site wrongly proven causal shows up
as an output that differs from eager.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mif_compile
from mif_compile import HeadPattern, ModelPlan
from mif_compile.backend import with_mass

E, H, HKV, D = 32, 4, 2, 8  # model width, query heads, kv heads (GQA), head_dim
B, L = 2, 12  # batch, sequence (L != D, so an L x L tensor is easy to spot)
BIG = 10**9  # min_seq_len: always the op's dense branch
SPARSE_OP = torch.ops.mif.sparse_attention.default
DYNAMIC = pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]."""
    b, hkv, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n_rep, n, d).reshape(b, hkv * n_rep, n, d)


def causal_pad_mask(pad: torch.Tensor, n: int) -> torch.Tensor:
    """Like transformers' sdpa_mask: causal AND padding, (B, 1, n, n) bool, built with arange indexing."""
    batch_idx = torch.arange(pad.shape[0])
    q_idx = torch.arange(n)
    kv_idx = torch.arange(n)
    causal = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]
    return causal & pad[batch_idx[:, None, None, None], kv_idx[None, None, None, :]]


class Attn(nn.Module):
    """One attention layer; ``kind`` picks how SDPA is called. q/k/v come from projections, so the head
    count is a constant even under dynamic=True (as in real models)."""

    def __init__(self, kind: str, hkv: int = H):
        super().__init__()
        self.kind, self.hkv = kind, hkv
        self.q = nn.Linear(E, H * D)
        self.k = nn.Linear(E, hkv * D)
        self.v = nn.Linear(E, hkv * D)

    def forward(self, x, pad=None, mask=None, mem=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        src = x if mem is None else mem
        m = src.shape[1]
        k = self.k(src).view(b, m, self.hkv, D).transpose(1, 2)
        v = self.v(src).view(b, m, self.hkv, D).transpose(1, 2)
        sdpa, kind, gqa = F.scaled_dot_product_attention, self.kind, self.hkv != H
        if kind == "causal":
            o = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        elif kind == "causal_scale":
            o = sdpa(q, k, v, None, 0.0, True, scale=0.3, enable_gqa=gqa)
        elif kind == "arange":
            o = sdpa(q, k, v, attn_mask=torch.arange(n)[None, :] <= torch.arange(n)[:, None], enable_gqa=gqa)
        elif kind == "pad_repeat_kv":  # transformers 5.17 under compile: materialised mask + repeat_kv
            r = H // self.hkv
            o = sdpa(q, repeat_kv(k, r), repeat_kv(v, r), attn_mask=causal_pad_mask(pad, n))
        elif kind == "and_masks":  # transformers' and_masks: start from q_idx.new_ones((), dtype=bool)
            qi, ki = torch.arange(n), torch.arange(n)
            m = qi.new_ones((), dtype=torch.bool) & (ki[None, :] <= qi[:, None])
            o = sdpa(q, k, v, attn_mask=m, enable_gqa=gqa)
        elif kind == "hidden_new_ones":  # padding built from the hidden state: x.new_ones(B, L)
            o = sdpa(q, k, v, attn_mask=causal_pad_mask(x.new_ones(b, n, dtype=torch.bool), n), enable_gqa=gqa)
        elif kind == "pad":
            o = sdpa(q, k, v, attn_mask=causal_pad_mask(pad, n), enable_gqa=gqa)
        elif kind == "dropout":
            o = sdpa(q, k, v, is_causal=True, dropout_p=0.25)
        elif kind == "not_causal":
            o = sdpa(q, k, v)
        elif kind == "cross":  # mem has another length
            o = sdpa(q, k, v, is_causal=True)
        elif kind == "float_mask":
            o = sdpa(q, k, v, attn_mask=torch.full((n, n), float("-inf")).triu(1))
        elif kind == "float_min_mask":  # finfo.min, not -inf: not equal to a boolean mask
            o = sdpa(q, k, v, attn_mask=torch.full((n, n), torch.finfo(torch.float32).min).triu(1))
        elif kind == "input_mask":
            o = sdpa(q, k, v, attn_mask=mask)
        elif kind == "window":
            qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
            o = sdpa(q, k, v, attn_mask=(ki <= qi) & (ki > qi - 4))
        elif kind == "shifted":
            qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
            o = sdpa(q, k, v, attn_mask=ki <= qi + 1)
        elif kind == "strict":
            qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
            o = sdpa(q, k, v, attn_mask=ki < qi)
        else:
            raise AssertionError(kind)
        return o.transpose(1, 2).reshape(b, n, H * D)[..., :E]


class Model(nn.Module):
    def __init__(self, kind: str, hkv: int = H, n_layers: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Attn(kind, hkv) for _ in range(n_layers)])

    def forward(self, x, pad=None, mask=None, mem=None):
        for layer in self.layers:
            x = x + layer(x, pad, mask, mem)
        return x


class Decode(nn.Module):
    """One new token against a KV cache (q_len 1, kv_len 1 + cache)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(E, 3 * H * D) for _ in range(2)])

    def forward(self, x, k_cache, v_cache):
        b = x.shape[0]
        for proj in self.layers:
            q, k, v = proj(x).view(b, 1, 3, H, D).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=False)
            x = x + o.transpose(1, 2).reshape(b, 1, H * D)[..., :E]
        return x


def inputs(n: int = L):
    torch.manual_seed(1)
    x = torch.randn(B, n, E)
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[0, :3] = False  # left padding in the first sequence
    pad[1, -2:] = False  # right padding in the second
    return x, pad


def compile_and_check(model, args, *, dynamic=False, plan=None):
    """Compile with the dense-branch backend, compare with eager, return (report, last graph)."""
    torch._dynamo.reset()
    mif_compile.clear_reports()
    inner = mif_compile.backend(plan, inductor=False, min_seq_len=BIG)
    graphs = []

    def capture(gm, example_inputs):
        fn = inner(gm, example_inputs)
        graphs.append(gm)
        return fn

    compiled = torch.compile(model, backend=capture, dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        out = compiled(*args)
        ref = model(*args)
    torch.testing.assert_close(out, ref, equal_nan=True)
    report = mif_compile.last_report()
    assert report is not None and graphs
    return report, graphs[-1], compiled


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def op_args(node) -> dict:
    """The sparse-attention call's arguments by schema name (q, k, v, key_padding, scale, patterns, ...)."""
    names = [a.name for a in SPARSE_OP._schema.arguments]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _ev(node):
    return node.meta["example_value"]


def graph_facts(gm):
    """(sparse-op nodes, SDPA nodes, nodes whose example value is [..., L, L]) of a rewritten graph."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SPARSE_OP]
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.scaled_dot_product_attention]
    qs = [_ev(n.args[0]) for n in ops + sdpa]
    n = qs[0].shape[2]
    square = []
    for node in gm.graph.nodes:
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.Tensor) and ev.dim() >= 2 and _same(ev.shape[-1], n) and _same(ev.shape[-2], n):
            square.append(node)
    return ops, sdpa, square


def assert_all_rewritten(report, kind, n_sites=2, layers=(0, 1)):
    assert report.counters["sdpa_sites"] == n_sites
    assert report.counters["rewritten"] == n_sites
    assert report.counters[f"rewritten_{kind}"] == n_sites
    assert report.counters["left_dense"] == 0
    assert [s.layer for s in report.sites] == list(layers)
    assert all(s.rewritten and s.reason == kind for s in report.sites)
    assert len(report.rewritten) == n_sites and not report.dense


def assert_all_dense(report, reason, n_sites=2):
    """``reason``: a substring of every site's reason, or a tuple of accepted substrings."""
    reasons = reason if isinstance(reason, tuple) else (reason,)
    assert report.counters["sdpa_sites"] == n_sites
    assert report.counters["left_dense"] == n_sites
    assert report.counters["rewritten"] == 0
    assert len(report.dense) == n_sites
    for s in report.sites:
        assert not s.rewritten
        assert any(r in s.reason for r in reasons), (reasons, s.reason)


# a mask whose position terms are not exactly key <= query (both wordings of passes/mask.py)
NOT_CAUSAL_ONLY = ("not causal-only", "other than key <= query")


# -- rewritten ------------------------------------------------------------------------------------


@DYNAMIC
def test_is_causal_mha(dynamic):
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("causal"), (x,), dynamic=dynamic)
    assert_all_rewritten(report, "causal")
    assert "gqa_native" not in report.counters
    for s in report.sites:
        assert (s.num_heads, s.num_kv_heads) == (H, H)
        assert s.patterns == (HeadPattern.vertical_slash(mass=1.0),) * H  # the default plan, default mass
        assert s.module and s.module.endswith(f"layers.{s.layer}")
    ops, sdpa, square = graph_facts(gm)
    assert len(ops) == 2 and not sdpa and not square
    # head plan baked in as (codes, budget0, budget1); min_seq_len passed through
    a = op_args(ops[0])
    assert list(a["patterns"]) == [HeadPattern.vertical_slash().pattern.code] * H
    assert list(a["budget0"]) == [1000] * H and list(a["budget1"]) == [6096] * H
    assert a["min_seq_len"] == BIG and a["key_padding"] is None


@DYNAMIC
def test_is_causal_gqa(dynamic):
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("causal", hkv=HKV), (x,), dynamic=dynamic)
    assert_all_rewritten(report, "causal")
    assert report.counters["gqa_native"] == 2
    assert all((s.num_heads, s.num_kv_heads) == (H, HKV) and len(s.patterns) == H for s in report.sites)
    ops, _, _ = graph_facts(gm)
    assert [_ev(op_args(op)["k"]).shape[1] for op in ops] == [HKV, HKV]


def test_explicit_scale_is_kept():
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("causal_scale"), (x,))
    assert_all_rewritten(report, "causal")
    ops, _, _ = graph_facts(gm)
    assert all(op_args(op)["scale"] == pytest.approx(0.3) for op in ops)


@DYNAMIC
@pytest.mark.parametrize("hkv", [H, HKV], ids=["mha", "gqa"])
def test_arange_causal_mask_is_proven_and_removed(dynamic, hkv):
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("arange", hkv=hkv), (x,), dynamic=dynamic)
    assert_all_rewritten(report, "causal")
    ops, sdpa, square = graph_facts(gm)
    assert len(ops) == 2 and not sdpa
    assert all(op_args(op)["key_padding"] is None for op in ops)  # no padding
    assert not square, [n.name for n in square]  # no L x L tensor left in the graph


@DYNAMIC
def test_causal_and_padding_mask(dynamic):
    x, pad = inputs()
    report, gm, _ = compile_and_check(Model("pad", hkv=HKV), (x, pad), dynamic=dynamic)
    assert_all_rewritten(report, "causal+padding")
    assert report.counters["gqa_native"] == 2
    ops, sdpa, square = graph_facts(gm)
    assert len(ops) == 2 and not sdpa
    assert not square, [n.name for n in square]
    for op in ops:
        a = op_args(op)
        padding, q = _ev(a["key_padding"]), _ev(a["q"])
        assert padding.dtype == torch.bool and padding.dim() == 2
        assert _same(padding.shape[0], q.shape[0]) and _same(padding.shape[1], q.shape[2])


@DYNAMIC
def test_transformers_style_mask_with_repeat_kv(dynamic):
    x, pad = inputs()
    report, gm, _ = compile_and_check(Model("pad_repeat_kv", hkv=HKV), (x, pad), dynamic=dynamic)
    assert_all_rewritten(report, "causal+padding")
    assert report.counters["gqa_native"] == 2  # k/v un-repeated
    ops, _, square = graph_facts(gm)
    assert not square
    for op in ops:
        assert _ev(op_args(op)["k"]).shape[1] == HKV and _ev(op_args(op)["v"]).shape[1] == HKV
    assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes)  # repeat_kv erased


@DYNAMIC
def test_and_masks_style_mask(dynamic):
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("and_masks"), (x,), dynamic=dynamic)
    assert_all_rewritten(report, "causal")
    assert not graph_facts(gm)[2]


def test_padding_from_hidden_new_ones_is_proven():
    """x.new_ones(B, L, dtype=bool) on a computed hidden state: only its dtype/device matter."""
    x, _ = inputs()
    report, _, _ = compile_and_check(Model("hidden_new_ones"), (x,))
    assert report.counters["rewritten"] == 2, [s.reason for s in report.sites]


def test_dynamic_new_length_reuses_the_graph():
    model = Model("pad", hkv=HKV)
    x, pad = inputs()
    _, _, compiled = compile_and_check(model, (x, pad), dynamic=True)
    n_reports = len(mif_compile.reports())
    x2, pad2 = inputs(n=9)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x2, pad2), model(x2, pad2), equal_nan=True)
    assert len(mif_compile.reports()) == n_reports  # no recompile for a new prompt length


def test_per_layer_plan_and_dense_layer():
    plan = ModelPlan((
        (HeadPattern.dense(),) * H,
        (HeadPattern.a_shape(4, 16), HeadPattern.vertical_slash(30, 800), HeadPattern.block_sparse(2), HeadPattern.dense()),
    ))
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("causal", hkv=HKV), (x,), plan=plan)
    s0, s1 = report.sites
    assert not s0.rewritten and s0.layer == 0 and "dense" in s0.reason
    assert s1.rewritten and s1.layer == 1 and s1.patterns == with_mass(plan.layers[1], 1.0)  # heads without a mass: the default
    assert report.counters["rewritten"] == 1 and report.counters["left_dense"] == 1
    ops, sdpa, _ = graph_facts(gm)
    assert len(ops) == 1 and len(sdpa) == 1
    a = op_args(ops[0])
    assert list(a["budget0"]) == [4, 30, 2, 0] and list(a["budget1"]) == [16, 800, 0, 0]


@DYNAMIC
def test_float_inf_causal_mask_is_proven(dynamic):
    """full(-inf).triu(1): 0 on and below the diagonal, -inf above, the additive form of causal."""
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model("float_mask"), (x,), dynamic=dynamic)
    assert_all_rewritten(report, "causal")
    ops, sdpa, square = graph_facts(gm)
    assert len(ops) == 2 and not sdpa and not square


# -- left dense -----------------------------------------------------------------------------------


@DYNAMIC
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("not_causal", "not causal"),
        ("float_min_mask", "additive mask"),
        ("window", NOT_CAUSAL_ONLY),
        ("shifted", NOT_CAUSAL_ONLY),
        ("strict", NOT_CAUSAL_ONLY),
    ],
)
def test_left_dense(kind, reason, dynamic):
    x, _ = inputs()
    report, gm, _ = compile_and_check(Model(kind), (x,), dynamic=dynamic)
    assert_all_dense(report, reason)
    ops, sdpa, _ = graph_facts(gm)
    assert not ops and len(sdpa) == 2


def test_dropout_left_dense():
    # dropout is random: only the decision is checked, not the values
    torch._dynamo.reset()
    mif_compile.clear_reports()
    x, _ = inputs()
    torch.compile(Model("dropout"), backend=mif_compile.backend(inductor=False, min_seq_len=BIG), fullgraph=True)(x)
    assert_all_dense(mif_compile.last_report(), "dropout_p")


@DYNAMIC
def test_cross_attention_left_dense(dynamic):
    x, _ = inputs()
    mem = torch.randn(B, 7, E)
    report, _, _ = compile_and_check(Model("cross"), (x, None, None, mem), dynamic=dynamic)
    if not dynamic:
        assert_all_dense(report, "q_len != kv_len")
    else:  # two symbols: rewritten, the op sees 12 != 7 at run time and runs the original SDPA (output == eager)
        assert report.counters["rewritten"] == 2 and report.counters["len_checked_at_run_time"] == 2


@DYNAMIC
def test_decode_left_dense(dynamic):
    x = torch.randn(B, 1, E)
    kc, vc = torch.randn(B, H, 5, D), torch.randn(B, H, 5, D)
    report, _, _ = compile_and_check(Decode(), (x, kc, vc), dynamic=dynamic)
    assert_all_dense(report, "decode")


def test_single_token_prefill_left_dense():
    x, _ = inputs(n=1)
    report, _, _ = compile_and_check(Model("causal"), (x,))
    assert_all_dense(report, "decode")


@DYNAMIC
def test_bool_mask_input_left_dense(dynamic):
    x, _ = inputs()
    mask = torch.ones(L, L, dtype=torch.bool).tril()  # causal, but nothing proves it
    report, gm, _ = compile_and_check(Model("input_mask"), (x, None, mask), dynamic=dynamic)
    assert_all_dense(report, "boolean function of positions")
    _, sdpa, square = graph_facts(gm)
    assert len(sdpa) == 2 and square  # the mask is still there (and the L x L check sees it)


def test_all_dense_plan():
    x, pad = inputs()
    for kind in ("causal", "pad"):
        report, _, _ = compile_and_check(Model(kind), (x, pad), plan=ModelPlan.uniform(HeadPattern.dense()))
        assert_all_dense(report, "dense")
        assert "every head" in report.sites[0].reason and "layer 0" in report.sites[0].reason


@DYNAMIC
def test_unprovable_mask_keeps_its_square_tensor(dynamic):
    """Control for the L x L check: a sliding-window mask is left in the graph, and seen."""
    x, _ = inputs()
    _, gm, _ = compile_and_check(Model("window"), (x,), dynamic=dynamic)
    assert graph_facts(gm)[2]


# -- bad plans fail at compile time ---------------------------------------------------------------


def _compile_error(plan: ModelPlan, mask_kind: str) -> str:
    """The message with which compiling ``Model(mask_kind)`` under ``plan`` fails."""
    torch._dynamo.reset()
    x, _ = inputs()
    compiled = torch.compile(Model(mask_kind), backend=mif_compile.backend(plan, inductor=False, min_seq_len=BIG))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as e:
        compiled(x)
    return str(e.value)


def test_wrong_head_count_fails_at_compile_time():
    msg = _compile_error(ModelPlan(((HeadPattern.dense(),) * H, (HeadPattern.a_shape(),) * (H - 1))), "causal")
    assert "layer 1" in msg and f"{H - 1} heads" in msg and f"{H} query heads" in msg


def test_too_few_layers_fails_at_compile_time():
    msg = _compile_error(ModelPlan(((HeadPattern.a_shape(),) * H,)), "arange")
    assert "layer 1" in msg and "1 layers" in msg


# -- comparisons: rewritten exactly when the mask is key <= query ---------------------------------

_OPS = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt}


class MaskSdpa(nn.Module):
    def __init__(self, make_mask):
        super().__init__()
        self.make_mask = make_mask

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(q.shape[2]))


def _qkv(n=8, h=2, d=4):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(1, h, n, d, generator=g) for _ in range(3))


@settings(deadline=None, max_examples=12)
@given(st.sampled_from(sorted(_OPS)), st.booleans(), st.integers(-2, 2))
@example("le", True, 0)
@example("gt", False, -1)
@example("lt", True, 1)
def test_comparison_masks(op, key_left, offset):
    """mask = (key OP query + offset) or (query OP key + offset); rewritten iff it equals tril."""
    def make(n):
        qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
        a, b = (ki, qi) if key_left else (qi, ki)
        return _OPS[op](a, b + offset)

    n = 8
    is_causal = torch.equal(make(n), torch.ones(n, n, dtype=torch.bool).tril())
    report, _, _ = compile_and_check(MaskSdpa(make), _qkv(n))
    (site,) = report.sites
    assert site.rewritten == is_causal, (op, key_left, offset, site.reason)


# -- masks the prover must not accept (regressions: each was once proven causal) --------------------


def _full_same_arange(n):  # all True: every key visible
    i = torch.arange(n)
    return (i[None, :] >= 0) & (i[:, None] >= 0)


def _diagonal_same_arange(n):  # causal AND key == query: each query sees only itself
    i = torch.arange(n)
    return (torch.arange(n)[None, :] <= torch.arange(n)[:, None]) & (i[None, :] == i[:, None])


def _wrapped_index(n):  # key 0 maps to position n (a[-1] wraps), so key 0 is never visible
    kk = torch.arange(n)[torch.arange(n) - 1] + 1
    return kk[None, :] <= torch.arange(n)[:, None]


def _sub_alpha(n):  # key - 2 * query <= 0: more keys than causal
    return torch.sub(torch.arange(n)[None, :], torch.arange(n)[:, None], alpha=2) <= 0


def _int_to_bool(n):  # (key != 0) <= query: not causal
    return torch.arange(n)[None, :].to(torch.bool) <= torch.arange(n)[:, None]


@pytest.mark.parametrize("make", [_full_same_arange, _diagonal_same_arange, _wrapped_index, _sub_alpha, _int_to_bool])
def test_non_causal_masks_are_not_rewritten(make):
    n = 8
    assert not torch.equal(make(n), torch.ones(n, n, dtype=torch.bool).tril())
    report, _, _ = compile_and_check(MaskSdpa(make), _qkv(n))  # outputs must equal eager
    assert not report.sites[0].rewritten, report.sites[0].reason


def test_single_arange_causal_mask_is_proven():
    """idx = arange(L); idx[None, :] <= idx[:, None]: one arange on two axes is two positions."""
    def make(n):
        i = torch.arange(n)
        return i[None, :] <= i[:, None]

    report, gm, _ = compile_and_check(MaskSdpa(make), _qkv())
    assert report.sites[0].rewritten and report.sites[0].reason == "causal"
    assert not graph_facts(gm)[2]


# -- the prover never crashes the compile: an op it cannot read leaves the site dense --------------


def _le_other_kwarg(n):
    return torch.le(torch.arange(n)[None, :], other=torch.arange(n)[:, None])


def _method_le_other_kwarg(n):
    return torch.arange(n)[None, :].le(other=torch.arange(n)[:, None])


def _logical_and_other_kwarg(n):
    ki, qi = torch.arange(n)[None, :], torch.arange(n)[:, None]
    return torch.logical_and(ki <= qi, other=ki >= 0)


@pytest.mark.parametrize("make", [_le_other_kwarg, _method_le_other_kwarg, _logical_and_other_kwarg])
def test_keyword_operands_are_read(make):
    """Operands passed as other= are read (they once crashed the compile with an IndexError)."""
    report, _, _ = compile_and_check(MaskSdpa(make), _qkv())  # outputs must equal eager
    (site,) = report.sites
    assert site.rewritten and site.reason == "causal", site.reason


def test_unreadable_ops_leave_the_site_dense():
    def make(n):  # -key >= -query: causal, but neg is not in the prover's vocabulary
        return -torch.arange(n)[None, :] >= -torch.arange(n)[:, None]

    report, _, _ = compile_and_check(MaskSdpa(make), _qkv())
    assert_all_dense(report, "neg", n_sites=1)


def _dunder_methods(n):  # what Dynamo records on torch 2.11 for transformers 5.17's masks
    ki, qi = torch.arange(n)[None, :], torch.arange(n)[:, None]
    same = ki.__sub__(ki).__eq__(qi.__sub__(qi))  # (k - k) == (q - q): True everywhere
    return ki.__le__(qi).__and__(same)


def test_dunder_method_masks_are_read():
    report, _, _ = compile_and_check(MaskSdpa(_dunder_methods), _qkv())
    (site,) = report.sites
    assert site.rewritten and site.reason == "causal", site.reason
