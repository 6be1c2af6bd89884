"""Where the edits go in each supported architecture: regular expressions over module names
(``model.named_modules()``), anchored so that they match the MLP path only (attention has modules
with the same suffixes: GPT-2's ``attn.c_proj``, BERT's ``attention.output.dense``).

Each pattern's last group is the layer number; a group before it (T5's "encoder"/"decoder")
becomes part of the site's key. A config's ``pattern`` replaces the table's entry and reaches
model types that are not listed.
"""
from __future__ import annotations

import re

import torch

_LLAMA_RED = r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$"
_LLAMA_REFT = r"(?:^|\.)layers\.(\d+)$"

# RED's sites, as its paper's code edits them: the FFN output projection, before the residual add
RED_SITES = {
    "llama": _LLAMA_RED,
    "mistral": _LLAMA_RED,
    "qwen2": _LLAMA_RED,
    "gpt2": r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$",  # a Conv1D, weight stored (in, out)
    "bert": r"(?:^|\.)encoder\.layer\.(\d+)\.output\.dense$",
    "roberta": r"(?:^|\.)encoder\.layer\.(\d+)\.output\.dense$",
    "t5": r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.DenseReluDense\.wo$",
}

# ReFT's sites: the decoder/encoder layers, whose output is the residual stream after the layer
REFT_SITES = {
    "llama": _LLAMA_REFT,
    "mistral": _LLAMA_REFT,
    "qwen2": _LLAMA_REFT,
    "gpt2": r"(?:^|\.)h\.(\d+)$",
    "bert": r"(?:^|\.)encoder\.layer\.(\d+)$",
    "roberta": r"(?:^|\.)encoder\.layer\.(\d+)$",
}
REFT_DEFERRED = {"t5": "ReFT on T5 (encoder-decoder positions) is not supported yet; RED on T5 is"}


def model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_sites(model, config, table: dict, what: str):
    """[(key, layer number, module name, module)] of the sites that ``config`` selects, in module
    order. Raises ValueError for an unsupported model type (listing the supported ones), a pattern
    that matches nothing, or a layer number the model does not have."""
    mtype = model_type(model)
    pattern = config.pattern
    if pattern is None:
        if mtype in REFT_DEFERRED and table is REFT_SITES:
            raise ValueError(f"{REFT_DEFERRED[mtype]} (pass pattern=... to choose modules yourself)")
        if mtype not in table:
            raise ValueError(
                f"{what} has no built-in sites for model type {mtype!r}; supported: {sorted(table)}. "
                "Pass pattern=<regular expression over model.named_modules() names, its last group "
                "the layer number> to edit another model"
            )
        pattern = table[mtype]
    regex = re.compile(pattern)
    found = []
    for name, module in model.named_modules():
        m = regex.search(name)
        if m is None:
            continue
        groups = [g for g in m.groups() if g is not None]
        if not groups or not groups[-1].isdigit():
            raise ValueError(f"pattern {pattern!r} matched {name!r} but its last group is not a layer number")
        layer = int(groups[-1])
        prefix = "_".join(groups[:-1]) or "layer"
        found.append((f"{prefix}{layer}", layer, name, module))
    if not found:
        raise ValueError(f"{what}: no module of this {mtype or type(model).__name__} model matches {pattern!r}")
    keys = [k for k, *_ in found]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{what}: pattern {pattern!r} matches several modules for the sites {dup}; "
                         "anchor it so that it matches one module per layer")
    numbers = sorted({layer for _, layer, _, _ in found})
    if config.layers != "all":
        missing = [x for x in config.layers if x not in numbers]
        if missing:
            raise ValueError(f"{what}: layers {missing} do not exist in this model; it has layers "
                             f"{numbers[0]}..{numbers[-1]} ({len(numbers)} in all)")
        found = [f for f in found if f[1] in config.layers]
    return found, len(numbers)


def hidden_size(model) -> int:
    """The residual-stream width: ``config.hidden_size`` (GPT-2's ``n_embd`` and T5's ``d_model``
    are aliased to it)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    d = getattr(config, "hidden_size", None)
    if not isinstance(d, int):
        raise ValueError("cannot tell the hidden size: the model has no config.hidden_size")
    return d


def output_width(module) -> int:
    """Width of a module's output: ``nn.Linear.out_features``, GPT-2 Conv1D's ``nf`` (its weight
    is stored (in, out)), else the first dimension of ``weight``."""
    for attr in ("out_features", "nf"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[0]
    raise ValueError(f"cannot tell the output width of {type(module).__name__}: it has no out_features, "
                     "nf or 2-D weight")


def param_dtype_device(module):
    """(dtype, device) of the module's first floating parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")
