"""The low-rank edit in PyTorch ops (``backend="torch"``): runs on any device and dtype, float64
included, and is the CPU path. It follows the contract of ``contract.py``.

Numerics: the kernels' "fp32 inside, one rounding at the end". Rows of ``h`` (and ``g``) and
every parameter are converted to the accumulation dtype (float32; float64 for float64 ``h``;
parameters keep their full precision, an fp32 ``B`` beside a bf16 ``h`` is never rounded to
bf16); the latent ``z = act(h A^T + a) - h C^T - c`` (with the identity and both A and C, as
``h (A - C)^T + a - c``: ``_difference``), the activation and its derivative, and
``y = h + z B`` are computed there and ``y`` is rounded to ``h``'s dtype once. The backward
likewise: ``dh = g + ga A - gz C`` rounded once, parameter gradients summed over rows in the
accumulation dtype. (Eager bf16 math rounds every intermediate instead: the (n, r) latent alone
costs up to tens of bf16 ulps where ``z`` is large against ``y``.)

Memory: the only (N, d) tensors allocated are the output (with an index, nothing: the rows are
edited in place) and ``dh``. For fp16/bf16 rows the fp32 working copies are made one block of
rows at a time (``_BLOCK_ELEMS`` elements, 16 MiB of fp32), so they stay small whatever N is;
float32/float64 rows are used as they are, with no copy. Latents are (n, r).

``fwd_differentiable`` is the same forward from plain differentiable ops (no in-place writes,
no autograd Function): what ``torch.func`` transforms and forward-mode AD run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._activations import IDENTITY, act_grad_torch, act_torch
from ..._rows import (
    acc_dtype, adds_rows, as_rows, edit_plan, first_real_entry, gather_rows, put_rows_, row_selector, rows_view,
    scratch_buffer,
)
from . import torch_constant, torch_listed

_BLOCK_ELEMS = 1 << 22


def _cast(t, dtype):
    """``t`` in ``dtype``; no call when it has it already (a no-op ``.to`` still costs a dispatch,
    about 1 us on the 2-core CPU, up to five per call)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _rows(t):
    """``as_rows(t)``, without a new view when ``t`` is already (N, d)."""
    return t if t.dim() == 2 else as_rows(t)


