"""Left padding (how ``generate()`` batches prompts of different lengths) under sparse budgets.

The index is laid out in absolute positions, so a left-padded row's attention can only equal the
same prompt alone where the pads are a whole number of query blocks (then every block boundary moves
with them). What must hold at any pad count: the sinks are the row's first real tokens (A-shape's
``n_init`` keys, vertical-slash's forced first columns, block-sparse's first block), not its pads, and
no budget ever reaches a future key (block-sparse rows with fewer real blocks than their budget).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import HeadPattern, ops

N, D = 320, 16


def padded_fn(q, k, v, pad):
    i = torch.arange(q.shape[2])
    mask = (i[None, None, None, :] <= i[None, None, :, None]) & pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _opts(pattern, **kw):
    return dict(min_seq_len=0, impl="reference", max_density=1.0, default_pattern=pattern, inductor=False, **kw)


def _qkv(n, seed=0, heads=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, D, generator=g) for _ in range(3)]


def _padded(q, k, v, p, seed=1):
    g = torch.Generator().manual_seed(seed)
    junk = lambda t: torch.cat([torch.randn(1, t.shape[1], p, D, generator=g), t], 2)  # noqa: E731
    pad = torch.ones(1, p + q.shape[2], dtype=torch.bool)
    pad[:, :p] = False
    return junk(q), junk(k), junk(v), pad


@pytest.mark.parametrize("pattern", [HeadPattern.a_shape(64, 128), HeadPattern.vertical_slash(8, 40, mass="fixed"),
                                     HeadPattern.vertical_slash(8, 40, mass=0.9)],
                         ids=["a_shape", "vs_fixed", "vs_adaptive"])
def test_pads_of_whole_query_blocks_change_nothing(pattern):
    """128 pads (two 64-query blocks, one of 128): the padded row's output is the prompt's alone, and
    the budget really drops keys (the sparse output is not dense)."""
    q, k, v = _qkv(N)
    alone = torch.compile(causal_fn, backend="minference", options=_opts(pattern, block_m=64))(q, k, v)
    torch._dynamo.reset()
    qp, kp, vp, pad = _padded(q, k, v, 128)
    out = torch.compile(padded_fn, backend="minference", options=_opts(pattern, block_m=64))(qp, kp, vp, pad)
    assert mif_compile.last_report().rewritten
    assert (alone - causal_fn(q, k, v)).abs().max() > 1e-2
    torch.testing.assert_close(out[:, :, 128:], alone, rtol=1e-5, atol=1e-5)


def test_a_shape_sink_is_the_first_real_tokens():
    """At any pad count, an A-shape head's sink blocks start at the row's first real key."""
    q, k, _ = _qkv(N + 50)
    pad = torch.ones(2, N + 50, dtype=torch.bool)
    pad[0, :50] = False  # row 0: 50 pads; row 1: none
    hp = HeadPattern.a_shape(64, 64)
    codes, b0, b1 = ops.encode_heads((hp, hp))
    idx = ops.build_layer_index(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), pad, D ** -0.5, codes, b0, b1,
                                block_m=64, impl="reference")
    for m in range(2, idx.block_count.shape[-1]):  # query blocks past the sink and the local window
        assert idx.block_offset[0, 0, m, 0] == 50 and idx.block_offset[1, 0, m, 0] == 0, m


def test_block_sparse_never_picks_a_future_block_under_left_padding():
    """A budget larger than a row's real blocks (block-sparse, top_k >= blocks, 200 pads): the rows
    attend exactly as dense SDPA under the same mask, every key within the budget and none beyond."""
    q, k, v = _qkv(N)
    qp, kp, vp, pad = _padded(q, k, v, 200)
    pattern = HeadPattern.block_sparse(64)
    for block_m in (64, 128):
        torch._dynamo.reset()
        f = torch.compile(padded_fn, backend="minference", options=_opts(pattern, block_m=block_m))
        out = f(qp, kp, vp, pad)
        torch.testing.assert_close(out[:, :, 200:], padded_fn(qp, kp, vp, pad)[:, :, 200:], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_of_a_model_equals_each_prompt_alone():
    """Through a Hugging Face model (the mask proven from `attention_mask`, positions from it): a batch
    whose first row has 128 pads (two query blocks of 64) gives that row the logits of its prompt run
    alone, under A-shape and vertical-slash budgets that drop keys."""
    from .models import tiny_llama

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 96, (1, 200), generator=g)
    other = torch.randint(0, 96, (1, 328), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 128, dtype=torch.long), prompt], 1), other])
    mask = torch.ones_like(ids)
    mask[0, :128] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for pattern in (HeadPattern.a_shape(32, 64), HeadPattern.vertical_slash(8, 40)):
        torch._dynamo.reset()
        comp = torch.compile(model, backend="minference", options=_opts(pattern, block_m=64))
        with torch.no_grad():
            alone = comp(prompt, use_cache=False).logits
            batch = comp(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            dense = model(prompt, use_cache=False).logits
        assert (alone - dense).abs().max() > 1e-3, pattern  # the budget drops keys
        torch.testing.assert_close(batch[:1, 128:], alone, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pattern", [HeadPattern.vertical_slash(60, 100, mass="fixed"),
                                     HeadPattern.vertical_slash(60, 100, mass=0.9),
                                     HeadPattern.vertical_slash(60, 100)], ids=["fixed", "mass0.9", "default"])
def test_right_padding_probes_the_last_real_queries(pattern):
    """A right-padded row (90 pads after 600 real tokens): the vertical-slash probe is the row's last
    real queries, not its pads, so its real rows get the prompt's own output (60 columns, 30 above the
    forced ones: the probe chooses those)."""
    q, k, v = _qkv(600)
    alone = torch.compile(causal_fn, backend="minference", options=_opts(pattern))(q, k, v)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    tail = lambda t: torch.cat([t, torch.randn(1, t.shape[1], 90, D, generator=g)], 2)  # noqa: E731
    pad = torch.ones(1, 690, dtype=torch.bool)
    pad[:, 600:] = False
    out = torch.compile(padded_fn, backend="minference", options=_opts(pattern))(tail(q), tail(k), tail(v), pad)
    assert (alone - causal_fn(q, k, v)).abs().max() > 1e-2
    torch.testing.assert_close(out[:, :, :600], alone, rtol=1e-5, atol=1e-5)
