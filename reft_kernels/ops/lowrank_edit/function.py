"""``LowrankEditFunction``: the autograd Function of the low-rank edit, over the backends of this
folder, which all follow ``contract.py``.

Files: ``triton_impl.py`` (Triton kernels and launchers), ``torch_impl.py`` (PyTorch ops; the
CPU path), ``cuda_impl.py`` (the CUDA C++ extension through torch.library ops). The public
functions ``lowrank_edit`` / ``lowrank_edit_`` (``reft_kernels.functional``) check the inputs and
pick the backend; this Function only runs it.

Per-call cost: at the sizes of a layer on a CPU the op is a sub-0.1 ms call, so the Python
around it counts: the Function reads each input's dtype without a generator, casts gradients only
where the dtype differs, skips the autocast context when autocast is off, and ``run`` applies it
through ``direct_apply`` outside transforms and ``torch.compile`` (see ``ops._autograd``).
"""
from __future__ import annotations

import torch

from ..._constants import IDENTITY
from .._autograd import autocast_off_for, direct_apply, once_differentiable, plain_call, unwrap_if_dead
from ..._rows import acc_dtype, as_rows
from . import cuda_impl, torch_constant, torch_impl, triton_impl

_FWD = {"triton": triton_impl.fwd, "cuda": cuda_impl.fwd, "torch": torch_impl.fwd}
_BWD = {"triton": triton_impl.bwd, "cuda": cuda_impl.bwd, "torch": torch_impl.bwd}


def _as(t, dtype):
    """``t`` in ``dtype`` (no call when it has it already: a no-op ``.to`` still dispatches)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _shaped(out, h):
    """The (N, d) output in ``h``'s shape (``out`` itself when ``h`` is 2-D)."""
    return out if h.dim() == 2 else out.view(h.shape)


class LowrankEditFunction(torch.autograd.Function):
    """Autograd Function for the low-rank edit; ``apply(h, A, a, B, C, c, spec, index)``.

    ``index`` None: out of place over every row, returns a new tensor shaped like ``h``.
    ``index`` given: edits the listed rows of ``h`` in place (``ctx.mark_dirty``) and returns
    ``h``. ``C`` is None when ``spec.tied`` (``C is B``): ``B``'s gradient then carries both of its
    terms. Saved for the backward (``contract.py``): ``h`` by reference, or ``hsave`` (n, d) with
    the index; the (n, r) latent ``z``; ``u`` (n, r) for a non-identity act; the parameters.
    Runs outside autocast and supports one backward (see ``reft_kernels.ops._autograd``).
    """

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, spec, index):
        return _forward(ctx, h, A, a, B, C, c, spec, index, True)

    @staticmethod
    @once_differentiable("reft_kernels.lowrank_edit")
    def backward(ctx, g):
        x, index, z, u, A, B, C = ctx.saved_tensors
        # (dh, dA, da, dB, dC, dc); with spec.tied, C is None and dB carries both of B's terms
        need = tuple(ctx.needs_input_grad[:6])
        with autocast_off_for(g):
            dh, grads = _BWD[ctx.spec.backend](g, x, index, A, B, C, z, u, ctx.spec, need)
        dA, da, dB, dC, dc = grads
        tA, ta, tB, tC, tc = ctx.dtypes
        return dh, _as(dA, tA), _as(da, ta), _as(dB, tB), _as(dC, tC), _as(dc, tc), None, None


def _forward(ctx, h, A, a, B, C, c, spec, index, dirty):
    ctx.spec = spec
    ctx.dtypes = (None if A is None else A.dtype, None if a is None else a.dtype, B.dtype,
                  None if C is None else C.dtype, None if c is None else c.dtype)
    with autocast_off_for(h):
        out, z, u, hsave = _FWD[spec.backend](h, index, A, a, B, C, c, spec, spec.act != IDENTITY)
    if index is not None:
        if dirty:
            ctx.mark_dirty(h)
        ctx.save_for_backward(hsave, index, z, u, A, B, C)
        return out
    ctx.save_for_backward(h, None, z, u, A, B, C)
    return _shaped(out, h)


class LowrankEditCopyFunction(LowrankEditFunction):
    """The out-of-place edit of the rows ``index`` (``lowrank_edit`` with an index): as
    ``LowrankEditFunction`` with an index, on a contiguous copy of ``h`` that the forward makes
    and returns (the backward is the same: ``dh`` is ``g`` with the listed rows updated). One
    autograd node instead of a clone's plus an in-place edit's (``mark_dirty`` rewrites the
    clone's history): 2 us of the 103 us that the forward took at f7+l7 over 2 sequences (N =
    256, 28 rows) on the 2-core CPU (one thread); with the one-lookup row plan of
    ``torch_impl.fwd`` it takes 85 us there, against 77 us for pyvene's eager
    gather-edit-scatter (side by side, minimum over 11 interleaved rounds)."""

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, spec, index):
        return _forward(ctx, h.clone(memory_format=torch.contiguous_format), A, a, B, C, c, spec, index, False)


