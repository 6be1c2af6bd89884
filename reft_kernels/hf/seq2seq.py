"""ReFT on encoder-decoder models (T5): one forward's rows per stack.

The model's forward hands the same keyword arguments to its encoder and its decoder, so the
``reft_batch`` keyword is a dict ``{"encoder": ReftBatch or None, "decoder": ReftBatch or None}``
and each site's hook takes its own stack's entry (a site key starts with its stack's name:
``encoder0``, ``decoder1``).

Positions:

- **encoder**: from the encoder's ``attention_mask`` (every token real without one), or the
  ``intervention_locations`` given to the forward or to ``generate`` (they are encoder positions);
- **decoder**: the same rule over the decoder's input of this forward: ``decoder_attention_mask``
  (else, with ``labels`` and no decoder input, the tokens T5 shifts in from the labels: the start
  token and every label that is not -100; else every token). At generation the decoder's prefill
  is its prompt (the start token, or ``decoder_input_ids`` given to ``generate``), edited like a
  causal LM's prompt; the later decode steps are not edited. A lone start token has no
  ``f{k}+l{k}`` position (each side is capped at half the length): give ``generate`` a longer
  decoder prompt, or choose ``positions="l1"`` to edit the start token.

``generate`` runs the encoder itself (not through the model's forward): a pre-hook on the encoder
stack builds its rows from that call's own inputs.
"""
from __future__ import annotations

import dataclasses

import torch

from .batch import KWARG, build_batch, cache_length

STACKS = ("encoder", "decoder")


def stack_of(key: str):
    """The stack ("encoder"/"decoder") of an encoder-decoder site key, else None."""
    return next((s for s in STACKS if key.startswith(s)), None)


def _width(t):
    return None if not isinstance(t, torch.Tensor) or t.dim() < 2 else tuple(t.shape[:2])


def _encoder_rows(handle, ids, embeds, mask, locations):
    ref = ids if ids is not None else embeds
    if _width(ref) is None:
        raise ValueError("ReFT on an encoder-decoder model needs input_ids (batch, seq) or inputs_embeds "
                         "(batch, seq, d) for the encoder")
    bsz, seq = ref.shape[:2]
    groups = [handle.configs[g] for g in handle._reft_groups]
    return build_batch(groups, bsz, seq, mask, locations, False, ref.device)


def _decoder_mask(given, bsz, seq, device):
    mask = given.get("decoder_attention_mask")
    if isinstance(mask, torch.Tensor) and _width(mask) == (bsz, seq):
        return mask
    labels = given.get("labels")
    if (given.get("decoder_input_ids") is None and given.get("decoder_inputs_embeds") is None
            and isinstance(labels, torch.Tensor) and _width(labels) == (bsz, seq)):
        mask = torch.ones(bsz, seq, dtype=torch.long, device=device)
        mask[:, 1:] = (labels[:, :-1] != -100).long()
        return mask
    return None


def seq2seq_batch(handle, given: dict, locations) -> dict:
    """The ``reft_batch`` value of one forward of an encoder-decoder model (``given``: its
    arguments by name)."""
    out = {"encoder": None, "decoder": None}
    if given.get("encoder_outputs") is None:
        out["encoder"] = _encoder_rows(handle, given.get("input_ids"), given.get("inputs_embeds"),
                                       given.get("attention_mask"), locations)
    dec = given.get("decoder_input_ids")
    if dec is None:
        dec = given.get("decoder_inputs_embeds")
    if dec is None:
        dec = given.get("labels")  # T5 shifts them right into its decoder input
    if _width(dec) is None:
        return out
    bsz, seq = dec.shape[:2]
    decode = cache_length(given.values()) > 0
    mask = _decoder_mask(given, bsz, seq, dec.device)
    width = handle._prompt_width
    if width is not None and seq > width and not decode:
        # inside generate without a KV cache: the decoder prompt is the first `width` columns
        mask = torch.ones(bsz, seq, dtype=torch.long, device=dec.device) if mask is None else mask.clone()
        mask[:, width:] = 0
    groups = [handle.configs[g] for g in handle._reft_groups]
    out["decoder"] = build_batch(groups, bsz, seq, mask, None, decode, dec.device)
    return out


class EncoderPreHook:
    """Forward pre-hook (with kwargs) on the encoder stack of an encoder-decoder model, for the
    encoder calls that ``generate`` makes itself (outside the model's forward). It takes
    ``intervention_locations`` and ``adapter_names`` out of the call's keywords (``generate``
    passes its keywords on to the encoder); when the encoder is called without rows and the
    adapter has ReFT, builds them from the call's ``input_ids`` / ``inputs_embeds`` and
    ``attention_mask``; with ``adapter_names``, the call's ``MixedAdapters`` go on the rows
    (ReFT) and on the handle until the encoder returns (RED, whose hooks read the handle):
    ``restore``, a forward hook that always runs, puts the handle's back."""

    def __init__(self, handle):
        self.handle = handle
        self._saved = []  # the handle's MixedAdapters before each encoder call in flight

    def __call__(self, module, args, kwargs):
        locations = kwargs.pop("intervention_locations", None)
        names = kwargs.pop("adapter_names", None)
        handle = self.handle
        if KWARG in kwargs or not handle._enabled:
            self._saved.append(handle._mixed)
            return args, kwargs
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        mixed = None
        if names is not None:
            from .mixed_batch import adapter_ids, mixed_adapters

            ref = ids if _width(ids) is not None else embeds
            if _width(ref) is None:
                raise ValueError("adapter_names needs the encoder's input_ids (batch, seq) or inputs_embeds")
            mixed = mixed_adapters(handle, adapter_ids(handle, names, ref.shape[0], ref.device))
        self._saved.append(handle._mixed)  # after every check: restore pops it
        if mixed is not None:
            handle._mixed = mixed
        if handle._reft_groups:
            rows = _encoder_rows(handle, ids, embeds, kwargs.get("attention_mask"), locations)
            if mixed is not None:
                rows = dataclasses.replace(rows, mixed=mixed)
            kwargs[KWARG] = {"encoder": rows, "decoder": None}
        return args, kwargs

    def restore(self, module, args, output):
        if self._saved:
            self.handle._mixed = self._saved.pop()
        return None


def decoder_prompt_width(kwargs) -> int:
    """The decoder prompt's width in a ``generate`` call: its ``decoder_input_ids``, else the
    start token alone."""
    dec = kwargs.get("decoder_input_ids")
    return dec.shape[1] if isinstance(dec, torch.Tensor) and dec.dim() >= 2 else 1
