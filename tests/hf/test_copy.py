"""``copy.deepcopy`` of a patched model (how TRL builds DPO reference models) gives an independent
patched model: its hooks, forward and generate act on its own interventions, not the original's."""
from __future__ import annotations

import copy

import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ._models import padded_batch, tiny_model

CONFIGS = [ReftConfig(rank=4, positions="f2+l2", share_weights=False), REDConfig(layers=[1])]


def _patched(seed=0):
    model = tiny_model("llama", seed=seed)
    get_reft_model(model, CONFIGS, verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _logits(model):
    ids, mask = padded_batch([5, 8], 8, "left", seed=2)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_deepcopy_is_an_independent_patched_model():
    model = _patched()
    twin = copy.deepcopy(model)
    before = _logits(model)
    assert torch.equal(_logits(twin), before)
    # the copy owns its interventions, handle, forward and hooks
    assert twin.reft is not model.reft and twin.reft.model is twin
    for a, b in zip(model.reft_interventions.parameters(), twin.reft_interventions.parameters()):
        assert a is not b and torch.equal(a, b)
    assert twin.forward.__self__ is twin and twin.generate.__self__ is twin
    # changing the copy's interventions changes the copy only
    with torch.no_grad():
        for p in twin.reft_interventions.parameters():
            p.mul_(2.0)
    assert not torch.equal(_logits(twin), before)
    assert torch.equal(_logits(model), before)
    # disabling or removing the copy leaves the original patched
    with twin.reft.disabled():
        assert torch.equal(_logits(model), before)
    twin.reft.remove()
    assert torch.equal(_logits(model), before)
    assert torch.equal(_logits(twin), _logits(tiny_model("llama")))


def test_deepcopy_generates_like_the_original():
    model = _patched()
    twin = copy.deepcopy(model)
    ids, mask = padded_batch([5, 8], 8, "left", seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), twin.generate(ids, **kw))
