"""RED: ``y = h * scale + bias`` over the last dimension (Wu et al., 2024).

Shapes: ``h`` (..., d); ``scale``, ``bias`` (d,), either may be None (scale only is IA3's form,
bias only is BitFit on activations). Output ``y`` has ``h``'s shape and dtype.

Numerics: the Triton kernels load every operand as fp32, compute ``fma(h, s, t)`` and round once
to ``h``'s dtype. RED's own code rounds twice (``h * s``, then ``+ t``), so in fp16/bf16 results may
differ from it in the last bit. Backward: ``dh = g * s``, ``ds = sum_rows(g * h)``,
``dt = sum_rows(g)``; the column sums are accumulated in fp32, per program over a fixed range of
rows, then summed over programs in a fixed order (no atomics: bitwise reproducible).

CUDA backend (``backend="cuda"``, opt-in): the kernels of ``csrc/red_fwd.cu`` and ``csrc/red_bwd.cu``
(same numerics; 16-byte vectors, the backward's partial sums finished by a fixed-order sum),
reached through the torch.library ops ``reft_kernels::red_fwd`` and ``reft_kernels::red_bwd``.

File layout: Triton kernels, their launchers, the PyTorch path, the CUDA ops, then
``RedFunction`` and ``red``.
"""
from __future__ import annotations

import torch

