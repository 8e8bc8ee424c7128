"""Triton kernels under the interpreter (fp16/fp32, tiny shapes) against the reference and float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mif_compile.kernels as K
from mif_compile.testing import assert_close_to_ref64

from .._cases import build, dense_masked, full_mask, low_precision_pt, make_inputs, probe_end, vs_case

pytest.importorskip("triton")
EDGE = dict(B=1, H=2, Hkv=1, D=16, N=1, block_m=64, V=1, S=1, sink="none", padding=False, seed=0)
few = settings(max_examples=6)


@few
@given(vs_case(max_n=200, max_heads=4))
@example(EDGE)
@example({**EDGE, "N": 130, "block_m": 128, "sink": "mixed", "padding": True, "H": 4, "Hkv": 2})
@example({**EDGE, "N": 200, "block_m": 64, "sink": "mixed", "H": 4, "Hkv": 2, "B": 2, "S": 30, "V": 20, "left": 150,
          "seed": 3})
def test_index_kernel_equals_reference(c):
    x = make_inputs(c)
    assert all(torch.equal(a, b) for a, b in zip(build(c, x, "triton"), build(c, x, "reference")))


@settings(max_examples=12)
@given(S=st.integers(1, 2100), V=st.integers(0, 40), rows=st.integers(1, 3), gap=st.sampled_from([128, 192]),
       fill=st.floats(0.0, 1.0), spread=st.sampled_from([1, 64, 200, 5000]), seed=st.integers(0, 2**31 - 1))
@example(S=1, V=0, rows=1, gap=192, fill=0.0, spread=1, seed=0)  # nothing to cut
@example(S=1025, V=1, rows=2, gap=192, fill=1.0, spread=200, seed=1)  # runs across the kernel's pieces of 1024
def test_runs_kernel_equals_its_torch_twin(S, V, rows, gap, fill, spread, seed):
    """The index prologue's one launch (sorted offsets cut into runs, counts) equals the torch code it
    replaced: offsets in clusters whose gaps fall on both sides of BLOCK_M + BLOCK_N, unused slots last."""
    from mif_compile.kernels.index import vs_runs, vs_runs_reference

    g = torch.Generator().manual_seed(seed)
    o = (torch.rand(rows, 2, S, generator=g) * spread * S / 8).long() + torch.randint(0, 3, (rows, 2, S), generator=g)
    o = torch.where(torch.rand(rows, 2, S, generator=g) < fill, o, -1)
    o = o.sort(-1, descending=True).values.to(torch.int32)
    v = torch.where(torch.rand(rows, 2, V, generator=g) < fill, torch.randint(0, 500, (rows, 2, V), generator=g), -1)
    got = vs_runs(o, v, block_m=gap - 64)
    want = vs_runs_reference(o, v, block_m=gap - 64)
    for name, a, b in zip(("run_id", "rfirst", "rlo", "ns", "nr", "nv"), got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b), name


@settings(max_examples=10)
@given(N=st.integers(1, 2200), B=st.integers(1, 2), last_q=st.sampled_from([1, 64, 100]), padded=st.booleans(),
       sink=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(N=2048, B=1, last_q=64, padded=False, sink=False, seed=0)  # t = N reads one group past the end
@example(N=1030, B=2, last_q=64, padded=True, sink=True, seed=1)
def test_column_score_kernel_equals_its_torch_twin(N, B, last_q, padded, sink, seed):
    """The selection's columns in one launch: the same float64 sums as the twin, so the same float32
    scores and own masses, forced keys included, with right padding (a probe end before N) and a sink."""
    from mif_compile.kernels import select
    from mif_compile.kernels.select_triton import column_scores

    g = torch.Generator().manual_seed(seed)
    H = 3
    col = torch.rand(B, H, N, generator=g) ** 4
    diag = torch.rand(B, H, N, generator=g) ** 4
    G = -(-N // 64)
    gmax = torch.nn.functional.pad(diag, (0, G * 64 - N)).view(B, H, G, 64).amax(-1)
    gcum = torch.nn.functional.pad(select.prefix_sum(gmax, dtype=torch.float64), (1, 0))
    end = torch.randint(1, N + 1, (B,), generator=g) if padded else torch.full((B,), N)
    s0 = torch.randint(0, N, (B,), generator=g) if sink else None
    args = (col, gmax, gcum, end, s0)
    kw = dict(last_q=last_q, n_force=30, tie=2.0 ** -20)
    for a, b in zip(column_scores(*args, **kw), select.column_scores_reference(*args, **kw)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@settings(max_examples=8)
@given(N=st.integers(1, 3000), B=st.integers(1, 2), v_max=st.integers(1, 70), s_max=st.integers(1, 700),
       padded=st.booleans(), sink=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(N=4096, B=1, v_max=60, s_max=300, padded=False, sink=False, seed=0)
@example(N=2500, B=2, v_max=64, s_max=640, padded=True, sink=True, seed=1)
def test_selection_with_its_kernels_equals_the_torch_selection(N, B, v_max, s_max, padded, sink, seed):
    """The whole adaptive selection with its two Triton kernels (the columns' own mass; which candidates
    to keep) against the pure-torch selection: the same columns and offsets, the share within an ulp;
    targets below, at and of 1, a head with target 0, caps below the largest, right padding, a sink."""
    from mif_compile.kernels import select, select_triton

    g = torch.Generator().manual_seed(seed)
    H = 4
    # noise, a local window, a few slashes of random weight and a few heavy keys: the targets are met part way
    col = torch.rand(B, H, N, generator=g) ** 8 * 1e-2
    diag = torch.rand(B, H, N, generator=g) ** 8 * 1e-2
    diag[..., : min(N, 3)] += 2.0
    for o in torch.randint(0, N, (6,), generator=g).tolist():
        diag[..., o: o + 20] += torch.rand(B, H, 1, generator=g)
    col[..., torch.randint(0, N, (5,), generator=g)] += torch.rand(B, H, 5, generator=g)
    v_count = torch.tensor([v_max, max(1, v_max // 2), v_max, 0])
    s_count = torch.tensor([s_max, s_max, max(1, s_max // 3), 1])
    mass = torch.tensor([0.9, 1.0, 0.0, 0.99])
    kw = dict(last_q=64, v_max=v_max, s_max=s_max,
              sink_start=torch.randint(0, N, (B,), generator=g) if sink else None,
              probe_end=torch.randint(1, N + 1, (B,), generator=g) if padded else None)
    want = select.vertical_slash_select(col, diag, v_count, s_count, mass, **kw)
    with pytest.MonkeyPatch.context() as mp:  # what a CUDA tensor gets
        mp.setattr(select, "column_scores", select_triton.column_scores)
        mp.setattr(select, "keep_candidates", select_triton.keep_candidates)
        got = select.vertical_slash_select(col, diag, v_count, s_count, mass, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=2.5e-7)


def test_runs_cut_exactly_at_a_gap_of_block_m_plus_block_n():
    from mif_compile.kernels.index import vs_runs

    o = torch.tensor([[[2000, 2000 - 192, 2000 - 383, 900, 899, 5, -1, -1]]], dtype=torch.int32)
    run_id, rfirst, rlo, ns, nr, nv = vs_runs(o, torch.tensor([[[3, -1, 7]]]), block_m=128)
    assert run_id.tolist() == [[[0, 1, 1, 2, 2, 3, 3, 3]]]  # 192 apart: a new run; 191 apart: the same one
    assert rfirst[..., :4].tolist() == [[[0, 1, 3, 5]]] and rlo[..., :4].tolist() == [[[2000, 1617, 899, 5]]]
    assert (rfirst[..., 4:] == 0).all() and (rlo[..., 4:] == 0).all()
    assert (ns.item(), nr.item(), nv.item()) == (6, 4, 2)


@few
@given(vs_case(max_n=200, max_heads=4), st.sampled_from([torch.float16, torch.float32]))
@example(EDGE, torch.float32)
@example({**EDGE, "N": 193, "block_m": 128, "sink": "small", "padding": True, "D": 32}, torch.float16)
@example({**EDGE, "N": 260, "block_m": 128, "sink": "mixed", "padding": True, "H": 4, "Hkv": 2, "B": 2, "S": 20,
          "left": 150, "seed": 5}, torch.float32)
def test_attention_kernel_vs_float64(c, dtype):
    x = make_inputs(c, dtype)
    idx = build(c, x)
    scale = c["D"] ** -0.5
    out = K.sparse_attention(x["q"], x["k"], x["v"], idx, scale=scale, block_m=c["block_m"],
                             key_padding=x["key_padding"], impl="triton")
    mask = full_mask(idx, c, x["key_padding"])
    ref64 = dense_masked(x["q"], x["k"], x["v"], mask, scale)
    assert_close_to_ref64(out, low_precision_pt(x["q"], x["k"], x["v"], mask, scale), ref64)


def test_launch_defaults_apply_where_measured():
    """pair/fold/tma default on only at block_m 128 and head dim 128 (kernels/attention.py); a caller's
    choice always wins."""
    from mif_compile.kernels import attention

    assert attention.launch_options(128, 128, 128) == (attention.PAIR, attention.FOLD, attention.TMA) == (True,) * 3
    for shape in ((64, 128, 128), (128, 64, 64), (128, 256, 256), (128, 256, 128)):
        assert attention.launch_options(*shape) == (False, False, False), shape
    assert attention.launch_options(128, 128, 128, pair=False) == (False, True, True)
    assert attention.launch_options(64, 32, 32, fold=True, tma=True) == (False, True, True)
    # and the default launch at that shape is correct: against float64 on the index's mask
    c = {**EDGE, "N": 700, "block_m": 128, "D": 128, "sink": "mixed", "padding": True, "H": 4, "Hkv": 2, "seed": 3}
    x = make_inputs(c, torch.float32)
    idx = build(c, x)
    assert attention._descriptors(x["k"], x["v"], 64, 128, 128) is not None and int(idx[0].max()) >= 4
    out = attention.sparse_attention(x["q"], x["k"], x["v"], idx, scale=0.1, block_m=128, key_padding=x["key_padding"])
    mask = full_mask(idx, c, x["key_padding"])
    ref64 = dense_masked(x["q"], x["k"], x["v"], mask, 0.1)
    assert_close_to_ref64(out, low_precision_pt(x["q"], x["k"], x["v"], mask, 0.1), ref64)


@few
@given(vs_case(max_n=700, max_heads=4), st.sampled_from([torch.float16, torch.float32]), st.integers(1, 200),
       st.integers(1, 300))
@example({**EDGE, "N": 1200, "block_m": 64, "sink": "mixed", "H": 4, "Hkv": 2, "seed": 7}, torch.float32, 250, 6)
@example({**EDGE, "N": 641, "block_m": 128, "sink": "small", "padding": True, "B": 2, "left": 100, "seed": 9},
         torch.float16, 129, 60)
def test_paired_tiles_vs_float64(c, dtype, n_cols, n_diags):
    """``pair=True`` (two index blocks, or 2 * 64 columns, per tile), ``tma=True`` / ``band_tma=True``
    (descriptor loads) and ``cols`` (columns a gather) attend the same keys, and ``fold=True`` (the scale
    inside the exponent) computes the same softmax: combinations against float64 on the index's mask,
    with many blocks off the band and more than 64 columns a row."""
    from mif_compile.kernels import attention

    c = {**c, "V": n_cols, "S": n_diags}
    x = make_inputs(c, dtype)
    idx = build(c, x)
    bc, _, cc, _ = idx
    scale = c["D"] ** -0.5
    mask = full_mask(idx, c, x["key_padding"])
    ref64 = dense_masked(x["q"], x["k"], x["v"], mask, scale)
    ref = low_precision_pt(x["q"], x["k"], x["v"], mask, scale)
    for pair, fold, tma, band_tma, cols in (
            (False, False, False, False, None), (True, False, False, False, None), (False, True, False, False, None),
            (True, True, False, False, None), (False, False, True, False, None), (False, True, True, False, None),
            (True, False, True, False, None), (True, True, True, False, None), (True, True, True, True, 64),
            (False, False, True, True, 128), (False, False, False, False, 32)):
        out = attention.sparse_attention(x["q"], x["k"], x["v"], idx, scale=scale, block_m=c["block_m"],
                                         key_padding=x["key_padding"], pair=pair, fold=fold, tma=tma,
                                         band_tma=band_tma, cols=cols)
        assert_close_to_ref64(out, ref, ref64)
    with pytest.raises(ValueError, match="cols=48"):
        attention.sparse_attention(x["q"], x["k"], x["v"], idx, scale=scale, block_m=c["block_m"], cols=48)
    if c["N"] == 1200:  # the first example: odd and even block counts, more than 128 columns a row
        assert int(bc.max()) >= 6 and int(cc.max()) > 128 and len(set(bc.flatten().tolist())) > 2
        assert attention._descriptors(x["k"], x["v"], 64, c["D"], c["D"]) is not None  # tma=True took descriptors


@few
@given(vs_case(max_n=200, max_heads=4), st.sampled_from([1, 17, 64, 100]), st.sampled_from([None, 0, 5, 90]))
@example(EDGE, 64, None)
@example({**EDGE, "N": 200, "B": 2, "H": 4, "Hkv": 2, "padding": True, "seed": 4}, 64, 90)
def test_estimation_kernel_vs_reference(c, last_q, cut):
    x = make_inputs(c, torch.float32)
    args = dict(last_q=last_q, scale=c["D"] ** -0.5, key_padding=x["key_padding"], probe_end=probe_end(c, cut))
    col, diag = K.vertical_slash_scores(x["q"], x["k"], impl="triton", **args)
    c64, d64 = K.vertical_slash_scores(x["q"].double(), x["k"].double(), impl="reference", **args)
    torch.testing.assert_close(col, c64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(diag, d64, rtol=1e-4, atol=1e-5)


def test_dense_budget_kernel_equals_sdpa():
    c = {**EDGE, "N": 150, "H": 4, "Hkv": 2, "D": 32, "block_m": 64}
    x = make_inputs(c, torch.float32)
    x["n_sink"] = torch.full((4,), 150)
    idx = build(c, x, "triton")
    out = K.sparse_attention(x["q"], x["k"], x["v"], idx, scale=0.2, block_m=64, impl="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"].repeat_interleave(2, 1), x["v"].repeat_interleave(2, 1), is_causal=True, scale=0.2)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D,Dv,dtype", [(24, 16, torch.float32), (48, 32, torch.float16), (16, 8, torch.float32)])
def test_head_dims_not_a_power_of_two_and_value_dim_differs(D, Dv, dtype):
    c = {**EDGE, "N": 150, "H": 4, "Hkv": 2, "D": D, "block_m": 64, "sink": "mixed", "padding": True, "V": 9, "S": 5}
    x = make_inputs(c, dtype)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 2, 150, Dv, generator=g).to(dtype)
    idx = build(c, x)
    scale = D ** -0.5
    out = K.sparse_attention(x["q"], x["k"], v, idx, scale=scale, block_m=64, key_padding=x["key_padding"],
                             impl="triton")
    assert out.shape == (1, 4, 150, Dv)
    mask = full_mask(idx, c, x["key_padding"])
    ref64 = dense_masked(x["q"], x["k"], v, mask, scale)
    assert_close_to_ref64(out, low_precision_pt(x["q"], x["k"], v, mask, scale), ref64)
    args = dict(last_q=64, scale=scale, key_padding=x["key_padding"])
    col, diag = K.vertical_slash_scores(x["q"].float(), x["k"].float(), impl="triton", **args)
    c64, d64 = K.vertical_slash_scores(x["q"].double(), x["k"].double(), impl="reference", **args)
    torch.testing.assert_close(col, c64, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(diag, d64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_kernel_propagates_nan_like_the_reference(dtype):
    c = {**EDGE, "N": 150, "H": 4, "Hkv": 2, "D": 16, "block_m": 64, "sink": "mixed", "V": 9, "S": 5}
    x = make_inputs(c, dtype)
    x["q"][0, 1, 140, 3] = float("nan")
    x["k"][0, 0, 70, 0] = float("nan")
    x["k"][0, 1, 30, :] = float("inf")
    idx = build(c, x)
    out = K.sparse_attention(x["q"], x["k"], x["v"], idx, scale=0.25, block_m=64, impl="triton")
    ref = K.sparse_attention(x["q"].double(), x["k"].double(), x["v"].double(), idx, scale=0.25, block_m=64,
                             impl="reference")
    assert torch.isnan(ref).any() and torch.equal(torch.isnan(out), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(out[ok].double(), ref[ok], rtol=2e-3, atol=2e-3)


def test_compile_time_constants_do_not_depend_on_the_length(monkeypatch):
    """Every new value of a kernel's tl.constexpr arguments compiles it again (seconds on a GPU), so
    they must not follow the prompt length: caps and split counts are run-time arguments. The
    keyword arguments of each launch are its constexprs; they must be equal at two lengths."""
    from mif_compile.kernels import attention, estimate, index

    seen: dict[str, list[dict]] = {}

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.setdefault(self.name, []).append(kwargs)
                return self.fn[grid](*args, **kwargs)
            return launch

    for mod, name in ((attention, "_sparse_attn_kernel"), (index, "_vs_index_kernel"), (index, "_vs_runs_kernel"),
                      (estimate, "_row_stats_kernel"), (estimate, "_col_diag_kernel")):
        monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name)))
    H, D = 2, 16
    for n in (1024, 1536):  # both multiples of block_m (EVEN_M), the same budgets
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
        col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=D ** -0.5, impl="triton")
        v_idx, s_off = K.vertical_slash_topk(col, diag, [30] * H, [200] * H)
        idx = K.build_vs_index(v_idx, s_off, torch.zeros(H, dtype=torch.int64), seq_len=n, block_m=128,
                               cap_s=K.max_blocks_per_row(n), cap_v=30, impl="triton")
        K.sparse_attention(q, k, v, idx, scale=D ** -0.5, block_m=128, impl="triton")
    assert sorted(seen) == ["_col_diag_kernel", "_row_stats_kernel", "_sparse_attn_kernel", "_vs_index_kernel",
                            "_vs_runs_kernel"]
    for name, calls in seen.items():
        assert len(calls) == 2 and calls[0] == calls[1], (name, calls)


@pytest.mark.parametrize("block_m", [64, 128])
def test_block_sparse_budget_beyond_real_blocks_stays_causal(block_m):
    """200 pads in front of 320 keys, a block budget larger than the real blocks: the index keeps no
    future block, so the kernel (which masks causally only the last blocks of a row) equals dense
    attention under the same mask."""
    g = torch.Generator().manual_seed(0)
    N, P, D = 520, 200, 16
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    pad = torch.ones(1, N, dtype=torch.bool)
    pad[:, :P] = False
    blk = K.block_sparse_topk(q, k, [64, 64], key_padding=pad, impl="reference")
    idx = K.build_bs_index(blk, seq_len=N, block_m=block_m, cap_s=K.max_blocks_per_row(N), impl="reference")
    out = K.sparse_attention(q, k, v, idx, scale=D ** -0.5, block_m=block_m, key_padding=pad, impl="triton")
    i = torch.arange(N)
    mask = (i[None, :] <= i[:, None]) & pad[0][None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out[:, :, P:].double(), want[:, :, P:], rtol=1e-4, atol=1e-4)
