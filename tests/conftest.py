"""Tests marked ``cuda`` run only where a CUDA GPU is present (CI has none; run them on the GPU).

Without CUDA the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when a kernel
module's ``@triton.jit`` runs, so it is set here, before any test module can import one (a kernel
imported first without it cannot run on the CPU at all).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles. 'dev' (the default) and 'ci' (when CI is set: fewer examples for tests without
# their own count) draw the same examples on every run, so a verdict never depends on the draw;
# HYPOTHESIS_PROFILE=explore draws new ones each run to look for failures (one found that way becomes an
# @example). A test's own @settings (max_examples, deadline) still apply.
_common = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, derandomize=True, **_common)
settings.register_profile("ci", max_examples=8, derandomize=True, **_common)
settings.register_profile("explore", max_examples=40, derandomize=False, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

pytest_plugins = ["pytester"]  # tests/test_install.py runs pytest on a throw-away test

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
