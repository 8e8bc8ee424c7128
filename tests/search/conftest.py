import pytest
import torch

from tests.backend.conftest import _fresh_dynamo  # noqa: F401  (autouse: a clean Dynamo per test)


@pytest.fixture(scope="module")
def planted():
    """(model, ids): the planted-heads model of ``planted.py`` and one prompt of its length."""
    from tests.search.planted import LAYOUT, N, PlantedModel

    model = PlantedModel(LAYOUT).eval()
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(0))
    return model, ids
