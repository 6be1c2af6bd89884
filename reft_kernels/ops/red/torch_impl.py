"""RED in PyTorch ops (``backend="torch"``): any device and dtype, float64 included; the CPU
path. Parameters are cast to ``h``'s dtype and the arithmetic is eager PyTorch's in that dtype
(``addcmul``: one rounding); the column sums accumulate in fp32 (float64 for float64).

Casts are skipped where the tensor already has the dtype (``Tensor.to`` to its own dtype is a
no-op that still costs a dispatch, about 1 us on the 2-core CPU)."""
from __future__ import annotations

import torch

from ..._rows import acc_dtype


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def fwd(h2, scale, bias):
    """(n, d) rows -> y (n, d) in h2's dtype."""
    s = _as(scale, h2.dtype)
    t = _as(bias, h2.dtype)
    if s is not None and t is not None:
        return torch.addcmul(t, h2, s)
    if s is not None:
        return h2 * s
    if t is not None:
        return h2 + t
    return h2.clone()


def bwd(g2, h2, scale, need_dh, need_ds, need_dt):
    """Memory-lean backward: the only (N, d) tensor allocated is ``dh`` (whose storage first holds
    ``g * h`` for the ``ds`` reduction)."""
    acc = acc_dtype(g2.dtype)
    dh = ds = dt = None
    buf = None
    if need_ds:
        buf = torch.mul(g2, h2)
        ds = buf.sum(0, dtype=acc)
    if need_dt:
        dt = g2.sum(0, dtype=acc)
    if need_dh:
        if scale is None:
            dh = g2
        elif buf is not None:
            dh = torch.mul(g2, _as(scale, g2.dtype), out=buf)
        else:
            dh = g2 * _as(scale, g2.dtype)
    return dh, ds, dt
