"""The ops under function transforms: ``torch.vmap``, ``torch.func.grad`` / ``jvp`` / ``jacrev`` and
forward-mode AD.

- ``backend="torch"`` (and the default dispatch) runs under each of them and gives, slice by
  slice, what the float64 formulas written here give: values, gradients and tangents.
- The kernel backends (Triton, and CUDA through its host mode) refuse with a RuntimeError that
  names the op and the backend, before anything is launched.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import reft_kernels as rk
from reft_kernels import _backend, _cuda
from reft_kernels.benchmark.launches import counting

D, R = 6, 3
F64 = torch.float64

# torch's forward-mode AD scripts its jvp decompositions on first use, which warns on torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------- float64 formulas

def _act64(u, act):
    if act is None:
        return u
    if act == "silu":
        return u / (1.0 + torch.exp(-u))
    if act == "tanh":
        return torch.tanh(u)
    raise AssertionError(act)


def edit64(h, B, A, a, C, c, act=None):
    """y = h + (act(h A^T + a) - h C^T - c) B on every row."""
    return h + (_act64(h @ A.t() + a, act) - h @ C.t() - c) @ B


def edit64_rows(h, index, B, A, a, C, c, act=None):
    """The rows of h.reshape(-1, d) listed by index (-1 skipped) edited, the others kept."""
    flat = h.reshape(-1, h.shape[-1])
    keep = torch.ones(flat.shape[0], 1, dtype=h.dtype, device=h.device)
    rows = index[index >= 0]
    keep[rows] = 0.0
    return (keep * flat + (1 - keep) * edit64(flat, B, A, a, C, c, act)).reshape(h.shape)


def red64(h, s, t):
    return h * s + t


def _params(device, dtype=F64):
    g = torch.Generator().manual_seed(3)
    mk = lambda *shape: (torch.randn(*shape, generator=g, dtype=F64) * 0.5).to(device, dtype)  # noqa: E731
    return {"B": mk(R, D), "A": mk(R, D), "a": mk(R), "C": mk(R, D), "c": mk(R)}


# ----------------------------------------------------------------------------- the PyTorch path runs

@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
def test_vmap_lowrank_matches_loop_of_formula(device, backend, act, with_index):
    h = torch.randn(4, 2, 5, D, dtype=F64, device=device)
    p = _params(device)
    index = torch.tensor([7, -1, 0, 3, -1], device=device) if with_index else None

    def op(x):
        return rk.lowrank_edit(x, p["B"], p["A"], p["a"], p["C"], p["c"], act=act, index=index, backend=backend)

    got = torch.vmap(op)(h)
    for i in range(h.shape[0]):
        want = (edit64_rows(h[i], index, *p.values(), act) if with_index else edit64(h[i], *p.values(), act))
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    assert with_index or not torch.equal(got, h)  # the edit does something


def test_vmap_over_parameters_and_tied(device):
    """Batched parameters (an ensemble): B tied to C, one batch element per parameter set."""
    h = torch.randn(5, D, dtype=F64, device=device)
    Bs = torch.randn(3, R, D, dtype=F64, device=device)
    A = torch.randn(R, D, dtype=F64, device=device)
    a = torch.randn(R, dtype=F64, device=device)
    got = torch.vmap(lambda B: rk.loreft(h, B, A, a, act="tanh", backend="torch"))(Bs)
    zero = torch.zeros(R, dtype=F64, device=device)
    for i in range(3):
        torch.testing.assert_close(got[i], edit64(h, Bs[i], A, a, Bs[i], zero, "tanh"), rtol=1e-12, atol=1e-12)


def test_vmap_red_matches_loop_of_formula(device):
    h = torch.randn(3, 4, D, dtype=F64, device=device)
    s, t = torch.randn(D, dtype=F64, device=device), torch.randn(D, dtype=F64, device=device)
    got = torch.vmap(lambda x: rk.red(x, s, t, backend="torch"))(h)
    for i in range(3):
        torch.testing.assert_close(got[i], red64(h[i], s, t), rtol=1e-12, atol=1e-12)
    ts = torch.randn(3, D, dtype=F64, device=device)  # batched bias
    got = torch.vmap(lambda b: rk.red(h[0], s, b))(ts)
    for i in range(3):
        torch.testing.assert_close(got[i], red64(h[0], s, ts[i]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
def test_func_grad_and_jvp_match_formula(device, with_index):
    """torch.func.grad (every input), vmap of grad, jacrev and jvp against the same transforms of
    the float64 formula: row 0 listed and several -1 entries, so a padding entry that counted row
    0's gradient again would show."""
    h = torch.randn(5, D, dtype=F64, device=device)
    p = _params(device)
    index = torch.tensor([-1, 0, -1, 3, -1], device=device) if with_index else None
    w = torch.randn(5, D, dtype=F64, device=device)

    def ours(x, B, A, a, C, c):
        return (rk.lowrank_edit(x, B, A, a, C, c, act="silu", index=index, backend="torch") * w).sum()

    def formula(x, B, A, a, C, c):
        y = edit64_rows(x, index, B, A, a, C, c, "silu") if with_index else edit64(x, B, A, a, C, c, "silu")
        return (y * w).sum()

    args = (h, *p.values())
    argnums = tuple(range(6))
    for got, want in zip(torch.func.grad(ours, argnums)(*args), torch.func.grad(formula, argnums)(*args)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    hs = torch.randn(2, 5, D, dtype=F64, device=device)
    torch.testing.assert_close(torch.vmap(torch.func.grad(ours), (0, *[None] * 5))(hs, *p.values()),
                               torch.vmap(torch.func.grad(formula), (0, *[None] * 5))(hs, *p.values()))
    torch.testing.assert_close(torch.func.jacrev(ours, 1)(*args), torch.func.jacrev(formula, 1)(*args))
    tangents = tuple(torch.randn_like(t) for t in args)
    got = torch.func.jvp(ours, args, tangents)
    want = torch.func.jvp(formula, args, tangents)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_forward_mode_ad_tangents(device):
    """Dual tensors (torch.autograd.forward_ad): out of place, in place, RED; the tangent is the
    formula's derivative along the tangent (checked by the formula's own jvp)."""
    h = torch.randn(4, D, dtype=F64, device=device)
    th = torch.randn_like(h)
    p = _params(device)
    index = torch.tensor([2, -1, 0], device=device)
    s, t = torch.randn(D, dtype=F64, device=device), torch.randn(D, dtype=F64, device=device)
    _, want = torch.func.jvp(lambda x: edit64_rows(x, index, *p.values()), (h,), (th,))
    _, want_red = torch.func.jvp(lambda x: red64(x, s, t), (h,), (th,))
    with fwAD.dual_level():
        y = rk.lowrank_edit(fwAD.make_dual(h, th), *p.values(), index=index, backend="torch")
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, want, rtol=1e-12, atol=1e-12)
        work = fwAD.make_dual(h.clone(), th.clone())  # an in-place edit updates the tangent in place
        out = rk.lowrank_edit_(work, *p.values(), index=index, backend="torch")
        assert out is work
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fwAD.unpack_dual(out).primal, edit64_rows(h, index, *p.values()))
        y = rk.red(fwAD.make_dual(h, th), s, t)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, want_red, rtol=1e-12, atol=1e-12)


