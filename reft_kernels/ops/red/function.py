"""``RedFunction``: the autograd Function of RED, ``y = h * scale + bias``, over the backends of
this folder (``triton_impl.py``, ``torch_impl.py``, ``cuda_impl.py``).

Every backend works on (n, d) row matrices: ``fwd(h2, scale, bias) -> y2`` and
``bwd(g2, h2, scale, need_dh, need_ds, need_dt) -> (dh, ds, dt)``, each output None when not
needed, ``ds``/``dt`` in a floating dtype of the backend's choosing (fp32 accumulation; the
Function casts them to the parameters' dtypes), the column sums reduced in a fixed order.
Saved for the backward: ``h`` by reference (only when ``scale`` needs a gradient) and ``scale``.
Runs outside autocast and supports one backward (see ``reft_kernels.ops._autograd``).
"""
from __future__ import annotations

import torch

from ..._rows import as_rows
from .._autograd import autocast_off, once_differentiable
from . import cuda_impl, torch_impl, triton_impl

_FWD = {"triton": triton_impl.fwd, "cuda": cuda_impl.fwd, "torch": torch_impl.fwd}
_BWD = {"triton": triton_impl.bwd, "cuda": cuda_impl.bwd, "torch": torch_impl.bwd}


class RedFunction(torch.autograd.Function):
    """Autograd Function for ``red``; ``apply(h, scale, bias, backend)`` with ``backend`` one of
    "triton", "cuda", "torch"."""

    @staticmethod
    def forward(ctx, h, scale, bias, backend):
        with autocast_off(h.device.type):
            y2 = _FWD[backend](as_rows(h), scale, bias)
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, scale)
        return y2.reshape(h.shape)

    @staticmethod
    @once_differentiable("reft_kernels.red")
    def backward(ctx, g):
        h, scale = ctx.saved_tensors
        need_dh, need_ds, need_dt = ctx.needs_input_grad[:3]
        g2 = as_rows(g)
        h2 = as_rows(h) if need_ds else None
        with autocast_off(g.device.type):
            dh, ds, dt = _BWD[ctx.backend](g2, h2, scale, need_dh, need_ds, need_dt)
        if dh is not None:
            dh = dh.reshape(g.shape)
        if ds is not None:
            ds = ds.to(scale.dtype)
        if dt is not None:
            dt = dt.to(ctx.bias_dtype)
        return dh, ds, dt, None


def run(h, scale, bias, backend):
    """RED on ``backend``: ``RedFunction.apply``, or, when no gradient will be needed (grad mode
    off, or no input requires grad), the backend's forward alone: no autograd node and nothing
    saved. (Not named ``apply``: that is the Function's.)"""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, scale, bias)):
        return RedFunction.apply(h, scale, bias, backend)
    with autocast_off(h.device.type):
        return _FWD[backend](as_rows(h), scale, bias).reshape(h.shape)
