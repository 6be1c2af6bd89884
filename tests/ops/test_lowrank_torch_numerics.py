"""The low-rank edit's PyTorch path in fp16/bf16 computes as the kernels do: fp32 inside (latent,
activation, ``h + z B``; parameters at their own precision) and one rounding at the end, forward
and backward. Judged against float64 formulas written here, in units of the low-precision ulp:
eager bf16 math, which rounds the (n, r) latent, missed one case (d = 1, r = 5, C tied to B,
silu) by about 14 bf16 ulps. Also: the fp32 working copies are made a block of rows at a time,
and the block size changes no value of ``y`` or ``dh``. The CPU extension, which takes the
bf16 edit of every row on a CPU (``cpu_ext.lowrank_all_applies``), is turned off here but for
one test that holds it to the same bounds.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reft_kernels as rk
from reft_kernels import cpu_ext
from reft_kernels.ops.lowrank_edit import torch_impl
from tests._helpers import ops_called

F64 = torch.float64


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setenv(cpu_ext.ENV_VAR, "0")


def _silu64(u):
    return u / (1.0 + torch.exp(-u))


def _edit64(h, B, A, a):
    """y = h + (silu(h A^T + a) - h B^T) B, C tied to B, in float64."""
    return h + (_silu64(h @ A.t() + a) - h @ B.t()) @ B


def _ulp(ref, dtype):
    """One unit in the last place of ``dtype`` at each element of ``ref`` (float64)."""
    info = torch.finfo(dtype)
    mag = ref.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def _problem(seed, n, d, r, h_dtype, p_dtype):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(h_dtype)
    B = torch.randn(r, d, generator=g).to(p_dtype)
    A = (torch.randn(r, d, generator=g) * 2.0).to(p_dtype)  # a large latent: silu far from linear
    a = torch.randn(r, generator=g).to(p_dtype)
    gy = torch.randn(n, d, generator=g).to(h_dtype)
    return h, B, A, a, gy


def _check(h, B, A, a, gy, inplace):
    """Forward and every gradient within one ulp of the float64 formula (two for the summed
    parameter gradients of low-precision parameters), plus fp32's own rounding of the terms."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, B, A, a)]
    hl, Bl, Al, al = leaves
    index = torch.arange(h.shape[0] - 1, -1, -1) if inplace else None
    if inplace:
        y = rk.lowrank_edit_(hl * 1, Bl, Al, al, Bl, act="silu", index=index, backend="torch")
    else:
        y = rk.lowrank_edit(hl, Bl, Al, al, Bl, act="silu", backend="torch")
    grads = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.detach().to(F64).requires_grad_() for t in (h, B, A, a)]
    y64 = _edit64(*ref_leaves)
    grads64 = torch.autograd.grad(y64, ref_leaves, gy.to(F64))
    # size of the terms summed into each value (float64 formula on absolute values, identity act)
    habs, Babs, Aabs, aabs = (t.detach().to(F64).abs() for t in (h, B, A, a))
    mag_y = habs + (habs @ Aabs.t() + aabs + habs @ Babs.t()) @ Babs
    for name, got, want, mag in [("y", y, y64, mag_y), *[
            (n_, g_, w_, None) for n_, g_, w_ in zip(("dh", "dB", "dA", "da"), grads, grads64)]]:
        assert got.dtype == (h.dtype if name in ("y", "dh") else {"dB": B, "dA": A, "da": a}[name].dtype)
        want = want.detach()
        err = (got.detach().to(F64) - want).abs()
        ulps = 1 if got.dtype == h.dtype and name in ("y", "dh") else 2
        tol = ulps * _ulp(want, got.dtype) if got.dtype != torch.float32 else 1e-5 * want.abs().max()
        if mag is not None:
            tol = tol + 2.0 ** -20 * mag
        else:
            tol = tol + 2.0 ** -20 * want.abs().max()
        assert (err <= tol).all(), (name, err.max().item(), (err / _ulp(want, got.dtype)).max().item())


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=["bf16_params", "fp32_params"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace_index"])
def test_bf16_d1_r5_tied_silu(p_dtype, inplace):
    """The reported case's shape, many rows and several seeds: every value within an ulp."""
    for seed in range(6):
        _check(*_problem(seed, 64, 1, 5, torch.bfloat16, p_dtype), inplace)


@pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=["bf16_params", "fp32_params"])
def test_cpu_extension_within_the_same_bounds(monkeypatch, p_dtype):
    """The extension's every-row edit of bf16 rows (lowrank_all.cpp) meets the bounds above."""
    monkeypatch.setenv(cpu_ext.ENV_VAR, "1")
    with ops_called() as names:
        for seed in range(6):
            _check(*_problem(seed, 64, 1, 5, torch.bfloat16, p_dtype), inplace=False)
        _check(*_problem(7, 40, 12, 3, torch.bfloat16, p_dtype), inplace=False)
    assert names == ["lowrank_all_fwd", "lowrank_all_bwd"] * 7


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block", [None, 24], ids=["one_block", "blocks_of_24"])
def test_lowp_wider_rows_and_blocks(monkeypatch, h_dtype, block):
    """d = 12, r = 3, fp32 parameters; with blocks of 24 elements (2 rows) the rows are converted
    in 20 blocks: the same bounds hold, and y and dh are bitwise those of one block."""
    problem = _problem(7, 40, 12, 3, h_dtype, torch.float32)
    if block is not None:
        monkeypatch.setattr(torch_impl, "_BLOCK_ELEMS", block)
    _check(*problem, inplace=False)
    h, B, A, a, gy = problem
    hl = h.clone().requires_grad_()
    y = rk.lowrank_edit(hl, B, A, a, B, act="silu", backend="torch")
    (dh,) = torch.autograd.grad(y, hl, gy)
    monkeypatch.setattr(torch_impl, "_BLOCK_ELEMS", 1 << 30)
    hl1 = h.clone().requires_grad_()
    y1 = rk.lowrank_edit(hl1, B, A, a, B, act="silu", backend="torch")
    (dh1,) = torch.autograd.grad(y1, hl1, gy)
    assert torch.equal(y, y1) and torch.equal(dh, dh1)


