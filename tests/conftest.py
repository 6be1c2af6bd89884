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
from reft_kernels._backend import triton_usable_on  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if triton_usable_on(DEVICE) else [])


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
