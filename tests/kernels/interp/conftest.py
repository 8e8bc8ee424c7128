"""Run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET is read when @triton.jit runs, so it is set here, before any test of this folder
imports a kernel module (they import lazily). On a machine with CUDA it is left alone and these
tests skip: the GPU tests (test_cuda.py) cover the compiled kernels there.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        skip = pytest.mark.skip(reason="Triton interpreter tests run only without CUDA (TRITON_INTERPRET=1)")
        for item in items:
            if "interp" in str(item.fspath):
                item.add_marker(skip)
