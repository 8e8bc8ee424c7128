"""A Triton kernel that does not compile on this machine runs as its torch twin (the same results).

The index's small kernels (``select_triton``, ``index.vs_runs``) replace chains of torch ops that give
the same values. Where one of them fails to compile (a Triton version's code generator, the GPU's shared
memory or registers), the prefill should not fail with it: the twin runs instead, with one warning,
and :func:`failures` lists what fell back. A failure after the kernel has run once with the same
compile-time constants is not a compile failure; it is raised.
"""

from __future__ import annotations

import functools
import warnings

_FAILED: dict[str, str] = {}
_RAN: set = set()


@functools.cache  # asked at every launch
def _compile_errors() -> tuple:
    errors = []
    try:
        from triton.compiler.errors import CompilationError

        errors.append(CompilationError)
    except ImportError:  # pragma: no cover - every supported Triton has it
        pass
    try:
        import triton.runtime.errors as rt

        errors += [getattr(rt, n) for n in ("OutOfResources", "PTXASError") if hasattr(rt, n)]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def run(name: str, key, fast, twin, *args, **kwargs):
    """``fast(*args, **kwargs)``, or ``twin(...)`` once ``fast`` failed to compile for ``key`` (its
    compile-time constants). On a GPU the first launch of each key is where Triton compiles, so any error
    there counts as a compile failure; under Triton's interpreter only Triton's compile errors do (there
    an error is a bug the tests must see)."""
    k = (name, key)
    if k in _FAILED:
        return twin(*args, **kwargs)
    first = k not in _RAN
    try:
        out = fast(*args, **kwargs)
    except _compile_errors() as e:
        return _fall_back(k, e, twin, args, kwargs)
    except Exception as e:
        from triton.runtime.errors import InterpreterError

        if not first or isinstance(e, InterpreterError):
            raise
        return _fall_back(k, e, twin, args, kwargs)
    _RAN.add(k)
    return out


def _fall_back(k, e, twin, args, kwargs):
    _FAILED[k] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warnings.warn(f"mif_compile: the Triton kernel {k[0]} {k[1]} did not compile ({_FAILED[k]}); its torch twin "
                  "runs instead (the same results, more launches)", RuntimeWarning, stacklevel=3)
    return twin(*args, **kwargs)


def failures() -> dict:
    """{(kernel, compile-time key): the error} for each kernel that runs as its torch twin."""
    return dict(_FAILED)
