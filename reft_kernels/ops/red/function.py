"""``RedFunction``: the autograd Function of RED, ``y = h * scale + bias``, over the backends of
this folder (``triton_impl.py``, ``torch_impl.py``, ``cuda_impl.py``).

Every backend works on (n, d) row matrices: ``fwd(h2, scale, bias) -> y2`` and
``bwd(g2, h2, scale, need_dh, need_ds, need_dt) -> (dh, ds, dt)``, each output None when not
needed, ``ds``/``dt`` in a floating dtype of the backend's choosing (fp32 accumulation; the
Function casts them to the parameters' dtypes), the column sums reduced in a fixed order.
Saved for the backward: ``h`` by reference (only when ``scale`` needs a gradient) and ``scale``.
Runs outside autocast and supports one backward (see ``reft_kernels.ops._autograd``).

Per-call cost: RED is a sub-0.1 ms op at the sizes of a layer on a CPU, so the Python around
the kernel counts. The Function skips what is a no-op in the common case (the row view of a
2-D ``h``, the reshape back, casts to the dtype a tensor already has, the autocast context when
autocast is off) and ``run`` applies it through ``direct_apply`` outside transforms and
``torch.compile``. Measured on the 2-core CPU (one thread), (8, 4) fp32 inputs requiring grad,
forward: ``rk.red`` 20.6 us per call before, 10.0 us after, eager ``h * s + t`` about 5 us (at
N = 1024, d = 256 the one ``addcmul`` against eager's two ops then wins: 39 us against 59 us).
"""
from __future__ import annotations

import torch

from ..._rows import as_rows
from .._autograd import autocast_off_for, direct_apply, once_differentiable, plain_call, unwrap_if_dead
from . import cuda_impl, torch_impl, triton_impl

_FWD = {"triton": triton_impl.fwd, "cuda": cuda_impl.fwd, "torch": torch_impl.fwd}
_BWD = {"triton": triton_impl.bwd, "cuda": cuda_impl.bwd, "torch": torch_impl.bwd}


def _rows(t):
    return t if t.dim() == 2 else as_rows(t)


def _shaped(y2, like):
    """``y2`` (n, d) in ``like``'s shape (no call when ``like`` is already 2-D)."""
    return y2 if like.dim() == 2 else y2.reshape(like.shape)


class RedFunction(torch.autograd.Function):
    """Autograd Function for ``red``; ``apply(h, scale, bias, backend)`` with ``backend`` one of
    "triton", "cuda", "torch"."""

    @staticmethod
    def forward(ctx, h, scale, bias, backend):
        with autocast_off_for(h):
            y2 = _FWD[backend](_rows(h), scale, bias)
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, scale)
        return _shaped(y2, h)

    @staticmethod
    @once_differentiable("reft_kernels.red")
    def backward(ctx, g):
        h, scale = ctx.saved_tensors
        need_dh, need_ds, need_dt = ctx.needs_input_grad[:3]
        with autocast_off_for(g):
            dh, ds, dt = _BWD[ctx.backend](_rows(g), _rows(h) if need_ds else None, scale, need_dh, need_ds,
                                           need_dt)
        if dh is not None:
            dh = _shaped(dh, g)
        if ds is not None and ds.dtype != scale.dtype:
            ds = ds.to(scale.dtype)
        if dt is not None and dt.dtype != ctx.bias_dtype:
            dt = dt.to(ctx.bias_dtype)
        return dh, ds, dt, None


_apply = direct_apply(RedFunction)


def run(h, scale, bias, backend):
    """RED on ``backend``: ``RedFunction.apply``, or, when no gradient will be needed (grad mode
    off, or no input requires grad), the backend's forward alone: no autograd node and nothing
    saved. (Not named ``apply``: that is the Function's.)"""
    if torch.is_grad_enabled() and (h.requires_grad or (scale is not None and scale.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        if plain_call():
            return _apply(unwrap_if_dead(h), None if scale is None else unwrap_if_dead(scale),
                          None if bias is None else unwrap_if_dead(bias), backend)
        return RedFunction.apply(h, scale, bias, backend)
    with autocast_off_for(h):
        return _shaped(_FWD[backend](_rows(h), scale, bias), h)
