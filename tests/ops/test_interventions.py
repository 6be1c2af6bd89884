"""pyreft's six interventions: each named wrapper against its own, independently written eager
formula (reft_kernels.reference.*_reference), forward and every gradient, every backend."""
import pytest
import torch

import reft_kernels as rk
from reft_kernels import reference as ref

D, R = 100, 5
SHAPE = (2, 9)
INDEX = [0, 4, -1, 9, 17]

# name -> (op, in-place op, reference, parameter shapes after h, takes act)
METHODS = {
    "loreft": (rk.loreft, rk.loreft_, ref.loreft_reference, [(R, D), (R, D), (R,)], True),
    "noreft": (rk.noreft, rk.noreft_, ref.noreft_reference, [(R, D), (R, D), (R,), (R,)], True),
    "noreft_no_b2": (rk.noreft, rk.noreft_, ref.noreft_reference, [(R, D), (R, D), (R,)], True),
    "direft": (rk.direft, rk.direft_, ref.direft_reference, [(R, D), (R, D), (R,)], True),
    "nodireft": (rk.nodireft, rk.nodireft_, ref.nodireft_reference, [(R, D), (R, D), (R,)], True),
    "consreft": (rk.consreft, rk.consreft_, ref.consreft_reference, [(R, D), (R,)], False),
    "lobireft": (rk.lobireft, rk.lobireft_, ref.lobireft_reference, [(R, D), (R,)], False),
}


def _inputs(shapes, device):
    h = torch.randn(*SHAPE, D, device=device)
    params = [torch.randn(s, device=device) / (D ** 0.5 if len(s) == 2 else 1) for s in shapes]
    return h, params


def _rel(x, y):
    return ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()


def _reference_rows(reference, h, params, act, index):
    """Reference applied to the listed rows only (independent of lowrank_edit_reference)."""
    kw = {"act": act} if act is not None else {}
    if index is None:
        return reference(h, *params, **kw)
    flat = h.reshape(-1, D)
    rows = index[index >= 0]
    return flat.index_put((rows,), reference(flat[rows], *params, **kw)).reshape(h.shape)


@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_matches_pyreft_formula(name, with_index, backend, device):
    op, _, reference, shapes, takes_act = METHODS[name]
    act = "silu" if takes_act and with_index else None
    h, params = _inputs(shapes, device)
    index = torch.tensor(INDEX, device=device) if with_index else None
    xs = [t.clone().requires_grad_() for t in [h, *params]]
    kw = {"act": act} if act is not None else {}
    y = op(*xs, index=index, backend=backend, **kw)
    x64 = [t.double().requires_grad_() for t in [h, *params]]
    y64 = _reference_rows(reference, x64[0], x64[1:], act, index)
    assert y.dtype == torch.float32 and y.shape == h.shape
    assert _rel(y, y64) < 1e-5
    g = torch.randn_like(y64)
    grads = torch.autograd.grad(y, xs, g.float())
    grads64 = torch.autograd.grad(y64, x64, g)
    for i, (a, b) in enumerate(zip(grads, grads64)):
        assert _rel(a, b) < 1e-5, f"gradient of input {i}"


@pytest.mark.parametrize("name", list(METHODS))
def test_inplace_twin_equals_out_of_place(name, backend, device):
    op, op_, _, shapes, _ = METHODS[name]
    h, params = _inputs(shapes, device)
    index = torch.tensor(INDEX, device=device)
    y = op(h, *params, index=index, backend=backend)
    h2 = h.clone()
    out = op_(h2, *params, index=index, backend=backend)
    assert out is h2
    assert torch.equal(h2, y)
    assert not torch.equal(h2, h)


def test_loreft_tied_gradient_sums_both_terms(backend, device):
    """loreft passes R as both B and C; its R gradient holds both terms."""
    h, (rot, W, b) = _inputs([(R, D), (R, D), (R,)], device)
    Rt = rot.clone().requires_grad_()
    rk.loreft(h, Rt, W, b, backend=backend).sum().backward()
    RB, RC = rot.clone().requires_grad_(), rot.clone().requires_grad_()
    rk.lowrank_edit(h, RB, W, b, RC, backend=backend).sum().backward()
    torch.testing.assert_close(Rt.grad, RB.grad + RC.grad, rtol=1e-5, atol=1e-6)
