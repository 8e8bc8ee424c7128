"""Property: whatever mask program a model runs, "rewritten" implies the eager mask IS causal
(AND the padding, for "causal+padding").

Hypothesis draws small mask programs (arange arithmetic, casts, comparisons, logical ops, index
lookups, tril/triu, padding lookups and in-place writes), compiles ``sdpa(attn_mask=program(...))``
with the pass only (no Inductor, the op's dense branch), and compares the eager mask, evaluated on
the same inputs, with the mask the report claims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mif_compile

N, B = 10, 2

# integer position programs over one axis: ("pos",) | ("add", p, c) | ("cast", p, dtype) | ("lookup", p, shift)
_INT = st.recursive(
    st.just(("pos",)),
    lambda inner: st.one_of(
        st.tuples(st.just("add"), inner, st.sampled_from([0, 1, -1, 3, 2**31 - 1, 2**62, 2**63 - 1])),
        st.tuples(st.just("cast"), inner, st.sampled_from(["int32", "int64", "float32", "bfloat16", "float16"])),
        st.tuples(st.just("lookup"), inner, st.sampled_from([0, -1, 1])),
    ),
    max_leaves=3,
)
_CMP = st.sampled_from(["le", "lt", "ge", "gt", "eq", "ne"])
_BOOL = st.recursive(
    st.one_of(
        st.tuples(st.just("cmp"), _CMP, _INT, _INT, st.booleans()),
        st.tuples(st.just("tri"), st.booleans(), st.integers(-1, 1)),
        st.just(("pad",)),
        st.just(("padlong",)),
    ),
    lambda inner: st.one_of(
        st.tuples(st.just("and"), inner, inner),
        st.tuples(st.just("not"), inner),
        st.tuples(st.just("where"), inner),
        st.tuples(st.just("write"), inner, st.sampled_from(["setitem", "fill", "not_", "view"])),
    ),
    max_leaves=4,
)
_DTYPES = {"int32": torch.int32, "int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def build_int(p, n):
    """[n] positions."""
    if p[0] == "pos":
        return torch.arange(n)
    x = build_int(p[1], n)
    if p[0] == "add":
        return x + p[2]
    if p[0] == "cast":
        return x.to(_DTYPES[p[2]])
    i = torch.arange(n)
    return x[(i + p[2]) % n] if p[2] > 0 else x[i + p[2]]  # shift -1 wraps (a[-1]); +1 via % is not 0..n-1


def build_bool(p, n, pad):
    """A mask broadcastable to [B, 1, n, n]."""
    kind = p[0]
    if kind == "cmp":
        _, op, a, b, key_left = p
        ka, qb = build_int(a, n)[None, :], build_int(b, n)[:, None]
        x, y = (ka, qb) if key_left else (qb, ka)
        return getattr(torch, op)(x, y)
    if kind == "tri":
        ones = torch.ones(n, n, dtype=torch.bool)
        return ones.tril(p[2]) if p[1] else ones.triu(p[2])
    if kind == "pad":
        return pad[:, None, None, :]
    if kind == "padlong":
        return pad.long()[:, None, None, :].bool()
    if kind == "and":
        return build_bool(p[1], n, pad) & build_bool(p[2], n, pad)
    if kind == "not":
        return ~build_bool(p[1], n, pad)
    if kind == "where":
        return torch.where(build_bool(p[1], n, pad), True, False)
    m = build_bool(p[1], n, pad)
    how = p[2]
    if how == "setitem":
        m[..., :2] = True
    elif how == "fill":
        m.fill_(True)
    elif how == "not_":
        m.logical_not_()
    else:
        m[..., :1].fill_(False)
    return m


def _check(program):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, 2, N, 4, generator=g) for _ in range(3))
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[0, :3] = False
    pad[1, -2:] = False

    def f(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build_bool(program, q.shape[2], pad))

    try:
        eager_mask = build_bool(program, N, pad.clone())
    except (RuntimeError, IndexError):
        return []  # the program is not valid eager code (e.g. an in-place write to a broadcast view)
    if eager_mask.dtype != torch.bool:
        return []
    compiled = torch.compile(f, backend=mif_compile.backend(inductor=False, min_seq_len=10**9), fullgraph=False)
    try:
        out = compiled(q, k, v, pad.clone())
    except Exception:
        return []  # a program Dynamo or SDPA refuses is not a site
    report = mif_compile.last_report()
    sites = report.sites if report is not None else []
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    for site in sites:
        if not site.rewritten:
            continue
        full = eager_mask.expand(B, 1, N, N)
        want = causal.expand(B, 1, N, N) if site.reason == "causal" else causal & pad[:, None, None, :]
        assert torch.equal(full, want), (program, site.reason)
    torch.testing.assert_close(out, f(q, k, v, pad.clone()), equal_nan=True)
    return sites


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(_BOOL)
@example(("cmp", "le", ("pos",), ("pos",), True))  # causal
@example(("and", ("cmp", "le", ("pos",), ("pos",), True), ("pad",)))  # causal & padding
@example(("write", ("tri", True, 0), "setitem"))
@example(("cmp", "le", ("add", ("pos",), 2**63 - 1), ("add", ("pos",), 2**63 - 1), True))
@example(("cmp", "le", ("lookup", ("pos",), -1), ("pos",), True))
@example(("not", ("tri", False, 1)))
@example(("and", ("tri", True, 0), ("padlong",)))
def test_rewritten_implies_eager_mask_is_causal(program):
    _check(program)


def test_the_property_sees_rewritten_sites():
    """The property is not vacuous: these programs are rewritten (and then checked)."""
    for program, kind in [
        (("cmp", "le", ("pos",), ("pos",), True), "causal"),
        (("not", ("tri", False, 1)), "causal"),
        (("and", ("tri", True, 0), ("padlong",)), "causal+padding"),
        (("cmp", "ge", ("cast", ("pos",), "float32"), ("add", ("pos",), 0), False), "causal"),
    ]:
        (site,) = _check(program)
        assert site.rewritten and site.reason == kind, (program, site.reason)
