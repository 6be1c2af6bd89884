"""Input checks shared by the ops: every bad input becomes a ValueError or TypeError that names the
argument and the shapes involved, before any kernel runs."""
from __future__ import annotations

import torch

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_hidden(h, name: str = "h") -> int:
    """Check the activation tensor ``h`` of shape (..., d); return d."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if h.dim() < 1:
        raise ValueError(f"{name} must have shape (..., d) with at least one dimension, got a scalar")
    if h.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension d >= 1, got shape {tuple(h.shape)}")
    return h.shape[-1]


def check_param(t, name: str, shape: tuple[int, ...], h: torch.Tensor, *, optional: bool) -> None:
    """Check a parameter tensor: floating point, exact ``shape``, on ``h``'s device."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} to match h of shape {tuple(h.shape)}, "
            f"got {tuple(t.shape)}"
        )
    if t.device != h.device:
        raise ValueError(f"{name} is on {t.device} but h is on {h.device}: move them to one device")


def check_backend_dtype(backend: str, h: torch.Tensor) -> None:
    if backend in ("triton", "cuda") and h.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend={backend!r} supports h in float16, bfloat16 or float32, got {h.dtype}; "
            "use backend='torch' for float64"
        )


def check_index(index, n_rows: int, h: torch.Tensor) -> torch.Tensor:
    """Check a row index into ``h.reshape(-1, d)`` and return it as a contiguous int64 tensor.

    Entries must lie in [-1, n_rows); -1 is padding (skipped). Listed rows must be distinct: an
    edit applied twice to one row has no single meaning, so duplicates are rejected. The check
    costs one small reduction and one host synchronisation; inside ``torch.compile`` it becomes
    device-side assertions instead (no graph break, an error at run time).
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D integer torch.Tensor or None, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor (int64), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if index.device != h.device:
        raise ValueError(f"index is on {index.device} but h is on {h.device}")
    index = index.to(torch.int64).contiguous()
    if index.numel() == 0:
        return index
    sorted_rows = index.sort().values
    out_of_range = (index < -1).any() | (index >= n_rows).any()
    duplicate = ((sorted_rows[1:] == sorted_rows[:-1]) & (sorted_rows[1:] >= 0)).any()
    if torch.compiler.is_compiling():
        # No host sync inside a compiled graph: the same checks as device-side assertions.
        torch._assert_async(~out_of_range, "index entries must lie in [-1, number of rows of h)")
        torch._assert_async(~duplicate, "index lists a row more than once")
        return index
    flags = torch.stack([out_of_range, duplicate]).tolist()
    if flags[0]:
        lo, hi = int(index.min()), int(index.max())
        raise ValueError(
            f"index entries must lie in [-1, {n_rows}) for h of shape {tuple(h.shape)} "
            f"({n_rows} rows of width {h.shape[-1]}), got values in [{lo}, {hi}]"
        )
    if flags[1]:
        dup_mask = (sorted_rows[1:] == sorted_rows[:-1]) & (sorted_rows[1:] >= 0)
        dup = sorted_rows[1:][dup_mask][0].item()
        raise ValueError(f"index lists row {dup} more than once: each row may be edited at most once")
    return index
