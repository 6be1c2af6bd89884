"""Training batches without ``intervention_locations``: a causal LM's forward takes each prompt
as the real tokens before the first labelled one (labels -100 on the prompt, as the collator
writes them), and warns when the labels mark no prompt.

References: prompt lengths written out by hand for hand-made batches, and the collator's own
``intervention_locations`` (built from the prompt lengths it tokenized, not from the labels).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from reft_kernels.hf import ReftConfig, ReftDataCollator, get_reft_model, prompt_lengths_from_labels

from ._models import tiny_model, tiny_tokenizer

X = -100
EXAMPLES = [("the cat sees a dog", "the dog runs"), ("what is red", "the sun is red"),
            ("who eats fish", "the cat eats fish")]


def test_prompt_lengths_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0],    # right padding: prompt 2, response 3
                         [0, 0, 1, 1, 1, 1],    # left padding: prompt 3, response 1
                         [1, 1, 1, 0, 0, 0],    # every label masked: all prompt
                         [1, 1, 1, 1, 0, 0],    # first token labelled: cannot tell
                         [1, 1, 1, 1, 1, 1],    # a masked token inside the response: prompt 1
                         [0, 0, 0, 0, 0, 0]])   # no real token
    labels = torch.tensor([[X, X, 7, 8, 9, X],
                           [X, X, X, X, X, 5],
                           [X, X, X, X, X, X],
                           [4, 5, 6, 7, X, X],
                           [X, 5, X, 7, 8, 9],
                           [X, X, X, X, X, X]])
    lengths, unknown = prompt_lengths_from_labels(mask, labels)
    assert lengths.tolist() == [2, 3, 3, 4, 1, 0]
    assert unknown.tolist() == [False, False, False, True, False, False]
    assert lengths.dtype == torch.long and unknown.dtype == torch.bool


def test_prompt_lengths_bad_input():
    mask = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be a tensor of the attention mask's shape"):
        prompt_lengths_from_labels(mask, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        prompt_lengths_from_labels(mask, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        prompt_lengths_from_labels(torch.ones(4), torch.zeros(4, dtype=torch.long))


def _patched(cfg, device):
    model = tiny_model("llama").to(device)
    torch.manual_seed(1)
    get_reft_model(model, cfg, verbose=False)
    with torch.no_grad():  # far from the identity, so that positions show in the logits
        for p in model.reft_interventions.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def _forward(model, batch, **drop):
    kw = {k: v for k, v in batch.items() if k not in drop}
    with torch.no_grad():
        out = model(**kw)
    return out.logits, out.loss


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_labels_give_the_collators_locations(side, share, device):
    cfg = ReftConfig(layers="all", rank=4, positions="f1+l2", share_weights=share)
    model = _patched(cfg, device)
    collator = ReftDataCollator(tiny_tokenizer(side), "f1+l2", share_weights=share)
    batch = {k: v.to(device) for k, v in collator(EXAMPLES).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labels that mark the prompt: no warning
        from_labels = _forward(model, batch, intervention_locations=1)
    given = _forward(model, batch)
    assert torch.equal(from_labels[0], given[0]) and torch.equal(from_labels[1], given[1])
    # the rule matters: the attention mask alone counts prompt and response as the prompt
    mask_only = _forward(model, batch, intervention_locations=1, labels=1)
    assert not torch.allclose(mask_only[0], given[0], atol=1e-4)


def test_labels_without_a_masked_prompt_warn_and_take_the_whole_sequence(device):
    model = _patched(ReftConfig(layers="all", rank=4, positions="f1+l1"), device)
    batch = {k: v.to(device) for k, v in ReftDataCollator(tiny_tokenizer(), "f1+l1")(EXAMPLES).items()}
    plain = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # only the padding masked
    with pytest.warns(UserWarning, match="prompt cannot be told from the labels"):
        logits, _ = _forward(model, {**batch, "labels": plain}, intervention_locations=1)
        if device.type == "cuda":  # the flag is read once its copy has reached the host, at a later forward
            torch.cuda.synchronize()
            _forward(model, {**batch, "labels": plain}, intervention_locations=1)
    mask_only, _ = _forward(model, batch, intervention_locations=1, labels=1)
    assert torch.equal(logits, mask_only)


def test_encoder_labels_leave_the_positions_alone():
    """A sequence classifier's labels are one per example: positions come from the attention mask."""
    model = tiny_model("bert")
    get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f1+l1"), verbose=False)
    ids = torch.randint(3, 64, (2, 6))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        with_labels = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).logits
        without = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(with_labels, without)
