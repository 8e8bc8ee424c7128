import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import mif_compile

    torch._dynamo.reset()
    mif_compile.clear_reports()
    yield
    torch._dynamo.reset()
