"""Which token positions a ReFT intervention edits, computed on the device for a whole batch.

Conventions (the ReFT paper's, which pyreft's paper scripts follow):
- ``positions="f{k}+l{k2}"``: the first ``k`` and the last ``k2`` tokens of each prompt, each side
  capped at half the prompt length (``prompt_len // 2``) so that the two never overlap; the last
  side includes the final prompt token. ``"f{k}"`` / ``"l{k}"``: one side only, capped at the
  prompt length. ``"all"``: every prompt token.
- The prompt of example ``b`` is its first ``prompt_lengths[b]`` real tokens (``attention_mask``
  is 1), or all of its real tokens when ``prompt_lengths`` is None; real tokens may be left- or
  right-padded. Positions are indices into the padded sequence.
- Training batches without locations: ``prompt_lengths_from_labels`` takes the prompt of each
  example as its real tokens before the first one whose label is not ``-100`` (the collator's
  labels mask the prompt and the padding).
- pyreft's bundled datasets pass ``prompt_len - 1`` as the last position, so their ``l{k}`` leaves
  out the final prompt token; pass ``prompt_lengths - 1`` to reproduce them. Its paper scripts
  instead prepend one pad "sink" token, which moves every position by one.

Shapes: each side's k is first capped at what a padded sequence of S tokens can hold (S // 2 per
side for ``"f{k}+l{k2}"``, S for one side), so the cost follows the sequence, not k:
``"f1000000+l1000000"`` on 6 tokens is ``"f3+l3"``. With k, k2 so capped, shared weights give
(B, P) with P = k + k2 (first positions, then last positions); unshared give (B, 2, P) with
P = max(k, k2), row 0 the first positions and row 1 the last; ``"all"`` gives (B, S). Unused slots
hold -1. No host synchronisation and no Python loop over the batch: the result depends only on
the mask's shape, so it can be computed inside a compiled or captured step.
"""
from __future__ import annotations

import re

import torch

_PART = re.compile(r"^([fl])(\d+)$")


def parse_positions(positions: str):
    """``"f7+l7"`` -> (7, 7); ``"f3"`` -> (3, 0); ``"l5"`` -> (0, 5); ``"all"`` -> "all"."""
    if not isinstance(positions, str):
        raise TypeError(f"positions must be a string such as 'f7+l7', 'f3', 'l5' or 'all', "
                        f"got {type(positions).__name__}")
    spec = positions.strip().lower()
    if spec == "all":
        return "all"
    parts = [_PART.match(p) for p in spec.split("+")]
    sides = [m.group(1) for m in parts if m]
    if not all(parts) or sides not in (["f"], ["l"], ["f", "l"]):
        raise ValueError(f"positions must be 'f<k>+l<k>', 'f<k>', 'l<k>' or 'all', got {positions!r}")
    k = {m.group(1): int(m.group(2)) for m in parts}
    if 0 in k.values():
        raise ValueError(f"positions {positions!r}: each k must be >= 1")
    return k.get("f", 0), k.get("l", 0)


def both_sides(spec) -> bool:
    """Whether ``parse_positions``' (k, k2) names both sides (each then capped at half the prompt)."""
    return spec != "all" and all(spec)


def cap_positions(spec, seq: int):
    """(k, k2) of ``parse_positions`` capped at what a padded sequence of ``seq`` tokens can hold:
    each side at ``seq // 2`` with both sides (a prompt of at most ``seq`` tokens gives each side
    at most half of it), at ``seq`` with one. O(1): nothing is built from k."""
    first, last = spec
    most = seq // 2 if both_sides(spec) else seq
    return min(first, most), min(last, most)


