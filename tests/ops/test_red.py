"""Correctness of ``red``: forward and every gradient against the float64 reference, over d,
optional terms, layouts, dtypes, partial requires_grad, gradcheck, determinism and bad input."""
from __future__ import annotations

import pytest
import torch

import reft_kernels
from reft_kernels import red
from reft_kernels.reference import red_reference

from .._helpers import (
    MIXED_DTYPE_CASES,
    DTYPES,
    LAYOUTS,
    bits,
    check_against_reference,
    make_base,
    make_red_params,
    max_abs,
    max_err,
    red_ref_fn,
    run_with_grads,
)


def _check(backend, base, view, params, g=None):
    return check_against_reference(red, red_ref_fn, base, view, params,
                                   kernel_kwargs=dict(backend=backend), g=g)


TERMS = {"scale_bias": "st", "scale_only": "s", "bias_only": "t", "neither": ""}


@pytest.mark.parametrize("d", [1, 7, 64, 100, 257], ids=lambda d: f"d{d}")
def test_red_d_fp32(backend, device, d):
    base, view = make_base("contiguous", (37,), d, device=device)
    base.requires_grad_()
    _check(backend, base, view, make_red_params(d, device=device))


LAYOUT_LEADS = {
    "contiguous": [(29,), (3, 7), (0,)],
    "transposed": [(3, 7), (2, 0)],
    "strided_rows": [(3, 5)],
    "sliced_cols": [(3, 7)],
    "strided_cols": [(4, 5)],
    "col_major": [(21,)],
    "transposed_strided_cols": [(3, 5)],
}
LAYOUT_CASES = [(lay, lead) for lay in LAYOUTS for lead in LAYOUT_LEADS[lay]]


@pytest.mark.parametrize("terms", list(TERMS), ids=list(TERMS))
@pytest.mark.parametrize("layout,lead", LAYOUT_CASES,
                         ids=[f"{lay}-{'x'.join(map(str, lead))}" for lay, lead in LAYOUT_CASES])
def test_red_layouts_and_terms_fp32(backend, device, layout, lead, terms):
    d = 48
    base, view = make_base(layout, lead, d, device=device)
    base.requires_grad_()
    params = make_red_params(d, device=device, terms=TERMS[terms])
    if terms == "neither":
        res = _check(backend, base, view, params)
        assert set(res) == {"out", "h"}
    else:
        _check(backend, base, view, params)


DTYPE_CASES = MIXED_DTYPE_CASES


@pytest.mark.parametrize("terms", ["scale_bias", "scale_only", "bias_only"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (80,)), ("transposed", (4, 9))],
                         ids=["rows80", "transposed"])
