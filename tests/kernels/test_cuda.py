"""GPU tests: compiled Triton kernels (bf16/fp16) vs the reference vs float64, on poisoned memory."""

from __future__ import annotations

import math

import pytest
import torch

import mif_compile.kernels as K
from mif_compile.testing import assert_close_to_ref64

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _poison(nbytes: int) -> None:
    """Fill freed allocator memory with NaN so an unwritten output element cannot pass."""
    junk = torch.full((nbytes // 2 + 1024,), float("nan"), dtype=torch.float16, device="cuda")
    del junk


def _layer(N, H, Hkv, D, dtype, seed, V=200, S=300, padding=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, H, N, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    v_idx = torch.randint(-1, N, (1, H, V), device="cuda", dtype=torch.int32, generator=g)
    s_off = torch.randint(-1, N, (1, H, S), device="cuda", dtype=torch.int32, generator=g)
    s_off[..., :64] = torch.arange(64, device="cuda", dtype=torch.int32)
    n_sink = torch.tensor([(0, 128, N)[h % 3] for h in range(H)], device="cuda")
    pad = (torch.rand(1, N, device="cuda", generator=g) > 0.2) if padding else None
    return q, k, v, v_idx, s_off, n_sink, pad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,block_m,padding", [(1000, 64, 64, False), (2113, 128, 128, False),
                                                  (1531, 128, 128, True), (4096, 32, 64, True)])
def test_attention_kernel_vs_reference_vs_float64(N, D, block_m, padding, dtype):
    H, Hkv = 8, 2
    q, k, v, v_idx, s_off, n_sink, pad = _layer(N, H, Hkv, D, dtype, seed=N + D, padding=padding)
    caps = dict(seq_len=N, block_m=block_m, cap_s=K.max_blocks_per_row(N), cap_v=v_idx.shape[-1])
    _poison(4 * H * N * 256)
    if padding:  # and the sink from an unaligned first real key, as a left-padded row has it
        caps["sink_start"] = torch.tensor([137], device="cuda", dtype=torch.int32)
    idx = K.build_vs_index(v_idx, s_off, n_sink, impl="triton", **caps)
    ref_idx = K.build_vs_index(v_idx, s_off, n_sink, impl="reference", **caps)
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a, b)
    scale = D ** -0.5
    _poison(2 * q.numel() * q.element_size())
    out = K.sparse_attention(q, k, v, idx, scale=scale, block_m=block_m, key_padding=pad, impl="triton")
    torch.cuda.synchronize()
    out_pt = K.sparse_attention(q, k, v, idx, scale=scale, block_m=block_m, key_padding=pad, impl="reference")
    ref64 = K.sparse_attention(q.double(), k.double(), v.double(), idx, scale=scale, block_m=block_m,
                               key_padding=pad, impl="reference")
    # out_pt computes in fp32; the low-precision kernel rounds p to bf16/fp16 before P @ V
    assert_close_to_ref64(out, out_pt, ref64, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("pair,fold,tma,stages,extra", [(True, False, False, 2, {}), (True, False, False, 3, {}),
                                                        (False, True, False, 3, {}), (True, True, False, 2, {}),
                                                        (False, False, True, 3, {}), (False, True, True, 3, {}),
                                                        (True, True, True, 3, {}),
                                                        (True, True, True, 3, {"band_tma": True, "cols": 64})])
@pytest.mark.parametrize("N,D,block_m,padding", [(4096, 128, 128, False), (3001, 128, 64, True), (5000, 64, 128, True)])
def test_paired_tiles_vs_float64(N, D, block_m, padding, pair, fold, tma, stages, extra):
    """The kernel with ``pair=True`` (two index blocks, or 128 columns, per tile) or ``tma=True`` (descriptor
    loads) on many off-band blocks and over 128 columns a row, against float64, at both stage counts the
    benchmark tries."""
    from mif_compile.kernels import attention

    H, Hkv, dtype = 8, 2, torch.bfloat16
    q, k, v, v_idx, s_off, n_sink, pad = _layer(N, H, Hkv, D, dtype, seed=N + D, V=1000, S=80, padding=padding)
    idx = K.build_vs_index(v_idx, s_off, n_sink, impl="triton", seq_len=N, block_m=block_m,
                           cap_s=K.max_blocks_per_row(N), cap_v=v_idx.shape[-1])
    assert int(idx[0].max()) >= 6 and int(idx[2].max()) > 128
    scale = D ** -0.5
    _poison(2 * q.numel() * q.element_size())
    if tma:
        assert attention._descriptors(k, v, 64, D, D) is not None
    out = attention.sparse_attention(q, k, v, idx, scale=scale, block_m=block_m, key_padding=pad, pair=pair,
                                     fold=fold, tma=tma, num_stages=stages, **extra)
    torch.cuda.synchronize()
    out_pt = K.sparse_attention(q, k, v, idx, scale=scale, block_m=block_m, key_padding=pad, impl="reference")
    ref64 = K.sparse_attention(q.double(), k.double(), v.double(), idx, scale=scale, block_m=block_m,
                               key_padding=pad, impl="reference")
    assert_close_to_ref64(out, out_pt, ref64, atol=2e-2)


def test_full_budget_equals_cudnn_free_sdpa():
    N, H, Hkv, D = 3000, 4, 2, 128
    q, k, v, *_ = _layer(N, H, Hkv, D, torch.bfloat16, seed=7)
    idx = K.build_vs_index(torch.full((1, H, 1), -1, device="cuda", dtype=torch.int32),
                           torch.zeros(1, H, 1, device="cuda", dtype=torch.int32), N,
                           seq_len=N, block_m=128, cap_s=K.max_blocks_per_row(N), cap_v=1)
    out = K.sparse_attention(q, k, v, idx, scale=D ** -0.5, block_m=128)
    g = H // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), is_causal=True)
    pt = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
    assert_close_to_ref64(out, pt, ref)


@pytest.mark.parametrize("N,last_q,padding,end", [(5000, 64, False, None), (70001, 64, True, None),
                                                   (999, 100, False, None), (70001, 64, True, 65000)])
def test_estimation_kernel_vs_reference(N, last_q, padding, end):
    H, Hkv, D = 8, 2, 128
    q, k, _, _, _, _, pad = _layer(N, H, Hkv, D, torch.bfloat16, seed=N, padding=padding)
    probe = None if end is None else torch.tensor([end], device="cuda", dtype=torch.int32)  # right padding
    _poison(4 * 2 * H * N * 4)
    col, diag = K.vertical_slash_scores(q, k, last_q=last_q, scale=D ** -0.5, key_padding=pad, impl="triton",
                                        probe_end=probe)
    c64, d64 = K.vertical_slash_scores(q.double(), k.double(), last_q=last_q, scale=D ** -0.5,
                                       key_padding=pad, impl="reference", probe_end=probe)
    assert torch.isfinite(col).all() and torch.isfinite(diag).all()
    torch.testing.assert_close(col, c64, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(diag, d64, rtol=2e-3, atol=1e-5)


def test_index_kernel_equals_reference_at_length():
    N, H = 65536 + 77, 4
    g = torch.Generator(device="cuda").manual_seed(3)
    col = torch.rand(1, H, N, device="cuda", generator=g)
    v_idx, s_off = K.vertical_slash_topk(col, col.flip(-1), torch.tensor([1000, 30, 100, 3500]),
                                         torch.tensor([6096, 800, 800, 100]))
    caps = dict(seq_len=N, block_m=128, cap_s=K.max_blocks_per_row(N), cap_v=3500)
    a = K.build_vs_index(v_idx, s_off, torch.zeros(H, dtype=torch.int64), impl="triton", **caps)
    for name, x, y in zip(("count", "offset", "ccount", "cindex"), a,
                          K.build_vs_index(v_idx.cpu(), s_off.cpu(), torch.zeros(H, dtype=torch.int64),
                                           impl="reference", **caps)):
        assert torch.equal(x.cpu(), y), name


def test_transformers_layout_past_int32_offsets():
    """q/k/v as transformers passes them (transposed views of [B, N, H, D]): stride_n is H * D, so row x
    stride passes 2**31 elements once N * H * D does (1M tokens x 32 heads x 128). The kernels must give
    what they give on contiguous copies (whose row strides stay small), not read out of bounds."""
    N, H, Hkv, D = 589_824, 32, 8, 128  # N * H * D = 2.4e9 > 2**31
    assert N * H * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    assert q.stride(2) == H * D
    col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=D ** -0.5, impl="triton")
    col_c, diag_c = K.vertical_slash_scores(q.contiguous(), k.contiguous(), last_q=64, scale=D ** -0.5, impl="triton")
    assert torch.equal(col, col_c) and torch.equal(diag, diag_c)
    v_idx, s_off = K.vertical_slash_topk(col, diag, torch.full((H,), 1000), torch.full((H,), 2000))
    idx = K.build_vs_index(v_idx, s_off, torch.zeros(H, dtype=torch.int64), seq_len=N, block_m=128,
                           cap_s=K.max_blocks_per_row(N), cap_v=1000)
    out = K.sparse_attention(q, k, v, idx, scale=D ** -0.5, block_m=128, impl="triton")
    out_c = K.sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx, scale=D ** -0.5, block_m=128,
                               impl="triton")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