def _describe(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_mask(attention_mask, prompt_lengths):
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (batch, seq_len) tensor, got {_describe(attention_mask)}")
    if prompt_lengths is not None:
        if not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.shape != attention_mask.shape[:1]:
            raise ValueError(f"prompt_lengths must be a ({attention_mask.shape[0]},) tensor for attention_mask of "
                             f"shape {tuple(attention_mask.shape)}, got {_describe(prompt_lengths)}")
        if prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype == torch.bool:
            raise TypeError(f"prompt_lengths must be an integer tensor, got {prompt_lengths.dtype}")
        if prompt_lengths.device != attention_mask.device:
            raise ValueError(f"prompt_lengths is on {prompt_lengths.device} but attention_mask is on "
                             f"{attention_mask.device}")


def _prompt_positions(attention_mask, prompt_lengths):
    """(pos, length): ``pos[b, j]`` is the padded position of the j-th real token of example b
    (S where there is none), ``length[b]`` the prompt length (clamped to the real tokens)."""
    real = attention_mask.bool()
    bsz, seq = real.shape
    n_real = real.sum(1)
    # rank of each real token among the real tokens of its row; the j-th real token sits where
    # rank == j. Scatter positions into (B, S) by rank: padding goes to a dump column S.
    rank = real.long().cumsum(1) - 1
    col = torch.where(real, rank, torch.full_like(rank, seq))
    pos = torch.full((bsz, seq + 1), seq, dtype=torch.long, device=real.device)
    pos.scatter_(1, col, torch.arange(seq, device=real.device).expand(bsz, seq).contiguous())
    length = n_real if prompt_lengths is None else torch.minimum(prompt_lengths.to(torch.long).clamp_min(0), n_real)
    return pos[:, :seq], length


def intervention_locations(attention_mask, positions="f7+l7", prompt_lengths=None, *, share_weights=True):
    """Intervention locations for a padded batch; see the module docstring for the conventions.

    Args:
        attention_mask: (B, S), 1 for real tokens (left or right padding).
        positions: "f{k}+l{k}", "f{k}", "l{k}" or "all".
        prompt_lengths: optional (B,) integer tensor, the prompt's length in real tokens.
        share_weights: one intervention for first and last positions, (B, P); otherwise (B, 2, P).

    Returns an int64 tensor on the mask's device, -1 in unused slots.
    """
    spec = parse_positions(positions)
    _check_mask(attention_mask, prompt_lengths)
    bsz, seq = attention_mask.shape
    dev = attention_mask.device
    if spec == "all":
        if seq == 0:
            return torch.empty((bsz, 0), dtype=torch.long, device=dev)
        pos, length = _prompt_positions(attention_mask, prompt_lengths)
        j = torch.arange(seq, device=dev)
        return torch.where(j[None, :] < length[:, None], pos, -1)
    first, last = cap_positions(spec, seq)
    if seq == 0:
        shape = (bsz, first + last) if share_weights else (bsz, 2, max(first, last))
        return torch.full(shape, -1, dtype=torch.long, device=dev)
    pos, length = _prompt_positions(attention_mask, prompt_lengths)
    cap = length // 2 if both_sides(spec) else length
    n_first = cap.clamp_max(first)
    n_last = cap.clamp_max(last)
    # the first n_first prompt tokens are the real tokens of rank 0 .. n_first - 1
    jf = torch.arange(first, device=dev)
    first_pos = torch.where(jf[None, :] < n_first[:, None], pos.gather(1, jf.clamp_max(seq - 1).expand(bsz, -1)), -1)
    # the last n_last, in order, are the real tokens of rank length - n_last + j
    jl = torch.arange(last, device=dev)
    rank_l = ((length - n_last)[:, None] + jl[None, :]).clamp(0, seq - 1)
    last_pos = torch.where(jl[None, :] < n_last[:, None], pos.gather(1, rank_l), -1)
    if share_weights:
        return torch.cat([first_pos, last_pos], dim=1)
    width = max(first, last)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
    return torch.stack([pad(first_pos), pad(last_pos)], dim=1)


def locations_to_rows(locations, seq_len: int):
    """Flat row numbers into the (B * S, d) view of a (B, S, d) hidden state: ``b * S + pos``,
    -1 kept for unused slots. ``locations``: (B, P) or (B, 2, P) from ``intervention_locations``
    (the latter gives (2, B * P): one index per intervention, first then last)."""
    if not isinstance(locations, torch.Tensor) or locations.dim() not in (2, 3):
        raise ValueError("locations must be a (B, P) or (B, 2, P) tensor")
    bsz = locations.shape[0]
    offset = (torch.arange(bsz, device=locations.device) * seq_len).view(bsz, *([1] * (locations.dim() - 1)))
    rows = torch.where(locations >= 0, locations + offset, -1)
    if locations.dim() == 3:
        return rows.transpose(0, 1).reshape(2, -1)
    return rows.reshape(-1)


def prompt_lengths_from_labels(attention_mask, labels, ignore_index: int = -100):
    """(prompt_lengths, unknown): the prompt of each example of a training batch, told from its
    labels as ``ReftDataCollator`` writes them (``ignore_index`` on the prompt and the padding).

    The prompt of example b is its real tokens (``attention_mask`` 1) before the first real
    token whose label is not ``ignore_index``; a row whose labels are all ``ignore_index`` is all
    prompt. Where the first real token already has a label (labels that mask no prompt, e.g.
    ``labels = input_ids``), the prompt cannot be told: that row takes all of its real tokens and
    is flagged in ``unknown``. Both are (B,) tensors on the mask's device (int64 and bool), made
    with no host synchronisation.
    """
    _check_mask(attention_mask, None)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(attention_mask.shape):
        raise ValueError(f"labels must be a tensor of the attention mask's shape {tuple(attention_mask.shape)}, "
                         f"got {_describe(labels)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    real = attention_mask.bool()
    labels = labels.to(real.device)
    n_real = real.sum(1)
    rank = real.long().cumsum(1) - 1  # rank of each real token among its row's real tokens
    supervised = real & (labels != ignore_index)
    first = torch.where(supervised, rank, n_real[:, None]).amin(1) if real.shape[1] else n_real
    unknown = (first == 0) & (n_real > 0)
    return torch.where(unknown, n_real, first), unknown
