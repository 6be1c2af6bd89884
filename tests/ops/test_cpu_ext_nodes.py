"""The autograd nodes of the CPU extension's out-of-place ops (``red.cpp``'s ``RedBackward``,
``const_rows.cpp``'s ``ConstRowsBackward``): plain ``torch::autograd::Node``s built by hand, as
PyTorch's generated ops build theirs, so each must keep what a ``torch::autograd::Function``
gave for free. Checked here: the node is the extension's; a saved tensor changed in place after
the forward makes the backward raise; a second backward without ``retain_graph`` raises, and with
it gives the same gradients; saved-tensor hooks see what the node saves and its gradients use
what they unpack; parameter gradients refuse double backward; no node without a gradient.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")

D, R = 12, 3
NODES = {"red": "reft_kernels::RedBackward", "lobireft": "reft_kernels::ConstRowsBackward"}


def _inputs(op, seed=0, dtype=torch.float32):
    """(h, params) of ``op``: every tensor a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    if op == "red":
        return leaf(2, 5, D), [leaf(D), leaf(D)]
    return leaf(2, 5, D), [leaf(R, D), leaf(R)]  # LoBiReFT: R, b


def _call(op, h, params):
    return rk.red(h, *params) if op == "red" else rk.lobireft(h, *params)


def _reference(op, h, params):
    h, params = h.double(), [p.double() for p in params]
    return h * params[0] + params[1] if op == "red" else h + params[1] @ params[0]


@pytest.mark.parametrize("op", list(NODES))
def test_the_node_is_the_extensions_and_its_gradients_are_right(op):
    h, params = _inputs(op)
    with ext_ops() as names:
        y = _call(op, h, params)
    assert names and names[0].endswith("_fwd"), names
    assert y.grad_fn.name() == NODES[op]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [h, *params], g)
    h64, p64 = h.detach().double().requires_grad_(), [p.detach().double().requires_grad_() for p in params]
    refs = torch.autograd.grad(_reference(op, h64, p64), [h64, *p64], g.double())
    torch.testing.assert_close(y.double(), _reference(op, h64, p64).detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(NODES))
def test_a_saved_tensor_changed_in_place_makes_the_backward_raise(op):
    h, params = _inputs(op, seed=1)
    # the tensor the node saves, as a non-leaf that can be changed in place: h for RED (saved
    # for the scale's gradient), R (B) for LoBiReFT
    if op == "red":
        x = h * 1.0
        y = rk.red(x, *params)
        changed = x
    else:
        R = params[0] * 1.0
        y = rk.lobireft(h, R, params[1])
        changed = R
    with torch.no_grad():
        changed.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("op", list(NODES))
def test_second_backward_needs_retain_graph(op):
    h, params = _inputs(op, seed=2)
    y = _call(op, h, params)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, params, g, retain_graph=True)
    second = torch.autograd.grad(y, params, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, params, g)


@pytest.mark.parametrize("op", list(NODES))
def test_saved_tensor_hooks_see_what_the_node_saves(op):
    h, params = _inputs(op, seed=3)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()  # the node must compute from what unpack hands back

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = _call(op, h, params)
    # RED: h (for the scale's gradient) and the scale; LoBiReFT: its latent row z, b and R
    assert len(packed) == (2 if op == "red" else 3)
    if op == "red":
        assert any(t is h for t in packed) and any(t is params[0] for t in packed)
    else:
        assert any(t is params[0] for t in packed) and any(t is params[1] for t in packed)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [h, *params], g)
    assert len(unpacked) == len(packed)
    h64, p64 = h.detach().double().requires_grad_(), [p.detach().double().requires_grad_() for p in params]
    refs = torch.autograd.grad(_reference(op, h64, p64), [h64, *p64], g.double())
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(NODES))
def test_parameter_gradients_refuse_double_backward(op):
    h, params = _inputs(op, seed=4)
    y = _call(op, h, params)
    (gp,) = torch.autograd.grad(y.pow(2).sum(), params[0], create_graph=True)
    name = "reft_kernels.red" if op == "red" else "reft_kernels.lowrank_edit"
    with pytest.raises(RuntimeError, match=f"{name} does not support double backward"):
        gp.pow(2).sum().backward()


def test_lobireft_gradient_of_h_is_exact_under_create_graph():
    """LoBiReFT adds one row to every row, so dy/dh is the identity: the gradient of h is the
    incoming gradient itself (with its graph), and differentiating it again is right, not refused."""
    h, params = _inputs("lobireft", seed=5)
    w = torch.randn(2, 5, D, requires_grad=True)
    y = rk.lobireft(h, *params)
    (gh,) = torch.autograd.grad((y * w).sum(), h, create_graph=True)
    assert torch.equal(gh, w)
    (gw,) = torch.autograd.grad(gh.pow(2).sum(), w)
    torch.testing.assert_close(gw, 2 * w.detach())


@pytest.mark.parametrize("op", list(NODES))
def test_only_some_inputs_require_grad(op):
    """Edges of inputs that need no gradient are empty, and the node computes only what is needed."""
    h, params = _inputs(op, seed=6)
    h.requires_grad_(False)
    params[1].requires_grad_(False)
    y = _call(op, h, params)
    (gp,) = torch.autograd.grad(y, params[0], torch.ones_like(y))
    p64 = [p.detach().double().requires_grad_() for p in params]
    (want,) = torch.autograd.grad(_reference(op, h.detach(), p64), p64[0], torch.ones_like(y, dtype=torch.float64))
    torch.testing.assert_close(gp.double(), want, rtol=1e-5, atol=1e-5)
    assert y.grad_fn.next_functions[0] == (None, 0)  # h needs no gradient: no edge
