"""RED's CUDA C++ backend (``backend="cuda"``, opt-in): the kernels of ``csrc/red_fwd.cu`` and
``csrc/red_bwd.cu`` (the Triton kernels' numerics; 16-byte vectors, the backward's partial sums
finished by a fixed-order sum), reached through the torch.library ops ``reft_kernels::red_fwd``
and ``reft_kernels::red_bwd`` over (n, d) row matrices.

The ops run ``reft_kernels._C`` on CUDA tensors and the PyTorch path (``torch_impl``) on other
devices, so their registration and fake implementations are testable anywhere. Outputs that
were not asked for are empty tensors; ds/dt are in the accumulation dtype.

The backward's ds and dt are fp32 partial column sums per row block, finished by the extension's
fixed-order sum (no torch reduction, no atomics), whose kernel ``reft_kernels.kernels(cuda_finish=
"serial" | "split")`` chooses (``_cuda.finish_kernel``): read when the CUDA kernel is called (with
torch.compile, at run time: the op is opaque to the trace) and passed to the extension, which
reads no environment.
"""
from __future__ import annotations

import torch

from ... import _cuda
from ..._rows import acc_dtype
from . import torch_impl


@torch.library.custom_op("reft_kernels::red_fwd", mutates_args=(),
                         schema="(Tensor h2, Tensor? scale, Tensor? bias) -> Tensor")
def red_fwd_op(h2, scale, bias):
    return torch_impl.fwd(h2, scale, bias).contiguous()


@red_fwd_op.register_kernel("cuda")
def red_fwd_kernel(h2, scale, bias):
    return _cuda.extension().red_fwd(h2, scale, bias)


@red_fwd_op.register_fake
def _red_fwd_fake(h2, scale, bias):
    return h2.new_empty(h2.shape)


@torch.library.custom_op(
    "reft_kernels::red_bwd", mutates_args=(),
    schema="(Tensor g2, Tensor? h2, Tensor? scale, bool need_dh, bool need_ds, bool need_dt) -> (Tensor, Tensor, Tensor)",
)
def red_bwd_op(g2, h2, scale, need_dh, need_ds, need_dt):
    dh, ds, dt = torch_impl.bwd(g2, h2, scale, need_dh, need_ds, need_dt)
    if need_dh and (dh is g2 or not dh.is_contiguous()):  # an op's output may not alias its input
        dh = dh.clone(memory_format=torch.contiguous_format)
    empty = _cuda.empty(g2, acc_dtype(g2.dtype))
    return (dh if need_dh else _cuda.empty(g2)), (ds if need_ds else empty), (dt if need_dt else empty.clone())


@red_bwd_op.register_kernel("cuda")
def red_bwd_kernel(g2, h2, scale, need_dh, need_ds, need_dt):
    finish_split = _cuda.finish_kernel() == "split"
    return tuple(_cuda.extension().red_bwd(g2, h2, scale, need_dh, need_ds, need_dt, finish_split))


@red_bwd_op.register_fake
def _red_bwd_fake(g2, h2, scale, need_dh, need_ds, need_dt):
    acc = acc_dtype(g2.dtype)
    d = g2.shape[1]
    return (g2.new_empty(g2.shape) if need_dh else g2.new_empty((0,)),
            g2.new_empty((d,) if need_ds else (0,), dtype=acc),
            g2.new_empty((d,) if need_dt else (0,), dtype=acc))


def _unit_cols(t):
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def fwd(h2, scale, bias):
    """(n, d) rows -> y (n, d) in h2's dtype."""
    scale, bias = _cuda.kernel_params(h2.dtype, scale, bias)
    return _cuda.call_op(red_fwd_op, red_fwd_kernel, _unit_cols(h2), scale, bias)


def bwd(g2, h2, scale, need_dh, need_ds, need_dt):
    """Return (dh or None, ds fp32 or None, dt fp32 or None)."""
    (scale,) = _cuda.kernel_params(g2.dtype, scale)
    dh, ds, dt = _cuda.call_op(red_bwd_op, red_bwd_kernel, _unit_cols(g2), _unit_cols(h2), scale, need_dh, need_ds,
                       need_dt)
    return (_cuda.if_needed(dh, need_dh), _cuda.if_needed(ds, need_ds), _cuda.if_needed(dt, need_dt))
