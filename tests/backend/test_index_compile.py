"""The opt-in compiled vertical-slash choice (``ops.compile_index``): ``torch.compile`` of ``vs_choice``
gives the same index as the eager torch code, through the op too. Run here with Inductor on CPU (the
option targets CUDA, where the same graph becomes Triton kernels)."""

from __future__ import annotations

import pytest
import torch

from mif_compile import HeadPattern, kernels as K, ops
from tests.backend.test_adaptive import structured_qk


@pytest.fixture
def compiled_index():
    torch._dynamo.reset()
    ops.compile_index("inductor", devices=("cpu",))
    yield
    ops.compile_index(None)
    torch._dynamo.reset()


def _inputs(n, heads):
    q, k, v = structured_qk(1, len(heads), 2, n, 16)
    codes, b0, b1 = ops.encode_heads(heads)
    return q, k, v, codes, b0, b1, ops.encode_mass(heads)


HEADS = (HeadPattern.vertical_slash(100, 600, mass=1.0), HeadPattern.vertical_slash(30, 300, mass="fixed"),
         HeadPattern.vertical_slash(100, 600, mass=0.9), HeadPattern.vertical_slash(100, 600, mass=0.99))


def test_compiled_choice_equals_eager(compiled_index):
    for n in (3000, 4000):  # one compile serves both lengths (dynamic)
        q, k, v, codes, b0, b1, mass = _inputs(n, HEADS)
        lp = ops._layer_plan(tuple(codes), tuple(b0), tuple(b1), n, 128, tuple(mass))
        t = ops._plan_tensors(lp, q.device)
        col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=16 ** -0.5, impl="reference")
        args = (col, diag, t["v_count"], t["s_count"], t["mass"], t["is_adaptive"])
        for caps in (dict(v_max=100, s_max=600, a_v_max=100, a_s_max=600), dict(v_max=100, s_max=600)):
            fn = ops._choice_fn(q.device)
            assert fn is not ops.vs_choice  # the compiled path
            got = fn(*args, last_q=64, **caps)
            want = ops.vs_choice(*args, last_q=64, **caps)
            for a, b in zip(got, want):
                assert (a is None and b is None) or torch.equal(a, b), (n, caps)


def test_op_with_the_compiled_choice_equals_eager(compiled_index):
    q, k, v, codes, b0, b1, mass = _inputs(2500, HEADS)
    args = (None, 16 ** -0.5, codes, b0, b1, 0, 64, 128, "reference", 1.0, mass)
    with ops.collect_stats() as rows:
        out = ops.run_layer(q, k, v, *args)
    ops.compile_index(None)
    with ops.collect_stats() as rows_eager:
        ref = ops.run_layer(q, k, v, *args)
    assert torch.equal(out, ref)
    assert rows[0]["density"] == rows_eager[0]["density"] and rows[0]["target_missed"] == rows_eager[0]["target_missed"]
    # the backward recomputes the index through the same path, compiled or not
    ops.compile_index("inductor", devices=("cpu",))
    g = torch.randn_like(q)
    got = ops.layer_grads(g, q, k, v, *args[:-2], 1.0, mass)
    ops.compile_index(None)
    want = ops.layer_grads(g, q, k, v, *args[:-2], 1.0, mass)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_index_refuses_a_non_name():
    with pytest.raises(TypeError, match="backend name or None"):
        ops.compile_index(object())
    assert ops._choice_fn(torch.device("cuda")) is ops.vs_choice  # the default: eager everywhere


def test_a_failing_compile_warns_once_and_runs_the_choice_eagerly():
    """A backend whose compile raises (as Inductor's tiling analysis did on an H100, torch 2.11) must not
    crash the prefill: one warning, then the eager choice, the same index, for the rest of the process."""
    calls = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("tiling assertion (test)")

    torch._dynamo.reset()
    torch._dynamo.register_backend(compiler_fn=broken, name="mif_test_broken")
    ops.compile_index("mif_test_broken", devices=("cpu",))
    try:
        q, k, v, codes, b0, b1, mass = _inputs(2500, HEADS)
        args = (None, 16 ** -0.5, codes, b0, b1, 0, 64, 128, "reference", 1.0, mass)
        with pytest.warns(RuntimeWarning, match="mif_test_broken.*failed.*tiling assertion.*runs eagerly"):
            out = ops.run_layer(q, k, v, *args)
        assert "tiling assertion" in ops.compile_index_failures()["mif_test_broken"]
        n_calls = len(calls)
        assert n_calls >= 1
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second compile
            again = ops.run_layer(q, k, v, *args)
        assert len(calls) == n_calls
        ops.compile_index(None)
        ref = ops.run_layer(q, k, v, *args)
        assert torch.equal(out, ref) and torch.equal(again, ref)
    finally:
        ops.compile_index(None)
        ops._INDEX_COMPILE["failed"].clear()
        ops._INDEX_COMPILE["fns"].pop("mif_test_broken", None)
        torch._dynamo.reset()
