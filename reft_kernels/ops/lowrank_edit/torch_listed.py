"""The backward of the in-place edit of listed rows on the PyTorch backend, written flat for the
call a model's ReFT hooks make once per layer and step: ``lowrank_edit_`` with an index, on
float32 or float64 rows of a CPU tensor that merge into one (N, d) view, with a latent that
depends on the row (``A`` or ``C`` present). ``torch_impl.bwd`` hands those calls here
(``applies``); the contract (``contract.py``), the numerics (one dtype throughout, so no
rounding but the ops' own) and the launches are those of ``torch_impl``'s general path, and so
is the handling of padding (-1) entries, without a host synchronisation: with ``dh`` they read
a zero scratch row (``scratch_buffer``), without it their latent gradient is masked, so they
add nothing anywhere.

    dh = g with dh[index] += ga A - gz C;   gz = g[index] B^T,  ga = gz * act'(u)
    dA = ga^T x,  da = sum ga,  dB = z^T g[index] (- gz^T x when tied),  dC = -gz^T x,  dc = -sum gz

Launches (LoReFT): 9 with ``dh`` (``g`` copied into the scratch buffer, gather, ``gz``, ``dA``,
``da``, ``dB``, the (r, d) ``A - C``, ``dh``'s rows, ``index_add_``), 6 without; each parameter
gradient reduced over rows by one matrix product or ``sum`` (fixed order, no atomics).

Why a flat copy of the general path: inside a training step this call runs between the model's
large matrix products, with the interpreter's and the ops' working sets evicted, and there each
Python call costs several times what a warm loop shows. Measured in the d = 256 LLaMA step of
``bench --e2e`` at f7+l7 on the 2-core CPU (6 layers, 56 of 1024 rows; both paths in one
process, alternating steps, 30 rounds): ``torch_impl.bwd`` took 443 us per layer through the
general path and 397 us through this one (387 in another run). A flat forward was tried too and
measured no faster (287 us against 272 for the general one, 10 rounds): there the launches, not
the Python, decide.
"""
from __future__ import annotations

import torch

from ..._activations import IDENTITY, act_grad_torch
from ..._rows import const_row, edit_plan, scratch_selector

_ACC = (torch.float32, torch.float64)


def applies(t: torch.Tensor, index: torch.Tensor, A, C, spec) -> bool:
    """Whether ``torch_impl.bwd``'s call with the gradient ``g`` (``t``) and the checked ``index``
    is this file's case (it also needs ``g``'s rows as one (N, d) view, which the caller
    checks). Never under ``torch.compile``, which traces the general path."""
    return (t.dtype in _ACC and t.device.type == "cpu" and index.numel() > 0
            and (A is not None or C is not None or spec.tied) and not torch.compiler.is_compiling())


def bwd(g, rows, x, index, A, B, C, z, u, spec, need):
    """(dh shaped like ``g`` or None, (dA, da, dB, dC, dc)) for ``torch_impl.fwd``'s call with an
    index; ``g`` in ``x``'s dtype with its rows as one (N, d) view ``rows``; ``x``, ``z``, ``u``
    as the forward saved them; ``need`` the flags of ``contract.py``."""
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    if need_dh:
        # g's rows and a zero scratch row, which padding entries read (so their gz is zero) and
        # write; the first N rows become dh
        buf = torch.cat([rows, const_row(rows)])
        sel = scratch_selector(g, index)
        gx = buf.index_select(0, sel)
        gz = gx @ B.t()
    else:  # no dh to build (the first edited layer): gather g's rows and mask the padding's gz
        keep, _, target = edit_plan(rows, index)
        gx = rows.index_select(0, target[0])
        gz = torch.where(keep, gx @ B.t(), 0)
    identity = spec.act == IDENTITY
    ga = gz if identity else gz * act_grad_torch(u, spec.act)
    tied = spec.tied
    cm = B if tied else C
    gzx = gz.t() @ x if (need_dc_w and C is not None) or (need_db and tied) else None
    da_w = (gzx if identity and gzx is not None else ga.t() @ x) if need_da_w else None
    da_b = ga.sum(0) if need_da_b or (need_dc_b and identity) else None
    db = None
    if need_db:
        db = torch.addmm(gzx, z.t(), gx, beta=-1) if tied else z.t() @ gx
    dc_w = gzx.neg() if need_dc_w and C is not None else None
    dc_b = (da_b.neg() if identity else gz.sum(0).neg_()) if need_dc_b else None
    if need_dh:
        if A is not None and cm is not None and identity:
            delta = gz @ (A - cm)
        elif A is not None:
            delta = ga @ A
            if cm is not None:
                delta.addmm_(gz, cm, alpha=-1)
        else:
            delta = gz @ cm.neg()
        buf.index_add_(0, sel, delta)
        return buf[:rows.shape[0]].view(g.shape), (da_w, (da_b if need_da_b else None), db, dc_w, dc_b)
    return None, (da_w, (da_b if need_da_b else None), db, dc_w, dc_b)
