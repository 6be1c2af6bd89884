"""Fold RED into the edited layers' weights for inference with no overhead, and undo it exactly.

RED edits the output of a linear map: ``y = (x W^T + b) * s + t = x (s * W)^T + (s * b + t)``
(``s * W`` scales W's output rows; GPT-2's Conv1D stores W as (in, out) and scales its columns).
``merge_red`` writes that product into the layer (a bias ``t`` is added where the layer had none)
and stops RED's hooks; ``unmerge_red`` puts back the original weight and bias tensors, bit for
bit, from a copy kept on the CPU, and restarts the hooks.

The product is computed in fp32 (float64 for float64 weights) and rounded once to the weight's
dtype, so merged outputs agree with unmerged ones within that rounding. A bias added to a layer
that had none is not part of the model's architecture: ``save_pretrained`` writes it, but
``from_pretrained`` drops it (LLaMA's ``mlp_bias=False``); save the interventions instead
(``save_interventions``), or unmerge before saving.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .attach import get_handle
from .config import REDConfig


def _red_sites(handle):
    """[(module name, module, RED intervention)] of every RED site of the handle's model."""
    modules = dict(handle.model.named_modules())
    out = []
    for gi, cfg in enumerate(handle.configs):
        if isinstance(cfg, REDConfig):
            for key, _, name in handle.sites[gi]:
                out.append((name, modules[name], handle.interventions[gi][key]))
    return out


def _is_conv1d(module) -> bool:
    """GPT-2's Conv1D: weight (in, out), ``nf`` output features."""
    w = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == module.nf


def merge_red(model) -> nn.Module:
    """Fold every RED intervention of ``model`` into its layer's weight and bias, and stop the RED
    hooks (ReFT interventions keep running). Returns the model. Raises RuntimeError when already
    merged, ValueError when the model has no RED intervention or a site is not a linear map."""
    handle = get_handle(model)
    if handle._red_merged is not None:
        raise RuntimeError("RED is already merged into this model's weights")
    sites = _red_sites(handle)
    if not sites:
        raise ValueError("this model has no RED intervention to merge")
    for name, module, _ in sites:
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"cannot merge RED into {name} ({type(module).__name__}): it has no 2-D weight")
    saved, added = {}, []
    with torch.no_grad():
        for name, module, iv in sites:
            w, b = module.weight, module.bias
            saved[name] = (w.detach().to("cpu", copy=True), None if b is None else b.detach().to("cpu", copy=True))
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            s, t = iv.scale.detach().to(w.device, acc), iv.bias.detach().to(w.device, acc)
            merged_w = w.to(acc) * (s[None, :] if _is_conv1d(module) else s[:, None])
            merged_b = t if b is None else b.to(acc) * s + t
            w.copy_(merged_w.to(w.dtype))
            if b is None:
                module.bias = nn.Parameter(merged_b.to(w.dtype), requires_grad=False)
                added.append(name)
            else:
                b.copy_(merged_b.to(b.dtype))
    handle._red_merged = saved
    if added:
        warnings.warn(
            f"merge_red added a bias to {len(added)} layer(s) that had none (e.g. {added[0]}): "
            "save_pretrained writes it but from_pretrained drops it; save the interventions with "
            "save_interventions, or unmerge_red before save_pretrained", stacklevel=2)
    return model


def unmerge_red(model) -> nn.Module:
    """Restore the weights and biases that ``merge_red`` changed, bit for bit (a bias it added is
    removed again), and restart the RED hooks. Returns the model."""
    handle = get_handle(model)
    saved = handle._red_merged
    if saved is None:
        raise RuntimeError("RED is not merged into this model's weights")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (w, b) in saved.items():
            module = modules[name]
            module.weight.copy_(w)
            if b is None:
                module.bias = None
            else:
                module.bias.copy_(b)
    handle._red_merged = None
    return model
