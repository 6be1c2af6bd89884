"""The Hugging Face tests run their tiny models with one intra-op thread: these shapes gain nothing
from more, and on a busy 2-core machine each parallel op of a tiny model waits for a descheduled
thread (measured: tests/hf 9 s with one thread, 25-250 s with two on a loaded machine)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