class ConstantLatentFunction(torch.autograd.Function):
    """The low-rank edit on the PyTorch backend over every row when its latent is one row for
    every row (no ``A``, no ``C``: LoBiReFT ``h + b R`` and the other ``a``/``c``-only term
    patterns, ``torch_constant``); ``apply(h, a, B, c, spec)``.

    The generic Function's math for this case (``torch_constant``) with less around it: four
    tensor arguments instead of six, the (r,) latent row saved instead of (n, r) views of it, no
    ``h`` saved (``dh = g``). LoBiReFT is the one method whose whole edit is a broadcast add, as
    cheap as eager's ``h + b @ R``, so the per-call cost decides against it. Measured side by
    side on the 2-core CPU (one thread, minimum over 11 interleaved rounds) at N = 2048, d = 256,
    r = 8: forward 118 us before this Function and the other per-call trims, 80 us after, eager
    64 us; forward + backward 344 us, 239 us, eager 223 us.
    """

    @staticmethod
    def forward(ctx, h, a, B, c, spec):
        acc = acc_dtype(h.dtype)
        with autocast_off_for(h):
            y, z_row, u_row = torch_constant.fwd_every_row(_rows(h), _as(a, acc), _as(B, acc), _as(c, acc), spec)
        ctx.spec = spec
        ctx.dtypes = (None if a is None else a.dtype, B.dtype, None if c is None else c.dtype)
        ctx.save_for_backward(z_row, u_row, B)
        return _shaped(y, h)

    @staticmethod
    @once_differentiable("reft_kernels.lowrank_edit")
    def backward(ctx, g):
        z_row, u_row, B = ctx.saved_tensors
        need_dh, need_da, need_db, need_dc = ctx.needs_input_grad[:4]
        with autocast_off_for(g):
            _, da, dB, _, dc = torch_constant.param_grads(
                _rows(g), z_row, u_row, _as(B, acc_dtype(g.dtype)), ctx.spec,
                (False, False, need_da, need_db, False, need_dc))
        ta, tB, tc = ctx.dtypes
        return (g if need_dh else None), _as(da, ta), _as(dB, tB), _as(dc, tc), None


def _rows(t):
    return t if t.dim() == 2 else as_rows(t)


_apply = direct_apply(LowrankEditFunction)
_apply_copy = direct_apply(LowrankEditCopyFunction)
_apply_constant = direct_apply(ConstantLatentFunction)


def _run_constant(h, a, B, c, spec):
    """``run`` for ``ConstantLatentFunction``'s case (PyTorch backend, every row, no A or C)."""
    if _needs_grad(h, None, a, B, None, c):
        if plain_call():
            return _apply_constant(unwrap_if_dead(h), _unwrap(a), unwrap_if_dead(B), _unwrap(c), spec)
        return ConstantLatentFunction.apply(h, a, B, c, spec)
    acc = acc_dtype(h.dtype)
    with autocast_off_for(h):
        y, _, _ = torch_constant.fwd_every_row(_rows(h), _as(a, acc), _as(B, acc), _as(c, acc), spec)
    return _shaped(y, h)


def _unwrap(t):
    return None if t is None else unwrap_if_dead(t)


def _needs_grad(h, A, a, B, C, c) -> bool:
    """Whether a gradient will be needed: grad mode on and some input requiring grad (written
    out, not as ``any`` over a generator: this runs on every call)."""
    return torch.is_grad_enabled() and (
        h.requires_grad or B.requires_grad or (A is not None and A.requires_grad)
        or (a is not None and a.requires_grad) or (C is not None and C.requires_grad)
        or (c is not None and c.requires_grad))


def run(h, A, a, B, C, c, spec, index):
    """The low-rank edit on ``spec.backend``: ``LowrankEditFunction.apply``, or, when no gradient
    will be needed (grad mode off, or no input requires grad), the backend's forward alone: no
    autograd node and nothing saved. (The no-grad case is also what lets
    ``torch.compile(fullgraph=True)`` trace an in-place edit: Dynamo traces ``ctx.mark_dirty``
    only on the autograd path.) Not named ``apply``: that is the Function's. A latent that is
    one row for every row, on the PyTorch backend over every row, takes
    ``ConstantLatentFunction``."""
    if index is None and A is None and C is None and spec.backend == "torch" and not spec.tied:
        return _run_constant(h, a, B, c, spec)
    if _needs_grad(h, A, a, B, C, c):
        if plain_call():
            return _apply(unwrap_if_dead(h), _unwrap(A), _unwrap(a), unwrap_if_dead(B), _unwrap(C), _unwrap(c),
                          spec, index)
        return LowrankEditFunction.apply(h, A, a, B, C, c, spec, index)
    with autocast_off_for(h):
        out, _, _, _ = _FWD[spec.backend](h, index, A, a, B, C, c, spec, False)
    if index is None:
        return _shaped(out, h)
    if spec.backend != "torch":  # a kernel wrote h behind autograd's back: bump its version, as
        torch.autograd.graph.increment_version(h)  # mark_dirty would (aten ops bump their own)
    return out


def run_copy(h, A, a, B, C, c, spec, index):
    """``run`` for the out-of-place edit of the rows ``index`` (not None): a new tensor, ``h``
    with the listed rows edited (``LowrankEditCopyFunction`` in eager calls that need a
    gradient, else ``run`` on a copy)."""
    if plain_call() and _needs_grad(h, A, a, B, C, c):
        return _apply_copy(unwrap_if_dead(h), _unwrap(A), _unwrap(a), unwrap_if_dead(B), _unwrap(C), _unwrap(c),
                           spec, index)
    # Under torch.compile (and transforms) the clone stays outside the Function: the Dynamo of
    # torch 2.11 traces LowrankEditCopyFunction (a forward that clones its input and edits the
    # clone in place) into wrong gradients for every input (tests/ops/test_compile.py on the
    # GPU machine's stack); 2.13's is right
    return run(h.clone(memory_format=torch.contiguous_format), A, a, B, C, c, spec, index)
