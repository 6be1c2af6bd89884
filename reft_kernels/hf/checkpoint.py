"""Adapter-only ``save_pretrained``: what a model with interventions writes when it is saved the
``transformers`` way, so that ``Trainer`` checkpoints (``checkpoint-N/``) and
``Trainer.save_model()`` hold the adapter, not the base weights.

``get_reft_model`` sets ``model.save_pretrained`` (an instance attribute; ``model.reft.remove()``
takes it away) to ``save_adapter``, which writes into the folder:

- ``reft_config.json`` and ``interventions.safetensors``: what ``save_interventions`` writes (the
  interventions and the ``modules_to_save``), read back by
  ``load_interventions(from_pretrained(base), folder)``;
- ``model.safetensors``: every tensor a resumed training needs, under the model's own names (the
  interventions, the ``modules_to_save``, and any other parameter that requires grad, such as
  PEFT's LoRA weights), for ``Trainer.train(resume_from_checkpoint=...)``, whose loader reads
  this file into the model with ``load_state_dict(strict=False)`` (transformers 5.x). The
  Trainer then logs the frozen base weights as missing keys: they are the base model's, loaded
  by ``from_pretrained`` and never trained. No ``config.json`` is written, so ``from_pretrained``
  on the folder fails instead of building a model around random base weights;
- for a ``peft.PeftModel``, PEFT's own adapter files too (its ``save_pretrained``).

Trainable base parameters that are neither interventions nor ``modules_to_save`` (a model
attached with ``disable_model_grads=False``, not a PeftModel) go to ``model.safetensors`` only:
a warning says that ``load_interventions`` will not restore them.
"""
from __future__ import annotations

import os
import warnings

import torch

from .sharding import is_sharded

RESUME_NAME = "model.safetensors"
# keywords of PreTrainedModel.save_pretrained that change nothing here (the files are small
# safetensors files)
_HARMLESS = {"safe_serialization", "max_shard_size", "variant", "save_function"}


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, getattr(peft, "PeftModel", ()))


def _full(t):
    return t.full_tensor() if is_sharded(t) else t


def _resume_filter(handle):
    """``keep(name)``: whether a state-dict entry is one that a resumed training needs."""
    from .attach import MODULE_ATTR

    wanted = tuple([MODULE_ATTR + "."] + [name + "." for name, _ in handle.extra_modules])
    trainable = {n for n, p in handle.model.named_parameters() if p.requires_grad}
    return lambda name: name in trainable or name.startswith(wanted)


def resume_state(handle, state_dict=None) -> dict:
    """{model name: CPU tensor} of what a resumed training needs (see the module docstring):
    taken from ``state_dict`` when given (the Trainer passes a gathered one under FSDP and
    DeepSpeed), else from the model."""
    keep = _resume_filter(handle)
    source = state_dict if state_dict is not None else handle.model.state_dict()
    # clone: no storage shared between names
    return {name: _full(value).detach().to("cpu").clone() for name, value in source.items() if keep(name)}


def quiet_resume(handle) -> None:
    """Set ``model._keys_to_ignore_on_save`` (an instance attribute; ``remove()`` restores the
    class's) to the state-dict names that ``model.safetensors`` leaves out, the frozen base
    weights: ``Trainer.train(resume_from_checkpoint=...)`` then loads the file without its
    warning listing every base weight as missing (it stays quiet when the missing keys are exactly
    those). Not for a PeftModel, whose resume PEFT handles. Called at attach, at each save and at
    each adapter change (the names depend on what trains)."""
    if is_peft_model(handle.model):
        return
    keep = _resume_filter(handle)
    object.__setattr__(handle.model, "_keys_to_ignore_on_save",
                       [name for name in handle.model.state_dict() if not keep(name)])


def untracked_trainable(handle) -> list:
    """Names of trainable parameters that ``load_interventions`` does not restore (neither
    interventions nor ``modules_to_save``); empty for a PeftModel, whose own files hold them."""
    from .attach import MODULE_ATTR

    if is_peft_model(handle.model):
        return []
    covered = [MODULE_ATTR + "."] + [name + "." for name, _ in handle.extra_modules]
    return [n for n, p in handle.model.named_parameters()
            if p.requires_grad and not any(n.startswith(c) for c in covered)]


def save_adapter(model, save_directory, *args, state_dict=None, is_main_process: bool = True, **kwargs):
    """``model.save_pretrained`` of a model with interventions: writes the adapter folder described
    in the module docstring into ``save_directory``, not the base weights. For a ``PeftModel``
    the positional and keyword arguments go on to PEFT's ``save_pretrained``; otherwise only the
    Trainer's ``state_dict`` and ``is_main_process`` (and keywords that change nothing for these
    small files, such as ``safe_serialization``) are accepted."""
    from safetensors.torch import save as st_save

    from .attach import get_handle
    from .io import _atomic_write, save_interventions, sharded

    handle = get_handle(model)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    peft = is_peft_model(model)
    if not peft:
        unknown = sorted(set(kwargs) - _HARMLESS)
        if args or unknown:
            raise TypeError(f"save_pretrained of a model with interventions writes the adapter folder and takes "
                            f"no {unknown or 'positional arguments'}; call model.reft.remove() first to save the "
                            "base model, or see reft_kernels.hf.merge_and_unload for RED")
    if handle._red_merged is not None:
        raise RuntimeError("RED is merged into this model's weights: call unmerge_red(model) before saving the "
                           "adapter, or export the merged model with merge_and_unload")
    if not (is_main_process or sharded(model)):
        return
    os.makedirs(save_directory, exist_ok=True)
    if peft and is_main_process:  # PEFT's own adapter files
        handle._inner("save_pretrained")(save_directory, *args, is_main_process=is_main_process,
                                         **({"state_dict": state_dict} if state_dict is not None else {}), **kwargs)
    save_interventions(model, save_directory)  # under FSDP2 every rank gathers, the first one writes
    quiet_resume(handle)
    resume = resume_state(handle, state_dict)
    dist = torch.distributed
    if not is_main_process or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _atomic_write(os.path.join(os.fspath(save_directory), RESUME_NAME), st_save(resume, metadata={"format": "pt"}))
    lost = untracked_trainable(handle)
    if lost:
        warnings.warn(
            f"{len(lost)} trainable base parameter(s) (e.g. {lost[0]}) are neither interventions nor "
            f"modules_to_save: {RESUME_NAME} keeps them for resuming training, but load_interventions does not "
            "restore them; name their modules in get_reft_model(..., modules_to_save=[...])", stacklevel=2)

