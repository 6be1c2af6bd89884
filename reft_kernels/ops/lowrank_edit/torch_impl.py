"""The low-rank edit in PyTorch ops (``backend="torch"``): runs on any device and dtype, float64
included, and is the CPU path. It follows the contract of ``contract.py``.

Numerics: parameters are cast to ``h``'s dtype and every product runs as eager PyTorch would
run it in that dtype (so bf16 results match eager bf16 math); only ``act'`` is evaluated in fp32.
Memory: the only (N, d) tensors allocated are the output (or, with an index, nothing: the rows
are edited in place) and ``dh``; latents are (n, r).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._activations import IDENTITY, act_grad_torch, act_torch
from ..._rows import acc_dtype, as_2d_plus, as_rows, put_rows_, row_selector


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _latent(x, A, a, B, C, c, spec):
    """(z, u) for rows ``x`` (n, d), parameters already in ``x``'s dtype."""
    n, r = x.shape[0], B.shape[0]
    if A is not None:
        u = F.linear(x, A, a)
    elif a is not None:
        u = a.expand(n, r)
    else:
        u = x.new_zeros(n, r)
    z = act_torch(u, spec.act)
    cm = B if spec.tied else C
    if cm is not None:
        z = z - F.linear(x, cm, c)
    elif c is not None:
        z = z - c
    return z, u


def _bwd_rows(g, x, z, u, A, B, C, spec, need):
    """Backward on row matrices: (dh, dA, da, dB, dC, dc) in ``x``'s dtype or the accumulation
    dtype for the sums; only ``dh`` is (n, d), built by ``addmm`` straight from ``g``."""
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    acc = acc_dtype(x.dtype)
    gz = g @ B.t()
    ga = gz
    if spec.act != IDENTITY:
        # act'(u) in fp32 and one rounding, as eager autograd does: in fp16/bf16 the derivative's
        # ten-odd separately rounded ops cost 2-6x accuracy in the parameter gradients.
        ga = (gz.to(acc) * act_grad_torch(u.to(acc), spec.act)).to(gz.dtype)
    cm = B if spec.tied else C
    dh = None
    if need_dh:
        dh = g
        if A is not None:
            dh = torch.addmm(dh, ga, A)
        if cm is not None:
            dh = dh.addmm_(gz, cm, alpha=-1) if dh is not g else torch.addmm(g, gz, cm, alpha=-1)
    da_w = ga.t() @ x if need_da_w else None
    da_b = ga.sum(0, dtype=acc) if need_da_b else None
    db = None
    if need_db:
        db = z.t() @ g
        if spec.tied:
            db = db.addmm_(gz.t(), x, alpha=-1)
    dc_w = -(gz.t() @ x) if need_dc_w and C is not None else None
    dc_b = -gz.sum(0, dtype=acc) if need_dc_b else None
    return dh, da_w, da_b, db, dc_w, dc_b


def fwd(h, index, A, a, B, C, c, spec, save_u):
    """Forward; see ``contract.py``."""
    acc = acc_dtype(h.dtype)
    A, a, B, C, c = (_cast(t, h.dtype) for t in (A, a, B, C, c))
    if index is None:
        x = as_rows(h)
        z, u = _latent(x, A, a, B, C, c, spec)
        return torch.addmm(x, z, B), z.to(acc), (u.to(acc) if save_u else None), None
    n, r, d = index.shape[0], B.shape[0], h.shape[-1]
    hv = as_2d_plus(h)
    if hv.numel() == 0:  # no rows to edit: every entry is padding
        zeros = h.new_zeros((n, r), dtype=acc)
        return h, zeros, (zeros.clone() if save_u else None), h.new_zeros((n, d))
    sel, valid = row_selector(h, index)
    x = hv[sel]  # one row per entry; padding entries read row 0
    z, u = _latent(x, A, a, B, C, c, spec)
    z = torch.where(valid[:, None], z, 0)
    put_rows_(hv, sel, index, torch.addmm(x, z, B))
    u = torch.where(valid[:, None], u, 0).to(acc) if save_u else None
    return h, z.to(acc), u, x


def bwd(g, x, index, A, B, C, z, u, spec, need):
    """Backward; see ``contract.py``."""
    A, B, C = (_cast(t, x.dtype) for t in (A, B, C))
    z = z.to(x.dtype)
    u = u.to(x.dtype) if u is not None else None
    if index is None:
        out = _bwd_rows(as_rows(g), as_rows(x), z, u, A, B, C, spec, need)
        return (out[0].reshape(g.shape) if need[0] else None), out[1:]
    if g.numel() == 0:  # h had no rows: every entry is padding, every gradient is zero
        zeros = x.new_zeros(x.shape)
        out = _bwd_rows(zeros, zeros, z, u, A, B, C, spec, need)
        return (g.clone() if need[0] else None), out[1:]
    sel, valid = row_selector(g, index)
    keep = valid[:, None]
    # padding entries gathered row 0: zero them (and their saved rows) so that they add nothing
    gr = torch.where(keep, as_2d_plus(g)[sel], 0)
    x = torch.where(keep, x, 0)
    out = _bwd_rows(gr, x, z, u, A, B, C, spec, need)
    dh = None
    if need[0]:
        dh = g.clone(memory_format=torch.contiguous_format)
        put_rows_(as_2d_plus(dh), sel, index, out[0])
    return dh, out[1:]
