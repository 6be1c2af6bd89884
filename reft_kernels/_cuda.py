"""Shared pieces of the CUDA C++ backend (``backend="cuda"``): access to the compiled extension
``reft_kernels._C`` and the argument conventions of its entry points.

The extension is optional: a CPU-only or pure-Python install has no ``_C`` and everything else
works; asking for ``backend="cuda"`` then raises a RuntimeError that says how to build it.
Each op file registers its CUDA ops with ``torch.library`` (namespace ``reft_kernels``); those
ops have a fake implementation for torch.compile and a PyTorch implementation for tensors on
other devices, so their registration is testable without a GPU.
"""
from __future__ import annotations

import torch

# The CUDA kernels keep the (rows, r) latents of a row group in shared memory sized for this
# rank (csrc/launch.h, kMaxRank).
CUDA_MAX_RANK = 64

BUILD_HINT = (
    "build it next to a CUDA build of torch with `pip install --no-build-isolation -e .` "
    "(nvcc on PATH or CUDA_HOME set; see the README's section on the CUDA extension)"
)

_EXT = None
_EXT_ERROR = None


def extension():
    """The compiled module ``reft_kernels._C``; RuntimeError with build instructions if missing."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            from . import _C
            _EXT = _C
        except ImportError as exc:  # not built, or built against another torch
            _EXT_ERROR = exc
    if _EXT is None:
        raise RuntimeError(
            f"backend='cuda' needs the compiled extension reft_kernels._C ({_EXT_ERROR}); {BUILD_HINT}"
        )
    return _EXT


def extension_available() -> bool:
    try:
        extension()
    except RuntimeError:
        return False
    return True


def kernel_params(h_dtype: torch.dtype, *params):
    """Parameters as the kernels take them: contiguous, all in one dtype that is either ``h``'s
    or float32. Mixed or other dtypes become float32 copies (the gradients are cast back to each
    parameter's own dtype by the autograd Function)."""
    dtypes = {p.dtype for p in params if p is not None}
    if len(dtypes) == 1 and dtypes.pop() in (h_dtype, torch.float32):
        return tuple(None if p is None else p.contiguous() for p in params)
    return tuple(None if p is None else p.float().contiguous() for p in params)


def if_needed(t: torch.Tensor, needed: bool):
    """``t``, or None for an output that was not asked for (the ops return an empty tensor there)."""
    return t if needed else None


def empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)
