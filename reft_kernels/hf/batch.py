"""One forward's intervention rows: built once per batch by the patched model forward and handed
to every decoder layer as the keyword argument ``reft_batch`` of the layer call.

Why a keyword argument and not state on a side object: with gradient checkpointing, transformers
5.17 re-runs the layer's ``__call__`` (hooks included) in the backward pass, after later forwards
may have replaced any side state; arguments of the layer call are recomputed with the layer, so
every recompute sees its own batch's rows (5.24 checkpoints ``forward`` only, which keeps hooks
outside; both are tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import remember_index_checked
from .positions import intervention_locations, locations_to_rows

KWARG = "reft_batch"


@dataclass(frozen=True)
class ReftBatch:
    """``rows[g]``: for ReFT group ``g`` (one per ``ReftConfig``), one 1-D int64 index per side
    (``(rows,)`` shared, ``(first_rows, last_rows)`` unshared), rows of the (B * S, d) view of the
    layer output, -1 for none. ``decode``: a generation step after the prefill (the KV cache
    already holds tokens); ReFT edits the prompt only, so the hooks leave decode steps alone.
    ``mixed``: a batch with one adapter per example (``adapter_names``), its
    ``mixed_batch.MixedAdapters``; None otherwise."""

    rows: tuple
    decode: bool
    mixed: object = None


# Imported here, not inside cache_length: torch 2.11's Dynamo cannot trace an import that resolves
# through transformers' lazy module ("Unsupported: Bad import result ... _LazyModule"), and
# cache_length runs inside the patched forward that torch.compile(fullgraph=True) traces.
try:
    from transformers import Cache as _Cache
except Exception:  # transformers absent or too old: a pattern-override model without HF caches
    _Cache = None


def cache_length(values) -> int:
    """Tokens already in the first ``transformers.Cache`` among ``values`` (0 when none): the
    cache object tells a decode step from a prefill whatever its keyword is called
    (``past_key_values`` on 5.17, ``cache`` on 5.24)."""
    if _Cache is None:
        return 0
    for v in values:
        if isinstance(v, _Cache):
            return int(v.get_seq_length())
    return 0


def check_locations(loc, bsz: int, seq: int, share_weights: bool, device) -> torch.Tensor:
    """Validate user-given ``intervention_locations`` and return them as int64 on ``device``:
    (B, P) or (B, 2, P) for shared weights (the two sides are then one list), (B, 2, P) for
    unshared; entries in [-1, seq) and no position listed twice in one example's list. The
    values are checked with one host synchronisation (device-side assertions inside
    ``torch.compile`` or CUDA-graph capture)."""
    if not isinstance(loc, torch.Tensor):
        raise TypeError(f"intervention_locations must be an integer tensor, got {type(loc).__name__}")
    if loc.dtype.is_floating_point or loc.dtype.is_complex or loc.dtype == torch.bool:
        raise TypeError(f"intervention_locations must be an integer tensor, got {loc.dtype}")
    shape = tuple(loc.shape)
    if loc.dim() not in (2, 3) or shape[0] != bsz or (loc.dim() == 3 and shape[1] != 2):
        want = "(B, P) or (B, 2, P)" if share_weights else "(B, 2, P)"
        raise ValueError(f"intervention_locations must have shape {want} with B = {bsz} for a batch of "
                         f"{bsz} x {seq} tokens, got {shape}")
    if not share_weights and loc.dim() != 3:
        raise ValueError(f"intervention_locations must be (B, 2, P) (first and last positions) for an "
                         f"intervention with share_weights=False, got {shape}")
    loc = loc.to(device=device, dtype=torch.long, non_blocking=True)
    sides = loc.reshape(bsz, -1) if share_weights else loc.transpose(0, 1).reshape(2 * bsz, -1)
    if sides.numel():
        srt = sides.sort(dim=1).values
        bad_range = (sides < -1).any() | (sides >= seq).any()
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
        if torch.compiler.is_compiling() or (loc.is_cuda and torch.cuda.is_current_stream_capturing()):
            torch._assert_async(~bad_range, "intervention_locations entries must lie in [-1, seq_len)")
            torch._assert_async(~dup, "intervention_locations lists a position twice in one example")
        else:
            flags = (bad_range.to(torch.uint8) + 2 * dup.to(torch.uint8)).item()  # the one sync
            if flags & 1:
                raise ValueError(f"intervention_locations entries must be -1 or positions in [0, {seq}) of "
                                 f"the padded input, got values in [{int(loc.min())}, {int(loc.max())}]")
            if flags & 2:
                raise ValueError("intervention_locations lists a position more than once in one example "
                                 "(each position may be edited once per intervention)")
    return loc


def build_batch(groups, bsz: int, seq: int, attention_mask: Optional[torch.Tensor], locations,
                decode: bool, device, prompt_lengths: Optional[torch.Tensor] = None) -> ReftBatch:
    """The rows of every ReFT group for one forward. ``groups``: the ReftConfigs, in order.
    Without ``locations``, each group's positions come from ``attention_mask`` (all tokens real
    when there is no 2-D mask), the prompt being each example's first ``prompt_lengths`` real
    tokens (every real token when None)."""
    if decode:
        return ReftBatch(rows=(), decode=True)
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        # rows built as normal tensors, so that check_index can remember them (inference tensors
        # have no version counter to key its cache on, which would cost a sync per layer). Not
        # asked inside torch.compile, which cannot trace the question (and needs no cache there:
        # the index checks are device-side assertions)
        with torch.inference_mode(False):
            return build_batch(groups, bsz, seq, attention_mask, locations, decode, device, prompt_lengths)
    if attention_mask is None or attention_mask.dim() != 2 or tuple(attention_mask.shape) != (bsz, seq):
        attention_mask = torch.ones(bsz, seq, dtype=torch.long, device=device)
    made = {}
    out = []
    for cfg in groups:
        key = (cfg.share_weights,) if locations is not None else (cfg.positions, cfg.share_weights)
        if key not in made:
            if locations is not None:
                loc = check_locations(locations, bsz, seq, cfg.share_weights, device)
                if cfg.share_weights:
                    loc = loc.reshape(bsz, -1)
            else:
                loc = intervention_locations(attention_mask.to(device), cfg.positions,
                                             None if prompt_lengths is None else prompt_lengths.to(device),
                                             share_weights=cfg.share_weights)
            rows = locations_to_rows(loc, seq)
            sides = (rows,) if rows.dim() == 1 else tuple(r.contiguous() for r in rows.unbind(0))
            for r in sides:
                remember_index_checked(r, bsz * seq)
            made[key] = sides
        out.append(made[key])
    return ReftBatch(rows=tuple(out), decode=False)
