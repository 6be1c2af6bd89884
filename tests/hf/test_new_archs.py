"""Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and Mixtral through the built-in site tables (no
``pattern=``): forward and gradients against an unpatched copy with reference hooks written here
(RED ``h * scale + bias`` on the module named in ``_models_more.RED_NAMES``; ReFT gather, edit with
``reft_kernels.reference``, scatter on each decoder layer's output), and greedy ``generate`` with
the KV cache against a cache-free greedy loop over the reference model."""
from __future__ import annotations

import copy

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, intervention_locations

from ._attach_common import (add_reft_reference_hooks, compare_with_hooked_reference, freeze_, gather_edit_scatter,
                             randomize_)
from ._models import layers_of, padded_batch
from ._models_more import NEW_ARCHS, RED_NAMES, tiny_new_model

LAYERS = (0, 2)
LENGTHS = (7, 5, 3)
SEQ = 7
EOS = 2
NEW = 3


def _red_reference_hooks(ref, arch, ivs, layers):
    modules = dict(ref.named_modules())
    handles = []
    for layer in layers:
        iv = ivs[f"layer{layer}"]

        def hook(module, args, out, iv=iv):
            return out * iv.scale + iv.bias

        handles.append(modules[RED_NAMES[arch].format(layer)].register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_red_matches_reference(arch):
    model = tiny_new_model(arch)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, REDConfig(layers=list(LAYERS), backend="torch"), verbose=False)
    ivs = model.reft_interventions[0]
    assert sorted(ivs) == [f"layer{x}" for x in LAYERS]
    randomize_(ivs)
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    kw = {"input_ids": ids, "attention_mask": mask}
    compare_with_hooked_reference(model, ref, kw, ivs, lambda: _red_reference_hooks(ref, arch, ivs, LAYERS))


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_reft_matches_reference(arch, share):
    model = tiny_new_model(arch)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, ReftConfig(layers=list(LAYERS), rank=4, positions="f2+l2", share_weights=share,
                                     backend="torch"), verbose=False)
    ivs = model.reft_interventions[0]
    randomize_(ivs)
    # right padding: Gemma 2's eager attention gives left padding's fully masked rows NaN
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    loc = intervention_locations(mask, "f2+l2", share_weights=share)
    kw = {"input_ids": ids, "attention_mask": mask}
    compare_with_hooked_reference(model, ref, kw, ivs, lambda: add_reft_reference_hooks(ref, ivs, LAYERS, loc, share))


def test_mixtral_red_cannot_be_merged_into_the_experts():
    from reft_kernels.hf import merge_red

    model = tiny_new_model("mixtral")
    get_reft_model(model, REDConfig(layers=[0], backend="torch"), verbose=False)
    with pytest.raises(ValueError, match="cannot merge RED into model.layers.0.mlp"):
        merge_red(model)


def _reference_greedy(arch, model, prompt, kind):
    """Greedy decoding of one unpadded prompt (1, n) on a fresh base model with reference hooks
    (ReFT at the prompt's "f2+l2" positions, RED at every token), full forwards without a cache."""
    base = freeze_(tiny_new_model(arch))
    ivs = model.reft_interventions[0]
    n = prompt.shape[1]
    seq = prompt
    with torch.no_grad():
        for _ in range(NEW):
            if kind == "red":
                handles = _red_reference_hooks(base, arch, ivs, LAYERS)
            else:
                loc = intervention_locations(torch.ones(1, n, dtype=torch.long), "f2+l2")
                handles = []
                for layer in LAYERS:
                    sides = [(ivs[f"layer{layer}"], loc)]

                    def hook(mod, args, out, sides=sides):
                        h = out[0] if isinstance(out, tuple) else out
                        h = torch.cat([gather_edit_scatter(h[:, :n], sides), h[:, n:]], dim=1)
                        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

                    handles.append(layers_of(base)[layer].register_forward_hook(hook))
            try:
                logits = base(input_ids=seq, use_cache=False).logits[0, -1].clone()
            finally:
                for h in handles:
                    h.remove()
            logits[EOS] = -float("inf")
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    return seq[0, n:]


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("kind", ["red", "reft"])
def test_generate_with_cache_matches_reference_loop(arch, kind):
    model = tiny_new_model(arch)
    cfg = (REDConfig(layers=list(LAYERS), backend="torch") if kind == "red"
           else ReftConfig(layers=list(LAYERS), rank=4, positions="f2+l2", backend="torch"))
    get_reft_model(model, cfg, verbose=False)
    randomize_(model.reft_interventions, std=0.3)
    # Gemma 2's eager attention turns left padding's fully masked rows into NaN (the base model's
    # own behaviour): its prompts are unpadded
    ids, mask = padded_batch((5, 5) if arch == "gemma2" else (5, 3), 5, "left", seed=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, use_cache=True)
    new = out[:, ids.shape[1]:]
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        want = _reference_greedy(arch, model, ids[b:b + 1, ids.shape[1] - n:], kind)
        assert torch.equal(new[b], want), (b, new[b], want)
