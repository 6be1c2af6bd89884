"""Property-based tests (hypothesis) of ``lowrank_edit`` / ``lowrank_edit_`` and ``red``.

Each example draws a whole problem -- shape (leading dims, d, r), layout and strides of ``h``,
``h``'s dtype and the parameters' dtype, activation, which optional terms are present, tying,
index rows and padding, a gain on ``A`` that saturates the activations -- and compares the op on
every backend that runs here (the ``backend`` fixture) with the float64 eager reference through
``check_against_reference``: the forward and every gradient, with the project's tolerance rules
(fp32: 1e-5 relative; fp16 / bf16: at most 2x the error of the same eager computation in that
precision). The index pattern (none, shuffled subset with -1 padding, only padding, empty) and
in place / out of place are parametrized, so every combination runs on every backend. The
low-rank property also checks that the forward without autograd gives the same bits as with it,
leaves the input of an out-of-place call untouched, and keeps the bits of rows not listed.

Shapes are tiny (at most 12 rows, d <= 40, r <= 5) and the example counts small, because on a
CPU the Triton kernels run through Triton's interpreter. ``derandomize=True`` makes the examples
the same on every run (and for every backend); each example seeds torch with a drawn seed, so a
failure reported by hypothesis (it prints the drawn case) reproduces exactly.

On judging a low-precision failure: the 2x-of-eager rule compares max errors, which says little
when the compared tensor has one or a few elements (d = 1, r = 1, one row: e.g. the gradient of
``a``). There, a backend that rounds in another order than eager (every backend computes in
fp32 and rounds once, where eager rounds each op) can miss the rule by chance, while its errors
are no larger than eager's on average. Such a miss is a rounding coincidence; an error many ulps
wide is not.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reft_kernels import ACTIVATION_NAMES, lowrank_edit, lowrank_edit_, red

from .._helpers import (
    LAYOUTS,
    bits,
    check_against_reference,
    lowrank_ref_fn,
    make_base,
    make_lowrank_params,
    make_red_params,
    red_ref_fn,
)

MAX_ROWS = 12
MAX_D = 40
MAX_R = 5

# (h dtype, parameter dtype)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
]

# Number of leading dims each layout of ``make_base`` takes.
LEAD_NDIMS = {
    "contiguous": (0, 1, 2, 3),
    "transposed": (2,),
    "strided_rows": (2,),
    "sliced_cols": (1, 2),
    "strided_cols": (1, 2),
    "col_major": (1,),
    "transposed_strided_cols": (2,),
}
assert set(LEAD_NDIMS) == set(LAYOUTS)

INDEX_KINDS = ("none", "subset", "all_padding", "empty")

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Triton's interpreter evaluates exp with numpy, which warns on overflow for saturated
# activations (the result is still exact); see test_lowrank_edit.py.
EXP_OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@st.composite
def layouts_and_leads(draw):
    """(layout, lead) with at most MAX_ROWS rows; a leading dim is 0 now and then."""
    layout = draw(st.sampled_from(LAYOUTS))
    ndim = draw(st.sampled_from(LEAD_NDIMS[layout]))
    lead, budget = [], MAX_ROWS
    for _ in range(ndim):
        s = draw(st.integers(0, max(budget, 1)) if draw(st.integers(0, 9)) == 0
                 else st.integers(1, max(budget, 1)))
        lead.append(s)
        budget = max(budget // max(s, 1), 1)
    lead = tuple(lead)
    assert _numel(lead) <= MAX_ROWS, lead
    return layout, lead


@st.composite
def index_lists(draw, kind: str, n_rows: int):
    """Entries of an index of ``kind``: None; "subset": a shuffled subset of distinct rows (at
    least one when there are rows; possibly every row) with 0-3 entries of -1 padding, in random
    order; "all_padding": only -1 entries; "empty": no entries."""
    if kind == "none":
        return None
    if kind == "empty":
        return []
    if kind == "all_padding":
        return [-1] * draw(st.integers(1, 4))
    rows = draw(st.permutations(range(n_rows)))[: draw(st.integers(min(1, n_rows), n_rows))]
    entries = list(rows) + [-1] * draw(st.integers(0, 3))
    return draw(st.permutations(entries))


# every subset of the optional terms (B is always present)
OPTIONAL_TERMS = tuple("".join(t for i, t in enumerate("AaCc") if m >> i & 1) for m in range(16))


@st.composite
def lowrank_cases(draw, index_kind: str):
    layout, lead = draw(layouts_and_leads())
    n_rows = _numel(lead)
    h_dtype, p_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    tied = draw(st.booleans())
    optional = draw(st.sampled_from(OPTIONAL_TERMS))
    if tied:
        optional = optional.replace("C", "")  # C is B
    index = draw(index_lists(index_kind, n_rows))
    return dict(
        layout=layout,
        lead=lead,
        d=draw(st.integers(1, MAX_D)),
        r=draw(st.integers(1, MAX_R)),
        h_dtype=h_dtype,
        p_dtype=p_dtype,
        act=draw(st.sampled_from((None,) + ACTIVATION_NAMES)),
        terms="B" + optional,
        tied=tied,
        index_kind=index_kind,
        index=index,
        # power-of-two gain on A (exact in every dtype): pushes activations into saturation
        a_gain=draw(st.sampled_from((1.0, 1.0, 8.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@EXP_OVERFLOW_OK
@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
@pytest.mark.parametrize("index_kind", INDEX_KINDS)
@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_lowrank_edit_matches_reference(backend, index_kind, inplace, data):
    """Forward and every gradient of lowrank_edit / lowrank_edit_ against the float64 reference;
    with an index, rows that are not listed come back bitwise unchanged. The index pattern and
    in place / out of place are parametrized so that each combination runs on every backend."""
    case = data.draw(lowrank_cases(index_kind), label="case")
    torch.manual_seed(case["seed"])
    d, r, lead = case["d"], case["r"], case["lead"]
    base, view = make_base(case["layout"], lead, d, case["h_dtype"])
    base.requires_grad_()
    params = make_lowrank_params(d, r, case["p_dtype"], terms=case["terms"], tied=case["tied"])
    if case["a_gain"] != 1.0 and params["A"] is not None:
        with torch.no_grad():
            params["A"].mul_(case["a_gain"])
    assert (params["C"] is params["B"]) == case["tied"]
    index = None if case["index"] is None else torch.tensor(case["index"], dtype=torch.int64)
    act = case["act"]
    fn = lowrank_edit_ if inplace else lowrank_edit

    res = check_against_reference(
        fn, lowrank_ref_fn, base, view, params, inplace=inplace,
        kernel_kwargs=dict(act=act, index=index, backend=backend),
        ref_kwargs=dict(act=act, index=index),
    )
    present = {k for k in ("B", "A", "a", "C", "c") if params[k] is not None}
    assert set(res) == {"out", "h"} | present

    # Without autograd (a separate path: no autograd node, nothing saved) the forward gives the
    # same bits as with it; the input of an out-of-place call is untouched, an in-place call
    # returns h itself; rows not listed in the index keep their bits.
    h = view(base.detach())
    before = h.clone()
    x = view(base.detach().clone()) if inplace else h
    x_grad = view(base.detach().requires_grad_().clone())  # a non-leaf, as in run_with_grads
    y_grad = fn(x_grad, **params, act=act, index=index, backend=backend)
    with torch.no_grad():
        y = fn(x, **params, act=act, index=index, backend=backend)
    assert torch.equal(bits(y), bits(y_grad.detach()))
    if inplace:
        assert y is x
    else:
        assert torch.equal(bits(h), bits(before))
    if index is not None:
        listed = torch.zeros(_numel(lead), dtype=torch.bool)
        listed[index[index >= 0]] = True
        assert torch.equal(bits(y.reshape(-1, d)[~listed]), bits(before.reshape(-1, d)[~listed]))


@st.composite
def red_cases(draw):
    layout, lead = draw(layouts_and_leads())
    h_dtype, p_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    return dict(
        layout=layout,
        lead=lead,
        d=draw(st.integers(1, MAX_D)),
        h_dtype=h_dtype,
        p_dtype=p_dtype,
        terms=draw(st.sampled_from(("st", "s", "t", ""))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, **SETTINGS)
@given(case=red_cases())
def test_red_matches_reference(backend, case):
    """Forward and every gradient of red against the float64 reference."""
    torch.manual_seed(case["seed"])
    d = case["d"]
    base, view = make_base(case["layout"], case["lead"], d, case["h_dtype"])
    base.requires_grad_()
    params = make_red_params(d, case["p_dtype"], terms=case["terms"])
    res = check_against_reference(red, red_ref_fn, base, view, params,
                                  kernel_kwargs=dict(backend=backend))
    present = {k for k in ("scale", "bias") if params[k] is not None}
    assert set(res) == {"out", "h"} | present
