"""Correctness of ``lowrank_edit`` / ``lowrank_edit_``: forward and every gradient against the
float64 reference, shapes and layouts, dtypes, tying, optional terms, activations, index
semantics, in-place behaviour, gradcheck, determinism and input validation."""
from __future__ import annotations

import pytest
import torch

import reft_kernels
from reft_kernels import ACTIVATION_NAMES, lowrank_edit, lowrank_edit_
from reft_kernels.ops.lowrank_edit.plan import triton_max_rank
from reft_kernels.reference import lowrank_edit_reference

from .._helpers import (
    MIXED_DTYPE_CASES,
    DTYPES,
    bits,
    check_against_reference,
    copy_params,
    lowrank_ref_fn,
    make_base,
    make_lowrank_params,
    max_abs,
    max_err,
    padded_index,
    run_with_grads,
)


def _check(backend, base, view, params, *, inplace=False, act=None, index=None, rtol=None):
    fn = lowrank_edit_ if inplace else lowrank_edit
    return check_against_reference(
        fn, lowrank_ref_fn, base, view, params, inplace=inplace,
        kernel_kwargs=dict(act=act, index=index, backend=backend),
        ref_kwargs=dict(act=act, index=index), rtol=rtol,
    )


# ----------------------------------------------------------------------------- d x r, fp32

