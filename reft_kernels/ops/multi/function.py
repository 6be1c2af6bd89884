"""The autograd Functions of the multi-adapter ops: ``RedMultiFunction`` and
``LowrankMultiFunction``, over the backends of this folder (forward: ``triton_impl`` or
``torch_impl``; backward: ``torch_impl`` on both). The public functions (``reft_kernels.multi``)
check the inputs and pick the backend; these only run it. Both run outside autocast and support
one backward (``reft_kernels.ops._autograd``).
"""
from __future__ import annotations

import torch

from ..._constants import IDENTITY
from ..._rows import as_rows
from .._autograd import autocast_off, once_differentiable
from . import torch_impl, triton_impl

_RED_FWD = {"triton": triton_impl.red_fwd, "torch": torch_impl.red_fwd}
_FWD = {"triton": triton_impl.fwd, "torch": torch_impl.fwd}


class RedMultiFunction(torch.autograd.Function):
    """``apply(h, scale, bias, ids, backend)``: ``y = h * scale[ids] + bias[ids]`` row by row (rows
    with id -1 unchanged). Saves ``h`` by reference (only when ``scale`` needs a gradient), the
    scale stack and the ids."""

    @staticmethod
    def forward(ctx, h, scale, bias, ids, backend):
        with autocast_off(h.device.type):
            y2 = _RED_FWD[backend](as_rows(h), scale, bias, ids)
        stack = scale if scale is not None else bias
        ctx.k = stack.shape[0]
        ctx.dtypes = (scale.dtype if scale is not None else None, bias.dtype if bias is not None else None)
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, scale, ids)
        return y2.reshape(h.shape)

    @staticmethod
    @once_differentiable("reft_kernels.red_multi")
    def backward(ctx, g):
        h, scale, ids = ctx.saved_tensors
        need_dh, need_ds, need_dt = ctx.needs_input_grad[:3]
        with autocast_off(g.device.type):
            dh, ds, dt = torch_impl.red_bwd(as_rows(g), as_rows(h) if need_ds else None, scale, ids, ctx.k,
                                            need_dh, need_ds, need_dt)
        dh = dh.reshape(g.shape) if dh is not None else None
        ds = ds.to(ctx.dtypes[0]) if ds is not None else None
        dt = dt.to(ctx.dtypes[1]) if dt is not None else None
        return dh, ds, dt, None, None


def red_run(h, scale, bias, ids, backend):
    """RED with stacked adapters: the Function, or the forward alone when no gradient is needed."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, scale, bias)):
        return RedMultiFunction.apply(h, scale, bias, ids, backend)
    with autocast_off(h.device.type):
        return _RED_FWD[backend](as_rows(h), scale, bias, ids).reshape(h.shape)


class LowrankMultiFunction(torch.autograd.Function):
    """``apply(h, A, a, B, C, c, ids, spec, index)``: the low-rank edit with each row's (or index
    entry's) own adapter, stacks (K, r, d) / (K, r). Like ``LowrankEditFunction``: ``index`` None
    is out of place over every row; with ``index`` the listed rows of ``h`` are edited in place
    (``ctx.mark_dirty``). ``C`` is None when ``spec.tied``. Saved: ``h`` or the listed rows, the
    ids, the compact (n, r) latent ``z`` (and ``u`` for a non-identity act), the stacks."""

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, ids, spec, index):
        ctx.spec = spec
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (A, a, B, C, c))
        with autocast_off(h.device.type):
            out, z, u, hsave = _FWD[spec.backend](h, index, ids, A, a, B, C, c, spec, spec.act != IDENTITY)
        if index is not None:
            ctx.mark_dirty(h)
            ctx.save_for_backward(hsave, index, ids, z, u, A, B, C)
            return out
        ctx.save_for_backward(h, None, ids, z, u, A, B, C)
        return out.view(h.shape)

    @staticmethod
    @once_differentiable("reft_kernels.lowrank_edit_multi")
    def backward(ctx, g):
        x, index, ids, z, u, A, B, C = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:6])
        with autocast_off(g.device.type):
            dh, grads = torch_impl.bwd(g, x, index, ids, A, B, C, z, u, ctx.spec, need)
        grads = tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))
        return (dh, *grads, None, None, None)


def lowrank_run(h, A, a, B, C, c, ids, spec, index):
    """The multi-adapter low-rank edit on ``spec.backend``: the Function, or, when no gradient
    will be needed, the backend's forward alone (no autograd node, nothing saved)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, A, a, B, C, c)):
        return LowrankMultiFunction.apply(h, A, a, B, C, c, ids, spec, index)
    with autocast_off(h.device.type):
        out, _, _, _ = _FWD[spec.backend](h, index, ids, A, a, B, C, c, spec, False)
    if index is None:
        return out.view(h.shape)
    if spec.backend != "torch":  # a kernel wrote h behind autograd's back: bump its version
        torch.autograd.graph.increment_version(h)
    return out
