"""Input checks of the multi-adapter ops: the stacked parameters and the adapter ids. Every bad
input becomes a ValueError or TypeError naming the argument and the shapes, before anything runs.

The adapter ids' values are checked like ``reft_kernels._validate.check_index`` checks an index:
eagerly (one host synchronisation on a GPU) once per ids tensor, remembered until the tensor is
written in place or the number of adapters changes; inside ``torch.compile`` and during CUDA-graph
capture as asynchronous device-side assertions instead (no synchronisation, no entry named)."""
from __future__ import annotations

import torch

from ..._validate import CheckedTensors

_IDS_CHECKED = CheckedTensors()  # fact: K, the number of adapters


def stack_shape(t, name: str, ndim: int, h: torch.Tensor, layout: str) -> tuple:
    """The shape of the stack that fixes K (and r): ``t`` must be a tensor of ``ndim`` dimensions
    laid out as ``layout`` (e.g. "(K, r, d)"), each >= 1, whose last dimension is ``h``'s d."""
    d = h.shape[-1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim or min(t.shape) < 1 or t.shape[-1] != d:
        raise ValueError(
            f"{name} must have shape {layout} (one slice per adapter) with every dimension >= 1 and "
            f"d = {d} (h has shape {tuple(h.shape)}), got {tuple(t.shape)}"
        )
    return tuple(t.shape)


def check_adapter_ids(ids, n: int, k: int, h: torch.Tensor, what: str) -> torch.Tensor:
    """Check ``adapter_ids``: an int64 tensor of shape (n,) on ``h``'s device with values in
    [-1, k); ``what`` says what the n entries are (e.g. "one per row of h.reshape(-1, d)").
    Returns it contiguous."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an int64 torch.Tensor of shape ({n},), got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"adapter_ids must be an int64 tensor, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"adapter_ids must have shape ({n},), {what}, got {tuple(ids.shape)}")
    if ids.device != h.device:
        raise ValueError(f"adapter_ids is on {ids.device} but h is on {h.device}")
    given, ids = ids, ids.contiguous()
    if ids.numel() == 0 or ids.device.type == "meta":
        return ids
    if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(((ids >= -1) & (ids < k)).all(), "adapter_ids must lie in [-1, number of adapters)")
        return ids
    if torch.is_inference(given):  # no version counter to key a cache on: check every call
        _check_values(ids, k)
        return ids
    if not _IDS_CHECKED.has(given, k):
        _check_values(ids, k)
        _IDS_CHECKED.add(given, k)
    return ids


def remember_adapter_ids_checked(ids: torch.Tensor, k: int) -> None:
    """Record that ``ids`` holds values in [-1, k) (its caller built it so, e.g. from ids already
    checked), so that ``check_adapter_ids`` skips the value check and its host synchronisation
    for this tensor until it is written to."""
    _IDS_CHECKED.add(ids, k)


def adapter_ids_checked(ids: torch.Tensor, k: int) -> bool:
    """Whether ``ids``' values are known to lie in [-1, k) (checked or remembered)."""
    return _IDS_CHECKED.has(ids, k)


def _check_values(ids: torch.Tensor, k: int) -> None:
    """The eager value check: one host synchronisation, an error naming the range found."""
    # ``.item()`` rather than ``.tolist()``: the same one sync, and one that a dispatch mode sees
    # (``benchmark.launches`` counts it; a CPU tensor's ``tolist`` reaches no ATen call)
    if ((ids < -1) | (ids >= k)).any().item():
        lo_hi = (int(ids.min()), int(ids.max()))
        raise ValueError(
            f"adapter_ids must lie in [-1, {k}) for {k} stacked adapter(s) (-1: no edit), got values "
            f"in [{lo_hi[0]}, {lo_hi[1]}]"
        )
