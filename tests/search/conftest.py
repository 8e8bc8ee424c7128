import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import mif_compile

    torch._dynamo.reset()
    mif_compile.clear_reports()
    yield
    torch._dynamo.reset()
