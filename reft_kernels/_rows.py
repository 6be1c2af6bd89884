"""Row views of (..., d) tensors and the index conventions shared by every backend.

An ``index`` is a 1-D int64 tensor of rows of ``t.reshape(-1, d)``; -1 entries are padding. The
backends keep one row per index entry (padding included) in everything they save, so that no
step depends on how many entries are real: no host synchronisation, no data-dependent shapes
(``torch.compile(fullgraph=True)`` and CUDA-graph capture stay possible).
"""
from __future__ import annotations

import math
import weakref

import torch

from ._validate import make_room


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an (N, d) matrix: a view whenever the leading dimensions can be merged (any
    strides, transposed last two dims included), otherwise a contiguous copy."""
    d = t.shape[-1]
    try:
        return t.view(-1, d)
    except RuntimeError:
        return t.reshape(-1, d)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rows that share its memory: the (N, d) view when its leading dimensions merge
    (any 2-D ``t`` itself), else ``as_2d_plus(t)``. Selectors derived on the (N, d) view are one
    index tensor, which ``gather_rows`` reads with ``index_select``."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return as_2d_plus(t)


def gather_rows(rows: torch.Tensor, selector: tuple) -> torch.Tensor:
    """``rows[selector]`` for a selector of ``row_selector`` / ``put_selector`` / ``edit_plan``
    derived on ``rows``: ``index_select`` when the selector is one index tensor. Measured on the
    2-core CPU (one thread, fp32, 224 of 1024 rows of width 576): 16 us against 79 us for
    advanced indexing with one index tensor and 91 us with two (a (16, 64, 576) ``t`` not
    flattened)."""
    return rows.index_select(0, selector[0]) if len(selector) == 1 else rows[selector]


def adds_rows(rows: torch.Tensor, selector: tuple) -> bool:
    """Whether an edit writes its new rows back into ``rows`` (an (N, d) view, ``selector`` one
    index tensor) by adding ``new - old`` with ``index_add_`` rather than putting ``new`` with
    ``index_put_``: on CPU tensors in the accumulation dtype (no rounding between the two), where
    it took 21 us against 70 us for ``index_put_`` with the ``index_select`` of its padding remap
    (224 of 1024 rows of width 576, fp32, 2-core CPU, one thread). Not on CUDA, where these ops
    were not measured. The caller adds zero rows for its padding entries (or sends them to a
    scratch row) and lists every real row once, so the sums need no order."""
    return (len(selector) == 1 and rows.device.type == "cpu" and rows.dtype == acc_dtype(rows.dtype)
            and rows.dim() == 2)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_2d_plus(t: torch.Tensor) -> torch.Tensor:
    """``t`` with at least two dimensions (a 1-D ``t`` is one row); a view."""
    return t.unsqueeze(0) if t.dim() == 1 else t


# What the row helpers derive from an index alone, kept per index tensor: a model hands one index
# to every layer, forward and backward, so the derivation (about ten small device ops: the
# selector, the validity mask, where row 0 is listed) runs once per index, not once per layer
# and pass. Keyed by id, checked against a weak reference and the version counter (an in-place
# write re-derives); not kept under torch.compile (it traces the ops), during CUDA-graph capture,
# or for inference tensors (no version counter). When full, the entries of tensors that are gone
# are dropped (``make_room``): a full clear in the middle of a forward made the layers after it
# derive their index's facts again, a step's launch count depending on what ran before it.
_FACTS: dict = {}  # (kind, id(index), lead shape) -> (weakref, version, facts)
_FACTS_SIZE = 64


def cached_facts(kind: str, index: torch.Tensor, lead: tuple, compute):
    """``compute(index, lead)``, kept per index tensor, version and ``kind`` (see ``_FACTS``).
    ``index`` may be any tensor whose values alone decide the facts (the multi-adapter ops key
    their row patterns on the adapter ids); ``lead`` any tuple of hashable values the facts also
    depend on (the leading shape here)."""
    cache = not (torch.compiler.is_compiling() or torch.is_inference(index)
                 or (index.is_cuda and torch.cuda.is_current_stream_capturing()))
    if cache:  # (id() only outside torch.compile: the Dynamo of torch 2.11 cannot trace it)
        key = (kind, id(index), tuple(lead))
        hit = _FACTS.get(key)
        if hit is not None and hit[0]() is index and hit[1] == index._version:
            return hit[2]
    facts = compute(index, lead)
    if cache:
        make_room(_FACTS, _FACTS_SIZE)
        _FACTS[key] = (weakref.ref(index), index._version, facts)
    return facts


def _derive_facts(index: torch.Tensor, lead: tuple):
    valid = index >= 0
    safe = index.clamp_min(0)
    sel = (safe,) if len(lead) == 1 else torch.unravel_index(safe, lead)
    # no .item(): sync-free (an empty index has no argmax: position 0, never used)
    if index.numel():
        first = valid.to(torch.uint8).argmax().reshape(1)
    else:
        first = index.new_zeros(1)
    return valid, sel, first


def _index_facts(index: torch.Tensor, lead: tuple):
    """(valid (n,) bool, selector, position of the first real entry (1,); 0 when there is none)."""
    return cached_facts("facts", index, lead, _derive_facts)


def _derive_row0(index: torch.Tensor, lead: tuple):
    hit0 = index == 0
    pos0 = hit0.to(torch.uint8).argmax().reshape(1) if index.numel() else index.new_zeros(1)
    return pos0, hit0.any()


def _row0_facts(index: torch.Tensor, lead: tuple):
    """(position of the first 0 entry (1,), whether 0 is listed ()): only ``put_rows`` needs them,
    so they are derived apart (four launches per index that the low-rank edit's hooks never
    pay)."""
    return cached_facts("row0", index, lead, _derive_row0)


def _derive_put_plan(index: torch.Tensor, lead: tuple):
    valid, sel, first = _index_facts(index, lead)
    remap = torch.where(valid, torch.arange(index.shape[0], device=index.device), first)
    return remap, tuple(s.index_select(0, remap) for s in sel)


def put_selector(t: torch.Tensor, index: torch.Tensor):
    """Advanced-indexing selector of one row of ``t.reshape(-1, d)`` per index entry, like
    ``row_selector``'s, but each padding entry points at the first real entry's row (at row 0
    when none is real): rows gathered with it are real rows of ``t``, and ``put_rows_`` writes
    back to the same places. Derived once per index tensor."""
    return _put_plan(index, tuple(as_2d_plus(t).shape[:-1]))[1]


def _put_plan(index: torch.Tensor, lead: tuple):
    """(remap (n,), selector) of ``put_rows_``: entry i writes row ``remap[i]`` of its rows to
    selector[i]; a padding entry repeats the first real entry (its row and its value), or, when
    no entry is real, writes entry 0's value to row 0. Derived once per index tensor."""
    return cached_facts("put", index, lead, _derive_put_plan)


