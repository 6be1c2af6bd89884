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
from .._autograd import autocast_off_for, direct_apply, once_differentiable
from . import torch_impl, triton_impl

_RED_FWD = {"triton": triton_impl.red_fwd, "torch": torch_impl.red_fwd}
_FWD = {"triton": triton_impl.fwd, "torch": torch_impl.fwd}


def _red_fwd(backend, h2, scale, bias, ids):
    """The backend's RED forward on rows ``h2`` (N, d); ids one per row or one per group of rows
    (``torch_impl.red_fwd``), the Triton kernel taking them one per row."""
    if backend == "triton" and ids.shape[0] != h2.shape[0]:
        ids = ids.repeat_interleave(h2.shape[0] // max(ids.shape[0], 1))
    return _RED_FWD[backend](h2, scale, bias, ids)


class RedMultiFunction(torch.autograd.Function):
    """``apply(h, scale, bias, ids, backend)``: ``y = h * scale[ids] + bias[ids]`` row by row, or
    sequence by sequence for (B,) ids (rows with id -1 unchanged). Saves ``h`` by reference
    (only when ``scale`` needs a gradient), the scale stack and the ids."""

    @staticmethod
    def forward(ctx, h, scale, bias, ids, backend):
        with autocast_off_for(h):
            y2 = _red_fwd(backend, as_rows(h), scale, bias, ids)
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
        with autocast_off_for(g):
            dh, ds, dt = torch_impl.red_bwd(as_rows(g), as_rows(h) if need_ds else None, scale, ids, ctx.k,
                                            need_dh, need_ds, need_dt)
        dh = dh.reshape(g.shape) if dh is not None else None
        ds = ds.to(ctx.dtypes[0]) if ds is not None else None
        dt = dt.to(ctx.dtypes[1]) if dt is not None else None
        return dh, ds, dt, None, None


_apply_red = direct_apply(RedMultiFunction)


def red_run(h, scale, bias, ids, backend):
    """RED with stacked adapters: the Function (through ``direct_apply`` outside
    ``torch.compile``), or the forward alone when no gradient is needed."""
    if torch.is_grad_enabled() and (h.requires_grad or (scale is not None and scale.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        if not torch.compiler.is_compiling():
            return _apply_red(h, scale, bias, ids, backend)
        return RedMultiFunction.apply(h, scale, bias, ids, backend)
    with autocast_off_for(h):
        return _red_fwd(backend, as_rows(h), scale, bias, ids).reshape(h.shape)


class LowrankMultiFunction(torch.autograd.Function):
    """``apply(h, A, a, B, C, c, ids, spec, index)``: the low-rank edit with each row's (or index
    entry's) own adapter, stacks (K, r, d) / (K, r). Like ``LowrankEditFunction``: ``index`` None
    is out of place over every row; with ``index`` the listed rows of ``h`` are edited in place
    (``ctx.mark_dirty``). ``C`` is None when ``spec.tied``. Saved: ``h`` or the listed rows, the
    ids, the compact (n, r) latent ``z`` (and ``u`` for a non-identity act), the stacks."""

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, ids, spec, index):
        return _forward(ctx, h, A, a, B, C, c, ids, spec, index, True)

    @staticmethod
    @once_differentiable("reft_kernels.lowrank_edit_multi")
    def backward(ctx, g):
        x, index, ids, z, u, A, B, C = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:6])
        with autocast_off_for(g):
            dh, grads = torch_impl.bwd(g, x, index, ids, A, B, C, z, u, ctx.spec, need)
        grads = tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))
        return (dh, *grads, None, None, None)


def _forward(ctx, h, A, a, B, C, c, ids, spec, index, dirty):
    ctx.spec = spec
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (A, a, B, C, c))
    with autocast_off_for(h):
        out, z, u, hsave = _FWD[spec.backend](h, index, ids, A, a, B, C, c, spec, spec.act != IDENTITY)
    if index is not None:
        if dirty:
            ctx.mark_dirty(h)
        ctx.save_for_backward(hsave, index, ids, z, u, A, B, C)
        return out
    ctx.save_for_backward(h, None, ids, z, u, A, B, C)
    return out.view(h.shape)


class LowrankMultiCopyFunction(LowrankMultiFunction):
    """The out-of-place edit of the rows ``index`` (``lowrank_edit_multi`` with an index): as
    ``LowrankMultiFunction`` with an index, on a contiguous copy of ``h`` that the forward makes
    and returns; one autograd node instead of a clone's plus an in-place edit's, as
    ``LowrankEditCopyFunction``. Eager calls only (``lowrank_run_copy``)."""

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, ids, spec, index):
        return _forward(ctx, h.clone(memory_format=torch.contiguous_format), A, a, B, C, c, ids, spec, index, False)


_apply = direct_apply(LowrankMultiFunction)
_apply_copy = direct_apply(LowrankMultiCopyFunction)


def _needs_grad(h, A, a, B, C, c) -> bool:
    """Grad mode on and some input requiring grad (written out: this runs on every call)."""
    return torch.is_grad_enabled() and (
        h.requires_grad or B.requires_grad or (A is not None and A.requires_grad)
        or (a is not None and a.requires_grad) or (C is not None and C.requires_grad)
        or (c is not None and c.requires_grad))


def lowrank_run(h, A, a, B, C, c, ids, spec, index):
    """The multi-adapter low-rank edit on ``spec.backend``: the Function (through
    ``direct_apply`` outside ``torch.compile``; the public functions refuse transforms), or,
    when no gradient will be needed, the backend's forward alone (no autograd node, nothing
    saved)."""
    if _needs_grad(h, A, a, B, C, c):
        if not torch.compiler.is_compiling():
            return _apply(h, A, a, B, C, c, ids, spec, index)
        return LowrankMultiFunction.apply(h, A, a, B, C, c, ids, spec, index)
    with autocast_off_for(h):
        out, _, _, _ = _FWD[spec.backend](h, index, ids, A, a, B, C, c, spec, False)
    if index is None:
        return out.view(h.shape)
    if spec.backend != "torch":  # a kernel wrote h behind autograd's back: bump its version
        torch.autograd.graph.increment_version(h)
    return out


def lowrank_run_copy(h, A, a, B, C, c, ids, spec, index):
    """``lowrank_run`` out of place with an index (not None): a new tensor, ``h`` with the listed
    rows edited (``LowrankMultiCopyFunction`` in eager calls that need a gradient, else
    ``lowrank_run`` on a copy: under torch.compile the clone stays outside the Function, as
    ``ops/lowrank_edit/function.run_copy`` explains)."""
    if _needs_grad(h, A, a, B, C, c) and not torch.compiler.is_compiling():
        return _apply_copy(h, A, a, B, C, c, ids, spec, index)
    return lowrank_run(h.clone(memory_format=torch.contiguous_format), A, a, B, C, c, ids, spec, index)
