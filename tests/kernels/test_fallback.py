"""A Triton kernel that fails to compile runs as its torch twin (kernels/fallback.py); other errors surface."""

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import InterpreterError, OutOfResources  # noqa: E402

from mif_compile.kernels import fallback  # noqa: E402


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(fallback, "_FAILED", {})
    monkeypatch.setattr(fallback, "_RAN", set())


def twin(x, *, scale):
    return x * scale


def test_a_compile_failure_runs_the_twin_once_warned_and_listed():
    calls = []

    def fast(x, *, scale):
        calls.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    with pytest.warns(RuntimeWarning, match="_k .*did not compile.*OutOfResources"):
        out = fallback.run("_k", 2048, fast, twin, torch.ones(3), scale=2.0)
    assert torch.equal(out, torch.full((3,), 2.0))
    assert list(fallback.failures()) == [("_k", 2048)]
    fallback.run("_k", 2048, fast, twin, torch.ones(3), scale=2.0)  # not tried again
    assert len(calls) == 1


def test_other_keys_still_try_the_kernel_and_its_result_is_returned():
    def fast(x, *, scale):
        return x + scale

    assert torch.equal(fallback.run("_k", 1, fast, twin, torch.ones(2), scale=1.0), torch.full((2,), 2.0))
    assert fallback.failures() == {}


def test_errors_that_are_not_compile_failures_are_raised():
    def interpreted_bug(x, *, scale):
        raise InterpreterError("index out of bounds")

    with pytest.raises(InterpreterError):
        fallback.run("_k", 1, interpreted_bug, twin, torch.ones(1), scale=1.0)
    state = {"n": 0}

    def fails_later(x, *, scale):
        state["n"] += 1
        if state["n"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return x

    fallback.run("_k", 2, fails_later, twin, torch.ones(1), scale=1.0)  # ran once with this key
    with pytest.raises(RuntimeError, match="illegal memory access"):
        fallback.run("_k", 2, fails_later, twin, torch.ones(1), scale=1.0)
    assert fallback.failures() == {}
