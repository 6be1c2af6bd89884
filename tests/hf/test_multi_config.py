"""Several configs on one model: each ReFT config edits its own positions whatever the order of
the configs, RED and ReFT included. Edits on disjoint rows commute, so listing the same configs
(with the same parameter values) in another order must give the same logits; a config that read
another config's rows would not."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ._models import padded_batch, tiny_model

RED = REDConfig(layers=[0, 2])
FIRST = ReftConfig(method="loreft", rank=3, positions="f2", layers=[0, 1])
LAST = ReftConfig(method="noreft", rank=2, positions="l3", layers=[1, 2])
SPLIT = ReftConfig(method="direft", rank=2, positions="f1+l1", share_weights=False, layers=[3])


def _patched(configs, values):
    model = tiny_model("llama", n_layers=4)
    get_reft_model(model, configs, verbose=False)
    for cfg, ivs in zip(configs, model.reft_interventions):
        with torch.no_grad():
            for name, p in ivs.named_parameters():
                p.copy_(values[(cfg, name)])
    return model


def _values(configs, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model("llama", n_layers=4)
    get_reft_model(model, configs, verbose=False)
    return {(cfg, name): p.detach() + 0.4 * torch.randn(p.shape, generator=g)
            for cfg, ivs in zip(configs, model.reft_interventions) for name, p in ivs.named_parameters()}


@pytest.mark.parametrize("order", [[RED, FIRST, LAST, SPLIT], [LAST, SPLIT, RED, FIRST], [SPLIT, FIRST, RED, LAST]],
                         ids=["red-first", "red-third", "split-first"])
def test_config_order_does_not_matter(order):
    values = _values([RED, FIRST, LAST, SPLIT])
    ids, mask = padded_batch([9, 12], 12, "left", seed=4)  # prompts of 9 and 12: f2, l3, f1+l1 disjoint
    reference = _patched([RED, FIRST, LAST, SPLIT], values)
    model = _patched(order, values)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        base = tiny_model("llama", n_layers=4)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(want, base, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_reft_config_edits_only_its_positions():
    """Layer 0 carries FIRST only (f2; LAST is on layers 1 and 2): its output changes at exactly
    the first two real tokens of each prompt."""
    values = _values([FIRST, LAST])
    model = _patched([FIRST, LAST], values)
    ids, mask = padded_batch([9, 12], 12, "right", seed=5)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.detach().clone()
        return hook

    layer0 = model.model.layers[0]
    with torch.no_grad():
        handle = layer0.register_forward_hook(record("patched"))  # after ours: sees the edited output
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
        with model.reft.disabled():
            handle = layer0.register_forward_hook(record("base"))
            model(input_ids=ids, attention_mask=mask)
            handle.remove()
    changed = (seen["patched"] - seen["base"]).abs().amax(-1) > 0
    expected = torch.zeros_like(changed)
    expected[:, :2] = True
    assert torch.equal(changed, expected)
