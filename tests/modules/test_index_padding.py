"""Indexed forwards with padding entries: every gradient exact, whatever the order of row 0 and -1.

Padding entries (-1) of an index point at row 0 inside the kernels and the row-put helpers, which is
where a put that autograd differentiates counts row 0's gradient once more per padding entry. Each
module (RED and the six ReFT classes) is run on indexes holding row 0 and -1 in every order, out of
place and in place, and compared, output and every gradient, with the float64 formula of the method
written out below, applied to every row and kept only on the listed ones (``torch.where``: autograd
through it is exact by construction).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import reft_kernels as rk

D, RANK = 8, 3
LEAD = (2, 3)  # six rows
MODULES = [rk.RED, rk.LoReFT, rk.NoReFT, rk.DiReFT, rk.NodiReFT, rk.ConsReFT, rk.LoBiReFT]

# Row 0 and -1 in every order (two padding entries, so a doubled count cannot hide as 1 = 1), with
# and without another row; row 0 alone; padding alone; padding beside rows other than 0.
INDEXES = sorted(set(itertools.permutations((0, -1, -1, 4)))) + [
    (0, -1), (-1, 0), (0,), (-1,), (-1, -1, -1), (5, -1, -1), (-1, 3, -1, 1), (0, 2), ()]


def _formula(m, x):
    """The method's own formula on rows ``x`` (n, d), written out (pyreft's definitions)."""
    if isinstance(m, rk.RED):
        return x * m.scale + m.bias
    if isinstance(m, rk.LoReFT):
        R = m.R
        return x + (x @ m.weight.t() + m.bias - x @ R.t()) @ R
    if isinstance(m, rk.NoReFT):
        W2 = m.proj_weight
        return x + (x @ m.weight.t() + m.bias - (x @ W2.t() + m.proj_bias)) @ W2
    if isinstance(m, rk.DiReFT):
        return x + (x @ m.weight.t() + m.bias) @ m.R
    if isinstance(m, rk.NodiReFT):
        return x + (x @ m.weight.t() + m.bias) @ m.proj_weight
    if isinstance(m, rk.ConsReFT):
        R = m.R
        return x + (m.bias - x @ R.t()) @ R
    assert isinstance(m, rk.LoBiReFT)
    return x + m.bias @ m.R


def _expected(m64, h64, index):
    """float64: the formula on the listed rows of ``h64.reshape(-1, d)``, the other rows as they are."""
    flat = h64.reshape(-1, D)
    listed = torch.zeros(flat.shape[0], dtype=torch.bool)
    for i in index:
        if i >= 0:
            listed[i] = True
    return torch.where(listed[:, None], _formula(m64, flat), flat).reshape(h64.shape)


def _module(cls, backend, dtype):
    torch.manual_seed(3)
    m = cls(D, backend=backend, dtype=dtype) if cls is rk.RED else cls(D, RANK, backend=backend, dtype=dtype)
    with torch.no_grad():  # nothing near the identity (RED starts at it)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m


def _case(cls, backend, index, inplace, layout):
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton kernels take fp32
    m = _module(cls, backend, dtype)
    m64 = copy.deepcopy(m).double()
    base = torch.randn(LEAD[1], LEAD[0], D, dtype=dtype) if layout == "transposed" else torch.randn(*LEAD, D, dtype=dtype)
    h = base.transpose(0, 1) if layout == "transposed" else base
    h.requires_grad_()
    h64 = h.detach().double().requires_grad_()
    idx = torch.tensor(index, dtype=torch.int64)
    g = torch.randn(*LEAD, D, dtype=torch.float64)

    if inplace:
        y = m(h * 1, idx, inplace=True)  # a non-leaf that autograd lets the op write
    else:
        y = m(h, idx)
    y_ref = _expected(m64, h64, index)
    params = dict(m.named_parameters())
    params64 = dict(m64.named_parameters())
    got = torch.autograd.grad(y, [h, *params.values()], g.to(y.dtype), allow_unused=True)
    want = torch.autograd.grad(y_ref, [h64, *params64.values()], g, allow_unused=True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol, msg=lambda s: f"output, index {index}: {s}")
    for name, a, b in zip(["h", *params], got, want):
        if b is None:  # the formula does not use this parameter on these rows
            b = torch.zeros_like(params64[name]) if name != "h" else torch.zeros_like(h64)
        a = torch.zeros_like(b) if a is None else a.double()
        torch.testing.assert_close(a, b, **tol, msg=lambda s, n=name: f"gradient of {n}, index {index}: {s}")


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_padding_entries_add_no_gradient(cls, backend):
    for index in INDEXES:
        _case(cls, backend, index, inplace=False, layout="contiguous")


@pytest.mark.parametrize("cls", MODULES[1:], ids=lambda c: c.__name__)
def test_padding_entries_add_no_gradient_in_place(cls, backend):
    for index in [(0, -1, -1, 4), (-1, -1, 4, 0), (-1, 0), (-1, -1, -1)]:
        _case(cls, backend, index, inplace=True, layout="contiguous")


@pytest.mark.parametrize("cls", [rk.RED, rk.LoReFT], ids=lambda c: c.__name__)
def test_padding_entries_on_a_transposed_h(cls, backend):
    for index in [(0, -1, -1, 4), (-1, 5, 0, -1)]:
        _case(cls, backend, index, inplace=False, layout="transposed")
