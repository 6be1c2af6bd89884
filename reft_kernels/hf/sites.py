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

# a mixture-of-experts layer's FFN: the sparse MoE block, whose output is the routed experts'
# weighted sum (transformers 5 fuses the experts' weights into 3-D tensors, so no per-expert
# projection exists to edit)
_MOE_RED = r"(?:^|\.)layers\.(\d+)\.mlp$"

# RED's sites, as its paper's code edits them: the FFN output projection, before the residual add
RED_SITES = {
    "llama": _LLAMA_RED,
    "mistral": _LLAMA_RED,
    "qwen2": _LLAMA_RED,
    "qwen3": _LLAMA_RED,
    "gemma2": _LLAMA_RED,  # before the post-feedforward norm, like every down_proj
    "gemma3_text": _LLAMA_RED,
    "phi3": _LLAMA_RED,  # its gate and up projections are one module (gate_up_proj); down_proj as LLaMA's
    "mixtral": _MOE_RED,
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
    "qwen3": _LLAMA_REFT,
    "gemma2": _LLAMA_REFT,
    "gemma3_text": _LLAMA_REFT,
    "phi3": _LLAMA_REFT,
    "mixtral": _LLAMA_REFT,
    "gpt2": r"(?:^|\.)h\.(\d+)$",
    "bert": r"(?:^|\.)encoder\.layer\.(\d+)$",
    "roberta": r"(?:^|\.)encoder\.layer\.(\d+)$",
    "t5": r"(?:^|\.)(encoder|decoder)\.block\.(\d+)$",  # rows per stack: see seq2seq.py
}
_DECODER_ONLY = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral")

# ReFT's sites by component (pyvene's names): "block_output" edits the layer's output and
# "block_input" its input (a pre-hook on the same module); "mlp_output" and "attention_output"
# edit the output of the layer's MLP (a MoE block's for Mixtral) and self-attention, before the
# residual add
REFT_COMPONENT_SITES = {
    "block_output": REFT_SITES,
    "block_input": REFT_SITES,
    "mlp_output": {**{t: r"(?:^|\.)layers\.(\d+)\.mlp$" for t in _DECODER_ONLY},
                   "gpt2": r"(?:^|\.)h\.(\d+)\.mlp$"},
    "attention_output": {**{t: r"(?:^|\.)layers\.(\d+)\.self_attn$" for t in _DECODER_ONLY},
                         "gpt2": r"(?:^|\.)h\.(\d+)\.attn$"},
}
# components edited inside a layer: their module gets the rows from its parent layer's call
SUBLAYER_COMPONENTS = ("mlp_output", "attention_output")

# RED sites that are not a projection (no out_features or weight): their output has the hidden size
RED_WIDTH_IS_HIDDEN = {"mixtral"}


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


def red_width(model, config, module) -> int:
    """Width of a RED site's output: the hidden size for the table's sites that are whole blocks
    (``RED_WIDTH_IS_HIDDEN``), else ``output_width(module)``."""
    if config.pattern is None and model_type(model) in RED_WIDTH_IS_HIDDEN:
        return hidden_size(model)
    return output_width(module)


def param_dtype_device(module):
    """(dtype, device) of the module's first floating parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")
