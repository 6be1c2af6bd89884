"""Input checks shared by the ops: every bad input becomes a ValueError or TypeError that names the
argument and the shapes involved, before any kernel runs."""
from __future__ import annotations

import weakref

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
    if t.shape != shape and tuple(t.shape) != tuple(shape):  # (torch.Size is a tuple: no copy first)
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


def make_room(cache: dict, size: int) -> None:
    """The eviction of the package's caches keyed by tensor ``id`` (each value starting with a
    weak reference to its tensor): once ``cache`` holds ``size`` entries, drop those whose tensor
    is gone, and every entry only if none is. (Clearing everything instead would drop the live
    tensors' entries too, e.g. in the middle of a forward whose layers share an index.)"""
    if len(cache) >= size:
        for key in [k for k, v in cache.items() if v[0]() is None]:
            del cache[key]
        if len(cache) >= size:
            cache.clear()


class CheckedTensors:
    """Tensors whose values were checked (or built valid), each with the fact checked against
    (``n_rows``, a number of adapters): a value check with its host synchronisation is then paid
    once per tensor, until its version counter moves (an in-place write), its storage changes or
    the fact differs. Keyed by ``id`` with a weak reference (no tensor is kept alive); inference
    tensors (no version counter) and tensors inside ``torch.compile`` are never remembered."""

    def __init__(self, size: int = 256):
        self._seen: dict = {}  # id(t) -> (weakref, version, data_ptr, fact)
        self._size = size

    def has(self, t: torch.Tensor, fact) -> bool:
        hit = self._seen.get(id(t))
        return hit is not None and hit[0]() is t and hit[1:] == (t._version, t.data_ptr(), fact)

    def add(self, t: torch.Tensor, fact) -> None:
        if torch.compiler.is_compiling() or torch.is_inference(t) or t.device.type == "meta":
            return
        make_room(self._seen, self._size)
        self._seen[id(t)] = (weakref.ref(t), t._version, t.data_ptr(), fact)


_INDEX_CHECKED = CheckedTensors()  # fact: n_rows


