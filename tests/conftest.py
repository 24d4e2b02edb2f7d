import pytest
import torch
from harness import ARCH_VARIANTS


@pytest.fixture(params=sorted(ARCH_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
