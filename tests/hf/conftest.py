"""Tiny models run with one intra-op thread in the test process (see tests/_threads.py)."""
from .._threads import _one_thread  # noqa: F401  (an autouse fixture, registered by this import)
