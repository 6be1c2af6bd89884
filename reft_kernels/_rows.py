"""Views of (..., d) tensors as (N, d) row matrices, shared by the ops."""
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
