"""Batches and states with ReFT attached: a padded batch (left or right) gives each example what
it gives alone, ``output_hidden_states`` shows the edited states, and a forward without an
attention mask edits the positions of all its tokens; float64 models, backend torch, against
references written here."""
from __future__ import annotations

import copy

import pytest
import torch

from reft_kernels.hf import ReftConfig, get_reft_model, intervention_locations

from ._attach_common import add_reft_reference_hooks, freeze_, grads_of, randomize_
from ._models import layers_of, model_inputs, padded_batch, tiny_model

SEQ = 9
LENGTHS = (9, 6, 4)


def _lm_loss_per_example(logits, ids, real):
    """Next-token cross entropy summed over each example's real tokens: (B,) losses."""
    out = []
    for b in range(ids.shape[0]):
        pos = real[b].nonzero().flatten()
        out.append(torch.nn.functional.cross_entropy(logits[b, pos[:-1]], ids[b, pos[1:]], reduction="sum"))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_padded_batch_equals_each_example_alone(arch, side, share):
    model = tiny_model(arch, dtype=torch.float64)
    get_reft_model(model, ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2", share_weights=share,
                                     backend="torch"), verbose=False)
    ivs = model.reft_interventions[0]
    randomize_(ivs)
    params = list(ivs.named_parameters())
    ids, mask = padded_batch((9, 5, 3), 10, side)
    pos_ids = (mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids).logits
    with model.reft.disabled(), torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids).logits
    assert not torch.allclose(logits, base, rtol=1e-3, atol=0), "the edit should change the logits"
    losses = _lm_loss_per_example(logits, ids, mask.bool())
    losses.sum().backward()
    batch_grads = grads_of(params)

    alone_grads = {}
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        one = ids[b, real][None]
        logits_b = model(input_ids=one, attention_mask=torch.ones_like(one)).logits
        torch.testing.assert_close(logits[b, real], logits_b[0], rtol=1e-10, atol=1e-12)
        loss_b = _lm_loss_per_example(logits_b, one, torch.ones_like(one, dtype=torch.bool))[0]
        torch.testing.assert_close(losses[b], loss_b, rtol=1e-10, atol=1e-12)
        loss_b.backward()
        for name, g in grads_of(params).items():
            alone_grads[name] = alone_grads.get(name, 0) + g
    for name, g in batch_grads.items():
        torch.testing.assert_close(g, alone_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_output_hidden_states_shows_edited_states(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    layers = (0, 1)  # not the last layer: its hidden state is normalised by some models
    get_reft_model(model, ReftConfig(method="noreft", layers=list(layers), rank=4, positions="f2+l2",
                                     backend="torch"), verbose=False)
    ivs = model.reft_interventions[0]
    randomize_(ivs)
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    got = model(**model_inputs(arch, ids, mask), output_hidden_states=True).hidden_states

    loc = intervention_locations(mask, "f2+l2")
    handles = add_reft_reference_hooks(ref, ivs, layers, loc, True)
    seen = {}

    def grab(layer):
        def hook(m, a, out):
            seen[layer] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    for layer in layers:  # registered after the reference hooks: they see the edited output
        handles.append(layers_of(ref)[layer].register_forward_hook(grab(layer)))
    with torch.no_grad():
        ref(**model_inputs(arch, ids, mask))
    for h in handles:
        h.remove()
    for layer in layers:
        torch.testing.assert_close(got[layer + 1], seen[layer], rtol=1e-10, atol=1e-12)
    # the states differ from the unedited model's exactly at the edited positions of layer 0
    base = ref(**model_inputs(arch, ids, mask), output_hidden_states=True).hidden_states
    diff = (got[1] - base[1]).abs().amax(-1) > 0
    want = torch.zeros_like(diff)
    b_idx, p_idx = (loc >= 0).nonzero(as_tuple=True)
    want[b_idx, loc[b_idx, p_idx]] = True
    assert torch.equal(diff, want)


def test_reft_without_attention_mask_edits_positions_of_all_tokens():
    model = tiny_model("gpt2", dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, ReftConfig(method="loreft", layers=[0, 2], rank=4, positions="f2+l3", backend="torch"),
                   verbose=False)
    randomize_(model.reft_interventions)
    ids, _ = padded_batch((7, 7), 7, "right")
    got = model(input_ids=ids).logits
    loc = torch.tensor([[0, 1, 4, 5, 6]] * 2)  # f2+l3 of 7 tokens
    handles = add_reft_reference_hooks(ref, model.reft_interventions[0], (0, 2), loc, True)
    want = ref(input_ids=ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