def check_index(index, n_rows: int, h: torch.Tensor) -> torch.Tensor:
    """Check a row index into ``h.reshape(-1, d)`` and return it as a contiguous int64 tensor.

    Entries must lie in [-1, n_rows); -1 is padding (skipped). Listed rows must be distinct: an
    edit applied twice to one row has no single meaning, so duplicates are rejected.

    Cost: the type, shape and device checks are free. The values are checked eagerly, with an
    error that names the bad entry, once per index tensor: the result is remembered for that
    tensor until its version counter moves (an in-place write) or ``n_rows`` changes, so a model
    that passes one index to every layer pays one check (one host synchronisation on a GPU) per
    index, not per call. Inside ``torch.compile`` and while a CUDA graph is being captured, where
    a host synchronisation is not allowed, the same checks run as asynchronous device-side
    assertions instead (an error at run time, without the entry named). Meta tensors hold no
    values and are not value-checked.
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D integer torch.Tensor or None, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor (int64), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if index.device != h.device:
        raise ValueError(f"index is on {index.device} but h is on {h.device}")
    # (the conversions only where they do something: a no-op .to/.contiguous still dispatches,
    # 1.1 us for the pair against 0.2 us for the two checks on the 2-core CPU)
    given = index
    if index.dtype != torch.int64:
        index = index.to(torch.int64)
    if not index.is_contiguous():
        index = index.contiguous()
    if index.numel() == 0 or index.device.type == "meta":
        return index
    if torch.compiler.is_compiling() or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        out_of_range, duplicate = _index_flags(index, n_rows)
        torch._assert_async(~out_of_range, "index entries must lie in [-1, number of rows of h)")
        torch._assert_async(~duplicate, "index lists a row more than once")
        return index
    if torch.is_inference(given):  # no version counter to key a cache on: check every call
        _check_index_values(index, n_rows, h)
        return index
    if not _INDEX_CHECKED.has(given, n_rows):
        _check_index_values(index, n_rows, h)
        _INDEX_CHECKED.add(given, n_rows)
    return index


def remember_index_checked(index: torch.Tensor, n_rows: int) -> None:
    """Record that ``index`` holds valid, distinct rows of an ``n_rows``-row tensor (its caller
    built it so, e.g. from an attention mask), so that ``check_index`` skips the value check and
    its host synchronisation for this tensor until it is written to."""
    _INDEX_CHECKED.add(index, n_rows)


def _index_flags(index: torch.Tensor, n_rows: int):
    """(any entry out of [-1, n_rows), any row listed twice) as 0-d bool tensors (no sync)."""
    sorted_rows = index.sort().values
    out_of_range = (index < -1).any() | (index >= n_rows).any()
    duplicate = ((sorted_rows[1:] == sorted_rows[:-1]) & (sorted_rows[1:] >= 0)).any()
    return out_of_range, duplicate


def _check_index_values(index: torch.Tensor, n_rows: int, h: torch.Tensor) -> None:
    """The eager value check (one host synchronisation), with errors that name the entry."""
    out_of_range, duplicate = _index_flags(index, n_rows)
    flags = (out_of_range.to(torch.uint8) + 2 * duplicate.to(torch.uint8)).item()  # the one sync
    if flags & 1:
        lo, hi = int(index.min()), int(index.max())
        raise ValueError(
            f"index entries must lie in [-1, {n_rows}) for h of shape {tuple(h.shape)} "
            f"({n_rows} rows of width {h.shape[-1]}), got values in [{lo}, {hi}]"
        )
    if flags & 2:
        sorted_rows = index.sort().values
        dup_mask = (sorted_rows[1:] == sorted_rows[:-1]) & (sorted_rows[1:] >= 0)
        dup = sorted_rows[1:][dup_mask][0].item()
        raise ValueError(f"index lists row {dup} more than once: each row may be edited at most once")


# ----------------------------------------------------------------------------- in-place targets

def _byte_span(t: torch.Tensor):
    """[lo, hi) bytes of ``t``'s storage that ``t`` can touch (None when empty)."""
    if t.numel() == 0:
        return None
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    es = t.element_size()
    return lo * es, (hi + 1) * es


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may touch a common byte: same storage and overlapping spans
    (conservative: interleaved views that never meet are reported too)."""
    if a.device != b.device or a.device.type == "meta":
        return False
    sa, sb = _byte_span(a), _byte_span(b)
    if sa is None or sb is None:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return sa[0] < sb[1] and sb[0] < sa[1]


def may_overlap_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share a memory location: a stride-0 (expanded) dimension,
    or strides that do not nest (``as_strided`` views whose rows overlap). Conservative: a layout
    whose strides interleave without overlapping is reported too."""
    if t.numel() == 0:  # no two elements to overlap (PyTorch may give empty results stride 0)
        return False
    extent = 0
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def check_inplace_target(h: torch.Tensor, others: dict) -> None:
    """Everything that would make an in-place edit of ``h`` fail or go wrong, checked before the
    first write (PyTorch's own in-place ops raise the same kinds of RuntimeError, also before
    writing). ``others``: name -> tensor (or None) read by the op, which ``h`` must not share
    memory with; their ``requires_grad`` decides, as for PyTorch, whether the edit is recorded
    by autograd. Inside ``torch.compile`` nothing is checked here (tensor identity, views and
    storage are not traceable; the compiled graph's own autograd checks apply)."""
    if torch.compiler.is_compiling():
        return
    if torch.is_inference(h) and not torch.is_inference_mode_enabled():
        raise RuntimeError("h is an inference tensor: it cannot be edited in place outside torch.inference_mode()")
    if torch.is_grad_enabled() and h.requires_grad:
        if h.is_leaf and h._is_view():  # a view taken under no_grad of a tensor that requires grad
            raise RuntimeError(
                "h is a view created in no_grad mode of a tensor that requires grad: it cannot be "
                "edited in place with grad mode on; take the view with grad mode on, or edit a clone"
            )
        if h.is_leaf:
            raise RuntimeError(
                "a leaf Variable that requires grad (h) cannot be edited in place: use the "
                "out-of-place op, or edit a clone (h.clone())"
            )
        if h._base is not None and h._base.is_leaf:
            raise RuntimeError(
                "a view of a leaf Variable that requires grad (h) cannot be edited in place: use "
                "the out-of-place op, or edit a view of a clone"
            )
    if may_overlap_itself(h):
        raise RuntimeError(
            f"unsupported operation: more than one element of h (shape {tuple(h.shape)}, strides "
            f"{tuple(h.stride())}) may refer to a single memory location (an expanded or overlapping "
            "view); clone() it before editing it in place"
        )
    for name, t in others.items():
        if t is not None and shares_memory(h, t):
            raise RuntimeError(
                f"h shares memory with {name}: an in-place edit of h would change {name} while the "
                f"op reads it; clone() one of them first"
            )
    grad_needed = h.requires_grad or any(t is not None and t.requires_grad for t in others.values())
    if torch.is_grad_enabled() and grad_needed and h._is_view():
        # Views that autograd forbids editing in place (outputs of unbind/split, views taken in
        # no_grad mode of a tensor that now needs grad) carry a private creation mark: an
        # in-place op on an empty slice of h makes autograd run its own checks, writing nothing.
        probe = h.narrow(-1, 0, 0)
        try:
            if probe.requires_grad:
                probe.mul_(1)
            else:
                probe.add_(torch.zeros(0, dtype=h.dtype, device=h.device, requires_grad=True))
        except RuntimeError as exc:
            raise RuntimeError(f"h cannot be edited in place: {exc}") from None
