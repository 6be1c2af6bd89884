"""RED's Triton backward with 2-D fp32 accumulators (``reft_kernels.kernels(red_bwd="tile2d")``, opt-in,
``ops/red/triton_impl.py``): every gradient against the float64 reference over d, terms, layouts,
dtypes and several row-split programs, bitwise determinism, and its tile."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import kernels, red
from reft_kernels._backend import available_backends
from reft_kernels.ops.red import plan as RP

from .._helpers import DTYPES, bits, check_against_reference, make_base, make_red_params, red_ref_fn, run_with_grads


@pytest.fixture
def tile2d(device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")
    with kernels(red_bwd="tile2d"):  # two row-split programs on the interpreter: one finish
        yield


def _check(base, view, params):
    return check_against_reference(red, red_ref_fn, base, view, params, kernel_kwargs=dict(backend="triton"))


@pytest.mark.parametrize("terms", ["st", "s", "t"])
@pytest.mark.parametrize("d", [1, 7, 100, 257], ids=lambda d: f"d{d}")
def test_tile2d_grads(tile2d, device, d, terms):
    base, view = make_base("contiguous", (300,), d, device=device)  # 5 row blocks of 64 on the interpreter
    base.requires_grad_()
    _check(base, view, make_red_params(d, device=device, terms=terms))


@pytest.mark.parametrize("layout,lead", [("transposed", (9, 31)), ("strided_cols", (7, 40)), ("sliced_cols", (5, 61))])
def test_tile2d_layouts(tile2d, device, layout, lead):
    base, view = make_base(layout, lead, 48, device=device)
    base.requires_grad_()
    _check(base, view, make_red_params(48, device=device))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tile2d_low_precision(tile2d, device, dtype):
    base, view = make_base("contiguous", (260,), 72, DTYPES[dtype], device=device)
    base.requires_grad_()
    _check(base, view, make_red_params(72, DTYPES[dtype], device=device))


def test_tile2d_deterministic(tile2d, device):
    h = torch.randn(333, 65, device=device)
    p = make_red_params(65, device=device)
    g = torch.randn(333, 65, device=device)
    runs = [run_with_grads(red, h.clone().requires_grad_(), lambda t: t, p, g, backend="triton")[1] for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(bits(runs[0][k]), bits(runs[1][k])), k


def test_tile2d_tile():
    assert RP.bwd_tile(4096, True, tile2d=True) == (16, 128, 4)
    assert RP.bwd_tile(4096, True) == (16, 256, 4)