class _Shapes(TorchDispatchMode):
    """Records (dtype, shape) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, tuple(t.shape)))
        return out


def test_fp32_working_copies_stay_one_block(monkeypatch):
    """bf16 rows (64 x 32), blocks of 256 elements (8 rows): forward and backward create no fp32
    tensor of rows wider than one block; the (n, d) tensors are y and dh, in bf16."""
    monkeypatch.setattr(torch_impl, "_BLOCK_ELEMS", 256)
    n, d, r = 64, 32, 4
    h, B, A, a, gy = _problem(1, n, d, r, torch.bfloat16, torch.float32)
    hl = h.clone().requires_grad_()
    with _Shapes() as shapes:
        y = rk.lowrank_edit(hl, B, A, a, B, act="silu", backend="torch")
        torch.autograd.grad(y, hl, gy)
    fp32_rows = [shape for dtype, shape in shapes.seen if dtype == torch.float32 and shape[-1:] == (d,)
                 and shape != (r, d)]
    assert fp32_rows and max(s[0] for s in fp32_rows) <= 256 // d, fp32_rows
    assert all(dtype == torch.bfloat16 for dtype, shape in shapes.seen if shape == (n, d))


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_row_independent_latent_rounds_once(h_dtype):
    """LoBiReFT's pattern (``B`` and ``a`` only: ``y = h + a B``, one delta for every row) on
    low-precision rows: ``y`` is the float64 result rounded once (at most one ulp away, from fp32's
    own rounding of the delta), the parameter gradients fp32-accurate sums over the rows."""
    g = torch.Generator().manual_seed(3)
    n, d, r = 300, 48, 6
    h = torch.randn(n, d, generator=g).to(h_dtype)
    B = torch.randn(r, d, generator=g, requires_grad=True)
    a = torch.randn(r, generator=g, requires_grad=True)
    gy = torch.randn(n, d, generator=g).to(h_dtype)
    y = rk.lowrank_edit(h, B, a=a, backend="torch")
    dB, da = torch.autograd.grad(y, [B, a], gy)
    B64, a64 = B.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    y64 = h.double() + a64 @ B64
    dB64, da64 = torch.autograd.grad(y64, [B64, a64], gy.double())
    assert y.dtype == h_dtype
    assert ((y.double() - y64.detach()).abs() <= _ulp(y64.detach(), h_dtype)).all()
    torch.testing.assert_close(dB.double(), dB64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(da.double(), da64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("index", [[5, -1, 7, -1], [-1, 0, 3], [2, -1, -1, 0]])
def test_padding_entries_never_read_unlisted_rows(act, index):
    """Padding entries gather a listed row (put_selector), so a non-finite row that is not listed
    (a hidden state nobody edits, here row 0 or row 1) cannot reach the parameter gradients as
    0 x inf; everything matches the float64 reference on the finite rows."""
    torch.manual_seed(0)
    d, r = 16, 3
    h = torch.randn(8, d, dtype=F64)
    listed = [i for i in index if i >= 0]
    bad = next(i for i in range(8) if i not in listed)
    h[bad] = float("inf")
    p = {k: torch.randn(*s, dtype=F64, requires_grad=True) for k, s in (("B", (r, d)), ("A", (r, d)), ("a", (r,)))}
    idx = torch.tensor(index)
    x = h.clone().requires_grad_()
    y = rk.lowrank_edit_(x * 1.0, p["B"], p["A"], p["a"], p["B"], act=act, index=idx, backend="torch")
    g = torch.randn(8, d, dtype=F64)
    grads = torch.autograd.grad(y, [x, *p.values()], g)
    assert all(torch.isfinite(gr).all() for gr in grads[1:])
    # the reference, from the listed rows only
    rows = h[listed]
    act_fn = (lambda u: torch.nn.functional.gelu(u)) if act else (lambda u: u)
    pr = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    yr = rows + (act_fn(rows @ pr["A"].t() + pr["a"]) - rows @ pr["B"].t()) @ pr["B"]
    want = torch.autograd.grad(yr, list(pr.values()), g[listed])
    for got, ref in zip(grads[1:], want):
        torch.testing.assert_close(got, ref)