@pytest.mark.parametrize("name,h_dtype,p_dtype", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_red_dtypes(backend, device, name, h_dtype, p_dtype, layout, lead, terms):
    d = 100
    base, view = make_base(layout, lead, d, h_dtype, device=device)
    base.requires_grad_()
    params = make_red_params(d, p_dtype, device=device, terms=TERMS[terms])
    _check(backend, base, view, params)


@pytest.mark.parametrize("h_dtype", ["fp32", "bf16"])
def test_red_noncontiguous_params(backend, device, h_dtype):
    d = 40
    base, view = make_base("contiguous", (3, 7), d, DTYPES[h_dtype], device=device)
    base.requires_grad_()
    leaves = {"scale": torch.randn(2 * d, device=device, requires_grad=True),
              "bias": torch.randn(d, 3, device=device, requires_grad=True)}
    check_against_reference(
        lambda h, scale, bias, **kw: red(h, scale[1::2], bias[:, 2], **kw),
        lambda h, scale, bias: red_reference(h, scale[1::2], bias[:, 2]),
        base, view, leaves, kernel_kwargs=dict(backend=backend))


def test_red_float64_torch_backend(device):
    base, view = make_base("strided_cols", (3, 6), 33, torch.float64, device=device)
    base.requires_grad_()
    _check("torch", base, view, make_red_params(33, torch.float64, device=device))


def test_red_mixed_dtype_result_dtypes(backend, device):
    h = torch.randn(6, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(16, device=device, requires_grad=True)
    t = torch.randn(16, device=device, dtype=torch.float16, requires_grad=True)
    y = red(h, s, t, backend=backend)
    assert y.dtype == torch.bfloat16 and y.shape == h.shape
    gh, gs, gt = torch.autograd.grad(y.float().sum(), [h, s, t])
    assert (gh.dtype, gs.dtype, gt.dtype) == (torch.bfloat16, torch.float32, torch.float16)


@pytest.mark.parametrize("which", ["h", "scale", "bias", "scale_bias", "h_bias"])
def test_red_partial_requires_grad(backend, device, which):
    d = 40
    base, view = make_base("transposed", (3, 5), d, device=device)
    base.requires_grad_(which.startswith("h"))
    params = make_red_params(d, device=device, requires_grad=False)
    for k in ("scale", "bias"):
        if k in which:
            params[k].requires_grad_()
    res = _check(backend, base, view, params)
    expected = {"out"} | ({"h"} if which.startswith("h") else set()) | {k for k in ("scale", "bias") if k in which}
    assert set(res) == expected


@pytest.mark.parametrize("g_kind", ["expanded", "transposed"])
def test_red_noncontiguous_upstream_grad(backend, device, g_kind):
    d, lead = 36, (4, 6)
    base, view = make_base("contiguous", lead, d, device=device)
    base.requires_grad_()
    if g_kind == "expanded":
        g = torch.ones((), device=device).expand(*lead, d)
    else:
        g = torch.randn(lead[1], lead[0], d, device=device).transpose(0, 1)
    _check(backend, base, view, make_red_params(d, device=device), g=g)


def test_red_one_dimensional_h(backend, device):
    base = torch.randn(11, device=device, requires_grad=True)
    _check(backend, base, lambda t: t, make_red_params(11, device=device))


def test_red_does_not_alias_input(backend, device):
    """With neither term, the result is a copy: editing it leaves h alone."""
    h = torch.randn(4, 8, device=device)
    y = red(h, backend=backend)
    assert torch.equal(y, h) and y.data_ptr() != h.data_ptr()
    y.add_(1.0)
    assert not torch.equal(y, h)


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("case", ["scale_bias", "scale_only", "bias_only", "transposed"])
def test_red_gradcheck_torch_backend(case):
    d = 5
    h = torch.randn(4, 3, d, dtype=torch.float64, requires_grad=True)
    s = torch.randn(d, dtype=torch.float64, requires_grad=True)
    t = torch.randn(d, dtype=torch.float64, requires_grad=True)
    if case == "scale_only":
        f, inputs = (lambda h, s: red(h, s, None, backend="torch")), (h, s)
    elif case == "bias_only":
        f, inputs = (lambda h, t: red(h, None, t, backend="torch")), (h, t)
    elif case == "transposed":
        f, inputs = (lambda h, s, t: red(h.transpose(0, 1), s, t, backend="torch")), (h, s, t)
    else:
        f, inputs = (lambda h, s, t: red(h, s, t, backend="torch")), (h, s, t)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_red_kernel_backward_deterministic(device, kernels):
    if kernels not in reft_kernels._backend.available_backends(device):
        pytest.skip(f"{kernels} backend unavailable")
    d, n = 64, 80  # 80 rows: the column sums are split over more than one program
    h0 = torch.randn(n, d, device=device)
    p = make_red_params(d, device=device)
    g = torch.randn(n, d, device=device)
    res = []
    for _ in range(2):
        base = h0.clone().requires_grad_()
        res.append(run_with_grads(red, base, lambda t: t, p, g, backend=kernels))
    (y1, g1), (y2, g2) = res
    assert torch.equal(bits(y1), bits(y2))
    for k in g1:
        assert torch.equal(bits(g1[k]), bits(g2[k])), k
    base = h0.clone().requires_grad_()
    _check(kernels, base, lambda t: t, p, g=g)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("shape", [(7,), (9,), (1, 8), (8, 1), ()], ids=["short", "long", "1x8", "8x1", "scalar"])
def test_red_wrong_param_shape(backend, device, name, shape):
    h = torch.randn(3, 8, device=device)
    p = make_red_params(8, device=device, requires_grad=False)
    p[name] = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=rf"^{name} must"):
        red(h, **p, backend=backend)


@pytest.mark.parametrize(
    "case,exc",
    [
        ("h_list", TypeError),
        ("h_numpy", TypeError),
        ("h_int", TypeError),
        ("h_complex", TypeError),
        ("h_scalar", ValueError),
        ("h_d0", ValueError),
        ("scale_int", TypeError),
        ("bias_list", TypeError),
        ("backend_nope", ValueError),
    ],
)
def test_red_bad_input(backend, device, case, exc):
    h = torch.randn(3, 8, device=device)
    p = make_red_params(8, device=device, requires_grad=False)
    kw = dict(backend=backend)
    if case == "h_list":
        h = h.tolist()
    elif case == "h_numpy":
        h = h.cpu().numpy()
    elif case == "h_int":
        h = torch.ones(3, 8, dtype=torch.int32, device=device)
    elif case == "h_complex":
        h = torch.randn(3, 8, dtype=torch.complex64, device=device)
    elif case == "h_scalar":
        h, p = torch.tensor(1.0, device=device), {}
    elif case == "h_d0":
        h, p = torch.randn(3, 0, device=device), {}
    elif case == "scale_int":
        p["scale"] = torch.ones(8, dtype=torch.int64, device=device)
    elif case == "bias_list":
        p["bias"] = [0.0] * 8
    elif case == "backend_nope":
        kw["backend"] = "nope"
    with pytest.raises(exc):
        red(h, **p, **kw)


def test_red_d_mismatch(backend, device):
    h = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match="scale"):
        red(h, torch.randn(8, device=device), backend=backend)
    with pytest.raises(ValueError, match="bias"):
        red(h, None, torch.randn(8, device=device), backend=backend)


def test_red_float64_with_triton_raises(device):
    if "triton" not in reft_kernels.available_backends(device):
        pytest.skip("the triton backend cannot run here")
    h = torch.randn(3, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        red(h, torch.randn(8, dtype=torch.float64, device=device), backend="triton")


def test_red_default_backend_float64_works(device, monkeypatch):
    """float64 with the default dispatch takes the PyTorch path on every device (on a GPU the
    default would otherwise be Triton, which takes no float64)."""
    monkeypatch.delenv("REFT_KERNELS_BACKEND", raising=False)
    h = torch.randn(5, 8, dtype=torch.float64, device=device)
    s, t = torch.randn(8, dtype=torch.float64, device=device), torch.randn(8, dtype=torch.float64, device=device)
    ref = red_reference(h, s, t)
    assert max_err(red(h, s, t), ref) <= 1e-12 * max_abs(ref)
    B = torch.randn(3, 8, dtype=torch.float64, device=device)
    from reft_kernels import lowrank_edit
    from reft_kernels.reference import lowrank_edit_reference
    ref = lowrank_edit_reference(h, B, B)
    assert max_err(lowrank_edit(h, B, B), ref) <= 1e-12 * max_abs(ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put params on another device")
def test_red_params_on_other_device():
    h = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="scale"):
        red(h, torch.randn(8))
