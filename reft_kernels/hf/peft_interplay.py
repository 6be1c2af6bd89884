"""Interventions attached to a ``peft.PeftModel`` (``get_reft_model(peft_model, ...,
disable_model_grads=False)``), and PEFT's own ways out of its wrapper.

Without this, PEFT's ``merge_and_unload()`` / ``unload()`` return the inner ``transformers``
model and silently leave the interventions behind on the discarded wrapper (the forward wrapper,
the interventions module and ``model.reft`` live on the PeftModel, and RED's hooks on the LoRA
layers PEFT throws away), and ``disable_adapter()`` runs the model with the interventions still
on. So ``get_reft_model`` sets, on a PeftModel:

- ``peft_model.disable_adapter()``: PEFT's context and ``model.reft.disabled()`` together: the
  base model, as the name says (TRL's DPO computes its reference forwards this way);
- ``peft_model.base_model.merge_and_unload()`` and ``.unload()`` (what ``peft_model.merge_and_unload()``
  resolves to): PEFT's method, then the same configs, ``modules_to_save`` and trained values
  attached to the model it returns (``returned.reft``). The PeftModel itself is left without
  interventions. RED merged with ``merge_red`` must be unmerged first.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch

_PEFT_PREFIX = "base_model.model."


def wrap_peft(handle) -> None:
    """Install the wrappers described in the module docstring on ``handle.model``, a PeftModel."""
    model = handle.model
    handle._patch(model, "disable_adapter", _disable_adapter)
    tuner = getattr(model, "base_model", None)
    for name, fn in (("merge_and_unload", _merge_and_unload), ("unload", _unload)):
        if callable(getattr(type(tuner), name, None)):
            handle._patch(tuner, name, fn)


def warn_if_inside_peft(model) -> None:
    """Warn when ``model`` holds PEFT layers but is not the PeftModel itself: attached there, the
    interventions would be missed by PEFT's ``disable_adapter()`` and lost (RED) or left inert
    (ReFT) by its ``merge_and_unload()``."""
    peft = sys.modules.get("peft")
    layer_cls = getattr(getattr(getattr(peft, "tuners", None), "tuners_utils", None), "BaseTunerLayer", None)
    if layer_cls is None or isinstance(model, getattr(peft, "PeftModel", ())):
        return
    if any(isinstance(m, layer_cls) for m in model.modules()):
        warnings.warn("this model holds PEFT adapter layers: attach the interventions to the peft.PeftModel itself "
                      "(get_reft_model(peft_model, ..., disable_model_grads=False)), so that PEFT's "
                      "disable_adapter() and merge_and_unload() take them into account", stacklevel=5)


@contextlib.contextmanager
def _disable_adapter(model):
    handle = model.reft
    with handle._inner("disable_adapter")(), handle.disabled():
        yield


def _merge_and_unload(model, *args, **kwargs):
    return _carry(model, "merge_and_unload", args, kwargs)


def _unload(model, *args, **kwargs):
    return _carry(model, "unload", args, kwargs)


def _carry(model, method: str, args, kwargs):
    """PEFT's ``method`` of the PeftModel ``model``, with the interventions moved to its result."""
    from .attach import get_reft_model

    handle = model.reft
    handle._check_attached(f"PEFT's {method}()")
    configs, entries = list(handle.configs), [e.removeprefix(_PEFT_PREFIX) for e in handle.modules_to_save]
    state = {k: v.detach().clone() for k, v in handle.interventions.state_dict().items()}
    trained = {name.removeprefix(_PEFT_PREFIX): {k: v.detach().clone() for k, v in m.state_dict().items()}
               for name, m in handle.extra_modules}
    training, keep_grads = handle.interventions.training, handle.disable_model_grads
    tuner = model.base_model
    handle.remove()  # our hooks and wrappers off the PeftModel, the modules_to_save as they were
    result = getattr(tuner, method)(*args, **kwargs)  # PEFT's own, now that the wrapper is gone
    try:
        get_reft_model(result, configs, verbose=False, disable_model_grads=keep_grads,
                       modules_to_save=entries or None)
        carried = result.reft
        with torch.no_grad():
            for k, v in carried.interventions.state_dict().items():
                v.copy_(state[k])
            for name, module in carried.extra_modules:
                for k, v in module.state_dict().items():
                    v.copy_(trained[name][k])
        carried.interventions.train(training)
    except Exception as exc:
        raise RuntimeError(f"PEFT's {method}() ran, but the interventions could not be carried to the model it "
                           f"returned ({exc}); that model is peft_model.base_model.model") from exc
    return result
