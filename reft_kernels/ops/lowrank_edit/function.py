"""``LowrankEditFunction``: the autograd Function of the low-rank edit, over the backends of this
folder, which all follow ``contract.py``.

Files: ``triton_impl.py`` (Triton kernels and launchers), ``torch_impl.py`` (PyTorch ops; the
CPU path), ``cuda_impl.py`` (the CUDA C++ extension through torch.library ops). The public
functions ``lowrank_edit`` / ``lowrank_edit_`` (``reft_kernels.functional``) check the inputs and
pick the backend; this Function only runs it.
"""
from __future__ import annotations

import torch

from ..._constants import IDENTITY
from .._autograd import autocast_off, once_differentiable
from . import cuda_impl, torch_impl, triton_impl

_FWD = {"triton": triton_impl.fwd, "cuda": cuda_impl.fwd, "torch": torch_impl.fwd}
_BWD = {"triton": triton_impl.bwd, "cuda": cuda_impl.bwd, "torch": torch_impl.bwd}


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
        ctx.spec = spec
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (A, a, B, C, c))
        with autocast_off(h.device.type):
            out, z, u, hsave = _FWD[spec.backend](h, index, A, a, B, C, c, spec, spec.act != IDENTITY)
        if index is not None:
            ctx.mark_dirty(h)
            ctx.save_for_backward(hsave, index, z, u, A, B, C)
            return out
        ctx.save_for_backward(h, None, z, u, A, B, C)
        return out.view(h.shape)

    @staticmethod
    @once_differentiable("reft_kernels.lowrank_edit")
    def backward(ctx, g):
        x, index, z, u, A, B, C = ctx.saved_tensors
        # (dh, dA, da, dB, dC, dc); with spec.tied, C is None and dB carries both of B's terms
        need = tuple(ctx.needs_input_grad[:6])
        with autocast_off(g.device.type):
            dh, grads = _BWD[ctx.spec.backend](g, x, index, A, B, C, z, u, ctx.spec, need)
        grads = tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))
        return (dh, *grads, None, None)


def run(h, A, a, B, C, c, spec, index):
    """The low-rank edit on ``spec.backend``: ``LowrankEditFunction.apply``, or, when no gradient
    will be needed (grad mode off, or no input requires grad), the backend's forward alone: no
    autograd node and nothing saved. (The no-grad case is also what lets
    ``torch.compile(fullgraph=True)`` trace an in-place edit: Dynamo traces ``ctx.mark_dirty``
    only on the autograd path.) Not named ``apply``: that is the Function's."""
    tensors = (h, A, a, B, C, c)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LowrankEditFunction.apply(h, A, a, B, C, c, spec, index)
    with autocast_off(h.device.type):
        out, _, _, _ = _FWD[spec.backend](h, index, A, a, B, C, c, spec, False)
    if index is None:
        return out.view(h.shape)
    if spec.backend != "torch":  # a kernel wrote h behind autograd's back: bump its version, as
        torch.autograd.graph.increment_version(h)  # mark_dirty would (aten ops bump their own)
    return out