def test_what_the_pytorch_path_refuses_under_transforms(device):
    h = torch.randn(2, 4, D, device=device)
    p = _params(device, torch.float32)
    index = torch.tensor([1, -1], device=device)
    with pytest.raises(RuntimeError, match=r"lowrank_edit_ cannot edit h in place under torch\.vmap"):
        torch.vmap(lambda x: rk.lowrank_edit_(x, p["B"], index=index, backend="torch"))(h.clone())
    with pytest.raises(ValueError, match="index must be a plain tensor under torch.vmap"):
        torch.vmap(lambda x, i: rk.lowrank_edit(x, p["B"], index=i, backend="torch"))(h, index.repeat(2, 1))


# ----------------------------------------------------------------------------- the kernels refuse

def _transforms(op):
    """(name, call) pairs: each runs ``op(x)`` under one transform."""
    def fwd_ad(x):
        with fwAD.dual_level():
            op(fwAD.make_dual(x, torch.ones_like(x)))

    return [
        ("torch.vmap", lambda x: torch.vmap(op)(x)),
        ("a torch.func transform", lambda x: torch.func.grad(lambda y: op(y).sum())(x[0])),
        ("a torch.func transform", lambda x: torch.func.jvp(op, (x[0],), (x[0],))),
        ("a torch.func transform", lambda x: torch.func.jacrev(op)(x[0, :1])),
        ("a torch.func transform", lambda x: torch.func.functionalize(op)(x[0])),
        ("forward-mode AD", fwd_ad),
    ]


