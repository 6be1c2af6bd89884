"""The split-d forward (and backward latent) for few rows (``ops/lowrank_edit/triton_small_n.py``), forced with
``reft_kernels.kernels(lowrank_fwd="split-d", lowrank_bwd="split-d")``: forward and every gradient
(its saved latents feed the backward) against the float64 reference, over the layouts, index
modes, terms, activations and dtypes it must handle, with several column ranges (S > 1) and
ragged edges. Which kernels a call launches: tests/ops/test_plans.py."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import kernels, lowrank_edit, lowrank_edit_
from reft_kernels._backend import available_backends
from reft_kernels._device import device_limits
from reft_kernels.ops.lowrank_edit import plan as P

from .._helpers import check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, padded_index


@pytest.fixture
def split(device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")
    with kernels(lowrank_fwd="split-d", lowrank_bwd="split-d"):
        yield


def _check(base, view, params, *, inplace=False, act=None, index=None):
    fn = lowrank_edit_ if inplace else lowrank_edit
    return check_against_reference(fn, lowrank_ref_fn, base, view, params, inplace=inplace,
                                   kernel_kwargs=dict(act=act, index=index, backend="triton"),
                                   ref_kwargs=dict(act=act, index=index))


def test_split_path_has_several_column_ranges(split, device):
    """The shapes below really take the split path with S > 1 (the plan the launchers follow)."""
    limits = device_limits(device) if device.type == "cuda" else None
    plan = P.plan(P.Call(9, 300, 5, torch.float32, has_C=True, tied=False, has_c=True), limits)
    assert (plan.fwd, plan.bwd) == ("split-d", "split-d")
    assert plan.fwd_launches[0].grid[1] > 1 and plan.bwd_launches[0].grid[1] > 1


@pytest.mark.parametrize("d,r", [(1, 1), (100, 3), (257, 16), (300, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("terms,tied,act", [("BAaCc", False, None), ("BAa", True, "gelu"), ("Ba", False, None),
                                            ("BAaC", False, "tanh")], ids=["noreft", "loreft-gelu", "lobireft", "C-tanh"])
def test_split_forward_and_grads(split, device, d, r, terms, tied, act):
    base, view = make_base("contiguous", (23,), d, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, r, device=device, terms=terms, tied=tied), act=act)


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("mode", ["out_index", "inplace", "inplace_index"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (5, 7)), ("transposed", (3, 7)), ("strided_cols", (4, 5))])
def test_split_layouts_and_index(split, device, mode, layout, lead, act):
    """Padding (-1) entries included: their latent is masked in the forward and the backward."""
    d, r = 140, 4
    base, view = make_base(layout, lead, d, device=device)
    base.requires_grad_()
    n = lead[0] * lead[1]
    index = padded_index(n, n // 2, 2, device=device) if mode.endswith("index") else None
    _check(base, view, make_lowrank_params(d, r, device=device, tied=True, terms="BAa"),
           inplace=mode.startswith("inplace"), index=index, act=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_low_precision(split, device, dtype):
    base, view = make_base("contiguous", (11,), 200, dtype=dtype, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(200, 8, device=device, tied=True, terms="BAa"))


def test_split_is_deterministic(split, device):
    h = torch.randn(17, 333, device=device)
    p = make_lowrank_params(333, 6, device=device, requires_grad=False)
    a = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    b = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    assert torch.equal(a, b)
