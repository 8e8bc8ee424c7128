"""The op at run time (issue 10 part B): padded dense path without an N x N mask, batch broadcast,
NaN/inf as dense SDPA gives them, a backward (gradcheck in float64, compiled training step), and
d_v != d_qk (MLA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import HeadPattern, ops
from mif_compile.ops import encode_heads

SCALE = 0.3
FULL = HeadPattern.vertical_slash(4096, 4096)  # every key at these lengths
ASHAPE = HeadPattern.a_shape(1, 64)  # a static sparse index (no estimation): keys dropped for N > 128


def op(q, k, v, pad=None, pattern=FULL, min_seq_len=0, impl="reference", max_density=1.0, block_m=64):
    codes, b0, b1 = encode_heads([pattern] * q.shape[1])
    return torch.ops.mif.sparse_attention(q, k, v, pad, SCALE, codes, b0, b1, min_seq_len, 16, block_m, impl,
                                          max_density)


def qkv(B=2, H=4, Hkv=2, N=200, D=16, Dv=None, dtype=torch.float32, seed=0, kv_batch=None):
    g = torch.Generator().manual_seed(seed)
    bk = kv_batch or B
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(bk, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(bk, Hkv, N, Dv or D, generator=g).to(dtype)
    return q, k, v


def padding(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, N, generator=g) > 0.3
    pad[0, : N // 3] = False  # left padding: the first rows of sequence 0 see no real key
    return pad


def full_mask(pad, N):
    return torch.ones(N, N, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=SCALE,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------
# item 11: the padded dense path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,Dv", [(700, 16), (1333, 8), (97, 16)])
def test_padded_dense_equals_full_mask_sdpa_exactly(monkeypatch, dtype, N, Dv):
    monkeypatch.setattr(ops, "_DENSE_MASK_ELEMS", 1 << 17)  # several chunks at these lengths
    q, k, v = qkv(N=N, Dv=Dv, dtype=dtype)
    pad = padding(2, N)
    assert len(ops.dense_chunks(2, N)) == (1 if N < 256 else -(-N // 256))
    out = ops.dense_attention(q, k, v, pad, SCALE)
    want = sdpa(q, k, v, full_mask(pad, N))
    assert out.shape == want.shape and out.is_contiguous()
    if dtype == torch.float64:  # SDPA's math path: the softmax sums fewer masked zeros, in another order
        torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    else:  # the CPU flash kernel: bit for bit, rows with no real key included
        assert torch.equal(out, want)
    assert torch.equal(op(q, k, v, pad, min_seq_len=1 << 20), out)  # the op's dense branch


def test_dense_chunks_bound_the_mask():
    for B, N in ((1, 32768), (2, 65536), (1, 1 << 20), (3, 1000)):
        chunks = ops.dense_chunks(B, N)
        assert chunks[0][0] == 0 and chunks[-1][1] == N
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        rows = chunks[0][1] - chunks[0][0]
        assert all(r1 <= ke <= N for _, r1, ke in chunks)
        assert B * rows * N <= max(ops._DENSE_MASK_ELEMS, B * 256 * N)  # O(N) per chunk, never N x N


# ---------------------------------------------------------------------------------------------
# item 6: batch broadcast


@pytest.mark.parametrize("which", ["kv", "q"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_batch_one_broadcasts_like_sdpa(which, path):
    q, k, v = qkv(B=2 if which == "kv" else 1, kv_batch=1 if which == "kv" else 2, N=150)
    out = op(q, k, v, min_seq_len=1 << 20 if path == "dense" else 0)
    want = sdpa(q, k, v)
    assert out.shape == (2, 4, 150, 16)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_batch_broadcast_with_padding_and_mismatch_error():
    q, k, v = qkv(B=2, kv_batch=1, N=150)
    pad = padding(2, 150)
    want = sdpa(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), full_mask(pad, 150))
    torch.testing.assert_close(op(q, k, v, pad), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op(q, k, v, pad[:1].expand(2, -1)), sdpa(q, k, v, full_mask(pad[:1], 150)))
    q3 = torch.randn(3, 4, 150, 16)
    with pytest.raises(ValueError, match="batch sizes do not broadcast: q 3, k 2, v 2"):
        op(q3, *qkv(B=2, N=150)[1:])


def test_compiled_broadcast_site_is_rewritten():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

    q, k, v = qkv(B=2, kv_batch=1, N=150)
    fn = torch.compile(attn, backend="minference", options=dict(min_seq_len=0, max_density=1.0, impl="reference", inductor=False,
                                                                default_pattern=FULL))
    out = fn(q, k, v)
    assert len(mif_compile.last_report().rewritten) == 1
    torch.testing.assert_close(out, attn(q, k, v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# item 10: NaN and inf


def _poison(q, k, where):
    q, k = q.clone(), k.clone()
    if where == "q":
        q[0, 1, 140, 3] = float("nan")
    elif where == "k_nan":
        k[1, 0, 100, 0] = float("nan")
    else:  # a +inf key: inf scores where q . k > 0, NaN after the softmax as in SDPA
        k[0, 1, 120, :] = float("inf")
    return q, k


@pytest.mark.parametrize("where", ["q", "k_nan", "k_inf"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_nan_inf_propagate_exactly_as_causal_sdpa(where, path):
    q, k, v = qkv(N=200)
    q, k = _poison(q, k, where)
    want = sdpa(q, k, v)
    out = op(q, k, v, min_seq_len=1 << 20 if path == "dense" else 0)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(out[ok], want[ok], rtol=1e-5, atol=1e-5)


def _row_oracle(q, k, v, mask):
    """float64 attention where a masked key never reaches a row (its score is replaced, not added)."""
    g = q.shape[1] // k.shape[1]
    kx, vx = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = ((q.double() @ kx.transpose(-1, -2)) * SCALE).masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return p @ vx


@pytest.mark.parametrize("where", ["q", "k_nan", "k_inf"])
@pytest.mark.parametrize("pattern", [FULL, ASHAPE])
def test_nan_inf_with_padding_and_sparsity_reach_exactly_the_rows_that_attend_them(where, pattern):
    q, k, v = qkv(N=200)
    q, k = _poison(q, k, where)
    pad = padding(2, 200)
    pad[1, 100] = pad[0, 120] = True  # the poisoned keys are real tokens
    codes, b0, b1 = encode_heads([pattern] * 4)
    index = ops.build_layer_index(q, k, pad, SCALE, codes, b0, b1, 16, 64, "reference")
    from mif_compile.kernels import index_to_dense_mask

    mask = index_to_dense_mask(index, 200, 64) & pad[:, None, None, :]
    want = _row_oracle(q, k, v, mask)
    out = op(q, k, v, pad, pattern=pattern)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(out[ok].double(), want[ok], rtol=1e-5, atol=1e-5)
    if where == "q":  # a NaN query: SDPA under the full mask agrees row for row
        assert torch.equal(torch.isnan(op(q, k, v, pad)), torch.isnan(sdpa(q, k, v, full_mask(pad, 200))))


# ---------------------------------------------------------------------------------------------
# item 5: the backward


@pytest.mark.parametrize("path,pattern,padded", [("dense", FULL, False), ("dense", FULL, True),
                                                  ("sparse", ASHAPE, False), ("sparse", ASHAPE, True),
                                                  ("sparse", FULL, True)])
def test_gradcheck_float64(path, pattern, padded):
    N = 140  # three query blocks of 64; a_shape(1, 64) drops keys
    q, k, v = (t.double().requires_grad_() for t in qkv(B=2, H=2, Hkv=1, N=N, D=4, Dv=3))
    pad = padding(2, N) if padded else None
    min_len = 1 << 20 if path == "dense" else 0
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, pad, pattern, min_len), (q, k, v),
                                    eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_broadcast_batch():
    q, k, v = (t.double().requires_grad_() for t in qkv(B=2, H=2, Hkv=1, N=90, D=4, kv_batch=1))
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, None, ASHAPE), (q, k, v), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_sparse_backward_equals_autograd_of_the_reference():
    q, k, v = (t.requires_grad_() for t in qkv(N=260, Dv=8))
    pad = padding(2, 260)
    out = op(q, k, v, pad, HeadPattern.vertical_slash(30, 60))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    codes, b0, b1 = encode_heads([HeadPattern.vertical_slash(30, 60)] * 4)
    index = ops.build_layer_index(q.detach(), k.detach(), pad, SCALE, codes, b0, b1, 16, 64, "reference")
    from mif_compile.kernels.reference import sparse_attention as ref

    want_out = ref(q, k, v, index, scale=SCALE, block_m=64, key_padding=pad)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    want = torch.autograd.grad(want_out, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_step_compiles_and_runs_sparse():
    """``model(x)`` with grad enabled (no torch.no_grad) through Inductor: the forward runs the
    sparse op and the backward matches eager's gradients with a budget covering every key."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 3 * 32)

    def attn(x):
        q, k, v = proj(x).view(2, 150, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE).sum()

    x = torch.randn(2, 150, 32)
    fn = torch.compile(attn, backend="minference", options=dict(min_seq_len=0, max_density=1.0, impl="reference",
                                                                default_pattern=FULL))
    # the FX graph cache keys on the graph, not on the op's fake: a stale entry would hide a fake change
    from torch._inductor import config as inductor_config

    with ops.collect_stats() as rows, inductor_config.patch(force_disable_caches=True):
        loss = fn(x)
        got = torch.autograd.grad(loss, proj.weight)[0]  # the backward graph compiles here
    assert len(mif_compile.last_report().rewritten) == 1 and rows and not rows[0]["fell_back_to_dense"]
    want_loss = attn(x)
    want = torch.autograd.grad(want_loss, proj.weight)[0]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# item 4: d_v != d_qk (MLA)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_value_head_dim_differs(path):
    q, k, v = qkv(N=150, D=24, Dv=16)
    pad = padding(2, 150)
    out = op(q, k, v, pad, min_seq_len=1 << 20 if path == "dense" else 0)
    assert out.shape == (2, 4, 150, 16)
    torch.testing.assert_close(out, sdpa(q, k, v, full_mask(pad, 150)), rtol=1e-5, atol=1e-5)


def test_mla_site_is_rewritten():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(N=150, H=2, Hkv=2, D=24, Dv=16)
    fn = torch.compile(attn, backend="minference", options=dict(min_seq_len=0, max_density=1.0, impl="reference", inductor=False,
                                                                default_pattern=FULL))
    out = fn(q, k, v)
    assert len(mif_compile.last_report().rewritten) == 1
    torch.testing.assert_close(out, attn(q, k, v), rtol=1e-5, atol=1e-5)
