"""One intra-op thread for tests of tiny models (imported as an autouse fixture by the conftests of
tests/hf, tests/scale and tests/distributed): these shapes gain nothing from more threads, and on a
busy 2-core machine each parallel op of a tiny model waits for a descheduled thread (measured:
tests/hf 9 s with one thread, 25-250 s with two on a loaded machine)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
