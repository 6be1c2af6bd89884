"""The CPU extension's RED (``reft_kernels/cpu_ext/red.cpp``): taken by ``red`` on float32/float64
CPU tensors and on bfloat16 ones (parameters bfloat16 or float32; float inside), checked against the float64 reference (output and every gradient) for each pair of
terms, row counts that span several of the backward's row blocks, and each input alone requiring
grad; a dispatch mode confirms which path ran. Also: the same bits whatever the thread count,
no-grad and inference calls, the calls left to the PyTorch path, and direct calls of the op.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off."""
from __future__ import annotations

import contextlib

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import check_against_reference, make_base, make_red_params, red_ref_fn
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")


@pytest.mark.parametrize("terms", ["st", "s", "t", ""])
# (h's dtype, the parameters'): bfloat16 rows are read into float, fma with float parameters and
# rounded once, the parameter gradients summed in float and returned in each parameter's dtype
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16,) * 2,
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "fp64", "bf16", "bf16_fp32_params"])
@pytest.mark.parametrize("lead", [(1,), (3, 7), (3, 100)])  # 300 rows: three row blocks, the last short
def test_against_reference(terms, dtypes, lead):
    torch.manual_seed(hash((terms, str(dtypes), lead)) % 2**31)
    base, view = make_base("contiguous", lead, 21, dtypes[0])
    base.requires_grad_(True)
    params = make_red_params(21, dtypes[1], terms=terms)
    with ext_ops() as names:
        check_against_reference(rk.red, red_ref_fn, base, view, params)
    assert names == ["red_fwd", "red_bwd"]


def test_bfloat16_rounds_once():
    """y is fma(h, s, t) in float rounded to bfloat16 once: bit for bit the float result's rounding
    (NaN and infinities included)."""
    torch.manual_seed(6)
    h = torch.randn(64, 40).bfloat16()
    h[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    s, t = torch.randn(40) * 3, torch.randn(40)
    with ext_ops() as names:
        y = rk.red(h, s, t)
    assert names == ["red"] or names == ["red_fwd"]
    want = torch.addcmul(t.double(), h.double(), s.double()).float().bfloat16()  # fma's one rounding, in float
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan) and nan.any()  # (a NaN's payload may differ)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("grad_of", ["h", "scale", "bias"])
def test_each_gradient_alone(grad_of):
    torch.manual_seed(2)
    base, view = make_base("contiguous", (5, 40), 16, torch.float32)
    params = make_red_params(16, torch.float32, requires_grad=False)
    (base if grad_of == "h" else params[grad_of]).requires_grad_(True)
    with ext_ops() as names:
        check_against_reference(rk.red, red_ref_fn, base, view, params)
    assert names == ["red_fwd", "red_bwd"]


def test_same_bits_whatever_the_thread_count():
    """The column sums go by fixed row blocks: one thread and two give the same bits."""
    torch.manual_seed(3)
    h = torch.randn(4, 300, 24, requires_grad=True)
    params = make_red_params(24)
    g = torch.randn(4, 300, 24)
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = rk.red(h, params["scale"], params["bias"])
            runs.append([y.detach(), *torch.autograd.grad(y, [h, params["scale"], params["bias"]], g)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_without_gradient(mode):
    torch.manual_seed(4)
    h = torch.randn(3, 5, 8)
    params = make_red_params(8, requires_grad=mode != "nothing_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with ctx(), ext_ops() as names:
        y = rk.red(h, params["scale"], params["bias"])
    assert y.grad_fn is None
    # (inference mode leaves out the autograd kernel: the op's own CPU kernel runs)
    assert names == (["red"] if mode == "inference_mode" else ["red_fwd"])
    want = h.double() * params["scale"].double() + params["bias"].double()
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["fp16", "fp32_h_bf16_params", "bf16_h_fp64_params", "transposed", "off", "empty"])
def test_calls_left_to_the_pytorch_path(case, monkeypatch):
    torch.manual_seed(5)
    dtype = {"fp16": torch.float16, "bf16_h_fp64_params": torch.bfloat16}.get(case, torch.float32)
    base, view = make_base("transposed" if case == "transposed" else "contiguous", (0,) if case == "empty" else (3, 5),
                           16, dtype)
    base.requires_grad_(True)
    params = make_red_params(16, {"fp16": torch.float16, "fp32_h_bf16_params": torch.bfloat16,
                                  "bf16_h_fp64_params": torch.float64}.get(case, torch.float32))
    if case == "off":
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    with ext_ops() as names:
        check_against_reference(rk.red, red_ref_fn, base, view, params)
    assert names == []


@pytest.mark.parametrize("case", ["fp16_h", "short_scale", "bias_dtype", "transposed_h"])
def test_direct_calls_of_the_op_are_checked(case):
    op = cpu_ext.red_op()
    assert op is not None, cpu_ext.status()
    h = torch.randn(6, 8, dtype=torch.float16 if case == "fp16_h" else torch.float32)
    if case == "transposed_h":
        h = torch.randn(8, 6).t()
    scale = torch.randn(7 if case == "short_scale" else 8)
    bias = torch.randn(8, dtype=torch.float64 if case == "bias_dtype" else torch.float32)
    with pytest.raises(RuntimeError, match="red"):
        op(h, scale, bias)
