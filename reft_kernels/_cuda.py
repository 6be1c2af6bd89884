"""Shared pieces of the CUDA C++ backend (``backend="cuda"``): access to the compiled extension
``reft_kernels._C``, its argument conventions, the kernel choice the backward finishes share
(``finish_kernel``), and the one supported way to run its kernels on host tensors (the CPU
emulation of the test suite).

The extension is optional: a CPU-only or pure-Python install has no ``_C`` and everything else
works; asking for ``backend="cuda"`` then raises a RuntimeError that says how to build it. The
ops of ``reft_kernels/ops/*/cuda_impl.py`` are registered with ``torch.library`` (namespace
``reft_kernels``); each has a fake implementation for torch.compile and a PyTorch implementation
for tensors on other devices, so their registration is testable without a GPU.
"""
from __future__ import annotations

import contextlib

import torch

from ._constants import CUDA_MAX_RANK, NUM_ACTIVATIONS
from .ops import variants

BUILD_HINT = (
    "build it next to a CUDA build of torch with `pip install --no-build-isolation -e .` "
    "(nvcc on PATH or CUDA_HOME set; see the README's section on the CUDA extension)"
)

_EXT = None
_EXT_ERROR = None
# Set by ``on_host``: (extension or None whose kernels take host tensors, forced cluster shape).
_HOST = None


def _check_constants(ext) -> None:
    """Refuse a build whose constants differ from ``reft_kernels._constants`` (a stale build)."""
    theirs = (getattr(ext, "MAX_RANK", None), getattr(ext, "NUM_ACTIVATIONS", None))
    ours = (CUDA_MAX_RANK, NUM_ACTIVATIONS)
    if theirs != ours:
        raise ImportError(
            f"reft_kernels._C was built from other sources: (MAX_RANK, NUM_ACTIVATIONS) = {theirs}, "
            f"this package expects {ours}; rebuild it"
        )


def extension():
    """The compiled module ``reft_kernels._C``; RuntimeError with build instructions if missing."""
    global _EXT, _EXT_ERROR
    if _HOST is not None and _HOST[0] is not None:
        return _HOST[0]
    if _EXT is None and _EXT_ERROR is None:
        try:
            from . import _C
            _check_constants(_C)
            _EXT = _C
        except ImportError as exc:  # not built, built against another torch, or stale
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


@contextlib.contextmanager
def on_host(ext=None, *, cluster_shape=(0, 0)):
    """Let ``backend="cuda"`` take CPU tensors while the context is open (for tests).

    ``ext``: an extension built from ``csrc/`` for the host (``tests/cuda/emulation``), whose
    entry points take CPU tensors: the CUDA backend's Python side then calls it exactly as it
    calls ``reft_kernels._C`` on a GPU. ``ext=None``: CPU tensors go through the backend's
    ``torch.library`` ops, which run their PyTorch implementation there (what the op
    registration, the op contracts and torch.compile are tested with).

    ``cluster_shape``: (cluster size, clusters) of the one-pass cluster backward
    (``reft_kernels.kernels(cuda_lowrank_bwd="cluster")``) while the context is open, 0 for the
    extension's choice (from d, and from the device's co-resident clusters). The emulated tests
    force them so that small inputs reach several CTAs per cluster and several clusters; a size
    that does not fit d makes the cluster backward refuse the call (``cuda_impl.bwd_plan`` raises).
    Contexts nest; the innermost one holds.
    """
    global _HOST
    if ext is not None:
        _check_constants(ext)
    size, clusters = (int(v) for v in cluster_shape)
    if size < 0 or clusters < 0:
        raise ValueError(f"on_host: cluster_shape must be two integers >= 0, got {cluster_shape!r}")
    previous, _HOST = _HOST, (ext, (size, clusters))
    try:
        yield
    finally:
        _HOST = previous


def cluster_shape() -> tuple[int, int]:
    """(cluster size, clusters) forced on the cluster backward by ``on_host``; (0, 0) outside it:
    the extension chooses."""
    return _HOST[1] if _HOST is not None else (0, 0)


def finish_kernel() -> str:
    """The fixed-order sum that finishes every parameter gradient of the CUDA backwards (RED's
    and the low-rank edit's) from their fp32 per-row-block partials: ``"serial"`` (the rule; one
    thread per column) or ``"split"`` (several threads per column and a fixed tree), as requested
    by ``reft_kernels.kernels(cuda_finish=...)`` when a kernel is called. Both are bitwise
    deterministic for a given shape; their summation orders differ."""
    return variants.active().choice("cuda_finish")


def host_mode() -> bool:
    """True inside ``on_host``: backend="cuda" accepts CPU tensors."""
    return _HOST is not None


def host_kernels() -> bool:
    """True inside ``on_host(ext)`` with an extension: call its kernels directly on CPU tensors."""
    return _HOST is not None and _HOST[0] is not None


def call_op(op, kernel, *args):
    """Run a backend op: the torch.library ``op`` (dispatch by device), or, inside ``on_host(ext)``,
    its CUDA implementation ``kernel`` directly on host tensors (the emulated kernels)."""
    return kernel(*args) if host_kernels() else op(*args)


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
