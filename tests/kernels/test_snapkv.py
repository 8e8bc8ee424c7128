"""SnapKV selection (kernels/snapkv.py through mif.sparse_attention_snapkv's run-time function) against
a dense float64 reference on the same q/k: the kept keys, the window, left padding, the refusals."""

from __future__ import annotations

import pytest
import torch

from mif_compile.config import HeadPattern
from mif_compile.kvcache import run_layer_snapkv
from mif_compile.ops import encode_heads, run_layer
from tests.kernels._oracle import snapkv_reference

VS = HeadPattern.vertical_slash(40, 120)
DENSE = HeadPattern("dense")


def _qkv(B=2, H=4, Hkv=2, N=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv))
    return q, k, v


def _run(q, k, v, pad, head, *, budget, window, pool, last_q=64, impl="reference"):
    codes, b0, b1 = encode_heads([head] * q.shape[1])
    return run_layer_snapkv(q, k, v, pad, q.shape[-1] ** -0.5, codes, b0, b1, 0, last_q, 64, impl, 1.0, None, -1,
                            budget, window, pool)


def _positions(kept, full):
    """Positions in ``full`` [B, Hkv, N, D] of the rows of ``kept`` [B, Hkv, K, D] (exact copies)."""
    eq = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # [B, Hkv, K, N]
    assert bool((eq.sum(-1) == 1).all()), "every kept key is a copy of exactly one prompt key"
    return eq.float().argmax(-1)


@pytest.mark.parametrize("head, window, pool, last_q", [
    (VS, 64, 7, 64),      # the sparse path's own estimation scores are reused
    (VS, 16, 5, 64),      # a window smaller than the probe: scored separately
    (DENSE, 64, 7, 64),   # a dense layer: scored by the estimation kernel alone
    (VS, 32, 1, 32),      # no pooling
])
def test_selection_equals_dense_float64_snapkv(head, window, pool, last_q):
    q, k, v = _qkv()
    budget = 100
    out, kc, vc = _run(q, k, v, None, head, budget=budget, window=window, pool=pool, last_q=last_q)
    ref = snapkv_reference(q, k, keep=budget, window=window, pool=pool, scale=q.shape[-1] ** -0.5)
    assert kc.shape == vc.shape == (2, 2, budget, 16)
    pos = _positions(kc, k)
    assert torch.equal(pos, ref)
    assert torch.equal(vc, v.gather(2, ref[..., None].expand(-1, -1, -1, 16)))
    # the attention output is the plain op's
    codes, b0, b1 = encode_heads([head] * 4)
    torch.testing.assert_close(out, run_layer(q, k, v, None, 0.25, codes, b0, b1, 0, last_q, 64, "reference", 1.0),
                               rtol=0, atol=0)


def test_gqa_votes_sum_over_the_group():
    """Query heads of one group vote together: a key only the group's second query head attends is kept."""
    q, k, v = _qkv(B=1, H=4, Hkv=2, N=256)
    k[0, 0, 10] = 0
    q[0, 1, -64:] = 0
    q[0, 1, -64:, 0] = 50.0
    k[0, 0, 10, 0] = 5.0  # head 1 (kv head 0) attends key 10 from every window row
    _, kc, _ = _run(q, k, v, None, VS, budget=80, window=64, pool=1)
    ref = snapkv_reference(q, k, keep=80, window=64, pool=1, scale=0.25)
    assert torch.equal(_positions(kc, k), ref)
    assert 10 in ref[0, 0].tolist()


def test_window_is_always_kept():
    """Window keys that no query attends are kept all the same, and the rest is the votes' top."""
    q, k, v = _qkv(B=1, N=256)
    k[:, :, -64:] = -10 * q[:, ::2, -64:].sign()  # the window's own keys get the lowest scores
    _, kc, vc = _run(q, k, v, None, VS, budget=96, window=64, pool=3)
    pos = _positions(kc, k)
    assert torch.equal(pos[..., -64:], torch.arange(192, 256).expand(1, 2, 64))
    assert bool((pos[..., :-64] < 192).all()) and bool((pos.diff(dim=-1) > 0).all())
    assert torch.equal(pos, snapkv_reference(q, k, keep=96, window=64, pool=3, scale=0.25))


def test_left_padding_keeps_pads_first_and_never_as_real_keys():
    q, k, v = _qkv(B=3, N=300)
    pad = torch.ones(3, 300, dtype=torch.bool)
    pad[1, :70] = False
    pad[2, :5] = False
    budget = 100
    _, kc, _ = _run(q, k, v, pad, VS, budget=budget, window=64, pool=7)
    keep = budget + 70  # the batch's largest pad count on top of the budget
    assert kc.shape[2] == keep
    pos = _positions(kc, k)
    ref = snapkv_reference(q, k, keep=keep, window=64, pool=7, scale=0.25, key_padding=pad)
    assert torch.equal(pos, ref)
    for b, p in enumerate((0, 70, 5)):
        assert torch.equal(pos[b, :, :p], torch.arange(p).expand(2, p))  # the decode mask's zeros
        assert bool((pos[b, :, p:] >= p).all())  # real keys only after them
        assert keep - p >= budget


def test_budget_covering_the_prompt_keeps_everything():
    q, k, v = _qkv(N=90)
    _, kc, vc = _run(q, k, v, None, VS, budget=90, window=64, pool=7)
    assert torch.equal(kc, k) and torch.equal(vc, v)
    assert kc.data_ptr() != k.data_ptr()  # a copy: the op's outputs never alias its inputs


def test_right_padding_is_refused():
    q, k, v = _qkv(B=2, N=300)
    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[1, -20:] = False
    with pytest.raises(ValueError, match="batch row 1 has a pad after a real token"):
        _run(q, k, v, pad, VS, budget=100, window=64, pool=7)
