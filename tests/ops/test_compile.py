"""``torch.compile(fullgraph=True)`` traces the PyTorch path with an ``index`` (out of place, in
place, and the RED module's index), forward and backward, with no graph break and results equal
to eager. (Before: ``PendingUnbackedSymbolNotFound``, from the boolean masking of padding
entries, which gives data-dependent shapes; the index check's host sync is a device-side assert
inside a compiled graph.)"""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk

D, R = 16, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params():
    g = torch.Generator().manual_seed(0)
    Rm = rk.orthonormal_rows(torch.randn(R, D, generator=g)).requires_grad_()
    W = (torch.randn(R, D, generator=g) / 4).requires_grad_()
    b = torch.randn(R, generator=g).requires_grad_()
    return Rm, W, b


def _grads(fn, h0, leaves):
    h = h0.clone().requires_grad_()
    y = fn(h)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, D)).sum(), [h, *leaves])
    return y.detach(), grads


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_index_out_of_place_and_in_place(compiler):
    Rm, W, b = _params()
    index = torch.tensor([7, -1, 0, 3, 9])
    red = rk.RED(D)

    def f(h):
        y = rk.loreft(h, Rm, W, b, index=index, backend="torch")
        y = red(y, index)
        return rk.loreft_(y * 1.0, Rm, W, b, index=index, act="gelu", backend="torch")

    h0 = torch.randn(2, 5, D)
    leaves = [Rm, W, b, red.scale, red.bias]
    y_ref, g_ref = _grads(f, h0, leaves)
    y, g = _grads(torch.compile(f, fullgraph=True, backend=compiler), h0, leaves)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(g, g_ref):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_fullgraph_in_place_without_grad():
    """No input requires grad: the edit runs without an autograd node (Dynamo traces
    ``ctx.mark_dirty`` only on the autograd path)."""
    Rm, W, b = (t.detach() for t in _params())
    index = torch.tensor([1, -1, 6])

    def f(h):
        return rk.loreft_(h, Rm, W, b, index=index, backend="torch")

    h0 = torch.randn(8, D)
    ref = f(h0.clone())
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h0.clone())
    torch.testing.assert_close(out, ref)


def test_compiled_index_check_still_fires():
    """Inside a compiled graph a bad index is an error at run time (a device-side assertion)."""
    B = torch.randn(R, D)

    def f(h, index):
        return rk.lowrank_edit(h, B, index=index, backend="torch")

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    g(torch.randn(6, D), torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="index"):
        g(torch.randn(6, D), torch.tensor([0, 0]))
