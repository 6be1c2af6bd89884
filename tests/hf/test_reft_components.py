"""ReFT at pyvene's other components (``component=`` on ReftConfig): "block_input",
"mlp_output", "attention_output" (and the default "block_output"), on LLaMA-family models and
GPT-2, against an unpatched copy with reference hooks written here on the named modules (a
pre-hook editing the layer's input; forward hooks on the MLP / self-attention output). Also:
gradient checkpointing (the MLP is called without the rows), validation, and save/load."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from reft_kernels.hf import (ReftConfig, get_reft_model, intervention_locations, load_interventions,
                             save_interventions)

from ._attach_common import compare_with_hooked_reference, freeze_, gather_edit_scatter, randomize_, reft_sides
from ._models import layers_of, padded_batch, tiny_model
from ._models_more import tiny_new_model

COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")
LAYERS = (0, 2)
LENGTHS = (7, 5, 3)
SEQ = 7


def _build(arch):
    return tiny_new_model(arch) if arch == "qwen3" else tiny_model(arch, dtype=torch.float64)


def _submodule(layer, component):
    if component == "mlp_output":
        return layer.mlp
    return layer.attn if hasattr(layer, "attn") else layer.self_attn


def _reference_hooks(ref, ivs, component, loc, share):
    handles = []
    for x in LAYERS:
        sides = reft_sides(ivs, x, loc, share)
        layer = layers_of(ref)[x]
        if component == "block_input":
            def pre(mod, args, kwargs, sides=sides):
                if args:
                    return (gather_edit_scatter(args[0], sides),) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": gather_edit_scatter(kwargs["hidden_states"], sides)}
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            continue

        def hook(mod, args, out, sides=sides):
            if isinstance(out, tuple):
                return (gather_edit_scatter(out[0], sides),) + tuple(out[1:])
            return gather_edit_scatter(out, sides)
        module = layer if component == "block_output" else _submodule(layer, component)
        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_component_matches_reference(arch, component, share):
    model = _build(arch)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, ReftConfig(layers=list(LAYERS), rank=4, positions="f2+l2", share_weights=share,
                                     component=component, backend="torch"), verbose=False)
    ivs = model.reft_interventions[0]
    randomize_(ivs)
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    loc = intervention_locations(mask, "f2+l2", share_weights=share)
    compare_with_hooked_reference(model, ref, dict(input_ids=ids, attention_mask=mask), ivs,
                                  lambda: _reference_hooks(ref, ivs, component, loc, share))


def test_components_differ():
    """The four components edit different hidden states: the same parameters give four outputs."""
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    outs = []
    for component in COMPONENTS:
        model = tiny_model("llama", dtype=torch.float64)
        get_reft_model(model, ReftConfig(layers=[1], rank=4, positions="f2+l2", component=component,
                                         backend="torch"), verbose=False)
        randomize_(model.reft_interventions)
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j]), (COMPONENTS[i], COMPONENTS[j])


def _enable_checkpointing(model, reentrant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _checkpoint_grads(arch, component, reentrant, disabled_between):
    model = tiny_model(arch)
    get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f2+l2", component=component,
                                     backend="torch"), verbose=False)
    randomize_(model.reft_interventions, std=0.3)
    if reentrant is not None:
        _enable_checkpointing(model, reentrant)
    model.train()
    batches = [padded_batch([5, 3, 6], 6, "left", seed=2), padded_batch([4, 7], 7, "right", seed=3)]
    loss = 0
    for ids, mask in batches:
        loss = loss + model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                            intervention_locations=intervention_locations(mask, "f2+l2"), use_cache=False).loss
        if disabled_between:  # a reference forward, as DPO runs one
            with model.reft.disabled(), torch.no_grad():
                model(input_ids=ids[:1], attention_mask=mask[:1], use_cache=False)
    loss.backward()
    return {n: p.grad for n, p in model.reft_interventions.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("component", ["mlp_output", "attention_output", "block_input"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_same_gradients(arch, component, reentrant):
    """Two forwards (each followed by a disabled reference forward) then one backward: the
    recompute of the first must use the first batch's rows."""
    want = _checkpoint_grads(arch, component, None, True)
    got = _checkpoint_grads(arch, component, reentrant, True)
    assert want.keys() == got.keys()
    for n in want:
        assert want[n] is not None and want[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9, msg=n)


def test_component_is_validated():
    with pytest.raises(ValueError, match="component must be one of"):
        ReftConfig(component="mlp_input")
    with pytest.raises(TypeError, match="component must be a string"):
        ReftConfig(component=3)


@pytest.mark.parametrize("arch,component", [("bert", "mlp_output"), ("t5", "attention_output"),
                                            ("t5", "block_input")])
def test_unsupported_component_raises_and_leaves_the_model(arch, component):
    model = tiny_model(arch)
    with pytest.raises(ValueError, match=f"component={component!r}"):
        get_reft_model(model, ReftConfig(layers=[0], rank=4, component=component), verbose=False)
    assert not hasattr(model, "reft_interventions") and getattr(model, "reft", None) is None


def test_save_load_round_trip_and_old_folders(tmp_path):
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    model = tiny_model("llama", dtype=torch.float64)
    get_reft_model(model, ReftConfig(layers=[1], rank=4, positions="f2+l2", component="mlp_output",
                                     backend="torch"), verbose=False)
    randomize_(model.reft_interventions)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    save_interventions(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "reft_config.json").read_text())
    assert meta["configs"][0]["component"] == "mlp_output"
    loaded = load_interventions(tiny_model("llama", dtype=torch.float64), tmp_path / "a")
    assert loaded.reft.configs[0].component == "mlp_output"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)

    # a folder written before the field existed: its configs have no "component" key
    old = tiny_model("llama", dtype=torch.float64)
    get_reft_model(old, ReftConfig(layers=[1], rank=4, positions="f2+l2", backend="torch"), verbose=False)
    randomize_(old.reft_interventions)
    save_interventions(old, tmp_path / "old")
    path = os.path.join(tmp_path, "old", "reft_config.json")
    meta = json.loads(open(path).read())
    del meta["configs"][0]["component"]
    with open(path, "w") as f:
        json.dump(meta, f)
    with torch.no_grad():
        want = old(input_ids=ids, attention_mask=mask).logits
    back = load_interventions(tiny_model("llama", dtype=torch.float64), tmp_path / "old")
    assert back.reft.configs[0].component == "block_output"
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)
