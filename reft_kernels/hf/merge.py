"""Fold RED into the edited layers' weights for inference with no overhead, and undo it exactly.

RED edits the output of a linear map: ``y = (x W^T + b) * s + t = x (s * W)^T + (s * b + t)``
(``s * W`` scales W's output rows; GPT-2's Conv1D stores W as (in, out) and scales its columns).
``merge_red`` writes that product into the layer (a bias ``t`` is added where the layer had none)
and stops RED's hooks; ``unmerge_red`` puts back the original weight and bias tensors, bit for
bit, from a copy kept on the CPU, and restarts the hooks.

The product is computed in fp32 (float64 for float64 weights) and rounded once to the weight's
dtype, so merged outputs agree with unmerged ones within that rounding. A bias added to a layer
that had none is not part of the model's architecture: ``from_pretrained`` would drop it (LLaMA's
``mlp_bias=False``). ``merge_and_unload`` (PEFT's name) is the export: it folds RED in for good,
makes the architecture carry the added biases (see ``export_bias.py``), and detaches everything
else, leaving a plain ``transformers`` model that ``save_pretrained`` / ``from_pretrained`` round-trip.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .attach import get_handle
from .config import REDConfig, ReftConfig
from .export_bias import plan_biases


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


def _check_linear(sites) -> None:
    for name, module, _ in sites:
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"cannot merge RED into {name} ({type(module).__name__}): it has no 2-D weight")


@torch.no_grad()
def _fold(module, iv, add_bias: bool, requires_grad: bool = False) -> bool:
    """Write ``s * W`` into the module's weight and ``s * b + t`` into its bias; a layer without a
    bias gets one holding ``t`` when ``add_bias`` (its own storage, never RED's). Returns whether
    a bias was added."""
    w, b = module.weight, module.bias
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    s, t = iv.scale.detach().to(w.device, acc), iv.bias.detach().to(w.device, acc)
    w.copy_((w.to(acc) * (s[None, :] if _is_conv1d(module) else s[:, None])).to(w.dtype))
    if b is not None:
        b.copy_((b.to(acc) * s + t).to(b.dtype))
        return False
    if add_bias:
        module.bias = nn.Parameter(t.to(w.dtype).clone(), requires_grad=requires_grad)
        return True
    return False


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
    _check_linear(sites)
    saved, added = {}, []
    for name, module, iv in sites:
        w, b = module.weight, module.bias
        saved[name] = (w.detach().to("cpu", copy=True), None if b is None else b.detach().to("cpu", copy=True))
        if _fold(module, iv, add_bias=True):
            added.append(name)
    handle._red_merged = saved
    if added:
        warnings.warn(
            f"merge_red added a bias to {len(added)} layer(s) that had none (e.g. {added[0]}), which this "
            "model's architecture does not have (from_pretrained would drop it): to save the merged model, "
            "export it with merge_and_unload(model); to save the adapter, save_interventions", stacklevel=2)
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


def merge_and_unload(model) -> nn.Module:
    """Export: fold every RED intervention of ``model`` into its layer's weight and bias for good,
    then detach everything else (hooks, wrapped methods, ``reft_interventions``, ``model.reft``;
    each parameter's ``requires_grad`` as before attaching; ``modules_to_save`` keep their trained
    values). Returns the same model object, now a plain ``transformers`` model that
    ``save_pretrained`` writes and ``from_pretrained`` reads back to the same outputs, with no
    storage shared between its parameters that the base model did not share.

    RED's bias needs a bias on each edited layer. Layers that have one take it. For layers
    without one, the model's config must be able to give them one (``export_bias.plan_biases``):
    LLaMA's ``mlp_bias`` is set to True and the MLP projections that RED does not edit get zero
    biases. Mistral, Qwen2 and T5 have no such option: unless RED's bias is zero at every such
    layer (then only the scale is folded in), ValueError says so, and the model is left as it
    was; keep the interventions with ``save_interventions`` instead.

    ReFT interventions edit chosen token positions, which no weight can express: a model with any
    ``ReftConfig`` attached raises ValueError (merge RED only by attaching it alone). A
    ``peft.PeftModel`` raises ValueError too: call PEFT's ``merge_and_unload()`` first (it carries
    the interventions to the model it returns), then this on that model. RED already merged with
    ``merge_red`` is merged again from the original weights.
    """
    from .checkpoint import is_peft_model

    handle = get_handle(model)
    reft = [c.method for c in handle.configs if isinstance(c, ReftConfig)]
    if reft:
        raise ValueError(f"merge_and_unload folds RED into the weights; ReFT interventions ({', '.join(reft)}) "
                         "edit chosen token positions of the residual stream, which no weight can express, so "
                         "they cannot be merged: keep them with save_interventions (or save_pretrained), or "
                         "attach RED alone")
    if is_peft_model(model):
        raise ValueError("merge_and_unload of a peft.PeftModel: call PEFT's merge_and_unload() first (it carries the "
                         "interventions to the model it returns), then merge_and_unload that model")
    sites = _red_sites(handle)
    _check_linear(sites)
    was_merged = handle._red_merged is not None
    if was_merged:
        unmerge_red(model)  # plan and fold from the original weights
    try:
        plan = plan_biases(model, [(name, module.bias is not None, iv) for name, module, iv in sites])
    except BaseException:
        if was_merged:  # leave the model as it was: merged again, bit for bit the same computation
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merge_red(model)
        raise
    modules = dict(model.named_modules())
    grad_of = lambda name: handle._requires_grad.get(f"{name}.weight", True)  # noqa: E731
    for name, module, iv in sites:
        _fold(module, iv, add_bias=name in plan.add_bias, requires_grad=grad_of(name))
    with torch.no_grad():
        for name in plan.add_bias:
            module = modules[name]
            if module.bias is None:  # a layer RED does not edit: a zero bias, as the config now says
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(plan.width[name], dtype=w.dtype, device=w.device),
                                           requires_grad=grad_of(name))
    for key, value in plan.config_changes.items():
        setattr(model.config, key, value)
    handle._detach(restore_extras=False)
    return model
