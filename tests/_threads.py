"""One intra-op thread for every test (an autouse fixture, registered by tests/conftest.py): the
suite's small shapes gain nothing from more threads, and on a busy 2-core machine each parallel op
waits for a descheduled thread that spins in OpenMP's barrier (measured: tests/hf 9 s with one
thread, 25-250 s with two on a loaded machine; one SmolLM2 training step 5-7 s with one thread
against 33-50 s with two at load 5)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
