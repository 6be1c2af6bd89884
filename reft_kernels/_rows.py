"""Row views of (..., d) tensors and the index conventions shared by every backend.

An ``index`` is a 1-D int64 tensor of rows of ``t.reshape(-1, d)``; -1 entries are padding. The
backends keep one row per index entry (padding included) in everything they save, so that no
step depends on how many entries are real: no host synchronisation, no data-dependent shapes
(``torch.compile(fullgraph=True)`` and CUDA-graph capture stay possible).
"""
from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an (N, d) matrix: a view whenever the leading dimensions can be merged (any
    strides, transposed last two dims included), otherwise a contiguous copy."""
    d = t.shape[-1]
    try:
        return t.view(-1, d)
    except RuntimeError:
        return t.reshape(-1, d)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_2d_plus(t: torch.Tensor) -> torch.Tensor:
    """``t`` with at least two dimensions (a 1-D ``t`` is one row); a view."""
    return t.unsqueeze(0) if t.dim() == 1 else t


def row_selector(t: torch.Tensor, index: torch.Tensor):
    """Advanced-indexing selector of the rows ``index`` of ``t.reshape(-1, d)``, usable on
    ``as_2d_plus(t)`` whatever ``t``'s strides, with -1 entries pointing at row 0.

    Returns (selector, valid): ``as_2d_plus(t)[selector]`` gathers one row per index entry
    (n, d); ``valid`` (n,) bool marks the real entries.
    """
    valid = index >= 0
    safe = index.clamp_min(0)
    lead = as_2d_plus(t).shape[:-1]
    sel = (safe,) if len(lead) == 1 else torch.unravel_index(safe, lead)
    return sel, valid


def put_rows_(dst: torch.Tensor, sel, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``dst[sel] = rows`` for the real entries of ``index`` only (``sel`` from ``row_selector``,
    ``dst`` an ``as_2d_plus`` view), in place, deterministic, with no host synchronisation.

    Padding entries point at row 0; they write row 0's final value (its new value when row 0
    is listed, its current value otherwise), so every write that reaches row 0 agrees and the
    result does not depend on the order of the writes.
    """
    if index.numel() == 0 or dst.numel() == 0:
        return dst
    row0 = dst[(0,) * (dst.dim() - 1)]
    hit0 = index == 0
    new0 = rows.index_select(0, hit0.to(torch.uint8).argmax().reshape(1))[0]  # no .item(): sync-free
    row0 = torch.where(hit0.any(), new0, row0)
    rows = torch.where((index >= 0)[:, None], rows, row0)
    return dst.index_put_(sel, rows)


def rows_addressing(h: torch.Tensor, index: torch.Tensor):
    """How a kernel finds row ``index[i]`` of ``h.reshape(-1, d)`` inside ``h`` itself.

    Returns (idx, stride_row, stride_col) such that the row starts at ``idx[i] * stride_row``
    elements. When the leading dimensions cannot be merged into one stride, ``idx`` becomes a
    table of element offsets (-1 kept for padding) and ``stride_row`` is 1.
    """
    d = h.shape[-1]
    try:
        v = h.view(-1, d)
        return index, v.stride(0), v.stride(1)
    except RuntimeError:
        pass
    sel, valid = row_selector(h, index)
    offs = sum(p * s for p, s in zip(sel, h.stride()[:-1]))
    return torch.where(valid, offs, -1), 1, h.stride(-1)
