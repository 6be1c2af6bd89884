"""The quick entry of ``red`` and of ``lowrank_edit`` with a one-row latent (LoBiReFT's pattern):
on the PyTorch backend on a CPU they call the extension's op before their own Python checks
(``functional._quick``, ``cpu_ext.quick_op``), and the op checks its arguments in C++. Checked
here: each bad input still gets the checked path's ValueError/TypeError naming the argument (the
op refuses, the checked path raises), calls the op refuses for its own reasons still run (and
agree with the float64 reference), and the calls that must not reach the extension do not.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")

D, R = 10, 3


def _red_args(case):
    h, s, t = torch.randn(4, D), torch.randn(D), torch.randn(D)
    if case == "short_scale":
        s = torch.randn(D - 1)
    elif case == "matrix_bias":
        t = torch.randn(2, D)
    elif case == "scalar_h":
        h = torch.tensor(1.0)
    elif case == "empty_d":
        h, s, t = torch.randn(4, 0), torch.randn(0), torch.randn(0)
    elif case == "meta_scale":
        s = torch.randn(D, device="meta")
    elif case == "int_h":
        h = torch.ones(4, D, dtype=torch.int64)
    return h, s, t


RED_ERRORS = {"short_scale": (ValueError, "scale must have shape"), "matrix_bias": (ValueError, "bias must have shape"),
              "scalar_h": (ValueError, "h must have shape"), "empty_d": (ValueError, "last dimension d >= 1"),
              "meta_scale": (ValueError, "scale is on meta"), "int_h": (TypeError, "h must be float16")}


@pytest.mark.parametrize("case", list(RED_ERRORS))
def test_red_bad_input_gets_the_checked_error(case):
    err, match = RED_ERRORS[case]
    with pytest.raises(err, match=match):
        rk.red(*_red_args(case))


def _lobi_args(case):
    h, R_, b = torch.randn(4, D), torch.randn(R, D), torch.randn(R)
    if case == "rank_zero":
        R_, b = torch.randn(0, D), torch.randn(0)
    elif case == "short_b":
        b = torch.randn(R - 1)
    elif case == "wide_R":
        R_ = torch.randn(R, D + 1)
    elif case == "vector_R":
        R_ = torch.randn(D)
    elif case == "scalar_h":
        h = torch.tensor(1.0)
    elif case == "list_b":
        b = [0.0] * R
    return h, R_, b


LOBI_ERRORS = {"rank_zero": (ValueError, "B must have shape"), "short_b": (ValueError, "a must have shape"),
               "wide_R": (ValueError, "B must have shape"), "vector_R": (ValueError, "B must have shape"),
               "scalar_h": (ValueError, "h must have shape"), "list_b": (TypeError, "a must be a torch.Tensor")}


@pytest.mark.parametrize("case", list(LOBI_ERRORS))
def test_lobireft_bad_input_gets_the_checked_error(case):
    err, match = LOBI_ERRORS[case]
    with pytest.raises(err, match=match):
        rk.lobireft(*_lobi_args(case))


def _close_to_reference(y, grads, want, want_grads):
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["strided_R", "fp64_h_fp32_params", "fp16_h"])
def test_lobireft_calls_the_extension_leaves_still_run(case):
    """A transposed R, float32 parameters beside float64 h, a float16 h: the PyTorch path."""
    torch.manual_seed(3)
    dtype = {"fp64_h_fp32_params": torch.float64, "fp16_h": torch.float16}.get(case, torch.float32)
    h = torch.randn(2, 5, D, dtype=dtype, requires_grad=True)
    Rm = (torch.randn(D, R).t() if case == "strided_R" else torch.randn(R, D)).requires_grad_()
    b = torch.randn(R, requires_grad=True)
    with ext_ops() as names:
        y = rk.lobireft(h, Rm, b)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [h, Rm, b], g)
    assert names == []
    h64, R64, b64 = (t.detach().double().requires_grad_() for t in (h, Rm, b))
    want = h64 + b64 @ R64
    want_grads = torch.autograd.grad(want, [h64, R64, b64], g.double())
    if case == "fp16_h":
        torch.testing.assert_close(y.double(), want.detach(), rtol=2e-3, atol=2e-3)
        return
    _close_to_reference(y, grads, want, want_grads)


@pytest.mark.parametrize("op", ["red", "lobireft"])
@pytest.mark.parametrize("case", ["backend_env", "forward_ad", "vmap"])
def test_calls_that_must_not_reach_the_extension(op, case, monkeypatch):
    """REFT_KERNELS_BACKEND set (the checked path's dispatch decides), forward-mode AD and vmap
    (the PyTorch path's differentiable ops, no op of the extension): not the quick entry."""
    torch.manual_seed(4)
    h = torch.randn(3, D)
    params = [torch.randn(D), torch.randn(D)] if op == "red" else [torch.randn(R, D), torch.randn(R)]
    call = rk.red if op == "red" else rk.lobireft
    if case == "backend_env":
        import reft_kernels.functional as F

        checked = []
        real = F.check_hidden
        monkeypatch.setattr(F, "check_hidden", lambda *a, **k: checked.append(1) or real(*a, **k))
        monkeypatch.setenv("REFT_KERNELS_BACKEND", "torch")
        out = call(h, *params)
        assert checked, "the quick entry took a call that REFT_KERNELS_BACKEND sends to the checked path"
        want = h * params[0] + params[1] if op == "red" else h + params[1] @ params[0]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        return
    if case == "forward_ad":
        import torch.autograd.forward_ad as fwAD

        tangent = torch.randn_like(h)
        with fwAD.dual_level(), ext_ops() as names:
            out = call(fwAD.make_dual(h, tangent), *params)
            jvp = fwAD.unpack_dual(out).tangent
        assert names == []
        want = tangent * params[0] if op == "red" else tangent
        torch.testing.assert_close(jvp, want)
        return
    with ext_ops() as names:
        out = torch.vmap(lambda x: call(x, *params))(h.unsqueeze(1))
    assert names == []
    want = h * params[0] + params[1] if op == "red" else h + params[1] @ params[0]
    torch.testing.assert_close(out.squeeze(1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["red", "lobireft"])
def test_the_quick_entry_takes_the_plain_call(op):
    """The plain call goes to the extension without the Python checks: with those checks made to
    fail, the call still runs (and is right)."""
    import reft_kernels.functional as F

    torch.manual_seed(5)
    h = torch.randn(3, 4, D, requires_grad=True)
    params = ([torch.randn(D), torch.randn(D)] if op == "red" else [torch.randn(R, D), torch.randn(R)])
    for p in params:
        p.requires_grad_()

    def refuse(*args, **kwargs):
        raise AssertionError("the checked path ran")

    mp = pytest.MonkeyPatch()
    mp.setattr(F, "check_hidden", refuse)
    try:
        with ext_ops() as names:
            y = rk.red(h, *params) if op == "red" else rk.lobireft(h, *params)
            g = torch.randn_like(y)
            grads = torch.autograd.grad(y, [h, *params], g)
    finally:
        mp.undo()
    assert names[0] == ("red_fwd" if op == "red" else "const_rows_fwd")
    h64, p64 = h.detach().double().requires_grad_(), [p.detach().double().requires_grad_() for p in params]
    want = h64 * p64[0] + p64[1] if op == "red" else h64 + p64[1] @ p64[0]
    _close_to_reference(y, grads, want, torch.autograd.grad(want, [h64, *p64], g.double()))
