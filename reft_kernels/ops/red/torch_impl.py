"""RED in PyTorch ops (``backend="torch"``): any device and dtype, float64 included; the CPU
path. Parameters are cast to ``h``'s dtype and the arithmetic is eager PyTorch's in that dtype
(``addcmul``: one rounding); the column sums accumulate in fp32 (float64 for float64)."""
from __future__ import annotations

import torch

from ..._rows import acc_dtype


def fwd(h2, scale, bias):
    """(n, d) rows -> y (n, d) in h2's dtype."""
    s = scale.to(h2.dtype) if scale is not None else None
    t = bias.to(h2.dtype) if bias is not None else None
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
            dh = torch.mul(g2, scale.to(g2.dtype), out=buf)
        else:
            dh = g2 * scale.to(g2.dtype)
    return dh, ds, dt