from . import _cuda, _triton
from ._backend import resolve_backend
from ._rows import acc_dtype, as_rows
from ._triton import cdiv, next_pow2, tl, triton
from ._validate import check_backend_dtype, check_hidden, check_param


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _red_fwd_kernel(
    h_ptr, s_ptr, t_ptr, y_ptr,
    n_rows, d,
    stride_h_row, stride_h_col, stride_y_row,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_D) tile of ``y = h * s + t``; grid (cdiv(N, BLOCK_M), cdiv(d, BLOCK_D))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :] * stride_h_col, mask=mask, other=0.0)
    y = h.to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            t = tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = tl.fma(y, s[None, :], t[None, :])
        else:
            y = y * s[None, :]
    elif HAS_BIAS:
        t = tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + t[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _red_bwd_kernel(
    g_ptr, h_ptr, s_ptr, dh_ptr, ds_part_ptr, dt_part_ptr,
    n_rows, d, rows_per_prog,
    stride_g_row, stride_g_col, stride_h_row, stride_h_col, stride_dh_row,
    HAS_SCALE: tl.constexpr, NEED_DH: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over ``(g, h)``: ``dh = g * s`` and fp32 partial column sums of ``g * h`` and ``g``.

    Grid (P, cdiv(d, BLOCK_D)): program (p, j) owns rows [p * rows_per_prog, (p+1) * rows_per_prog)
    (``rows_per_prog`` a multiple of BLOCK_M) and columns block j, and writes its partial sums to
    row p of the (P, d) buffers; the caller sums those P rows.
    """
    pid_p = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    if HAS_SCALE:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ds_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dt_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for m0 in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col,
                    mask=mask, other=0.0).to(tl.float32)
        if NEED_DS:
            h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :] * stride_h_col,
                        mask=mask, other=0.0).to(tl.float32)
            ds_acc += tl.sum(g * h, axis=0)
        if NEED_DT:
            dt_acc += tl.sum(g, axis=0)
        if NEED_DH:
            dh = g
            if HAS_SCALE:
                dh = g * s[None, :]
            tl.store(dh_ptr + rows[:, None] * stride_dh_row + cols[None, :],
                     dh.to(dh_ptr.dtype.element_ty), mask=mask)
    if NEED_DS:
        tl.store(ds_part_ptr + pid_p.to(tl.int64) * d + cols, ds_acc, mask=col_ok)
    if NEED_DT:
        tl.store(dt_part_ptr + pid_p.to(tl.int64) * d + cols, dt_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _red_tiles(d: int, on_gpu: bool):
    """(BLOCK_M, BLOCK_D, num_warps). GPU: 4096-element tiles, at most 512 columns wide, so each of
    128 threads moves 32 elements (several 16-byte vectors). Interpreter: bigger tiles, since every
    program costs a fixed Python overhead there. Not yet tuned on a GPU."""
    if on_gpu:
        block_d = min(next_pow2(d), 512)
        return max(1, 4096 // block_d), block_d, 4
    block_d = min(next_pow2(d), 256)
    return max(1, 8192 // block_d), block_d, 4


def _red_bwd_tiles(d: int, on_gpu: bool):
    """(BLOCK_M, BLOCK_D, num_warps) of the backward: each program loops over its rows in
    BLOCK_M-row steps, keeping two fp32 column accumulators of BLOCK_D. Not yet tuned on a GPU."""
    if on_gpu:
        return 16, min(next_pow2(d), 256), 4
    return 64, min(next_pow2(d), 128), 4


def _red_fwd_triton(h2, scale, bias):
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    if n == 0:
        return y
    block_m, block_d, warps = _red_tiles(d, h2.is_cuda)
    grid = (cdiv(n, block_m), cdiv(d, block_d))
    _red_fwd_kernel[grid](
        h2, scale if scale is not None else h2, bias if bias is not None else h2, y,
        n, d, h2.stride(0), h2.stride(1), y.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y


def _red_bwd_triton(g2, h2, scale, need_dh, need_ds, need_dt):
    """Return (dh or None, ds fp32 or None, dt fp32 or None)."""
    n, d = g2.shape
    dev = g2.device
    dh = torch.empty((n, d), dtype=g2.dtype, device=dev) if need_dh else None
    if n == 0:
        zeros = torch.zeros(d, dtype=torch.float32, device=dev)
        return dh, (zeros if need_ds else None), (zeros.clone() if need_dt else None)
    block_m, block_d, warps = _red_bwd_tiles(d, g2.is_cuda)
    n_dblocks = cdiv(d, block_d)
    progs, rows_per_prog = _triton.row_split(n, block_m, n_dblocks, dev)
    h2 = h2 if h2 is not None else g2  # only read when need_ds
    ds_part = torch.empty((progs, d), dtype=torch.float32, device=dev) if need_ds else None
    dt_part = torch.empty((progs, d), dtype=torch.float32, device=dev) if need_dt else None
    _red_bwd_kernel[(progs, n_dblocks)](
        g2, h2, scale if scale is not None else g2,
        dh if dh is not None else g2,
        ds_part if ds_part is not None else g2, dt_part if dt_part is not None else g2,
        n, d, rows_per_prog,
        g2.stride(0), g2.stride(1), h2.stride(0), h2.stride(1), d,
        HAS_SCALE=scale is not None, NEED_DH=need_dh, NEED_DS=need_ds, NEED_DT=need_dt,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    ds = ds_part.sum(0) if need_ds else None
    dt = dt_part.sum(0) if need_dt else None
    return dh, ds, dt


# ----------------------------------------------------------------------------- PyTorch path

def _red_fwd_torch(h2, scale, bias):
    s = scale.to(h2.dtype) if scale is not None else None
    t = bias.to(h2.dtype) if bias is not None else None
    if s is not None and t is not None:
        return torch.addcmul(t, h2, s)
    if s is not None:
        return h2 * s
    if t is not None:
        return h2 + t
    return h2.clone()


def _red_bwd_torch(g2, h2, scale, need_dh, need_ds, need_dt):
    """Memory-lean backward: the only (N, d) tensor allocated is ``dh`` (whose storage first holds
    ``g * h`` for the ``ds`` reduction)."""
    acc = acc_dtype(g2.dtype)
    dh = ds = dt = None
    buf = None
    if need_ds:
        buf = torch.mul(g2, h2)
        ds = buf.sum(0, dtype=acc)
    if need_dt:
        dt = g2.sum(0, dtype=acc)
    if need_dh:
        if scale is None:
            dh = g2
        elif buf is not None:
            dh = torch.mul(g2, scale.to(g2.dtype), out=buf)
        else:
            dh = g2 * scale.to(g2.dtype)
    return dh, ds, dt


# ----------------------------------------------------------------------------- CUDA ops

# torch.library ops over (n, d) row matrices. CUDA tensors run reft_kernels._C; other devices
# run the PyTorch path (so the registration and fake implementations are testable anywhere).
# Outputs that were not asked for are empty tensors. ds/dt are in the accumulation dtype.

@torch.library.custom_op("reft_kernels::red_fwd", mutates_args=(),
                         schema="(Tensor h2, Tensor? scale, Tensor? bias) -> Tensor")
def _red_fwd_op(h2, scale, bias):
    return _red_fwd_torch(h2, scale, bias).contiguous()


@_red_fwd_op.register_kernel("cuda")
def _red_fwd_op_cuda(h2, scale, bias):
    return _cuda.extension().red_fwd(h2, scale, bias)


@_red_fwd_op.register_fake
def _red_fwd_op_fake(h2, scale, bias):
    return h2.new_empty(h2.shape)


@torch.library.custom_op(
    "reft_kernels::red_bwd", mutates_args=(),
    schema="(Tensor g2, Tensor? h2, Tensor? scale, bool need_dh, bool need_ds, bool need_dt) -> (Tensor, Tensor, Tensor)",
)
def _red_bwd_op(g2, h2, scale, need_dh, need_ds, need_dt):
    dh, ds, dt = _red_bwd_torch(g2, h2, scale, need_dh, need_ds, need_dt)
    if need_dh and (dh is g2 or not dh.is_contiguous()):  # an op's output may not alias its input
        dh = dh.clone(memory_format=torch.contiguous_format)
    empty = _cuda.empty(g2, acc_dtype(g2.dtype))
    return (dh if need_dh else _cuda.empty(g2)), (ds if need_ds else empty), (dt if need_dt else empty.clone())


@_red_bwd_op.register_kernel("cuda")
def _red_bwd_op_cuda(g2, h2, scale, need_dh, need_ds, need_dt):
    return tuple(_cuda.extension().red_bwd(g2, h2, scale, need_dh, need_ds, need_dt))


@_red_bwd_op.register_fake
def _red_bwd_op_fake(g2, h2, scale, need_dh, need_ds, need_dt):
    acc = acc_dtype(g2.dtype)
    d = g2.shape[1]
    return (g2.new_empty(g2.shape) if need_dh else g2.new_empty((0,)),
            g2.new_empty((d,) if need_ds else (0,), dtype=acc),
            g2.new_empty((d,) if need_dt else (0,), dtype=acc))


def _unit_cols(t):
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def _red_fwd_cuda(h2, scale, bias):
    scale, bias = _cuda.kernel_params(h2.dtype, scale, bias)
    return _red_fwd_op(_unit_cols(h2), scale, bias)


def _red_bwd_cuda(g2, h2, scale, need_dh, need_ds, need_dt):
    (scale,) = _cuda.kernel_params(g2.dtype, scale)
    dh, ds, dt = _red_bwd_op(_unit_cols(g2), _unit_cols(h2), scale, need_dh, need_ds, need_dt)
    return (_cuda.if_needed(dh, need_dh), _cuda.if_needed(ds, need_ds), _cuda.if_needed(dt, need_dt))


_RED_FWD = {"triton": _red_fwd_triton, "cuda": _red_fwd_cuda, "torch": _red_fwd_torch}
_RED_BWD = {"triton": _red_bwd_triton, "cuda": _red_bwd_cuda, "torch": _red_bwd_torch}


# ----------------------------------------------------------------------------- autograd + API

class RedFunction(torch.autograd.Function):
    """Autograd Function for ``red``; ``backend`` is "triton", "cuda" or "torch"."""

    @staticmethod
    def forward(ctx, h, scale, bias, backend):
        h2 = as_rows(h)
        y2 = _RED_FWD[backend](h2, scale, bias)
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, scale)
        return y2.reshape(h.shape)

    @staticmethod
    def backward(ctx, g):
        h, scale = ctx.saved_tensors
        need_dh, need_ds, need_dt = ctx.needs_input_grad[:3]
        g2 = as_rows(g)
        h2 = as_rows(h) if need_ds else None
        dh, ds, dt = _RED_BWD[ctx.backend](g2, h2, scale, need_dh, need_ds, need_dt)
        if dh is not None:
            dh = dh.reshape(g.shape)
        if ds is not None:
            ds = ds.to(scale.dtype)
        if dt is not None:
            dt = dt.to(ctx.bias_dtype)
        return dh, ds, dt, None


def red(h, scale=None, bias=None, *, backend=None):
    """RED edit ``y = h * scale + bias`` of ``h`` (..., d) with ``scale``, ``bias`` of shape (d,).

    Either parameter may be None. ``y`` has ``h``'s shape and dtype; gradients come back in each
    tensor's own dtype (parameters may be in another dtype than ``h``, e.g. fp32 with bf16 ``h``).
    ``backend``: None (default dispatch), "triton", "cuda" or "torch"; see ``reft_kernels._backend``.
    """
    d = check_hidden(h)
    check_param(scale, "scale", (d,), h, optional=True)
    check_param(bias, "bias", (d,), h, optional=True)
    be = resolve_backend(backend, h.device)
    check_backend_dtype(be, h)
    if be in ("triton", "cuda"):
        scale = scale.contiguous() if scale is not None else None
        bias = bias.contiguous() if bias is not None else None
    return RedFunction.apply(h, scale, bias, be)