def _blocks(n: int, d: int, dtype: torch.dtype):
    """Row ranges [i, j) that cover n rows: one block when the rows need no conversion (already
    in the accumulation dtype) or inside ``torch.compile`` (one block keeps the graph small),
    else blocks of about ``_BLOCK_ELEMS`` elements."""
    if dtype == acc_dtype(dtype) or torch.compiler.is_compiling():
        step = max(n, 1)
    else:
        step = max(1, _BLOCK_ELEMS // max(d, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _difference(A, B, C, spec):
    """The difference form's ``A - C`` (C being B when tied), for the identity activation with
    both A and C; else None. Then ``z = x (A - C)^T + a - c`` and ``dh = g + gz (A - C)``: one
    product over the rows instead of two in the forward and in ``dh`` (and ``dC = -dA``, the
    tied ``dB = z^T g - dA`` from one ``gz^T x``). ``A - C`` is rounded once; the sums are the
    same, in another rounding than the two-term form. Measured on the 2-core CPU (AMD EPYC, fp32,
    LoReFT tied, N = 1024, d = 256, r = 8, one thread, a step of ``h * 1`` then the edit over
    every row without an index, forward + backward, median of 270): 796 us with the two-term
    form, 643 us with this one."""
    cm = B if spec.tied else C
    if spec.act != IDENTITY or A is None or cm is None:
        return None
    return A - cm


def _latent(x, A, a, B, C, c, spec, D):
    """(z, u) for rows ``x`` (n, d); ``x`` and the parameters in one dtype. Plain ops only; the
    ``- x C^T`` term folds into one ``addmm`` when there is no ``c`` (one launch less per call).
    ``D``: ``_difference(A, B, C, spec)``, formed once by the caller for all its row blocks; when
    it is not None, the difference form (u is then None: the identity saves none)."""
    n, r = x.shape[0], B.shape[0]
    if D is not None:
        z = F.linear(x, D, a)
        return (z - c if c is not None else z), None
    if A is not None:
        u = F.linear(x, A, a)
    elif a is not None:
        u = a.expand(n, r)
    else:
        u = x.new_zeros(n, r)
    z = act_torch(u, spec.act)
    cm = B if spec.tied else C
    if cm is not None and c is None:
        z = torch.addmm(z, x, cm.t(), alpha=-1)
    elif cm is not None:
        z = z - F.linear(x, cm, c)
    elif c is not None:
        z = z - c
    return z, u


def _fwd_rows(x, A, a, B, C, c, spec, save_u, keep=None, delta=False):
    """``y = x + z B`` for rows ``x`` (n, d) in their own dtype, one rounding; parameters already
    in the accumulation dtype. Returns (y (n, d) in ``x``'s dtype, z (n, r), u (n, r) or None, in
    the accumulation dtype). ``keep`` (n, 1) bool: z is zero (and y = x) where it is False. A
    latent that does not depend on the row goes to ``torch_constant``. ``delta`` (only for ``x``
    in the accumulation dtype and a latent that depends on the row): ``z B`` instead of ``y``."""
    if torch_constant.applies(A, B, C, spec):
        return torch_constant.fwd_rows(x, a, B, c, spec, save_u, keep)
    acc = acc_dtype(x.dtype)
    n, d = x.shape
    r = B.shape[0]
    D = _difference(A, B, C, spec)
    if x.dtype == acc:
        z, u = _latent(x, A, a, B, C, c, spec, D)
        if keep is not None:
            z = torch.where(keep, z, 0)
        return (z @ B if delta else torch.addmm(x, z, B)), z, (u if save_u else None)
    y = x.new_empty((n, d))
    z = x.new_empty((n, r), dtype=acc)
    u = x.new_empty((n, r), dtype=acc) if save_u else None
    for i, j in _blocks(n, d, x.dtype):
        xc = x[i:j].to(acc)
        zc, uc = _latent(xc, A, a, B, C, c, spec, D)
        if keep is not None:
            zc = torch.where(keep[i:j], zc, 0)
        z[i:j] = zc
        if save_u:
            u[i:j] = uc
        y[i:j] = xc.addmm_(zc, B)  # the one rounding: fp32 -> x's dtype
    return y, z, u


def _add(total, part):
    """``part`` for the first row block, else ``total += part`` (in place)."""
    return part if total is None else total.add_(part)


def _bwd_rows(g, x, z, u, A, B, C, spec, need, valid=None, g_private=False, dh_delta=False):
    """Backward on row matrices ``g``, ``x`` (n, d) in h's dtype; ``z``, ``u`` and the parameters
    in the accumulation dtype. Returns (dh (n, d) in g's dtype or None, dA, da, dB, dC, dc in
    the accumulation dtype or None), the parameter gradients summed block by block in a fixed
    order. ``valid`` (n,) bool: the latent gradient is zero where it is False (padding entries),
    so those rows add nothing to the parameters and their ``dh`` rows are ``g``'s. ``g_private``:
    ``g`` is a copy the caller gives up, so ``dh`` may be computed in it (in place); with
    ``dh_delta`` too (``g`` in the accumulation dtype), ``dh - g`` is returned in ``dh``'s place
    (None when the edit does not depend on ``h``), for the caller to add.

    Launches: the latent ``gz = g B^T``, one product per weight gradient, one sum per bias and
    two products for ``dh`` (one in the difference form, ``_difference``); with the identity,
    ``ga`` is ``gz``, so ``dB``'s ``- gz^T x`` (tied) and ``dC`` reuse ``dA = gz^T x``, and
    ``dc = -da``."""
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    acc = acc_dtype(x.dtype)
    n, d = g.shape
    r = B.shape[0]
    cm = B if spec.tied else C
    need_dc_w = need_dc_w and C is not None
    need_x = need_da_w or need_dc_w or (need_db and spec.tied)
    own = g.dtype != acc  # g's blocks are converted copies, free to overwrite
    identity = spec.act == IDENTITY
    D = _difference(A, B, C, spec) if need_dh else None
    # the terms added to g for dh: g + ga (A - C) in the difference form (the identity: ga is gz),
    # else g + ga A - gz C
    dh_A, dh_C = (D, None) if D is not None else (A, cm)
    da_w = da_b = db = dc_w = dc_b = None
    dh = g.new_empty((n, d)) if need_dh and own else None
    for i, j in _blocks(n, d, g.dtype):
        gc = g[i:j].to(acc)
        xc = x[i:j].to(acc) if need_x else None
        gz = gc @ B.t()
        if valid is not None:
            gz = torch.where(valid[i:j, None], gz, 0)
        ga = gz if identity else gz * act_grad_torch(u[i:j], spec.act)
        # gz^T x (ga = gz with the identity) serves dA, the tied dB's second term and dC = -gz^T x
        da_wk = ga.t() @ xc if (need_da_w or (identity and ((need_db and spec.tied) or need_dc_w))) else None
        if need_da_w:
            da_w = _add(da_w, da_wk)
        if need_da_b or (need_dc_b and identity):
            da_bk = ga.sum(0)
            if need_da_b:
                da_b = _add(da_b, da_bk)
        if need_db:
            if spec.tied and identity:  # z^T g - gz^T x, gz^T x being da_wk
                db = _add(db, torch.addmm(da_wk, z[i:j].t(), gc, beta=-1))
            elif spec.tied:
                db = _add(db, torch.addmm(z[i:j].t() @ gc, gz.t(), xc, alpha=-1))
            else:
                db = _add(db, z[i:j].t() @ gc)
        if need_dc_w:
            dc_w = _add(dc_w, da_wk.neg() if identity else (gz.t() @ xc).neg_())
        if need_dc_b:
            dc_b = _add(dc_b, da_bk.neg() if identity else gz.sum(0).neg_())
        if need_dh and own:  # g + ga A - gz C into the converted block of g, last (it overwrites it)
            if dh_A is not None:
                gc.addmm_(ga, dh_A)
            if dh_C is not None:
                gc.addmm_(gz, dh_C, alpha=-1)
            dh[i:j] = gc  # the one rounding
        elif need_dh and g_private and dh_delta:  # ga A - gz C, added by the caller
            dh = ga @ dh_A if dh_A is not None else None
            if dh_C is not None:
                dh = dh.addmm_(gz, dh_C, alpha=-1) if dh is not None else torch.mm(gz, dh_C).neg_()
        elif need_dh and g_private:  # one block, a copy of g's rows that is ours: in place
            if dh_A is not None:
                gc.addmm_(ga, dh_A)
            if dh_C is not None:
                gc.addmm_(gz, dh_C, alpha=-1)
            dh = gc
        elif need_dh:  # one block, g itself: out of place
            dh = torch.addmm(gc, ga, dh_A) if dh_A is not None else gc
            if dh_C is not None:
                dh = dh.addmm_(gz, dh_C, alpha=-1) if dh_A is not None else torch.addmm(gc, gz, dh_C, alpha=-1)
    if n == 0:  # no rows: zero gradients
        zeros = lambda *shape: torch.zeros(shape, dtype=acc, device=g.device)  # noqa: E731
        da_w, da_b, db = (zeros(r, d) if need_da_w else None), (zeros(r) if need_da_b else None), \
            (zeros(r, d) if need_db else None)
        dc_w, dc_b = (zeros(r, d) if need_dc_w else None), (zeros(r) if need_dc_b else None)
    if need_dh and n == 0:  # no rows (the loop above set dh otherwise; None there: a zero delta)
        dh = g.new_empty((n, d))
    return dh, da_w, da_b, db, dc_w, dc_b


def fwd(h, index, A, a, B, C, c, spec, save_u):
    """Forward; see ``contract.py``."""
    acc = acc_dtype(h.dtype)
    A, a, B, C, c = _cast(A, acc), _cast(a, acc), _cast(B, acc), _cast(C, acc), _cast(c, acc)
    if index is None:
        y, z, u = _fwd_rows(h if h.dim() == 2 else as_rows(h), A, a, B, C, c, spec, save_u)
        return y, z, u, None
    n, r, d = index.shape[0], B.shape[0], h.shape[-1]
    hv = rows_view(h)
    if hv.numel() == 0:  # no rows to edit: every entry is padding
        zeros = h.new_zeros((n, r), dtype=acc)
        return h, zeros, (zeros.clone() if save_u else None), h.new_zeros((n, d))
    # one row per entry; a padding entry reads the first real entry's row (a real, finite row),
    # and y = x there (z is 0): the put writes the first real entry's value in its place
    # (``put_rows_``, inlined: one cached plan instead of three lookups, 1.2 us against 3.5 us,
    # and ``index_select`` rather than tuple indexing where the rows have one leading
    # dimension, 4.2 us against 8.1 us, at f7+l7 over 2 sequences on the 2-core CPU; ``rows_view``
    # gives (B, S, d) activations one leading dimension)
    keep, remap, target = edit_plan(hv, index)
    x = gather_rows(hv, target)
    if n and adds_rows(hv, target) and not torch_constant.applies(A, B, C, spec):
        # h's rows += z B: a padding entry adds its zero row (z is 0 there) to the first real
        # entry's row, and every real row is listed once
        delta, z, u = _fwd_rows(x, A, a, B, C, c, spec, save_u, keep, delta=True)
        hv.index_add_(0, target[0], delta)
    else:
        y, z, u = _fwd_rows(x, A, a, B, C, c, spec, save_u, keep)
        if n:
            hv.index_put_(target, y.index_select(0, remap))
    u = torch.where(keep, u, 0) if save_u else None
    return h, z, u, x


def bwd(g, x, index, A, B, C, z, u, spec, need):
    """Backward; see ``contract.py``."""
    acc = acc_dtype(x.dtype)
    A, B, C, z, u = _cast(A, acc), _cast(B, acc), _cast(C, acc), _cast(z, acc), _cast(u, acc)
    # (no rows, or an empty index: the generic path's zeros)
    constant = torch_constant.applies(A, B, C, spec) and g.numel() > 0 and z.shape[0] > 0
    if index is None:
        if constant:  # dh = g: the edit does not depend on h
            return (g if need[0] else None), torch_constant.param_grads(_rows(g), z, u, B, spec, need)
        out = _bwd_rows(_rows(g), _rows(x), z, u, A, B, C, spec, need)
        return (out[0].reshape(g.shape) if need[0] else None), out[1:]
    if g.numel() and torch_listed.applies(g, index, A, C, spec):  # a model's per-layer backward
        rows = rows_view(g)
        if rows.dim() == 2:
            return torch_listed.bwd(g, rows, x, index, A, B, C, z, u, spec, need)
    if g.numel() == 0:  # h had no rows: every entry is padding, every gradient is zero
        zeros = x.new_zeros(x.shape)
        out = _bwd_rows(zeros, zeros, z, u, A, B, C, spec, need)
        return (g.clone() if need[0] else None), out[1:]
    if constant:  # dh = g: the edit does not depend on h
        gv = rows_view(g)
        sel, valid = row_selector(gv, index)
        gr = torch.where(valid[:, None], gather_rows(gv, sel), 0)
        return (g if need[0] else None), torch_constant.param_grads(gr, z, u, B, spec, need,
                                                                    first_real_entry(g, index))
    scratch = scratch_buffer(g, index) if need[0] and index.numel() else None
    if scratch is not None:
        # dh in an (N + 1, d) buffer: g's rows, then a zero scratch row that every padding entry
        # reads and writes (``scratch_selector``). Padding rows of g are then zero, so they add
        # nothing to the parameters without a mask, and the edited rows go back with one put,
        # without making the padding entries' writes agree first; the scratch row is dropped.
        # Launches per call: cat, gather, put (against clone, gather, where, index_select, put:
        # 16 per layer of the patched LLaMA's step at f7+l7 instead of 18, test_launch_budget).
        buf, ssel = scratch
        n_rows = buf.shape[0] - 1
        add = adds_rows(buf, (ssel,))
        out = _bwd_rows(buf.index_select(0, ssel), x, z, u, A, B, C, spec, need, g_private=True, dh_delta=add)
        if not add:
            buf.index_put_((ssel,), out[0])
        elif out[0] is not None:  # dh's rows - g's rows (None: the edit does not depend on h)
            buf.index_add_(0, ssel, out[0])
        return buf[:n_rows].view(g.shape), out[1:]
    # Padding entries read the first real entry's row of g (and their saved rows are that row of
    # h): real rows, so their masked latent gradient (``valid``) and zero z make them add nothing
    # to the parameters. (With no real entry at all they read row 0, whatever it holds.)
    # (on ``rows_view(g)``: the forward's row plan, one selector, ``index_select``)
    gv = rows_view(g)
    keep, _, target = edit_plan(gv, index)
    out = _bwd_rows(gather_rows(gv, target), x, z, u, A, B, C, spec, need, keep[:, 0])
    dh = None
    if need[0]:
        dh = g.clone(memory_format=torch.contiguous_format)
        put_rows_(rows_view(dh), index, out[0])
    return dh, out[1:]


def fwd_differentiable(h, A, a, B, C, c, spec, index):
    """``y`` (``h``'s shape and dtype) from plain differentiable PyTorch ops, with ``fwd``'s
    numerics; gradients, tangents and batching come from PyTorch (``torch.func`` transforms,
    forward-mode AD). ``index``: None (every row) or (n,) rows of ``h.reshape(-1, d)``, -1 for
    none. Padding entries are sent to n extra rows beyond the N real ones, one each, and dropped:
    every real row is read and written once, so each gradient is counted once. Not memory-lean
    (autograd keeps what it needs): only the transforms use it."""
    acc = acc_dtype(h.dtype)
    A, a, B, C, c = (_cast(t, acc) for t in (A, a, B, C, c))
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    if index is None:
        x = flat.to(acc)
        z, _ = _latent(x, A, a, B, C, c, spec, _difference(A, B, C, spec))
        return torch.addmm(x, z, B).to(h.dtype).reshape(h.shape)
    n_rows, n = flat.shape[0], index.shape[0]
    sel = torch.where(index >= 0, index, n_rows + torch.arange(n, device=index.device))
    ext = torch.cat([flat, torch.zeros((n, d), dtype=h.dtype, device=h.device)])
    x = ext.index_select(0, sel).to(acc)
    z, _ = _latent(x, A, a, B, C, c, spec, _difference(A, B, C, spec))
    y = torch.addmm(x, z, B).to(h.dtype)
    return ext.index_copy(0, sel, y)[:n_rows].reshape(h.shape)