TRITON_HERE = "triton" in _backend.available_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
KERNELS = (["triton"] if TRITON_HERE else []) + ["cuda"]


_KERNEL_OPS = {"red_fwd", "red_bwd", "lowrank_edit_fwd", "lowrank_edit_fwd_", "lowrank_edit_bwd"}  # the CUDA ops


@pytest.fixture
def no_launch():
    """Counts what runs (``benchmark.launches.counting``) and fails the test if a Triton kernel or
    one of the CUDA backend's ops was reached."""
    with counting() as counter:
        yield
    launched = [k for k in counter.by_name if k.startswith("triton:") or k in _KERNEL_OPS]
    assert not launched, f"kernels launched: {launched}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op_name", ["red", "lowrank_edit", "lowrank_edit_index"])
def test_kernel_backends_refuse_before_launching(device, kernel, op_name, no_launch):
    h = torch.randn(3, 4, D, device=device)
    p = _params(device, torch.float32)
    s = torch.randn(D, device=device)
    if op_name == "red":
        op = lambda x: rk.red(x, s, s, backend=kernel)  # noqa: E731
    else:
        index = torch.tensor([2, -1], device=device) if op_name.endswith("index") else None
        op = lambda x: rk.lowrank_edit(x, p["B"], p["A"], act="silu", index=index, backend=kernel)  # noqa: E731
    name = "red" if op_name == "red" else "lowrank_edit"
    host = _cuda.on_host() if kernel == "cuda" and device.type == "cpu" else contextlib.nullcontext()
    with host:
        for transform, call in _transforms(op):
            with pytest.raises(RuntimeError) as info:
                call(h)
            msg = str(info.value)
            assert f"reft_kernels.{name}: backend='{kernel}' cannot run under {transform}" in msg, msg
            assert "use backend='torch'" in msg


def test_kernel_backend_from_the_environment_refuses(device, monkeypatch, no_launch):
    monkeypatch.setenv("REFT_KERNELS_BACKEND", KERNELS[0])
    h = torch.randn(2, 3, D, device=device)
    s = torch.randn(D, device=device)
    with pytest.raises(RuntimeError, match="from the REFT_KERNELS_BACKEND environment variable"):
        torch.vmap(lambda x: rk.red(x, s))(h)


def test_kernels_still_take_tensors_captured_from_outside(device):
    """Only the tensors an op receives matter: a kernel call on plain tensors inside a vmapped
    function runs (its result is a constant of the transform)."""
    if not TRITON_HERE:
        pytest.skip("the Triton backend does not run here")
    h = torch.randn(4, D, device=device)
    s = torch.randn(D, device=device)
    xs = torch.randn(3, D, device=device)
    got = torch.vmap(lambda x: x + rk.red(h, s, backend="triton").sum(0))(xs)
    torch.testing.assert_close(got, xs + (h.double() * s.double()).sum(0).float())



def test_captured_tensor_that_requires_grad_inside_a_transform(device, no_launch):
    """A captured parameter that requires grad needs the autograd Function, which PyTorch does
    not apply inside a torch.func transform: the kernels refuse, and the PyTorch path records
    plain ops whose gradient (taken outside the transform) is the formula's."""
    h = torch.randn(4, D, dtype=F64, device=device)
    s = torch.randn(D, dtype=F64, device=device, requires_grad=True)
    xs = torch.randn(3, D, dtype=F64, device=device)
    if TRITON_HERE:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run under a torch.func transform"):
            torch.vmap(lambda x: x + rk.red(h.float(), s.float(), backend="triton").sum(0))(xs.float())
    out = torch.vmap(lambda x: x * rk.red(h, s, s, backend="torch").sum(0))(xs)
    torch.testing.assert_close(out, xs * red64(h, s, s).sum(0).detach(), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), s)
    torch.testing.assert_close(g, xs.sum(0) * (h.sum(0) + h.shape[0]), rtol=1e-12, atol=1e-12)
