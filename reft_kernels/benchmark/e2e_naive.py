"""The ``naive`` provider of the end-to-end benchmark: the same interventions as ``ours``, written
the way pyvene/pyreft and RED's code run them, in plain eager PyTorch.

- ReFT (LoReFT) on a decoder layer's output: a forward hook that clones the whole (B, S, d)
  hidden state, gathers the intervention positions with an index tensor (``torch.gather``),
  applies pyreft's ``LoreftIntervention`` formula ``x + (W x + b - x Rw) Rw^T`` with ordinary
  torch ops, and scatters the edited rows back into the clone (``out[batch, positions] = ...``).
  ``Rw`` (d, r) sits behind ``torch.nn.utils.parametrizations.orthogonal`` exactly as pyreft's
  rotate layer does, and is materialised twice per call as pyreft's forward does (once in the
  rotate layer, once for its transpose); the learned source is an ``nn.Linear(d, r)``.
- RED on the MLP output projection: a forward hook returning ``h * scale + bias`` (two ops).

What the naive provider is given for free: its positions are computed once, on the device, for
the fixed benchmark batch (pyvene receives them from the collator); ``ours`` computes its own from
the attention mask inside every forward. Sequences are unpadded here, so no -1 handling.
"""
from __future__ import annotations

import torch
from torch import nn

from ..orthogonal import random_orthonormal_rows
from .cases import _PyreftRotation


class NaiveLoReFT(nn.Module):
    """pyreft's ``LoreftIntervention`` in eager ops: R (as a (d, r) ``rotate.weight``) behind torch's
    orthogonal parametrization in fp32, ``learned_source`` a ``Linear(d, r)`` in the model's dtype."""

    def __init__(self, d: int, rank: int, *, dtype=None, device=None, R=None):
        super().__init__()
        R = random_orthonormal_rows(rank, d, device=device) if R is None else R.detach().float()
        self.rotate = _PyreftRotation.build(R.to(device))
        self.learned_source = nn.Linear(d, rank, dtype=dtype, device=device)

    def forward(self, x):
        rotated = torch.matmul(x.to(self.rotate.weight.dtype), self.rotate.weight)  # 1st materialisation
        delta = torch.matmul(self.learned_source(x) - rotated, self.rotate.weight.T)  # 2nd
        return (x + delta).to(x.dtype)


class NaiveRED(nn.Module):
    """RED's ``h * scale + bias`` as two eager ops (identity at init)."""

    def __init__(self, d: int, *, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def forward(self, h):
        return h * self.scale + self.bias


def _split(output):
    if isinstance(output, torch.Tensor):
        return output, lambda h: h
    return output[0], lambda h: (h,) + tuple(output[1:])


class _GatherEditScatter:
    """Forward hook of one layer: clone, gather ``locations`` (B, P), edit, scatter back."""

    def __init__(self, iv, locations):
        self.iv, self.locations = iv, locations

    def __call__(self, module, args, output):
        h, rebuild = _split(output)
        loc = self.locations
        bsz, npos = loc.shape
        out = h.clone()
        rows = torch.gather(h, 1, loc.unsqueeze(-1).expand(bsz, npos, h.shape[-1]))
        batch = torch.arange(bsz, device=h.device).unsqueeze(1).expand(bsz, npos)
        out[batch, loc] = self.iv(rows)
        return rebuild(out)


class _Red:
    def __init__(self, iv):
        self.iv = iv

    def __call__(self, module, args, output):
        h, rebuild = _split(output)
        return rebuild(self.iv(h))


def decoder_layers(model):
    """The decoder layers of a LLaMA-architecture causal LM (``model.model.layers``)."""
    return model.get_decoder().layers


def attach_naive(model, method: str, *, rank: int = 8, locations=None, init=None):
    """Freeze ``model`` and hook the naive interventions of ``method`` ("loreft" or "red") onto every
    layer; returns the ModuleList of interventions (also set as ``model.naive_interventions``).

    ``locations``: (B, P) int64 positions on the model's device, for LoReFT. ``init``: optional
    per-layer dicts of starting values (LoReFT: ``R`` (r, d) orthonormal rows, ``W``, ``b``;
    RED: ``scale``, ``bias``), used by the tests to give naive and ours the same parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    p0 = next(model.parameters())
    d, dtype, device = model.config.hidden_size, p0.dtype, p0.device
    ivs = nn.ModuleList()
    for i, layer in enumerate(layers):
        start = init[i] if init is not None else {}
        if method == "loreft":
            if locations is None:
                raise ValueError("naive LoReFT needs its (B, P) locations")
            iv = NaiveLoReFT(d, rank, dtype=dtype, device=device, R=start.get("R"))
            layer.register_forward_hook(_GatherEditScatter(iv, locations))
        elif method == "red":
            iv = NaiveRED(d, dtype=dtype, device=device)
            layer.mlp.down_proj.register_forward_hook(_Red(iv))
        else:
            raise ValueError(f"naive provider: unknown method {method!r}")
        with torch.no_grad():
            for name, value in start.items():
                target = {"W": ("learned_source", "weight"), "b": ("learned_source", "bias")}.get(name)
                if target is not None:
                    getattr(getattr(iv, target[0]), target[1]).copy_(value)
                elif name in ("scale", "bias"):
                    getattr(iv, name).copy_(value)
        ivs.append(iv)
    model.add_module("naive_interventions", ivs)
    return ivs