@pytest.mark.parametrize("r", [1, 3, 4, 16, 33], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("d", [1, 7, 64, 100, 257], ids=lambda d: f"d{d}")
def test_generic_d_by_r_fp32(backend, device, d, r):
    base, view = make_base("contiguous", (37,), d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device)
    _check(backend, base, view, params)


# ----------------------------------------------------------------------------- layouts x index

LAYOUT_CASES = [
    ("rows", "contiguous", (29,)),
    ("batch_seq", "contiguous", (3, 7)),
    ("transposed", "transposed", (3, 7)),
    ("strided_rows", "strided_rows", (3, 5)),
    ("sliced_cols", "sliced_cols", (3, 7)),
    ("strided_cols", "strided_cols", (4, 5)),
    ("col_major", "col_major", (21,)),
    ("transposed_strided_cols", "transposed_strided_cols", (3, 5)),
    ("zero_rows", "contiguous", (0,)),
    ("zero_rows_bs", "transposed", (2, 0)),
]
MODES = ["out", "out_index", "inplace", "inplace_index"]


def _mode_args(mode, lead, device):
    n = 1
    for s in lead:
        n *= s
    inplace = mode.startswith("inplace")
    if mode.endswith("index"):
        index = padded_index(n, n // 2, 2, device=device)
    else:
        index = None
    return inplace, index


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,layout,lead", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
@pytest.mark.parametrize("d,r", [(64, 4), (100, 16)], ids=["d64r4", "d100r16"])
def test_layouts_fp32(backend, device, d, r, name, layout, lead, mode):
    base, view = make_base(layout, lead, d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device, tied=(name == "transposed"))
    inplace, index = _mode_args(mode, lead, device)
    _check(backend, base, view, params, inplace=inplace, index=index, act="silu" if r == 16 else None)


# ----------------------------------------------------------------------------- dtypes

DTYPE_CASES = MIXED_DTYPE_CASES + [
    # (id, h dtype, param dtype)
    ("fp32_h_fp64_params", torch.float32, torch.float64),
    ("fp16_h_mixed_params", torch.float16, "mixed"),
]
MIXED_PARAM_DTYPES = {"B": torch.bfloat16, "A": torch.float32, "a": torch.float16,
                      "C": torch.float64, "c": torch.float32}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("name,h_dtype,p_dtype", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_dtypes(backend, device, name, h_dtype, p_dtype, layout, mode):
    """Forward and every gradient in low precision (judged against the same eager computation in
    that precision) and with parameters in other dtypes than h (gradients in their own dtype).
    The transposed cases also tie C to B."""
    d, r, lead = 100, 16, (4, 9)
    base, view = make_base(layout, lead, d, h_dtype, device=device)
    base.requires_grad_()
    tied = layout == "transposed"
    if p_dtype == "mixed":
        params = make_lowrank_params(d, r, device=device, requires_grad=False)
        params = {k: v.to(MIXED_PARAM_DTYPES[k]).requires_grad_() for k, v in params.items()}
        if tied:
            params["C"] = params["B"]
    else:
        params = make_lowrank_params(d, r, p_dtype, device=device, tied=tied)
    inplace, index = _mode_args(mode, lead, device)
    _check(backend, base, view, params, inplace=inplace, index=index, act="gelu")


# Triton's interpreter evaluates tanh as 2 sigmoid(2x) - 1 with numpy: exp overflows to inf for
# large |x| (the result is still exact), which numpy reports as a RuntimeWarning.
EXP_OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@EXP_OVERFLOW_OK
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_lowp_activation_grads_many_rows(backend, device, dtype, act):
    """fp16/bf16 with an activation, 512 rows, small d and r, so the error of the activation's
    derivative dominates the gradients; five fixed seeds. The max error of every gradient must
    stay within 2x that of eager PyTorch in the same precision (plus one ulp of slack)."""
    d, r = 8, 2
    for seed in range(5):
        torch.manual_seed(seed)
        base, view = make_base("contiguous", (512,), d, DTYPES[dtype], device=device)
        base.requires_grad_()
        params = make_lowrank_params(d, r, DTYPES[dtype], terms="BAa", device=device)
        with torch.no_grad():
            params["A"].mul_(2.0)
        _check(backend, base, view, params, act=act)


@pytest.mark.parametrize("mode", ["out", "inplace_index"])
def test_noncontiguous_params(backend, device, mode):
    """Parameters given as strided views (B as the transpose of a (d, r) tensor, a as a slice)."""
    d, r, lead = 40, 6, (3, 7)
    base, view = make_base("contiguous", lead, d, device=device)
    base.requires_grad_()
    src = make_lowrank_params(d, r, device=device, requires_grad=False)
    leaves = {
        "B": src["B"].t().contiguous().requires_grad_(),      # (d, r) leaf, passed as .t()
        "A": src["A"].repeat(1, 2).requires_grad_(),           # (r, 2d) leaf, passed as [:, ::2]
        "a": torch.stack([src["a"], src["a"]], 1).requires_grad_(),  # (r, 2), passed as [:, 1]
        "C": src["C"].t().contiguous().requires_grad_(),
        "c": src["c"].clone().requires_grad_(),
    }
    inplace, index = _mode_args(mode, lead, device)
    fn = lowrank_edit_ if inplace else lowrank_edit

    def op(h, B, A, a, C, c, **kw):
        return fn(h, B.t(), A[:, ::2], a[:, 1], C.t(), c, **kw)

    def ref(h, B, A, a, C, c, **kw):
        return lowrank_ref_fn(h, B.t(), A[:, ::2], a[:, 1], C.t(), c, **kw)

    check_against_reference(op, ref, base, view, leaves, inplace=inplace,
                            kernel_kwargs=dict(act="silu", index=index, backend=backend),
                            ref_kwargs=dict(act="silu", index=index))


def test_chained_inplace_edits(backend, device):
    """Two in-place edits of overlapping row sets, then a use of h: the second edit's backward
    must see the rows as the first edit left them (each saves its own copy of its rows)."""
    d, r, n = 24, 4, 18
    leaf = torch.randn(n, d, device=device, requires_grad=True)
    p1 = make_lowrank_params(d, r, device=device)
    p2 = make_lowrank_params(d, r, device=device, tied=True)
    i1 = torch.tensor([0, 3, 5, -1, 9, 12], device=device)
    i2 = torch.tensor([12, 5, 1, 17], device=device)
    w = torch.randn(n, d, device=device)

    h = leaf * 1.0
    lowrank_edit_(h, **p1, act="tanh", index=i1, backend=backend)
    lowrank_edit_(h, **p2, act="relu", index=i2, backend=backend)
    loss = (h * w).sum()
    ins = [leaf, *(v for v in p1.values()), p2["B"], p2["A"], p2["a"], p2["c"]]
    gk = torch.autograd.grad(loss, ins)

    leaf64 = leaf.detach().double().requires_grad_()
    q1, q2 = copy_params(p1, torch.float64), copy_params(p2, torch.float64)
    y = lowrank_edit_reference(leaf64, **q1, act="tanh", index=i1)
    y = lowrank_edit_reference(y, **q2, act="relu", index=i2)
    loss64 = (y * w.double()).sum()
    gr = torch.autograd.grad(loss64, [leaf64, *(v for v in q1.values()), q2["B"], q2["A"], q2["a"], q2["c"]])
    assert max_err(h, y) <= 1e-5 * max_abs(y)
    for i, (a, b) in enumerate(zip(gk, gr)):
        assert max_err(a, b) <= 1e-5 * max_abs(b) + 1e-6, i


@pytest.mark.parametrize("mode", ["out", "inplace_index"])
def test_float64_torch_backend(device, mode):
    d, r, lead = 33, 5, (3, 6)
    base, view = make_base("transposed", lead, d, torch.float64, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, torch.float64, device=device)
    inplace, index = _mode_args(mode, lead, device)
    _check("torch", base, view, params, inplace=inplace, index=index, act="tanh")


def test_mixed_dtype_result_dtypes(backend, device):
    """bf16 h with fp32 parameters: output bf16, h's gradient bf16, every parameter's fp32."""
    h = torch.randn(5, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    p = make_lowrank_params(16, 3, torch.float32, device=device)
    y = lowrank_edit(h, **p, backend=backend)
    assert y.dtype == torch.bfloat16
    gs = torch.autograd.grad(y.float().sum(), [h, p["B"], p["A"], p["a"], p["C"], p["c"]])
    assert gs[0].dtype == torch.bfloat16
    assert all(gr.dtype == torch.float32 for gr in gs[1:])


# ----------------------------------------------------------------------------- partial grads, odd g

@pytest.mark.parametrize("mode", ["out", "inplace_index"])
@pytest.mark.parametrize("which", ["h", "B", "A_a", "C_c", "params", "tied_B"])
def test_partial_requires_grad(backend, device, which, mode):
    """Only some inputs require grad: the others get no gradient, the rest match the reference."""
    d, r, lead = 20, 3, (3, 5)
    base, view = make_base("contiguous", lead, d, device=device)
    params = make_lowrank_params(d, r, device=device, requires_grad=False, tied=(which == "tied_B"))
    want = {"h": "h", "B": "B", "A_a": "Aa", "C_c": "Cc", "params": "BAaCc", "tied_B": "B"}[which]
    base.requires_grad_("h" in want)
    for k in "BAaCc":
        if k in want:
            params[k].requires_grad_()
    inplace, index = _mode_args(mode, lead, device)
    res = _check(backend, base, view, params, inplace=inplace, index=index, act="gelu")
    expected = {"out"} | ({"h"} if "h" in want else set()) | {k for k in "BAaCc" if params[k].requires_grad}
    assert set(res) == expected


@pytest.mark.parametrize("mode", ["out", "inplace_index"])
@pytest.mark.parametrize("g_kind", ["expanded", "transposed"])
def test_noncontiguous_upstream_grad(backend, device, g_kind, mode):
    """Upstream gradients with stride 0 (``y.sum()``) or transposed strides."""
    d, r, lead = 36, 5, (4, 6)
    base, view = make_base("contiguous", lead, d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device)
    if g_kind == "expanded":
        g = torch.ones((), device=device).expand(*lead, d)
    else:
        g = torch.randn(lead[1], lead[0], d, device=device).transpose(0, 1)
    inplace, index = _mode_args(mode, lead, device)
    _check_g(backend, base, view, params, g, inplace=inplace, index=index)


def _check_g(backend, base, view, params, g, *, inplace=False, index=None, act=None):
    fn = lowrank_edit_ if inplace else lowrank_edit
    return check_against_reference(
        fn, lowrank_ref_fn, base, view, params, inplace=inplace, g=g,
        kernel_kwargs=dict(act=act, index=index, backend=backend), ref_kwargs=dict(act=act, index=index),
    )


# ----------------------------------------------------------------------------- tied C is B

@pytest.mark.parametrize("act", [None, "tanh"], ids=["identity", "tanh"])
@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
def test_tied_matches_untied(backend, device, act, with_index):
    d, r, n = 48, 6, 21
    h0 = torch.randn(n, d, device=device)
    index = padded_index(n, 12, 3, device=device) if with_index else None
    p = make_lowrank_params(d, r, device=device, tied=True)
    assert p["C"] is p["B"]
    pu = copy_params(p)
    pu["C"] = p["B"].detach().clone().requires_grad_()  # equal values, distinct tensor
    assert pu["C"] is not pu["B"]
    g = torch.randn(n, d, device=device)

    h_t = h0.clone().requires_grad_()
    y_t, gr_t = run_with_grads(lowrank_edit, h_t, lambda t: t, p, g, act=act, index=index, backend=backend)
    h_u = h0.clone().requires_grad_()
    y_u, gr_u = run_with_grads(lowrank_edit, h_u, lambda t: t, pu, g, act=act, index=index, backend=backend)

    torch.testing.assert_close(y_t, y_u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gr_t["h"], gr_u["h"], rtol=1e-6, atol=1e-6)
    for k in ("A", "a", "c"):
        torch.testing.assert_close(gr_t[k], gr_u[k], rtol=1e-6, atol=1e-6)
    summed = gr_u["B"].double() + gr_u["C"].double()
    assert max_err(gr_t["B"], summed) <= 1e-5 * max_abs(summed) + 1e-7
    # the tied gradient really carries the C term: it differs from the untied B gradient alone
    assert max_err(gr_t["B"], gr_u["B"]) > 1e-3 * max_abs(gr_u["B"])
    # and both agree with the float64 reference
    base = h0.clone().requires_grad_()
    _check(backend, base, lambda t: t, p, act=act, index=index)


# ----------------------------------------------------------------------------- optional terms

TERM_CASES = [
    ("no_A", "BaCc"),
    ("no_a", "BACc"),
    ("no_C", "BAac"),
    ("no_c", "BAaC"),
    ("only_B", "B"),
    ("only_B_a", "Ba"),
    ("only_B_c", "Bc"),
    ("B_a_c", "Bac"),  # with "B", "Ba", "Bc": the latent is one row for every row (torch_constant.py)
    ("B_A_only", "BA"),
    ("B_C_only", "BC"),
]


@pytest.mark.parametrize("name,terms", TERM_CASES, ids=[c[0] for c in TERM_CASES])
def test_optional_terms(backend, device, name, terms):
    d, r = 40, 5
    base, view = make_base("contiguous", (3, 8), d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device, terms=terms)
    _check(backend, base, view, params)
    base2, view2 = make_base("transposed", (3, 8), d, device=device)
    base2.requires_grad_()
    _check(backend, base2, view2, params, inplace=True, index=padded_index(24, 10, 2, device=device),
           act="sigmoid")


@EXP_OVERFLOW_OK
@pytest.mark.parametrize("terms", ["BAaCc", "BAa"], ids=["all_terms", "no_C"])
@pytest.mark.parametrize("act", ACTIVATION_NAMES)
def test_activations(backend, device, act, terms):
    d, r = 24, 7
    base, view = make_base("contiguous", (2, 11), d, device=device)
    base.requires_grad_()
    # scale up A so the pre-activation spans the nonlinear range of every activation
    params = make_lowrank_params(d, r, device=device, terms=terms)
    with torch.no_grad():
        params["A"].mul_(2.0)
    _check(backend, base, view, params, act=act)


@EXP_OVERFLOW_OK
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"])
def test_activations_saturated(backend, device, act):
    """Pre-activations up to |u| ~ 100: every activation and its derivative stay finite and
    match the reference in their saturated ranges."""
    d, r = 16, 4
    base, view = make_base("contiguous", (20,), d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device, terms="BAa")
    with torch.no_grad():
        params["A"].mul_(40.0)
    _check(backend, base, view, params, act=act)


# ----------------------------------------------------------------------------- index semantics

@pytest.mark.parametrize("layout,lead", [("contiguous", (23,)), ("transposed", (3, 7)),
                                         ("strided_rows", (2, 6))], ids=["rows", "transposed", "strided_rows"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_index_out_of_place_equals_clone_then_inplace(backend, device, layout, lead, dtype):
    d, r = 40, 4
    base, view = make_base(layout, lead, d, DTYPES[dtype], device=device)
    h = view(base)
    n = h.numel() // d
    index = padded_index(n, n // 2, 3, device=device)
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    y = lowrank_edit(h, **p, act="relu", index=index, backend=backend)
    h2 = h.clone()
    out = lowrank_edit_(h2, **p, act="relu", index=index, backend=backend)
    assert out is h2
    assert torch.equal(y, h2)
    assert torch.equal(h, view(base)) and y.data_ptr() != h.data_ptr()
    # rows not listed are bitwise unchanged, listed rows changed
    listed = index[index >= 0]
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[listed] = True
    y2, h2d = y.reshape(-1, d), h.reshape(-1, d)
    assert torch.equal(bits(y2[~mask]), bits(h2d[~mask]))
    assert (y2[mask] != h2d[mask]).any(dim=1).all()


def test_index_rows_unlisted_untouched_even_nan(backend, device):
    """The in-place forward reads and writes only the listed rows: NaN/inf in other rows neither
    leak into the edited rows nor change bits."""
    d, r, n = 32, 4, 20
    h = torch.randn(n, d, device=device)
    index = torch.tensor([3, -1, 0, 17, 9, -1], device=device)
    unlisted = torch.ones(n, dtype=torch.bool, device=device)
    unlisted[index[index >= 0]] = False
    h[unlisted] = float("nan")
    h[unlisted.nonzero()[0, 0], :5] = float("inf")
    before = h.clone()
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    ref = lowrank_edit_reference(before.double(), **copy_params(p, torch.float64, False), index=index)
    ptr = h.data_ptr()
    out = lowrank_edit_(h, **p, index=index, backend=backend)
    assert out is h and h.data_ptr() == ptr
    assert torch.equal(bits(h[unlisted]), bits(before[unlisted]))
    assert torch.isfinite(h[~unlisted]).all()
    assert max_err(h[~unlisted], ref[~unlisted]) <= 1e-5 * max_abs(ref[~unlisted])


def test_index_all_padding_and_empty_are_noops(backend, device):
    d = 16
    h = torch.randn(3, 5, d, device=device)
    p = make_lowrank_params(d, 3, device=device)
    for index in (torch.full((4,), -1, dtype=torch.long, device=device),
                  torch.empty(0, dtype=torch.long, device=device)):
        hh = h.clone()
        out = lowrank_edit_(hh, **p, index=index, backend=backend)
        assert out is hh and torch.equal(bits(hh), bits(h))
        y = lowrank_edit(h, **p, index=index, backend=backend)
        assert torch.equal(bits(y), bits(h))
        # gradients: h gets the upstream gradient unchanged, parameters get zeros
        x = h.clone().requires_grad_()
        g = torch.randn_like(h)
        y = lowrank_edit(x, **p, index=index, backend=backend)
        gs = torch.autograd.grad(y, [x, p["B"], p["A"], p["a"], p["C"], p["c"]], g)
        assert torch.equal(gs[0], g)
        for gr in gs[1:]:
            assert torch.count_nonzero(gr) == 0


def test_index_int32_accepted(backend, device):
    d, r, n = 20, 3, 15
    h = torch.randn(n, d, device=device)
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    idx64 = padded_index(n, 7, 2, device=device)
    y32 = lowrank_edit(h, **p, index=idx64.to(torch.int32), backend=backend)
    ref = lowrank_edit_reference(h.double(), **copy_params(p, torch.float64, False), index=idx64)
    assert max_err(y32, ref) <= 1e-5 * max_abs(ref)
    h2 = h.clone()
    lowrank_edit_(h2, **p, index=idx64.to(torch.int32), backend=backend)
    assert torch.equal(h2, y32)


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
@pytest.mark.parametrize(
    "bad,exc",
    [
        ([1, 4, 1], ValueError),            # duplicate
        ([0, 2, 2, -1], ValueError),        # duplicate next to padding
        ([0, -2], ValueError),              # < -1
        ([0, 12], ValueError),              # == N
        ([100], ValueError),                # > N
        ("float", TypeError),
        ("bool", TypeError),
        ("2d", ValueError),
        ("list", TypeError),
    ],
    ids=["dup", "dup_with_pad", "below_-1", "eq_N", "above_N", "float", "bool", "2d", "list"],
)
def test_index_invalid(backend, device, bad, exc, inplace):
    d, n = 8, 12
    h = torch.randn(3, 4, d, device=device)
    B = torch.randn(2, d, device=device)
    if bad == "float":
        index = torch.tensor([0.0, 1.0], device=device)
    elif bad == "bool":
        index = torch.zeros(n, dtype=torch.bool, device=device)
    elif bad == "2d":
        index = torch.tensor([[0, 1], [2, 3]], device=device)
    elif bad == "list":
        index = [0, 1]
    else:
        index = torch.tensor(bad, device=device)
    before = h.clone()
    fn = lowrank_edit_ if inplace else lowrank_edit
    with pytest.raises(exc, match="index"):
        fn(h, B, index=index, backend=backend)
    assert torch.equal(h, before)


def test_index_duplicate_message_names_row(backend, device):
    h = torch.randn(10, 4, device=device)
    B = torch.randn(1, 4, device=device)
    with pytest.raises(ValueError, match="row 7"):
        lowrank_edit(h, B, index=torch.tensor([7, 2, 7], device=device), backend=backend)


# ----------------------------------------------------------------------------- in place

def test_inplace_edits_h_itself(backend, device):
    d, r = 30, 4
    x = torch.randn(4, 6, d, device=device)
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    ref = lowrank_edit_reference(x.double(), **copy_params(p, torch.float64, False))
    h = x.clone()
    ptr, ver = h.data_ptr(), h._version
    out = lowrank_edit_(h, **p, backend=backend)
    assert out is h and h.data_ptr() == ptr and h._version > ver
    assert max_err(h, ref) <= 1e-5 * max_abs(ref) + 1e-7


@pytest.mark.parametrize("view_kind", ["sliced_cols", "transposed", "strided_rows"])
@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
def test_inplace_on_view_edits_base_and_grads_flow(backend, device, view_kind, with_index):
    d, r = 24, 3
    if view_kind == "sliced_cols":
        src = torch.randn(3, 5, d + 1, device=device)
        view = lambda t: t[:, :, 1:]  # noqa: E731  (base[:, 1:] in the last dim)
    elif view_kind == "transposed":
        src = torch.randn(5, 3, d, device=device)
        view = lambda t: t.transpose(0, 1)  # noqa: E731
    else:
        src = torch.randn(3, 10, d, device=device)
        view = lambda t: t[:, 1::2]  # noqa: E731
    n = view(src).numel() // d
    index = padded_index(n, 9, 2, device=device) if with_index else None
    p = make_lowrank_params(d, r, device=device)
    leaf = src.clone().requires_grad_()
    base = leaf * 2.0  # producer of base: its backward must see the in-place edit's gradient
    h = view(base)
    out = lowrank_edit_(h, **p, act="tanh", index=index, backend=backend)
    assert out is h
    # base edited through the view; elements outside the view untouched
    leaf64 = src.double().requires_grad_()
    p64 = copy_params(p, torch.float64)
    base64 = leaf64 * 2.0
    ref_view = lowrank_edit_reference(view(base64), **p64, act="tanh", index=index)
    outside = torch.ones_like(base, dtype=torch.bool)
    view(outside).fill_(False)
    assert torch.equal(base.detach()[outside], (src * 2.0)[outside])
    assert max_err(view(base), ref_view) <= 1e-5 * max_abs(ref_view) + 1e-7
    # gradient through mark_dirty to the base's producer (leaf) and the parameters
    g = torch.randn_like(base)
    loss_k = (base * g).sum()
    ref_base = base64.clone()
    view(ref_base).copy_(ref_view)
    loss_r = (ref_base * g.double()).sum()
    gk = torch.autograd.grad(loss_k, [leaf, p["B"], p["A"], p["a"], p["C"], p["c"]])
    gr = torch.autograd.grad(loss_r, [leaf64, p64["B"], p64["A"], p64["a"], p64["C"], p64["c"]])
    for name, a, b in zip(["h", "B", "A", "a", "C", "c"], gk, gr):
        assert max_err(a, b) <= 1e-5 * max_abs(b) + 1e-7, name


def test_inplace_on_leaf_requiring_grad_raises(backend, device):
    h = torch.randn(4, 8, device=device, requires_grad=True)
    B = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError):
        lowrank_edit_(h, B, backend=backend)
    with pytest.raises(RuntimeError):
        lowrank_edit_(h, B, index=torch.tensor([1], device=device), backend=backend)


def test_inplace_without_grad_on_leaf_ok(backend, device):
    h = torch.randn(4, 8, device=device)
    B = torch.randn(2, 8, device=device, requires_grad=True)
    ref = lowrank_edit_reference(h.double(), B.double())
    with torch.no_grad():
        lowrank_edit_(h, B, backend=backend)
    torch.testing.assert_close(h.double(), ref)


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
def test_one_dimensional_h(backend, device, inplace):
    """h of shape (d,) is a single row; with index [0] (or all rows in place) it is edited."""
    d, r = 9, 2
    base = torch.randn(d, device=device, requires_grad=True)
    params = make_lowrank_params(d, r, device=device)
    index = torch.tensor([0], device=device)
    _check(backend, base, lambda t: t, params, inplace=inplace, index=index)
    if inplace:
        _check(backend, base, lambda t: t, params, inplace=True)
    else:
        _check(backend, base, lambda t: t, params)


# ----------------------------------------------------------------------------- gradcheck

def _gc_params(d, r, terms="BAaCc", tied=False):
    return make_lowrank_params(d, r, torch.float64, terms=terms, tied=tied)


@pytest.mark.parametrize(
    "case",
    ["all_terms", "tied", "tanh", "gelu", "index", "inplace_nonleaf", "inplace_index_transposed"],
)
def test_gradcheck_torch_backend(case):
    d, r = 6, 3
    act, index, inplace, tied, lead, transpose = None, None, False, False, (5,), False
    if case == "tied":
        tied, act = True, "silu"
    elif case in ("tanh", "gelu"):
        act = case
    elif case == "index":
        lead, index, act = (2, 4), torch.tensor([5, -1, 0, 3]), "gelu_tanh"
    elif case == "inplace_nonleaf":
        inplace, act = True, "sigmoid"
    elif case == "inplace_index_transposed":
        inplace, tied, lead, transpose = True, True, (3, 2), True
        index, act = torch.tensor([4, -1, 1]), "tanh"
    p = _gc_params(d, r, tied=tied)
    h = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
    names = [k for k in ("B", "A", "a", "C", "c") if not (tied and k == "C")]

    def f(h, *ts):
        kw = dict(zip(names, ts))
        if tied:
            kw["C"] = kw["B"]
        if inplace:
            x = h * 1.0  # non-leaf
            if transpose:
                x = x.transpose(0, 1)
            return lowrank_edit_(x, **kw, act=act, index=index, backend="torch")
        return lowrank_edit(h, **kw, act=act, index=index, backend="torch")

    assert torch.autograd.gradcheck(f, (h, *[p[k] for k in names]), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kernels", ["triton", "cuda"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace_index"])
def test_kernel_backward_deterministic(device, inplace, kernels):
    if kernels not in reft_kernels._backend.available_backends(device):
        pytest.skip(f"{kernels} backend unavailable")
    d, r, n = 96, 8, 80  # 80 rows: more than one program in the row-split reduction
    h0 = torch.randn(n, d, device=device)
    p = make_lowrank_params(d, r, device=device, tied=True)
    g = torch.randn(n, d, device=device)
    index = padded_index(n, 70, 5, device=device) if inplace else None
    res = []
    for _ in range(2):
        base = h0.clone().requires_grad_()
        res.append(run_with_grads(lowrank_edit_ if inplace else lowrank_edit, base, lambda t: t, p, g,
                                  inplace=inplace, act="silu", index=index, backend=kernels))
    (y1, g1), (y2, g2) = res
    assert torch.equal(bits(y1), bits(y2))
    for k in g1:
        assert torch.equal(bits(g1[k]), bits(g2[k])), k
    # and the two-stage reduction is right
    base = h0.clone().requires_grad_()
    _check(kernels, base, lambda t: t, p, inplace=inplace, act="silu", index=index)


# ----------------------------------------------------------------------------- bad input

def _good(device, d=8, r=3):
    h = torch.randn(2, 5, d, device=device)
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    return h, p


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
@pytest.mark.parametrize(
    "name,shape",
    [("B", (3, 7)), ("B", (3,)), ("B", (1, 3, 8)), ("A", (2, 8)), ("A", (3, 9)), ("A", (8, 3)),
     ("C", (4, 8)), ("C", (3, 7)), ("a", (2,)), ("a", (3, 1)), ("c", (4,)), ("c", (1, 3))],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_wrong_param_shape(backend, device, name, shape, inplace):
    h, p = _good(device)
    p[name] = torch.randn(shape, device=device)
    fn = lowrank_edit_ if inplace else lowrank_edit
    before = h.clone()
    with pytest.raises(ValueError, match=rf"^{name} must"):
        fn(h, **p, backend=backend)
    assert torch.equal(h, before)


def test_d_mismatch(backend, device):
    h = torch.randn(4, 10, device=device)
    B = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="B"):
        lowrank_edit(h, B, backend=backend)
    A = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="A"):
        lowrank_edit(h, torch.randn(2, 10, device=device), A, backend=backend)


@pytest.mark.parametrize(
    "case,exc",
    [
        ("h_list", TypeError),
        ("h_int", TypeError),
        ("h_bool", TypeError),
        ("B_none", TypeError),
        ("B_list", TypeError),
        ("B_int", TypeError),
        ("A_list", TypeError),
        ("B_zero_rank", ValueError),
        ("act_unknown", ValueError),
        ("act_int", TypeError),
        ("act_callable", TypeError),
        ("backend_nope", ValueError),
        ("backend_int", ValueError),
    ],
)
def test_bad_input(backend, device, case, exc):
    h, p = _good(device)
    kw = dict(backend=backend)
    if case == "h_list":
        h = h.tolist()
    elif case == "h_int":
        h = torch.randint(0, 5, (2, 5, 8), device=device)
    elif case == "h_bool":
        h = torch.zeros(2, 5, 8, dtype=torch.bool, device=device)
    elif case == "B_none":
        p["B"] = None
    elif case == "B_list":
        p["B"] = p["B"].tolist()
    elif case == "B_int":
        p["B"] = torch.ones(3, 8, dtype=torch.int64, device=device)
    elif case == "A_list":
        p["A"] = p["A"].tolist()
    elif case == "B_zero_rank":
        p = dict(B=torch.randn(0, 8, device=device))
    elif case == "act_unknown":
        kw["act"] = "mish"
    elif case == "act_int":
        kw["act"] = 1
    elif case == "act_callable":
        kw["act"] = torch.tanh
    elif case == "backend_nope":
        kw["backend"] = "nope"
    elif case == "backend_int":
        kw["backend"] = 1
    for fn in (lowrank_edit, lowrank_edit_):
        with pytest.raises(exc):
            fn(h, **p, **kw)


def test_float64_with_triton_raises(device):
    if "triton" not in reft_kernels.available_backends(device):
        pytest.skip("the triton backend cannot run here")
    h = torch.randn(3, 8, dtype=torch.float64, device=device)
    B = torch.randn(2, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        lowrank_edit(h, B, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        lowrank_edit_(h, B, backend="triton")


@pytest.mark.parametrize("dtype,limit,rtol", [(torch.float32, 64, 1e-5), (torch.bfloat16, 128, 2e-2)],
                         ids=["fp32", "bf16"])
def test_rank_above_triton_limit(device, dtype, limit, rtol):
    assert triton_max_rank(dtype) == limit
    d, r = 8, limit + 1
    h = torch.randn(3, d, device=device).to(dtype)
    p = make_lowrank_params(d, r, device=device, requires_grad=False)
    with pytest.raises(ValueError, match=str(r)):
        lowrank_edit(h, **p, backend="triton")
    # default dispatch quietly takes the PyTorch path
    ref = lowrank_edit_reference(h.double(), **copy_params(p, torch.float64, False))
    y = lowrank_edit(h, **p)
    assert y.dtype == dtype and max_err(y, ref) <= rtol * max_abs(ref)
    # r = limit is still accepted by the Triton backend
    if "triton" in reft_kernels._backend.available_backends(device):
        p = make_lowrank_params(d, limit, device=device, requires_grad=False)
        ref = lowrank_edit_reference(h.double(), **copy_params(p, torch.float64, False))
        y = lowrank_edit(h, **p, backend="triton")
        assert max_err(y, ref) <= rtol * max_abs(ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put params on another device")
def test_params_on_other_device():
    h = torch.randn(3, 8, device="cuda")
    B = torch.randn(2, 8)
    with pytest.raises(ValueError, match="B"):
        lowrank_edit(h, B)
