"""The benchmark cases of ``reft-kernels bench`` as pytest-benchmark tests:

    python -m pytest bench/ --benchmark-group-by=param:case         # the quick sweep, this device
    REFT_KERNELS_BENCH_SWEEP=gpu python -m pytest bench/ ...         # the GPU sweep

Each (case, provider, mode) is one test; the provider's output and gradients are checked against
the float64 formula first (a mismatch fails the test instead of timing it). ``reft-kernels bench``
is the runner that writes the CSV, table and plots' input; this is the same work for people who
keep their numbers in pytest-benchmark's own storage and comparisons.
"""
from __future__ import annotations

import os

import pytest
import torch

from reft_kernels.benchmark import runner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = runner.sweep(os.environ.get("REFT_KERNELS_BENCH_SWEEP", "quick"), DEVICE)
PROVIDERS = runner.default_providers(DEVICE)


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.label().replace(" ", ",") for c in CASES])
def test_bench(benchmark, case, provider, mode):
    inputs = runner.C.make_inputs(case, DEVICE)
    got = runner.provider_fn(case, provider, inputs, {})
    if got is None:
        pytest.skip(f"{provider} does not apply to {case.op}")
    fn, extra = got
    leaves = list(runner.leaves_of(inputs).values()) + extra
    g = runner.upstream_grad(case, inputs)
    status = runner.check_provider(case, fn, inputs, g)
    assert status == "ok", status
    run = runner.mode_fn(mode, fn, inputs, leaves, g)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    benchmark(lambda: (run(), sync()))


@pytest.fixture(autouse=True)
def _provider_context(request):
    """Each provider measured under the runner's settings for it (``runner.provider_context``)."""
    with runner.provider_context(request.node.callspec.params["provider"]):
        yield
