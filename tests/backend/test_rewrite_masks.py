"""Masks as hand-written models build them (issue 10, items 3, 7, 8 and 9).

Each site is compiled with the dense-branch backend (``min_seq_len`` huge: the op computes the
original causal attention exactly), so a mask wrongly proven causal shows up as an output that
differs from eager. Provable masks must be rewritten; masks written in place, indexed one axis at a
time, or built from positions that overflow or round must stay dense, with the output exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mif_compile

BIG = 10**9
N, B, H, D = 12, 2, 2, 4


def _qkv(n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(3))


def _pad(n=N):
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[0, :3] = False  # left padding
    pad[1, -2:] = False  # right padding
    return pad


def _causal(n):
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def run(make, n=N, dtype=torch.float32, dynamic=False):
    """Compile ``sdpa(q, k, v, attn_mask=make(n, q, k, v, pad))``; compare with eager on fresh copies
    of the inputs (some cases write to them); return the site."""
    torch._dynamo.reset()

    def f(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=make(q.shape[2], q, k, v, pad))

    args = (*_qkv(n, dtype), _pad(n))
    compiled = torch.compile(f, backend=mif_compile.backend(inductor=False, min_seq_len=BIG), dynamic=dynamic,
                             fullgraph=True)
    with torch.no_grad():
        out = compiled(*[a.clone() for a in args])
        ref = f(*[a.clone() for a in args])
    (site,) = mif_compile.last_report().sites
    assert torch.equal(out, ref), (site.reason, (out - ref).abs().max())
    return site


# -- item 3: safe to prove -----------------------------------------------------------------------

PROVABLE = {
    "ones_tril": lambda n, q, k, v, pad: torch.ones(n, n, dtype=torch.bool).tril(),
    "tril_of_float_ones_bool": lambda n, q, k, v, pad: torch.tril(torch.ones(n, n)).bool(),
    "not_triu": lambda n, q, k, v, pad: ~torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1),
    "float_inf_triu": lambda n, q, k, v, pad: torch.full((n, n), float("-inf")).triu(1),
    "where_0_inf": lambda n, q, k, v, pad: torch.where(_causal(n), 0.0, float("-inf")),
    "masked_fill_inf": lambda n, q, k, v, pad: torch.zeros(n, n).masked_fill(~_causal(n), float("-inf")),
    "slice_of_longer": lambda n, q, k, v, pad: torch.ones(64, 64, dtype=torch.bool).tril()[:n, :n],
    "slice_of_longer_4d": lambda n, q, k, v, pad: torch.ones(64, 64, dtype=torch.bool).tril()[None, None, :n, :n],
    "float_positions": lambda n, q, k, v, pad: torch.arange(n).float()[None, :] <= torch.arange(n).float()[:, None],
    "transposed_lookup": lambda n, q, k, v, pad: (lambda i: (i[None, :] - i[:, None])[i[:, None], i[None, :]] <= 0)(
        torch.arange(n)),
}
PROVABLE_PAD = {
    "causal_and_pad": lambda n, q, k, v, pad: _causal(n) & pad[:, None, None, :],
    "pad_long_bool": lambda n, q, k, v, pad: _causal(n) & pad.long()[:, None, None, :].bool(),
    "pad_long_then_bool": lambda n, q, k, v, pad: _causal(n) & pad.long().bool()[:, None, None, :],
    "pad_view": lambda n, q, k, v, pad: _causal(n) & pad.view(pad.shape[0], -1)[:, None, None, :],
    "tril_and_pad_ne_0": lambda n, q, k, v, pad: torch.ones(n, n, dtype=torch.bool).tril() & (
        pad.long()[:, None, None, :] != 0),
    "float_inf_with_pad": lambda n, q, k, v, pad: torch.where(_causal(n) & pad[:, None, None, :], 0.0, float("-inf")),
}


@pytest.mark.parametrize("name", sorted(PROVABLE))
def test_provable_masks_are_rewritten(name):
    site = run(PROVABLE[name])
    assert site.rewritten and site.reason == "causal", site.reason


@pytest.mark.parametrize("name", sorted(PROVABLE_PAD))
def test_provable_padding_masks_are_rewritten(name):
    site = run(PROVABLE_PAD[name])
    assert site.rewritten and site.reason == "causal+padding", site.reason


@pytest.mark.parametrize("name", ["ones_tril", "float_inf_triu", "slice_of_longer"])
def test_provable_masks_are_rewritten_under_dynamic(name):
    site = run(PROVABLE[name], dynamic=True)
    assert site.rewritten and site.reason == "causal", site.reason


def test_finfo_min_mask_left_dense():
    """HF's old float masks use finfo.min, not -inf: not the same as a boolean mask, left dense."""
    site = run(lambda n, q, k, v, pad: torch.where(_causal(n), 0.0, torch.finfo(torch.float32).min))
    assert not site.rewritten


# -- item 7: in-place writes -----------------------------------------------------------------------


def _setitem(n, q, k, v, pad):
    m = _causal(n)
    m[:, :3] = True
    return m


def _fill(n, q, k, v, pad):
    m = torch.ones(n, n, dtype=torch.bool).tril()
    m.fill_(True)
    return m


def _logical_not_(n, q, k, v, pad):
    m = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    m.logical_not_()  # now causal, as ~ would give; then flipped back through a view
    m[:].logical_not_()
    return ~m


