"""load_pyreft for pyvene's other ReFT components: folders in pyreft's save format whose keys name
``block_input``, ``mlp_output`` or ``attention_output`` load as ``ReftConfig(component=...)``,
and the logits then match a reference written here: an unpatched model with hand-written hooks on
the modules pyvene maps each component to (a forward pre-hook on the layer for its input, forward
hooks on the MLP / self-attention), applying pyreft's formulas in float64 to the rows at the same
positions. Components without a ``ReftConfig`` site, mixed components, and a model type without
the component's modules raise ValueError naming the key or component, leaving the model as it was.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from reft_kernels.hf import intervention_locations
from reft_kernels.hf.pyreft_import import load_pyreft

from ._models import model_inputs, padded_batch, tiny_model
from .test_pyreft_import import LAYERS, POSITIONS, RANK, _fails, pyreft_edit, pyvene_key, write_pyreft_dir

# pyvene's module for each (architecture, component), and whether the hook reads its input
# (its llama / gpt2 type-to-module mappings), written out independently of reft_kernels' sites.py
PYVENE_MODULES = {
    ("llama", "block_input"): ("model.layers.{}", "input"),
    ("llama", "mlp_output"): ("model.layers.{}.mlp", "output"),
    ("llama", "attention_output"): ("model.layers.{}.self_attn", "output"),
    ("gpt2", "block_input"): ("transformer.h.{}", "input"),
    ("gpt2", "mlp_output"): ("transformer.h.{}.mlp", "output"),
    ("gpt2", "attention_output"): ("transformer.h.{}.attn", "output"),
}
NEW_COMPONENTS = ("block_input", "mlp_output", "attention_output")


def _edit(h, states, layer, sides, method, act):
    """``h`` (B, S, d) with the rows at each side's (B, P) locations replaced by pyreft's edit
    (float64, then cast back); a copy."""
    h = h.clone()
    for k, where in sides.items():
        b_idx, p_idx = (where >= 0).nonzero(as_tuple=True)
        pos = where[b_idx, p_idx]
        h[b_idx, pos] = pyreft_edit(method, states[(layer, k)], h[b_idx, pos].double(), act).to(h.dtype)
    return h


def reference_logits(arch, component, method, states, kw, share, act=None):
    """An unpatched ``arch`` model with pyreft's edits applied by hooks at pyvene's module for
    ``component``; (B, S, vocab) logits."""
    model = tiny_model(arch)
    loc = intervention_locations(kw["attention_mask"], POSITIONS, share_weights=share)
    sides = {0: loc} if share else {0: loc[:, 0], 1: loc[:, 1]}
    path, where = PYVENE_MODULES[(arch, component)]
    for layer in sorted({layer for layer, _ in states}):
        module = model.get_submodule(path.format(layer))
        if where == "input":
            def pre(mod, args, kwargs, layer=layer):
                if args:
                    return (_edit(args[0], states, layer, sides, method, act),) + tuple(args[1:]), kwargs
                h = _edit(kwargs["hidden_states"], states, layer, sides, method, act)
                return args, {**kwargs, "hidden_states": h}
            module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def hook(mod, args, out, layer=layer):
                if isinstance(out, tuple):
                    return (_edit(out[0], states, layer, sides, method, act),) + tuple(out[1:])
                return _edit(out, states, layer, sides, method, act)
            module.register_forward_hook(hook)
    with torch.no_grad():
        return model(**kw).logits


def _logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("share,style,method,act,side", [
    (True, "0.1.8", "loreft", None, "left"),
    (False, "0.1.6", "nodireft", "gelu", "right"),
    (True, "0.1.6", "consreft", None, "right"),
], ids=["loreft-shared", "nodireft-unshared-gelu", "consreft-0.1.6"])
@pytest.mark.parametrize("component", NEW_COMPONENTS)
def test_component_matches_pyreft_at_pyvene_site(tmp_path, arch, component, share, style, method, act, side):
    states = write_pyreft_dir(tmp_path, method, style=style, share=share, component=component)
    ids, mask = padded_batch([6, 9, 4], 9, side, seed=3)
    kw = model_inputs(arch, ids, mask)
    model = tiny_model(arch)
    base = _logits(model, kw)
    assert load_pyreft(model, tmp_path, positions=POSITIONS, act=act) is model
    cfg = model.reft.configs[0]
    assert (cfg.component, cfg.method, cfg.rank, cfg.layers, cfg.share_weights) == (
        component, method, RANK, LAYERS, share)
    ref = reference_logits(arch, component, method, states, kw, share, act=act)
    assert (ref - base).abs().max() > 1e-2  # the edit matters
    torch.testing.assert_close(_logits(model, kw), ref, atol=2e-5, rtol=1e-4)


def test_components_give_different_logits(tmp_path):
    """One set of weights imported at each of the four components: four different outputs, so a
    component that were silently loaded as another would be seen."""
    states = write_pyreft_dir(tmp_path / "block_output", "loreft")
    ids, mask = padded_batch([6, 9, 4], 9, "left", seed=3)
    kw = model_inputs("llama", ids, mask)
    outs = {"block_output": _logits(load_pyreft(tiny_model("llama"), tmp_path / "block_output",
                                                positions=POSITIONS), kw)}
    for component in NEW_COMPONENTS:
        write_pyreft_dir(tmp_path / component, "loreft", states=states, component=component)
        outs[component] = _logits(load_pyreft(tiny_model("llama"), tmp_path / component, positions=POSITIONS), kw)
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[:i]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


# ----------------------------------------------------------------------------- errors leave the model as it was

def _edit_config(directory, change):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("component", ["mlp_input", "attention_input", "mlp_activation", "query_output"])
@pytest.mark.parametrize("style", ["0.1.6", "0.1.8"])
def test_component_without_a_site_is_refused(tmp_path, component, style):
    write_pyreft_dir(tmp_path, "loreft", component=component, style=style)
    key = pyvene_key(LAYERS[0], 0, style).replace("block_output", component)
    _fails(tiny_model("llama"), tmp_path, rf"intervention '{key}' is on component '{component}'; supported "
                                         r"components: \['block_output', 'block_input'")


def test_mixed_components_are_refused(tmp_path):
    write_pyreft_dir(tmp_path, "direft", component="mlp_output")
    old = pyvene_key(LAYERS[1], 0, "0.1.8").replace("block_output", "mlp_output")
    new = old.replace("mlp_output", "attention_output")
    os.rename(tmp_path / f"intkey_{old}.bin", tmp_path / f"intkey_{new}.bin")

    def change(cfg):
        cfg["sorted_keys"][1] = new
        cfg["representations"][1][1] = "attention_output"
    _edit_config(tmp_path, change)
    _fails(tiny_model("llama"), tmp_path, rf"mix components 'attention_output' \('{new}'\), 'mlp_output'")


def test_key_and_representation_disagree(tmp_path):
    write_pyreft_dir(tmp_path, "loreft", component="mlp_output")
    _edit_config(tmp_path, lambda cfg: cfg["representations"][0].__setitem__(1, "attention_output"))
    key = pyvene_key(LAYERS[0], 0, "0.1.8").replace("block_output", "mlp_output")
    _fails(tiny_model("llama"), tmp_path,
           rf"key '{key}' names component 'mlp_output' but its representation says 'attention_output'")


@pytest.mark.parametrize("component", ["mlp_output", "attention_output"])
def test_model_type_without_the_component(tmp_path, component):
    write_pyreft_dir(tmp_path, "loreft", component=component)
    _fails(tiny_model("bert"), tmp_path, rf"on component '{component}', which has no built-in sites for model "
                                        r"type 'bert'; supported: \[.*'gpt2'.*'llama'")
