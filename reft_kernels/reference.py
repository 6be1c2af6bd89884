"""Plain eager PyTorch formulas: the baseline for tests and benchmarks.

Each function computes its op the way pyreft and RED's official code do, with separate PyTorch ops
and autograd doing the backward. Parameters are cast to ``h``'s dtype first, so calling these on
float64 inputs gives the float64 reference, and on bf16/fp16 inputs gives "the same eager
computation in that precision" that kernel errors are judged against.
"""
from __future__ import annotations

from ._activations import act_code, act_torch

# How far a kernel may be from the float64 reference in fp16 / bf16: at most this many times the
# error of the same eager computation in that precision (these formulas on the low-precision
# tensors). The tests (tests/_helpers.py) and the benchmark's check (benchmark/runner.py) use it.
LOWP_FACTOR = 2.0

def _cast(t, h):
    return None if t is None else t.to(h.dtype)


def red_reference(h, scale=None, bias=None):
    """RED, ``y = h * scale + bias``, as two rounded ops (like RED's code)."""
    y = h
    if scale is not None:
        y = y * _cast(scale, h)
    if bias is not None:
        y = y + _cast(bias, h)
    return y if y is not h else h.clone()


def _lowrank_rows(x, B, A, a, C, c, code):
    """``x + (act(x A^T + a) - x C^T - c) B`` on rows ``x`` (..., d), in ``x``'s dtype (the
    parameters already cast to it); the optional terms are skipped when None."""
    u = x @ A.t() if A is not None else x.new_zeros(x.shape[:-1] + (B.shape[0],))
    if a is not None:
        u = u + a
    z = act_torch(u, code)
    if C is not None:
        z = z - x @ C.t()
    if c is not None:
        z = z - c
    return x + z @ B


def lowrank_edit_reference(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None):
    """``y = h + (act(h A^T + a) - h C^T - c) B`` on every row of ``h.reshape(-1, d)``, or, with
    ``index``, on the listed rows only (-1 entries skipped), the other rows copied unchanged."""
    code = act_code(act)
    B, A, a, C, c = (_cast(t, h) for t in (B, A, a, C, c))
    if index is None:
        return _lowrank_rows(h, B, A, a, C, c, code)
    d = h.shape[-1]
    rows = index[index >= 0]
    flat = h.reshape(-1, d)
    edited = _lowrank_rows(flat[rows], B, A, a, C, c, code)
    return flat.index_put((rows,), edited).reshape(h.shape)



# Many adapters in one batch (``reft_kernels.multi``): a loop over the adapters, each applying the
# one-adapter formula above to its own rows (found with a host synchronisation; a reference only).

def red_multi_reference(h, scale, bias, adapter_ids):
    """``red_reference`` with adapter ``adapter_ids[i]`` (a slice of the (K, d) stacks) on row i of
    ``h.reshape(-1, d)``, or, with (h.shape[0],) ids for an h of three or more dimensions, on
    every row of ``h[i]``; rows with id -1 copied unchanged."""
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    if h.dim() >= 3 and adapter_ids.shape[0] == h.shape[0] != flat.shape[0]:
        adapter_ids = adapter_ids.repeat_interleave(flat.shape[0] // h.shape[0])
    out = flat.clone()
    for k in range((scale if scale is not None else bias).shape[0]):
        rows = (adapter_ids == k).nonzero().flatten()
        if rows.numel():
            s = scale[k] if scale is not None else None
            t = bias[k] if bias is not None else None
            out = out.index_put((rows,), red_reference(flat[rows], s, t))
    return out.reshape(h.shape)


def lowrank_edit_multi_reference(h, B, A=None, a=None, C=None, c=None, *, adapter_ids, act=None, index=None):
    """``lowrank_edit_reference`` with adapter k's slices of the (K, r, d) / (K, r) stacks on the
    rows whose adapter id is k: without ``index`` one id per row of ``h.reshape(-1, d)``, with it
    one per index entry (entries with index -1 or id -1 edit nothing)."""
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    out = flat.clone()
    pick = lambda t, k: None if t is None else t[k]  # noqa: E731
    for k in range(B.shape[0]):
        if index is None:
            rows = (adapter_ids == k).nonzero().flatten()
        else:
            rows = index[(adapter_ids == k) & (index >= 0)]
        if rows.numel():
            edited = lowrank_edit_reference(flat[rows], B[k], pick(A, k), pick(a, k), pick(C, k), pick(c, k), act=act)
            out = out.index_put((rows,), edited)
    return out.reshape(h.shape)

# pyreft's six interventions, written out independently of lowrank_edit_reference and of the
# method table (``methods.METHODS``), so that tests check each method's terms against its formula
# (tests/test_methods.py) and each op against it. Matrices are (r, d); the parameters are in the
# table's ``params`` order.

def loreft_reference(h, R, W, b, act=None):
    """pyreft LoreftIntervention: ``h + (act(h W^T + b) - h R^T) R``."""
    R, W, b = (_cast(t, h) for t in (R, W, b))
    return h + (act_torch(h @ W.t() + b, act_code(act)) - h @ R.t()) @ R


def noreft_reference(h, W2, W1, b1, b2=None, act=None):
    """pyreft NoreftIntervention: ``h + (act(h W1^T + b1) - (h W2^T + b2)) W2``."""
    W2, W1, b1, b2 = (_cast(t, h) for t in (W2, W1, b1, b2))
    proj = h @ W2.t() if b2 is None else h @ W2.t() + b2
    return h + (act_torch(h @ W1.t() + b1, act_code(act)) - proj) @ W2


def direft_reference(h, R, W, b, act=None):
    """pyreft DireftIntervention: ``h + act(h W^T + b) R``."""
    R, W, b = (_cast(t, h) for t in (R, W, b))
    return h + act_torch(h @ W.t() + b, act_code(act)) @ R


def nodireft_reference(h, W2, W1, b, act=None):
    """pyreft NodireftIntervention: ``h + act(h W1^T + b) W2``."""
    W2, W1, b = (_cast(t, h) for t in (W2, W1, b))
    return h + act_torch(h @ W1.t() + b, act_code(act)) @ W2


def consreft_reference(h, R, b):
    """pyreft ConsreftIntervention: ``h + (b - h R^T) R``."""
    R, b = (_cast(t, h) for t in (R, b))
    return h + (b - h @ R.t()) @ R


def lobireft_reference(h, R, b):
    """pyreft LobireftIntervention: ``h + b R``."""
    R, b = (_cast(t, h) for t in (R, b))
    return h + b @ R
