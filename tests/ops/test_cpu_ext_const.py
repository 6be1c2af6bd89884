"""The CPU extension's edit of every row with a latent that is one row (``const_rows.cpp``:
LoBiReFT's ``h + b R`` and the other a/c-only patterns), taken by ``lowrank_edit`` without an
index on float32/float64 CPU tensors and on bfloat16 ones (parameters bfloat16 or float32): against the float64 reference (output and every gradient)
for each term pattern and activation, each input alone requiring grad, the same bits whatever
the thread count, no-grad calls, the calls left to the PyTorch path; a dispatch mode confirms
which path ran.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")


@pytest.mark.parametrize("terms", ["Ba", "Bac", "Bc", "B"])
@pytest.mark.parametrize("act", [None, "gelu", "sigmoid"])
# (h's dtype, the parameters'): bfloat16 rows are read into float, the row z B added in float and
# rounded once, the parameter gradients summed in float and returned in each parameter's dtype
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16,) * 2,
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "fp64", "bf16", "bf16_fp32_params"])
@pytest.mark.parametrize("lead", [(3, 7), (3, 100)])  # 300 rows: three blocks of the column sum
def test_against_reference(terms, act, dtypes, lead):
    torch.manual_seed(hash((terms, act, str(dtypes), lead)) % 2**31)
    base, view = make_base("contiguous", lead, 21, dtypes[0])
    base.requires_grad_(True)
    params = make_lowrank_params(21, 4, dtypes[1], terms=terms)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": act}, ref_kwargs={"act": act})
    assert names == ["const_rows_fwd", "const_rows_bwd"]


@pytest.mark.parametrize("r", [1, 15, 16, 17, 64])
def test_parameter_gradients_over_every_rank_and_lane_tail(r):
    """dz = B s is summed in 16 lanes and a tail: ranks and widths around the lane count, against
    the float64 reference."""
    torch.manual_seed(r)
    d = 16 * 3 + r % 7  # a tail after the lanes unless r % 7 == 0
    base, view = make_base("contiguous", (2, 50), d, torch.float32)
    base.requires_grad_(True)
    params = make_lowrank_params(d, r, torch.float32, terms="Bac")
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": "silu"}, ref_kwargs={"act": "silu"})
    assert names == ["const_rows_fwd", "const_rows_bwd"]


@pytest.mark.parametrize("grad_of", ["h", "B", "a", "c"])
def test_each_gradient_alone(grad_of):
    torch.manual_seed(2)
    base, view = make_base("contiguous", (2, 9), 12, torch.float32)
    params = make_lowrank_params(12, 3, torch.float32, terms="Bac", requires_grad=False)
    (base if grad_of == "h" else params[grad_of]).requires_grad_(True)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": "tanh"}, ref_kwargs={"act": "tanh"})
    # only h: no parameter gradient to compute, so no backward op (dh is the incoming gradient)
    assert names == (["const_rows_fwd"] if grad_of == "h" else ["const_rows_fwd", "const_rows_bwd"])


def test_lobireft_same_bits_whatever_the_thread_count():
    torch.manual_seed(3)
    h = torch.randn(4, 300, 24, requires_grad=True)
    R = torch.randn(5, 24, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    g = torch.randn(4, 300, 24)
    runs, before = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = rk.lobireft(h, R, b)
            runs.append([y.detach(), *torch.autograd.grad(y, [h, R, b], g)])
    finally:
        torch.set_num_threads(before)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_without_gradient():
    torch.manual_seed(4)
    h = torch.randn(3, 5, 8)
    params = make_lowrank_params(8, 2, torch.float32, terms="Ba")
    with torch.no_grad(), ext_ops() as names:
        y = rk.lowrank_edit(h, params["B"], a=params["a"])
    assert y.grad_fn is None and names == ["const_rows_fwd"]
    torch.testing.assert_close(y, h + params["a"].detach() @ params["B"].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["fp16", "fp32_h_fp64_params", "bf16_h_fp64_params", "transposed", "tied",
                                  "with_index", "off"])
def test_calls_left_to_the_pytorch_path(case, monkeypatch):
    torch.manual_seed(5)
    dtype = {"fp16": torch.float16, "bf16_h_fp64_params": torch.bfloat16}.get(case, torch.float32)
    base, view = make_base("transposed" if case == "transposed" else "contiguous", (3, 5), 16, dtype)
    base.requires_grad_(True)
    pdtype = torch.float64 if case in ("fp32_h_fp64_params", "bf16_h_fp64_params") else dtype
    params = make_lowrank_params(16, 2, pdtype, terms="Ba", tied=case == "tied")
    index = torch.tensor([0, 4, -1]) if case == "with_index" else None
    if case == "off":
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"index": index}, ref_kwargs={"index": index})
    assert "const_rows_fwd" not in names


def test_direct_calls_of_the_op_are_checked():
    op = torch.ops.reft_kernels_cpu.const_rows.default
    assert cpu_ext.red_op() is not None, cpu_ext.status()
    with pytest.raises(RuntimeError, match="const_rows"):
        op(torch.randn(4, 8), torch.randn(3), torch.randn(2, 8), None, 0)  # a of the wrong rank
    with pytest.raises(RuntimeError, match="const_rows"):
        op(torch.randn(4, 8), None, torch.randn(2, 8, dtype=torch.float64), None, 0)