def _view_write(n, q, k, v, pad):
    m = _causal(n)
    m[:2].fill_(True)
    return m


def _out_kwarg(n, q, k, v, pad):
    m = _causal(n)
    torch.logical_not(m, out=m)
    return ~m


def _pad_written_after(n, q, k, v, pad):
    m = _causal(n) & pad[:, None, None, :]
    pad.fill_(True)
    return m


def _pad_written_through_cast(n, q, k, v, pad):
    p = pad.bool()  # the same tensor
    m = _causal(n) & p[:, None, None, :]
    pad[:, :1] = True
    return m


MUTATED = [_setitem, _fill, _logical_not_, _view_write, _out_kwarg, _pad_written_after, _pad_written_through_cast]


@pytest.mark.parametrize("make", MUTATED, ids=lambda f: f.__name__)
def test_masks_written_in_place_stay_dense(make):
    site = run(make)
    assert not site.rewritten and "mutated in place" in site.reason, site.reason


def _repeat(x, r):
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, r, n, d).reshape(b, h * r, n, d)


def test_kv_written_after_repeat_kv_stays_dense():
    """The op would read k/v before repeat_kv (a copy): a later write to k must leave it dense."""
    torch._dynamo.reset()

    def f(q, k, v):
        kr, vr = _repeat(k, 2), _repeat(v, 2)
        k.mul_(2)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=_causal(q.shape[2]))

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, N, D, generator=g), torch.randn(1, 2, N, D, generator=g), torch.randn(1, 2, N, D, generator=g)
    compiled = torch.compile(f, backend=mif_compile.backend(inductor=False, min_seq_len=BIG), fullgraph=True)
    out = compiled(q.clone(), k.clone(), v.clone())
    assert torch.equal(out, f(q.clone(), k.clone(), v.clone()))
    (site,) = mif_compile.last_report().sites
    assert not site.rewritten and "mutated in place" in site.reason, site.reason


# -- item 8: advanced indexing substitutes every axis at once ------------------------------------


def test_lookup_on_two_axes_is_not_read_as_zero():
    """rel[i[None, :], i[:, None]] is rel transposed (query <= key here), not a constant."""
    def make(n, q, k, v, pad):
        i = torch.arange(n)
        rel = i[None, :] - i[:, None]
        return rel[i[None, :], i[:, None]] <= 0

    site = run(make)
    assert not site.rewritten and "not causal-only" in site.reason, site.reason


# -- item 9: overflow and rounding of positions ----------------------------------------------------


def _int64_overflow(n, q, k, v, pad):
    i = torch.arange(n) + (2**63 - 1)
    return i[None, :] <= i[:, None]


def _int32_overflow(n, q, k, v, pad):
    i = torch.arange(n, dtype=torch.int32) + (2**31 - 1)
    return i[None, :] <= i[:, None]


def _bf16_positions(n, q, k, v, pad):
    i = torch.arange(n).to(torch.zeros((), dtype=torch.bfloat16))
    return i[None, :] <= i[:, None]


def _fp16_positions(n, q, k, v, pad):
    i = torch.arange(n).half()
    return i[None, :] <= i[:, None]


@pytest.mark.parametrize("make", [_int64_overflow, _int32_overflow], ids=lambda f: f.__name__)
def test_overflowing_positions_stay_dense(make):
    assert not torch.equal(make(N, *([None] * 4)), _causal(N))  # eager wraps: not causal
    site = run(make)
    assert not site.rewritten and "overflow" in site.reason, site.reason


@pytest.mark.parametrize("make,n", [(_bf16_positions, 300), (_fp16_positions, 2100)], ids=["bf16", "fp16"])
def test_rounded_positions_stay_dense(make, n):
    assert not torch.equal(make(n, *([None] * 4)), _causal(n))  # eager rounds: not causal
    site = run(make, n=n)
    assert not site.rewritten and "round" in site.reason, site.reason


def test_float_arange_under_a_bf16_default_dtype_stays_dense():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        def make(n, q, k, v, pad):
            i = torch.arange(float(n))
            return i[None, :] <= i[:, None]

        assert not torch.equal(make(300, *([None] * 4)), _causal(300))
        site = run(make, n=300, dtype=torch.float32)
    finally:
        torch.set_default_dtype(prev)
    assert not site.rewritten, site.reason


def test_kv_written_before_repeat_kv_is_rewritten():
    """A cache written in place before repeat_kv reads it (StaticCache's index_copy_) is what the op
    reads too: rewritten, output exact."""
    torch._dynamo.reset()

    def f(q, k, v, cache_k, cache_v):
        cache_k.copy_(k)
        cache_v.copy_(v)
        kr, vr = _repeat(cache_k, 2), _repeat(cache_v, 2)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=_causal(q.shape[2]))

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, N, D, generator=g), torch.randn(1, 2, N, D, generator=g), torch.randn(1, 2, N, D, generator=g)
    args = (q, k, v, torch.zeros_like(k), torch.zeros_like(v))
    compiled = torch.compile(f, backend=mif_compile.backend(inductor=False, min_seq_len=BIG), fullgraph=True)
    out = compiled(*[a.clone() for a in args])
    assert torch.equal(out, f(*[a.clone() for a in args]))
    (site,) = mif_compile.last_report().sites
    assert site.rewritten and site.reason == "causal", site.reason
