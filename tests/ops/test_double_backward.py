"""Double backward is refused with a clear error on every backend, while first-order gradients
computed with ``create_graph=True`` stay correct. (Before: ``lowrank_edit`` silently dropped the
second-order terms, with relative errors of 1.0-1.5 on a gradient penalty, and ``red`` on the
PyTorch path failed with an internal ``out=`` message.)"""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk

from .._helpers import lowrank_ref_fn, make_lowrank_params, max_abs, max_err, red_ref_fn

D, R = 12, 3


def _lowrank(h, p, index, inplace, backend):
    if inplace:
        return rk.lowrank_edit_(h * 1.0, p["B"], p["A"], p["a"], p["C"], p["c"], act="gelu", index=index,
                                backend=backend)
    return rk.lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], act="gelu", index=index, backend=backend)


@pytest.mark.parametrize("mode", ["out", "index", "inplace_index"])
def test_lowrank_edit_double_backward_refused(backend, device, mode):
    h = torch.randn(5, D, device=device, requires_grad=True)
    p = make_lowrank_params(D, R, tied=True, device=device)
    index = torch.tensor([1, -1, 4], device=device) if mode != "out" else None
    y = _lowrank(h, p, index, mode == "inplace_index", backend)
    (gh,) = torch.autograd.grad(y.pow(2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="reft_kernels.lowrank_edit does not support double backward"):
        gh.pow(2).sum().backward()


@pytest.mark.parametrize("wrt", ["h", "scale"])
def test_red_double_backward_refused(backend, device, wrt):
    h = torch.randn(5, D, device=device, requires_grad=True)
    s = torch.randn(D, device=device, requires_grad=True)
    t = torch.randn(D, device=device, requires_grad=True)
    y = rk.red(h, s, t, backend=backend)
    (g1,) = torch.autograd.grad(y.pow(2).sum(), h if wrt == "h" else s, create_graph=True)
    with pytest.raises(RuntimeError, match="reft_kernels.red does not support double backward"):
        g1.pow(2).sum().backward()


@pytest.mark.parametrize("mode", ["out", "index", "inplace_index"])
def test_create_graph_first_order_gradients_still_right(backend, device, mode):
    """A gradient taken with create_graph=True (and not differentiated again) equals the float64
    reference's, every input included."""
    h = torch.randn(5, D, device=device, requires_grad=True)
    p = make_lowrank_params(D, R, tied=True, device=device)
    index = torch.tensor([1, -1, 4], device=device) if mode != "out" else None
    leaves = [h, p["B"], p["A"], p["a"], p["c"]]
    y = _lowrank(h, p, index, mode == "inplace_index", backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g, create_graph=True)
    h64, B64, A64, a64, c64 = (t.detach().double().requires_grad_() for t in leaves)
    y64 = lowrank_ref_fn(h64, B64, A64, a64, B64, c64, act="gelu", index=index)
    refs = torch.autograd.grad(y64, [h64, B64, A64, a64, c64], g.double())
    for name, a, b in zip("hBAac", grads, refs):
        assert max_err(a, b) <= 1e-5 * max(1.0, max_abs(b)), name
    s = torch.randn(D, device=device, requires_grad=True)
    y = rk.red(h, s, None, backend=backend)
    gs = torch.autograd.grad(y, [h, s], g, create_graph=True)
    s64 = s.detach().double().requires_grad_()
    h64 = h.detach().double().requires_grad_()
    refs = torch.autograd.grad(red_ref_fn(h64, s64), [h64, s64], g.double())
    for a, b in zip(gs, refs):
        assert max_err(a, b) <= 1e-5 * max(1.0, max_abs(b))


def test_double_backward_error_through_autograd_grad(backend, device):
    """``torch.autograd.grad(..., inputs=...)`` (not only ``.backward()``) reaches the error."""
    leaf = torch.randn(4, D, device=device, requires_grad=True)
    s = torch.randn(D, device=device)
    p = make_lowrank_params(D, R, device=device)
    for y in (rk.red(leaf, s, backend=backend), _lowrank(leaf, p, None, False, backend)):
        (g1,) = torch.autograd.grad(y.square().sum(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(g1.sum(), leaf)
