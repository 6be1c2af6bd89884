"""Test setup: Triton kernels run through Triton's CPU interpreter when no GPU is present.

The interpreter must be chosen before ``reft_kernels`` (and so its ``@triton.jit`` kernels) is
imported, which is why this happens here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import reft_kernels  # noqa: E402,F401
from reft_kernels import _backend  # noqa: E402

from ._threads import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread per test)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if os.environ.get("REFT_KERNELS_TEST_CUDA_EMULATION") == "1" and DEVICE.type == "cpu":
    # Opt-in: the whole suite also runs backend="cuda" on CPU tensors through the host-thread
    # emulation of the CUDA kernels (tests/cuda/emulation; slow: minutes), for the whole session.
    from reft_kernels import _cuda  # noqa: E402

    from .cuda.emulation.build import build  # noqa: E402

    _EMULATION = _cuda.on_host(build())  # kept referenced: a collected context would exit
    _EMULATION.__enter__()

# torch everywhere; triton on a GPU or through the interpreter; cuda where the extension is built
# and a GPU is present.
BACKENDS = _backend.available_backends(DEVICE)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that can run on this machine's test device."""
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="I/N",
        help="run only the I-th of N contiguous slices of the collected tests (0-based), so that "
             "N processes can share one run; used by tools/device_check.sh, where compiling "
             "each kernel specialisation for the GPU dominates the time",
    )


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        i, n = (int(x) for x in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {spec!r}") from None
    lo, hi = len(items) * i // n, len(items) * (i + 1) // n
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]
