"""Many adapters in one batch: ``model(..., adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])``, one adapter name per example (PEFT's keyword), with
``"__base__"`` for an example that runs the base model unedited.

Every layer then edits all the examples in one call of the multi-adapter ops
(``reft_kernels.red_multi``, ``lowrank_edit_multi``): each site's parameters are stacked over
the model's adapters (active first, then the others in the order added: ``adapter_names``), the
ranks padded with zero rows to the largest (a zero row edits nothing and gets no gradient that
reaches a real parameter), and each edited row carries its example's adapter id. No host
synchronisation and no loop over the adapters inside the forward.

Rules:
- the adapters in such a batch must be alike but for their rank: the same configs in the same
  order (method, positions, layers, act, dropout, ...), hence the same sites; ValueError otherwise;
- the ReFT hooks read the ids from the batch's rows (``ReftBatch.mixed``), so gradient
  checkpointing recomputes them right; RED's hooks (on modules called without keywords) read
  them from the handle during the forward, so a mixed batch with RED under gradient
  checkpointing in training raises ValueError instead of recomputing with the wrong ids;
- an inactive adapter's parameters stay frozen (``requires_grad=False``) as ``adapters.py``
  says: to train several adapters in one batch, set ``requires_grad_(True)`` on
  ``model.reft_adapters[name]`` after building them; gradients land in each adapter's own
  parameters;
- ``generate`` turns the names into a (B,) int64 tensor of adapter ids before it starts, which
  its beam search and ``num_return_sequences`` expand with the other model inputs; the forward
  accepts either form;
- on an encoder-decoder model (T5) the encoder's and the decoder's rows carry the same
  ``MixedAdapters``; the encoder call that ``generate`` makes itself gets the ids through the
  encoder's pre-hook (``seq2seq.EncoderPreHook``), which also puts them on the handle for RED
  until the encoder returns.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from ..ops.multi.checks import adapter_ids_checked, remember_adapter_ids_checked
from .config import ReftConfig

BASE_NAME = "__base__"  # PEFT's name for an example without adapter


def _signature(configs) -> tuple:
    """What must agree between adapters batched together: their configs with the rank left out."""
    return tuple(dataclasses.replace(c, rank=1) if isinstance(c, ReftConfig) else c for c in configs)


def adapter_ids(handle, names, bsz: int, device) -> torch.Tensor:
    """``names`` (a list of B adapter names, or a (B,) integer tensor of positions in
    ``handle.adapter_names``, -1 for the base model) as a (B,) int64 tensor on ``device``.
    TypeError / ValueError naming ``adapter_names`` for anything else."""
    known = handle.adapter_names
    if isinstance(names, torch.Tensor):
        if names.dtype.is_floating_point or names.dtype.is_complex or names.dtype == torch.bool:
            raise TypeError(f"adapter_names must be a list of adapter names (or an integer tensor of ids), got "
                            f"a {names.dtype} tensor")
        if names.dim() != 1 or names.shape[0] != bsz:
            raise ValueError(f"adapter_names must name one adapter per example: {bsz} for this batch, got a tensor "
                             f"of shape {tuple(names.shape)}")
        if not torch.compiler.is_compiling() and names.numel() and not adapter_ids_checked(names, len(known)):
            # one host sync per ids tensor: generate passes the same expanded tensor every step
            lo, hi = int(names.min()), int(names.max())
            if lo < -1 or hi >= len(known):
                raise ValueError(f"adapter_names ids must lie in [-1, {len(known)}) (this model's adapters: "
                                 f"{list(known)}), got values in [{lo}, {hi}]")
            remember_adapter_ids_checked(names, len(known))
        return names.to(device=device, dtype=torch.long)
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names, one per example, got {type(names).__name__}")
    if len(names) != bsz:
        raise ValueError(f"adapter_names must name one adapter per example: {bsz} for this batch, got {len(names)}")
    position = {name: i for i, name in enumerate(known)}
    position[BASE_NAME] = -1
    bad = [n for n in names if not isinstance(n, str) or n not in position]
    if bad:
        raise ValueError(f"adapter_names: unknown adapter {bad[0]!r}; this model has {list(known)} "
                         f"(and {BASE_NAME!r} for the base model)")
    ids = torch.tensor([position[n] for n in names], dtype=torch.long, device=device)
    remember_adapter_ids_checked(ids, len(known))
    return ids


def mixed_adapters(handle, ids: torch.Tensor) -> "MixedAdapters":
    """This forward's mixed-adapter state for ``ids`` (B,); ValueError when the adapters differ
    in more than their ranks, or when RED would be recomputed by gradient checkpointing."""
    adapters = [handle._adapter(name) for name in handle.adapter_names]
    want = _signature(adapters[0].configs)
    for ad in adapters[1:]:
        if _signature(ad.configs) != want:
            raise ValueError(
                f"adapter_names: adapters batched together must have the same configs but for their rank; "
                f"{adapters[0].name!r} has {list(adapters[0].configs)} and {ad.name!r} has {list(ad.configs)}")
    model = handle.model
    has_red = any(not isinstance(c, ReftConfig) for c in adapters[0].configs)
    if has_red and model.training and torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("adapter_names with RED cannot run under gradient checkpointing in training: RED's "
                         "hooks would recompute with another batch's adapters (disable gradient checkpointing, "
                         "or train one adapter per batch)")
    return MixedAdapters(adapters, ids)


class MixedAdapters:
    """One forward's adapters: ``ids`` (B,) int64, -1 for the base model; ``adapters`` the
    ``_Adapter`` records, id order. Stacks each site's parameters once per forward, and each
    row index's per-entry ids once per forward (the index tensors are shared by the layers)."""

    def __init__(self, adapters, ids: torch.Tensor):
        self.adapters, self.ids = adapters, ids
        self._stacks = {}
        # id(index) -> (index, its entries' adapter ids); ("examples", device) -> the (B,) ids on
        # that device, for the RED sites
        self._entries = {}

    def red_ids(self, h: torch.Tensor) -> torch.Tensor:
        """The ids ``red_multi`` takes for a RED site's output ``h`` (B, ..., d): (B,), one per
        example (for a (B, d) ``h`` also one per row), on ``h``'s device; the op gathers B rows
        of the stacks, not one per row."""
        if h.dim() < 2 or h.shape[0] != self.ids.shape[0]:
            raise ValueError(f"adapter_names names {self.ids.shape[0]} examples, but a layer's hidden states have "
                             f"shape {tuple(h.shape)}")
        key = ("examples", h.device)  # every RED layer of the forward shares them
        ids = self._entries.get(key)
        if ids is None:
            ids = self.ids if self.ids.device == h.device else self.ids.to(h.device)  # device_map
            remember_adapter_ids_checked(ids, len(self.adapters))  # checked ids: no sync
            self._entries[key] = ids
        return ids

    def entry_ids(self, index: torch.Tensor, seq: int) -> torch.Tensor:
        """(n,) adapter id of each entry of ``index`` (rows of the (B * S, d) view, -1 padding)."""
        got = self._entries.get(id(index))
        if got is not None and got[0] is index:
            return got[1]
        ids = torch.where(index >= 0, self.ids[index.clamp(min=0) // seq], -1)
        remember_adapter_ids_checked(ids, len(self.adapters))  # made from checked ids: no sync
        self._entries[id(index)] = (index, ids)
        return ids

    def red_terms(self, gi: int, key: str):
        """(scale, bias) of RED site ``key`` of config ``gi``, each (K, d)."""
        got = self._stacks.get((gi, key))
        if got is None:
            ivs = [ad.groups[gi][key] for ad in self.adapters]
            dtype = ivs[0].scale.dtype
            got = (torch.stack([iv.scale.to(dtype) for iv in ivs]), torch.stack([iv.bias.to(dtype) for iv in ivs]))
            self._stacks[(gi, key)] = got
        return got

    def lowrank_terms(self, gi: int, key: str):
        """(B, A, a, C, c) of ReFT intervention ``key`` of config ``gi``, matrices (K, r, d) and
        vectors (K, r) with r the largest rank (zero rows below each adapter's own), ``C is B``
        when the method ties them, absent terms None."""
        got = self._stacks.get((gi, key))
        if got is None:
            terms = [ad.groups[gi][key].edit_terms() for ad in self.adapters]
            r = max(t[0].shape[0] for t in terms)
            dtypes = [t.dtype if t is not None else None for t in terms[0]]

            def stack(j):
                if terms[0][j] is None:
                    return None
                rows = [t[j].to(dtypes[j]) for t in terms]
                pads = [(0, 0, 0, r - x.shape[0]) if x.dim() == 2 else (0, r - x.shape[0]) for x in rows]
                return torch.stack([F.pad(x, p) if any(p) else x for x, p in zip(rows, pads)])

            B, A, a = stack(0), stack(1), stack(2)
            tied = terms[0][3] is not None and terms[0][3] is terms[0][0]
            got = (B, A, a, B if tied else stack(3), stack(4))
            self._stacks[(gi, key)] = got
        return got

    def editor(self, gi: int, key: str, iv, index: torch.Tensor, seq: int) -> "MixedEditor":
        return MixedEditor(self.lowrank_terms(gi, key), iv.act, iv.backend, self.entry_ids(index, seq), iv.training)


class MixedEditor:
    """Stands in for one intervention module in ``attach._edit_rows``: called as the module is
    (``(h, index, inplace=...)``, or on the gathered rows of ``index`` alone), it edits each row
    with its own adapter's parameters."""

    def __init__(self, terms, act, backend, ids, training: bool):
        self.terms, self.act, self.backend, self.ids, self.training = terms, act, backend, ids, training

    def __call__(self, h, index=None, *, inplace=False):
        from ..multi import lowrank_edit_multi, lowrank_edit_multi_

        op = lowrank_edit_multi_ if inplace else lowrank_edit_multi
        ids = self.ids
        if ids.device != h.device:  # device_map
            ids = ids.to(h.device)
            remember_adapter_ids_checked(ids, self.terms[0].shape[0])
        return op(h, *self.terms, adapter_ids=ids, act=self.act, index=index, backend=self.backend)
