import pytest
import torch
from harness import ARCH_VARIANTS


@pytest.fixture(params=sorted(ARCH_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tests run tiny tensors: an intra-op thread pool only adds synchronisation (and, when the other
    # core is busy, ~15 ms stalls per op). One thread keeps the suite fast and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
