"""Every causal site is rewritten at every prompt length, under every compile mode (issue 10, items 1, 2).

Three successive lengths under default ``torch.compile`` (automatic dynamic: static first, then a
recompile with symbols, where the ids length and the mask length, or q's and k's lengths, are
different symbols), under ``dynamic=True`` and with ``mark_dynamic``; batch 1 and 2, left and right
padding, with and without a cache; tiny HF models and plain q/k/v functions. Each length asserts
from the report that every site is rewritten, and a full budget (the op's sparse path, every key
kept) gives the dense output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import HeadPattern, ModelPlan
from tests.backend.models import tiny_gpt2, tiny_llama, tiny_qwen2

FULL = HeadPattern.vertical_slash(v=4096, s=4096)  # covers every key at these lengths
LENGTHS = (16, 24, 40)


def _compile(fn, mode, **options):
    torch._dynamo.reset()
    options = {"min_seq_len": 0, "inductor": False, "max_density": 1.0, "default_pattern": FULL, **options}
    dynamic = {"auto": None, "dynamic": True, "mark_dynamic": None}[mode]
    return torch.compile(fn, backend="minference", options=options, dynamic=dynamic)


def _assert_all_rewritten(n_sites, kind=None):
    report = mif_compile.last_report()
    assert report is not None and report.counters["sdpa_sites"] == n_sites, report
    assert report.counters["rewritten"] == n_sites, [s.reason for s in report.sites]
    if kind:
        assert all(s.reason == kind for s in report.sites), [s.reason for s in report.sites]


# -- HF models -------------------------------------------------------------------------------------

HF_CASES = [  # (arch, mode, batch, padding side or None, use_cache)
    ("llama", "auto", 1, None, True),  # generate()'s call: an all-ones mask and a cache
    ("llama", "auto", 2, "left", False),
    ("qwen2", "auto", 2, "right", True),
    ("llama", "dynamic", 2, "left", True),
    ("llama", "mark_dynamic", 1, None, False),
    ("gpt2", "auto", 2, "left", False),  # attention_mask.view(batch, -1)
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,mode,batch,side,use_cache", HF_CASES)
def test_hf_model_every_length_rewritten(arch, mode, batch, side, use_cache):
    model = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}[arch]()
    compiled = _compile(model, mode)
    g = torch.Generator().manual_seed(5)
    for n in LENGTHS:
        ids = torch.randint(0, 96, (batch, n), generator=g)
        mask = torch.ones(batch, n, dtype=torch.long)
        if side == "left":
            mask[0, :3] = 0
        elif side == "right":
            mask[-1, -4:] = 0
        if mode == "mark_dynamic":
            torch._dynamo.mark_dynamic(ids, 1)
            torch._dynamo.mark_dynamic(mask, 1)
        with torch.no_grad():
            out = compiled(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
            ref = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        _assert_all_rewritten(model.config.num_hidden_layers, "causal+padding")
        real = mask.bool()  # logits of padded positions are not compared (their rows see no key)
        torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=2e-5)


# -- plain q/k/v functions -------------------------------------------------------------------------


def _qkv(b, h, n, d=8, hkv=None, seed=6):
    g = torch.Generator().manual_seed(seed + n)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = (torch.randn(b, hkv or h, n, d, generator=g) for _ in range(2))
    return q, k, v


def causal_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gqa_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def padded_fn(q, k, v, pad):
    n = q.shape[2]
    i = torch.arange(n)
    b = torch.arange(pad.shape[0])
    mask = (i[None, None, None, :] <= i[None, None, :, None]) & pad[b[:, None, None, None], i[None, None, None, :]]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _mark(mode, *tensors):
    if mode == "mark_dynamic":
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 2 if t.dim() == 4 else 1)


@pytest.mark.parametrize("mode", ["auto", "dynamic", "mark_dynamic"])
@pytest.mark.parametrize("fn", [causal_fn, gqa_fn], ids=["mha", "gqa"])
def test_qkv_function_every_length_rewritten(mode, fn):
    compiled = _compile(fn, mode)
    for batch, n in zip((1, 2, 2), LENGTHS):
        q, k, v = _qkv(batch, 4, n, hkv=2 if fn is gqa_fn else None)
        _mark(mode, q, k, v)
        out = compiled(q, k, v)
        _assert_all_rewritten(1, "causal")
        torch.testing.assert_close(out, fn(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["auto", "dynamic"])
def test_qkv_function_with_padding_every_length_rewritten(mode):
    compiled = _compile(padded_fn, mode)
    for n in LENGTHS:
        q, k, v = _qkv(2, 2, n)
        pad = torch.ones(2, n, dtype=torch.bool)
        pad[0, :2] = False
        pad[1, -3:] = False
        out = compiled(q, k, v, pad)
        _assert_all_rewritten(1, "causal+padding")
        ref = padded_fn(q, k, v, pad)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_unequal_lengths_at_run_time_compute_the_original_top_left_causal():
    """Compiled where q_len and kv_len are two symbols: a call with q_len != kv_len gets exactly
    sdpa(is_causal=True) (top-left aligned), not a sparse prefill."""
    compiled = _compile(causal_fn, "auto")
    for n in (16, 24):
        compiled(*_qkv(1, 2, n))
    assert mif_compile.last_report().counters["len_checked_at_run_time"] == 1
    _assert_all_rewritten(1)
    q, _, _ = _qkv(1, 2, 20)
    _, k, v = _qkv(1, 2, 28)
    torch.testing.assert_close(compiled(q, k, v), causal_fn(q, k, v), atol=0, rtol=0)


class _Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return causal_fn(q, k, v)


class _Layers(torch.nn.Module):  # a layer index for a per-layer plan (layers.0)
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Causal()])

    def forward(self, q, k, v):
        return self.layers[0](q, k, v)


def test_symbolic_head_count_uniform_and_per_head_plans():
    """dynamic=True: the head count is a symbol. A uniform plan follows the run-time heads; a
    per-head plan is checked against them, at compile time and at run time."""
    compiled = _compile(causal_fn, "dynamic")
    for h in (2, 3):
        q, k, v = _qkv(1, h, 20)
        torch.testing.assert_close(compiled(q, k, v), causal_fn(q, k, v), atol=2e-5, rtol=2e-5)
        _assert_all_rewritten(1)
    plan = ModelPlan(layers=((FULL, FULL),))
    model = _Layers()
    compiled = _compile(model, "dynamic", config=plan)
    q, k, v = _qkv(1, 2, 20)
    torch.testing.assert_close(compiled(q, k, v), causal_fn(q, k, v), atol=2e-5, rtol=2e-5)
    _assert_all_rewritten(1)
    assert mif_compile.last_report().sites[0].layer == 0
    with pytest.raises(Exception, match="2 head patterns for this layer, but the attention has 3 query heads"):
        compiled(*_qkv(1, 3, 20))


def test_recompiled_hf_graph_builds_no_square_mask():
    """The 75 GiB case of the issue: at the second and third lengths (the graph with symbols), the
    (B, 1, N, N) mask is gone from the graph; only the (B, L) padding reaches the op."""
    from tests.backend.test_pass import graph_facts

    model = tiny_llama(num_hidden_layers=1)
    inner = mif_compile.backend(inductor=False, min_seq_len=0, max_density=1.0, default_pattern=FULL)
    graphs = []

    def capture(gm, example_inputs):
        fn = inner(gm, example_inputs)
        graphs.append(gm)
        return fn

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture)
    for n in LENGTHS:
        ids = torch.randint(0, 96, (1, n))
        with torch.no_grad():
            compiled(input_ids=ids, attention_mask=torch.ones(1, n, dtype=torch.long), use_cache=True)
    assert len(graphs) == 2  # static at the first length, symbolic from the second on
    ops, sdpa, square = graph_facts(graphs[-1])
    assert len(ops) == 1 and not sdpa
    assert not square, [n.name for n in square]
    padding = ops[0].args[3].meta["example_value"]
    assert padding.dtype == torch.bool and padding.dim() == 2


def test_run_time_guard_slices_a_longer_padding_and_refuses_a_shorter_one():
    """mask[b, k] over k < kv_len reads mask[:, :kv_len]; a shorter mask is eager's index error."""
    from mif_compile.ops import encode_heads, run_layer

    q, k, v = _qkv(2, 2, 20)
    codes, b0, b1 = encode_heads((FULL,))
    pad = torch.ones(2, 26, dtype=torch.bool)
    pad[0, :4] = False
    pad[1, 20:] = False  # beyond kv_len: never read
    out = run_layer(q, k, v, pad, 8**-0.5, codes, b0, b1, 0, impl="reference")
    ref = run_layer(q, k, v, pad[:, :20].contiguous(), 8**-0.5, codes * 2, b0 * 2, b1 * 2, 0, impl="reference")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"padding mask has shape \(2, 19\), smaller than \(batch=2, kv_len=20\)"):
        run_layer(q, k, v, pad[:, :19], 8**-0.5, codes, b0, b1, 0, impl="reference")