def _derive_edit_plan(index: torch.Tensor, lead: tuple):
    valid = _index_facts(index, lead)[0]
    remap, target = _put_plan(index, lead)
    return valid[:, None], remap, target


def edit_plan(rows: torch.Tensor, index: torch.Tensor):
    """(keep (n, 1) bool, remap (n,), selector) for editing the rows ``index`` of ``rows`` (an
    ``as_2d_plus`` view): ``keep`` marks the real entries, ``rows[selector]`` gathers one row per
    entry as ``put_selector`` does, and ``rows.index_put_(selector, new.index_select(0, remap))``
    writes them back as ``put_rows_`` does. One cached lookup for the three (no launch of its
    own: views of ``_index_facts`` and ``_put_plan``)."""
    return cached_facts("plan", index, tuple(rows.shape[:-1]), _derive_edit_plan)


def first_real_entry(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(1,) int64: the position in ``index`` of its first non-negative entry (0 when there is
    none), without a host synchronisation; derived once per index tensor."""
    return _index_facts(index, tuple(as_2d_plus(t).shape[:-1]))[2]


def _derive_scratch(index: torch.Tensor, lead: tuple):
    n_rows = 1
    for size in lead:
        n_rows *= size
    return torch.where(_index_facts(index, lead)[0], index, n_rows)


def scratch_selector(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(n,) int64: ``index`` into the N rows of ``t.reshape(-1, d)``, with every padding entry
    replaced by N, the row one past the end: rows of an (N + 1, d) buffer whose last row is a
    scratch row, which padding entries read (it holds what the caller put there, e.g. zeros) and
    write (any of their values may land there; the caller drops that row). Derived once per
    index tensor, from its validity mask (one launch; the mask of the merged (N,) rows, which
    ``rows_view`` users such as the forward derived already)."""
    return cached_facts("scratch", index, (math.prod(t.shape[:-1]),), _derive_scratch)


_CONST_ROWS: dict = {}  # (value, dtype, device, d) -> a (1, d) constant row, never written


def const_row(t, value: float = 0.0):
    """A (1, d) row filled with ``value`` in ``t``'s dtype and device: kept per (value, dtype,
    device, d), so that appending it to ``t``'s rows is one launch (``cat``), not two (a fill and
    the cat); made anew inside torch.compile, which traces it."""
    if torch.compiler.is_compiling():
        return t.new_full((1, t.shape[-1]), value)
    key = (value, t.dtype, t.device, t.shape[-1])
    row = _CONST_ROWS.get(key)
    if row is None:
        if len(_CONST_ROWS) >= 64:
            _CONST_ROWS.clear()
        row = _CONST_ROWS[key] = torch.full((1, t.shape[-1]), value, dtype=t.dtype, device=t.device)
    return row


def scratch_buffer(t: torch.Tensor, index: torch.Tensor):
    """(buf, selector) for writing the rows ``index`` of a copy of ``t`` without a padding mask:
    ``buf`` (N + 1, d), t's rows then a zero scratch row (one ``cat``), and ``selector`` the
    ``scratch_selector`` into it; ``buf[:N]`` is the copy. None when t's leading dimensions do
    not merge into one (no (N, d) view to copy in one launch)."""
    rows = rows_view(t)
    if rows.dim() != 2:
        return None
    return torch.cat([rows, const_row(t)]), scratch_selector(t, index)


def row_selector(t: torch.Tensor, index: torch.Tensor):
    """Advanced-indexing selector of the rows ``index`` of ``t.reshape(-1, d)``, usable on
    ``as_2d_plus(t)`` whatever ``t``'s strides, with -1 entries pointing at row 0.

    Returns (selector, valid): ``as_2d_plus(t)[selector]`` gathers one row per index entry
    (n, d); ``valid`` (n,) bool marks the real entries. Derived once per index tensor (see
    ``_index_facts``).
    """
    valid, sel = _index_facts(index, tuple(as_2d_plus(t).shape[:-1]))[:2]
    return sel, valid


def put_rows_(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row ``index[i]`` of ``dst`` (an ``as_2d_plus`` view) set to ``rows[i]`` for the real entries
    of ``index`` only, in place, deterministic, with no host synchronisation: two
    launches (``_put_plan``: each padding entry repeats the first real entry's write, so every
    write to a row agrees).

    Precondition: ``rows`` at padding entries hold ``dst``'s current row 0 when no entry of
    ``index`` is real (they are written, to row 0, only then): what a row-wise edit that leaves its
    padding rows unchanged gives on rows gathered with ``put_selector`` or ``row_selector``.

    Not differentiable: autograd through these writes would send row 0's gradient once more for
    every padding entry. Called with grad mode on and a tensor that requires grad it raises; code
    that needs gradients calls ``put_rows``, whose backward is exact for any index.
    """
    if torch.is_grad_enabled() and (dst.requires_grad or rows.requires_grad):
        raise RuntimeError(
            "put_rows_ is not differentiable (its padding entries copy row 0, so autograd would "
            "count row 0's gradient once per padding entry): use reft_kernels._rows.put_rows"
        )
    if index.numel() == 0 or dst.numel() == 0:
        return dst
    remap, target = _put_plan(index, tuple(dst.shape[:-1]))
    return dst.index_put_(target, rows.index_select(0, remap))


def _agreeing_rows(dst, index, rows):
    """``rows`` with each padding entry replaced by row 0's final value (its new value when row 0
    is listed, its current value otherwise), so that every write reaching row 0 agrees."""
    row0 = dst[(0,) * (dst.dim() - 1)]
    lead = tuple(dst.shape[:-1])
    valid = _index_facts(index, lead)[0]
    pos0, any0 = _row0_facts(index, lead)
    new0 = rows.index_select(0, pos0)[0]
    row0 = torch.where(any0, new0, row0)
    return torch.where(valid[:, None], rows, row0)


class PutRowsFunction(torch.autograd.Function):
    """``put_rows`` as an autograd Function with an exact backward for any index with padding.

    Forward: a copy of ``dst`` (..., d) with row ``index[i]`` of ``dst.reshape(-1, d)`` replaced by
    ``rows[i]`` (n, d) for every real entry; -1 entries write nothing.
    Backward, with ``g`` the gradient of the output: ``d dst`` is ``g`` with the listed rows zeroed
    (the same put, of zeros: itself exact, so double backward is exact too), ``d rows[i]`` is
    ``g``'s row ``index[i]`` for a real entry and zero for a padding entry. Each row's gradient is
    counted once, whatever the number and order of padding entries.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dst, index, rows):
        # Out of place (index_put, not a clone written by index_put_): under torch.compile on
        # torch 2.11 the in-place write into the clone gave zero gradients through this Function.
        if index.numel() == 0 or dst.numel() == 0:
            return dst.clone()
        sel, _ = row_selector(dst, index)
        d2 = as_2d_plus(dst)
        return d2.index_put(sel, _agreeing_rows(d2, index, rows.to(dst.dtype))).view(dst.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dst, index, rows = inputs
        ctx.save_for_backward(index)
        ctx.rows_meta = (rows.shape, rows.dtype)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        shape, dtype = ctx.rows_meta
        need_dst, _, need_rows = ctx.needs_input_grad
        g_dst = g_rows = None
        if need_dst:
            g_dst = put_rows(g, index, g.new_zeros(shape))
        if need_rows:
            if g.numel() == 0:
                g_rows = g.new_zeros(shape, dtype=dtype)
            else:
                sel, valid = row_selector(g, index)
                g_rows = torch.where(valid[:, None], as_2d_plus(g)[sel], 0).to(dtype)
        return g_dst, None, g_rows


def put_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``dst`` (..., d) whose rows ``index`` (n,) of ``dst.reshape(-1, d)`` hold ``rows``
    (n, d), -1 entries skipped; differentiable with an exact backward (``PutRowsFunction``), no
    host synchronisation. ``index`` must list each row at most once (``check_index``)."""
    return PutRowsFunction.apply(dst, index, rows)


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
