"""CPU tests of the pure-PyTorch reference against loop oracles and float64 dense attention."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mif_compile.kernels as K
from mif_compile.testing import assert_close_to_ref64

from ._cases import build, dense_masked, full_mask, low_precision_pt, make_inputs, probe_end, nm, vs_case
from ._oracle import naive_scores, naive_vs_rows

EDGE = dict(B=1, H=2, Hkv=1, D=16, N=1, block_m=64, V=1, S=1, sink="none", padding=False, seed=0)


@given(vs_case())
@example(EDGE)
@example({**EDGE, "N": 129, "block_m": 128, "sink": "mixed", "padding": True})
def test_vs_index_matches_contract_oracle(c):
    x = make_inputs(c)
    idx = build(c, x)
    want = naive_vs_rows(x["v_idx"], x["s_off"], x["n_sink"], seq_len=c["N"], block_m=c["block_m"],
                         sink_start=x["sink_start"])
    for (b, h, m), (blocks, cols) in want.items():
        assert idx.block_offset[b, h, m, : idx.block_count[b, h, m]].tolist() == blocks, (b, h, m)
        assert idx.column_index[b, h, m, : idx.column_count[b, h, m]].tolist() == cols, (b, h, m)


@given(vs_case())
def test_vs_index_invariants(c):
    x = make_inputs(c)
    idx = build(c, x)
    N, BM = c["N"], c["block_m"]
    for (b, h, m) in [(b, h, m) for b in range(c["B"]) for h in range(c["H"]) for m in range(nm(c))]:
        m0 = m * BM
        nb, ncol = int(idx.block_count[b, h, m]), int(idx.column_count[b, h, m])
        blocks = idx.block_offset[b, h, m]
        cols = idx.column_index[b, h, m]
        assert (blocks[nb:] == -1).all() and (cols[ncol:] == -1).all()
        bl, cl = blocks[:nb].tolist(), cols[:ncol].tolist()
        assert all(0 <= s < min(m0 + BM, N) for s in bl)  # no block starts beyond the query block
        assert all(b2 - b1 >= 64 for b1, b2 in zip(bl, bl[1:]))  # ascending and disjoint
        assert cl == sorted(set(cl)) and all(0 <= cc < m0 for cc in cl)
        assert not any(s <= cc < s + 64 for cc in cl for s in bl)
        keys = [s + j for s in bl for j in range(64) if s + j < N] + cl
        assert len(keys) == len(set(keys))  # no key twice


@given(vs_case(), st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
@example(EDGE, torch.float64)
def test_reference_attention_vs_dense64(c, dtype):
    x = make_inputs(c, dtype)
    idx = build(c, x)
    scale = c["D"] ** -0.5
    mask = full_mask(idx, c, x["key_padding"])
    ref64 = dense_masked(x["q"], x["k"], x["v"], mask, scale)
    out = K.sparse_attention(x["q"], x["k"], x["v"], idx, scale=scale, block_m=c["block_m"],
                             key_padding=x["key_padding"], impl="reference")
    assert out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-10, atol=1e-10)
    else:
        assert_close_to_ref64(out, low_precision_pt(x["q"], x["k"], x["v"], mask, scale), ref64)


@given(vs_case(), st.sampled_from(["sink", "slashes"]))
def test_budget_covering_every_key_is_dense(c, how):
    c = {**c, "padding": False, "left": 0}  # no pads: the sink starts at key 0
    x = make_inputs(c, torch.float64)
    N = c["N"]
    if how == "sink":
        x["n_sink"] = torch.full((c["H"],), N)
    else:
        x["s_off"] = torch.arange(N, dtype=torch.int32).expand(c["B"], c["H"], N).contiguous()
    c["S"] = x["s_off"].shape[-1]
    idx = build(c, x)
    out = K.sparse_attention(x["q"], x["k"], x["v"], idx, scale=0.3, block_m=c["block_m"], impl="reference")
    g = c["H"] // c["Hkv"]
    dense = torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"].repeat_interleave(g, 1), x["v"].repeat_interleave(g, 1), is_causal=True, scale=0.3)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


@given(vs_case(max_n=160), st.integers(1, 80), st.sampled_from([None, 0, 1, 37, 150]))
def test_scores_match_loop_oracle(c, last_q, cut):
    x = make_inputs(c, torch.float64)
    end = probe_end(c, cut)  # right padding: row 0's probe ends `cut` keys before N
    col, diag = K.vertical_slash_scores(x["q"], x["k"], last_q=last_q, scale=0.2,
                                        key_padding=x["key_padding"], impl="reference", probe_end=end)
    c2, d2 = naive_scores(x["q"], x["k"], last_q=last_q, scale=0.2, key_padding=x["key_padding"], probe_end=end)
    assert col.dtype == torch.float32 and col.shape == (c["B"], c["H"], c["N"])
    torch.testing.assert_close(col.double(), c2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.double(), d2, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 400), st.integers(1, 3), st.integers(0, 2**31 - 1), st.sampled_from([None, 0, 7, 150, 390]))
def test_topk_keeps_forced_and_respects_budgets(N, H, seed, left):
    g = torch.Generator().manual_seed(seed)
    col, diag = torch.rand(2, H, N, generator=g), torch.rand(2, H, N, generator=g)
    v_count = torch.randint(1, N + 1, (H,), generator=g).clamp(max=N)
    s_count = torch.randint(1, N + 1, (H,), generator=g).clamp(max=N)
    # left padding: the forced columns are each row's first real keys; the forced diagonals stay offsets
    start = None if left is None else torch.tensor([min(left, N - 1), 0])
    v_idx, s_off = K.vertical_slash_topk(col, diag, v_count, s_count, n_force_v=30, n_force_s=100,
                                         sink_start=start)
    assert v_idx.dtype == torch.int32 and v_idx.shape == (2, H, int(v_count.max()))
    for h in range(H):
        for ids, cnt, force in ((v_idx, v_count, 30), (s_off, s_count, 100)):
            got = ids[:, h, : cnt[h]]
            assert (ids[:, h, cnt[h]:] == -1).all() and (got >= 0).all() and (got < N).all()
            for b in range(2):
                row = set(got[b].tolist())
                assert len(row) == int(cnt[h])
                s0 = int(start[b]) if start is not None and ids is v_idx else 0
                forced = set(range(s0, min(s0 + force, N)))
                assert forced <= row if int(cnt[h]) >= len(forced) else row <= forced


@given(st.integers(1, 300), st.sampled_from([64, 128]), st.integers(1, 6), st.booleans(), st.integers(0, 2**31 - 1),
       st.sampled_from([0, 0, 50, 130]))
def test_block_sparse_topk_and_index(N, block_m, top, padding, seed, left):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, h, N, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    pad = torch.rand(B, N, generator=g) > 0.3 if padding else None
    first = [0] * B  # each row's first real key: its block is the forced sink block
    if pad is not None:
        first = [min(left, N - 1) if b == 0 else 0 for b in range(B)]  # row 0 left-padded
        for b in range(B):
            pad[b, :first[b]] = False
            pad[b, first[b]] = True
    top_k = torch.tensor([top, 1, top + 1, 3])
    blk = K.block_sparse_topk(q, k, top_k, key_padding=pad, impl="reference")
    NB = math.ceil(N / 64)
    assert blk.shape == (B, H, NB, min(NB, int(top_k.max())))
    for b in range(B):
        for h in range(H):
            for qb in range(NB):
                row = blk[b, h, qb]
                real = [j for j in range(qb + 1) if pad is None or bool(pad[b, j * 64:(j + 1) * 64].any())]
                n_ok = min(int(top_k[h]), len(set(real) | {qb}))  # blocks of pads only are never picked
                kept = row[row >= 0].tolist()
                got = row[:n_ok].tolist()
                assert kept == got and len(set(got)) == n_ok, (kept, n_ok)
                assert all(j in real or j == qb for j in got)  # causal, and never a block of pads
                sb = first[b] // 64
                forced = {sb, qb} if sb <= qb else {qb}  # the sink block (never a future one) and the diagonal
                assert forced <= set(got) if n_ok >= len(forced) else set(got) <= forced
    idx = K.build_bs_index(blk, seq_len=N, block_m=block_m, cap_s=K.max_blocks_per_row(N), impl="reference")
    sub = block_m // 64
    for b in range(B):
        for h in range(H):
            for m in range(math.ceil(N / block_m)):
                want = sorted({int(j) * 64 for j in blk[b, h, m * sub:(m + 1) * sub].flatten() if j >= 0})
                assert idx.block_offset[b, h, m, : idx.block_count[b, h, m]].tolist() == want
    c = dict(N=N, block_m=block_m)
    mask = full_mask(idx, c, pad)
    out = K.sparse_attention(q, k, v, idx, scale=0.25, block_m=block_m, key_padding=pad, impl="reference")
    torch.testing.assert_close(out, dense_masked(q, k, v, mask, 0.25), rtol=1e-10, atol=1e-10)


@given(vs_case())
def test_count_kept_pairs_matches_mask(c):
    x = make_inputs(c)
    idx = build(c, x)
    pairs = K.count_kept_pairs(idx, c["N"], c["block_m"])
    assert torch.equal(pairs, K.index_to_dense_mask(idx, c["N"], c["block_m"]).sum((-1, -2)))


def test_validation_messages_name_the_problem(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 10, 16)
    k = torch.randn(1, 3, 10, 16)
    with pytest.raises(ValueError, match="multiple of kv heads 3"):
        K.vertical_slash_scores(q, k, last_q=4, scale=1.0)
    idx = K.build_vs_index(torch.zeros(1, 4, 1, dtype=torch.int32), torch.zeros(1, 4, 1, dtype=torch.int32), 0,
                           seq_len=10, block_m=64, cap_s=1, cap_v=1)
    with pytest.raises(ValueError, match="block_m must be 64 or 128, got 32"):
        K.sparse_attention(q, q, q, idx, scale=1.0, block_m=32)
    with pytest.raises(ValueError, match="impl must be one of"):
        K.sparse_attention(q, q, q, idx, scale=1.0, block_m=64, impl="cuda")
    q200 = torch.randn(1, 4, 200, 16)
    with pytest.raises(ValueError, match="index counts must be"):
        K.sparse_attention(q200, q200, q200, idx, scale=1.0, block_m=64)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        K.build_vs_index(idx.column_index[..., 0, :], idx.column_index[..., 0, :], 0, seq_len=10, block_m=64,
                         cap_s=1, cap_v=1, impl="triton")


def test_import_is_lean():
    code = ("import sys, torch, mif_compile.kernels as K; "
            "assert 'mif_compile.kernels.attention' not in sys.modules; "
            "assert 'mif_compile.kernels.estimate' not in sys.modules; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zero_budgets_give_only_unused_entries():
    col = torch.rand(2, 3, 90)
    v_idx, s_off = K.vertical_slash_topk(col, col, [0, 7, 0], torch.tensor([0, 0, 0]))
    assert (v_idx[:, [0, 2]] == -1).all() and ((v_idx[:, 1] >= 0).sum(-1) == 7).all() and s_off.shape[-1] == 0
    q = torch.randn(2, 3, 200, 16)
    blk = K.block_sparse_topk(q, q[:, :1], [0, 2, 0])
    assert (blk[:, [0, 2]] == -1).all()
    idx = K.build_vs_index(v_idx, s_off, torch.zeros(3, dtype=torch.int64), seq_len=90, block_m=64, cap_s=2, cap_v=7)
    out = K.sparse_attention(q[:, :, :90], q[:, :, :90], q[:, :, :90], idx, scale=0.1, block_m=64)
    assert (out[:, [0, 2]] == 0).all() and torch.isfinite(out).all()  # heads with no key: rows give 0
    with pytest.raises(ValueError, match="v_count must be >= 0"):
        K.vertical_slash_topk(col, col, [-1, 1, 1], [1, 1, 1])


def test_budget_max_never_reads_a_device():
    from mif_compile.kernels.reference import budget_max

    t = torch.tensor([3, 9, 1])
    assert budget_max(t, None, "v_max") == 9 and budget_max([4, 2], None, "v_max") == 4
    assert budget_max(5, None, "v_max") == 5 and budget_max(t, 12, "v_max") == 12
