"""Where RED's bias goes when a RED-edited layer has no bias of its own, so that an exported model
(``merge_and_unload``) still carries it after ``save_pretrained`` / ``from_pretrained``.

``from_pretrained`` builds the architecture from ``config.json`` and reads only the tensors that
architecture has: a bias the config does not call for is dropped. So a bias can be added only
where a config option makes the architecture have it. The one such option among the supported
model types is LLaMA's ``mlp_bias`` (it gives ``gate_proj``, ``up_proj`` and ``down_proj`` of
every layer a bias). Mistral, Qwen2 (their MLPs are built with ``bias=False``) and T5 (``wo`` is)
have none.

Rather than trust a table, ``plan_biases`` builds the architecture from the changed config on the
meta device (no memory, no weights) and compares its tensors with the model's: the plan stands
only if the changed architecture has exactly the model's tensors plus the biases to add.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .sites import model_type, output_width

CONFIG_OPTIONS = ("mlp_bias",)  # config flags that give MLP projections a bias


@dataclass
class BiasPlan:
    """``add_bias``: names of the modules to give a bias (RED's sites without one, and the layers
    that the changed config also gives one, which get zeros); ``width``: their output widths;
    ``config_changes``: config attributes to set."""

    add_bias: set = field(default_factory=set)
    width: dict = field(default_factory=dict)
    config_changes: dict = field(default_factory=dict)


def _biased(model) -> dict:
    """{module name: module} of the modules that hold a ``bias`` tensor (the interventions aside)."""
    from .attach import MODULE_ATTR

    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), torch.Tensor) and not n.startswith(MODULE_ATTR)}


def _state_keys(model) -> set:
    from .attach import MODULE_ATTR

    return {k for k in model.state_dict() if not k.startswith(MODULE_ATTR + ".")}


def plan_biases(model, sites) -> BiasPlan:
    """The biases and config change that let ``model`` carry RED's bias at each of ``sites``
    (``[(module name, had a bias, RED module)]``). A site without a bias whose RED bias is all
    zeros needs none. ValueError, naming the model type and a layer, when the config offers no
    way to add the biases needed; the model is not changed."""
    need = [name for name, had_bias, iv in sites if not had_bias and bool((iv.bias.detach() != 0).any())]
    if not need:
        return BiasPlan()
    config = getattr(model, "config", None)
    option = next((o for o in CONFIG_OPTIONS if getattr(config, o, None) is False), None)
    mtype = model_type(model) or type(model).__name__
    cannot = (f"merge_and_unload: RED's bias at {need[0]} (and {len(need) - 1} more) needs a bias on a layer that "
              f"has none, and this {mtype} model's config offers no way to add one that from_pretrained reads")
    hint = ("; keep the interventions instead (save_interventions or save_pretrained, then load_interventions), "
            "or merge_red(model) for in-memory inference")
    if option is None:
        raise ValueError(cannot + hint)
    changed = copy.deepcopy(config)
    setattr(changed, option, True)
    try:
        with torch.device("meta"):
            skeleton = type(model)(changed)
    except Exception as exc:  # not a transformers model built from its config
        raise ValueError(f"{cannot} (building it with {option}=True failed: {exc}){hint}") from None
    have, want = _biased(model), _biased(skeleton)
    add = set(want) - set(have)
    if not set(need) <= set(want) or set(have) - set(want):
        raise ValueError(f"{cannot} ({option}=True does not give {need[0]} a bias){hint}")
    expected = _state_keys(model) | {f"{name}.bias" for name in add}
    if _state_keys(skeleton) != expected:
        raise ValueError(f"{cannot} ({option}=True changes more than the biases){hint}")
    modules = dict(model.named_modules())
    return BiasPlan(add_bias=add, width={name: output_width(modules[name]) for name in add},
                    config_changes={option: True})
