"""Tests marked ``cuda`` run only where a CUDA GPU is present (CI has none; run them on the GPU).

Without CUDA the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when a kernel
module's ``@triton.jit`` runs, so it is set here, before any test module can import one (a kernel
imported first without it cannot run on the CPU at all).
"""

import os

import pytest
import torch

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
