"""One intra-op thread in the test process too (the workers set their own): tiny shapes gain
nothing from more, and two processes share a 2-core machine."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
