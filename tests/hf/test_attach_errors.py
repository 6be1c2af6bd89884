"""get_reft_model's errors (each leaves the model exactly as it was), the ``pattern`` override
for a model type the site tables do not list, and the checks on ``intervention_locations``."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, intervention_locations

from ._attach_common import freeze_, gather_edit_scatter, randomize_, reft_sides, snapshot
from ._models import model_inputs, padded_batch, tiny_model, tiny_unsupported_model

RED_TYPES = ("bert", "gemma2", "gemma3_text", "gpt2", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3",
             "roberta", "t5")
REFT_TYPES = RED_TYPES


def _fails_and_leaves_model_unchanged(model, configs, exc, match, kw):
    before = snapshot(model)
    with torch.no_grad():
        base = model(**kw).logits
    with pytest.raises(exc, match=match) as info:
        get_reft_model(model, configs, verbose=False)
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base)
    return str(info.value)


@pytest.mark.parametrize("kind", ["red", "reft"])
def test_unsupported_model_type_lists_the_supported_ones(kind):
    model = tiny_unsupported_model()
    ids, mask = padded_batch((6, 4), 6, "right")
    cfg = REDConfig() if kind == "red" else ReftConfig(rank=4)
    msg = _fails_and_leaves_model_unchanged(model, cfg, ValueError, "'opt'", dict(input_ids=ids, attention_mask=mask))
    for name in RED_TYPES if kind == "red" else REFT_TYPES:
        assert f"'{name}'" in msg
    assert "pattern" in msg


def test_pattern_override_reaches_an_unlisted_model_type():
    model = tiny_unsupported_model(dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, [
        ReftConfig(method="direft", layers=[0], rank=4, positions="f2+l2", pattern=r"(?:^|\.)decoder\.layers\.(\d+)$",
                   backend="torch"),
        REDConfig(pattern=r"(?:^|\.)decoder\.layers\.(\d+)\.fc2$", backend="torch"),
    ], verbose=False)
    reft, red = model.reft_interventions
    assert list(reft.keys()) == ["layer0"] and list(red.keys()) == ["layer0", "layer1"]
    randomize_(model.reft_interventions)
    ids, mask = padded_batch((6, 4), 6, "left")
    got = model(input_ids=ids, attention_mask=mask).logits

    layers = ref.model.decoder.layers
    sides = reft_sides(reft, 0, intervention_locations(mask, "f2+l2"), True)
    handles = [layers[0].register_forward_hook(lambda m, a, out: (gather_edit_scatter(out[0], sides),) + out[1:]
                                               if isinstance(out, tuple) else gather_edit_scatter(out, sides))]
    for n in (0, 1):
        iv = red[f"layer{n}"]
        handles.append(layers[n].fc2.register_forward_hook(lambda m, a, out, iv=iv: out * iv.scale + iv.bias))
    want = ref(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    assert not torch.allclose(ref(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-3, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


ERROR_CASES = {
    # name: (arch, configs, exception, message regex)
    "red-layer-out-of-range": ("llama", [REDConfig(layers=[0, 5])], ValueError, r"layers \[5\] do not exist"),
    "reft-layer-out-of-range": ("gpt2", [ReftConfig(layers=[3], rank=4)], ValueError, r"layers \[3\] do not exist"),
    "rank-above-hidden-size": ("llama", [ReftConfig(layers=[0], rank=33)], ValueError, "rank=33 exceeds the hidden "
                                                                                     "size 32"),
    # a valid config before the failing one must not stay attached
    "second-config-fails": ("bert", [REDConfig(), ReftConfig(layers=[0, 9], rank=4)], ValueError, r"\[9\]"),
    "red-and-reft-on-t5-missing-layer": ("t5", [REDConfig(), ReftConfig(layers=[0, 9], rank=4)], ValueError,
                                         r"\[9\]"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_attach_errors_leave_the_model_unchanged(case):
    arch, configs, exc, match = ERROR_CASES[case]
    model = tiny_model(arch)
    kw = model_inputs(arch, *padded_batch((6, 4), 6, "right"))
    _fails_and_leaves_model_unchanged(model, configs, exc, match, kw)


def test_attaching_twice_fails_and_keeps_the_first_attachment():
    model = tiny_model("llama")
    kw = model_inputs("llama", *padded_batch((6, 4), 6, "right"))
    get_reft_model(model, ReftConfig(layers=[1], rank=4, positions="f1+l1"), verbose=False)
    randomize_(model.reft_interventions)
    handle = model.reft
    _fails_and_leaves_model_unchanged(model, REDConfig(), ValueError, "already has interventions", kw)
    assert model.reft is handle
    handle.remove()
    get_reft_model(model, REDConfig(), verbose=False)  # after remove() it attaches again


def test_forward_without_kwargs_is_refused_after_partial_attach_and_rolled_back():
    """The forward wrapper fails after the interventions were added: everything is undone."""
    model = tiny_model("llama")
    cls_forward = type(model).forward

    def user_forward(input_ids=None, attention_mask=None):  # no **kwargs: the rows cannot reach the layers
        return cls_forward(model, input_ids=input_ids, attention_mask=attention_mask)

    model.forward = user_forward
    kw = model_inputs("llama", *padded_batch((6, 4), 6, "right"))
    _fails_and_leaves_model_unchanged(model, [REDConfig(), ReftConfig(layers=[0], rank=4)], ValueError,
                                      r"takes no \*\*kwargs", kw)
    assert model.__dict__["forward"] is user_forward

    def has_locations(input_ids=None, attention_mask=None, intervention_locations=None, **kwargs):
        return cls_forward(model, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.forward = has_locations
    _fails_and_leaves_model_unchanged(model, [REDConfig()], ValueError, "already has an 'intervention_locations'", kw)
    assert "intervention_locations" in inspect.signature(model.forward).parameters


BAD_LOCATIONS = {
    # name: (share_weights, locations for a batch of 2 x 6 tokens, exception, message regex)
    "wrong-batch-size": (True, torch.tensor([[0, 1], [2, 3], [4, 5]]), ValueError, r"B = 2 .* got \(3, 2\)"),
    "float-dtype": (True, torch.tensor([[0.0, 1.0], [2.0, 3.0]]), TypeError, "integer tensor.*float32"),
    "not-a-tensor": (True, [[0, 1], [2, 3]], TypeError, "integer tensor, got list"),
    "position-past-the-end": (True, torch.tensor([[0, 6], [1, 2]]), ValueError, r"positions in \[0, 6\)"),
    "below-minus-one": (True, torch.tensor([[0, -2], [1, 2]]), ValueError, r"positions in \[0, 6\)"),
    "duplicate-in-one-example": (True, torch.tensor([[1, 3, 1], [0, 1, 2]]), ValueError, "more than once"),
    "duplicate-across-shared-sides": (True, torch.tensor([[[1, 2], [2, 5]], [[0, 1], [4, 5]]]), ValueError,
                                      "more than once"),
    "unshared-given-BP": (False, torch.tensor([[0, 1], [4, 5]]), ValueError, r"share_weights=False"),
    "unshared-duplicate-in-one-side": (False, torch.tensor([[[1, 1], [4, 5]], [[0, 1], [4, 5]]]), ValueError,
                                       "more than once"),
    "three-sides": (False, torch.zeros(2, 3, 2, dtype=torch.long), ValueError, r"\(B, 2, P\)"),
}


@pytest.mark.parametrize("case", list(BAD_LOCATIONS))
def test_bad_intervention_locations_are_refused(case):
    share, loc, exc, match = BAD_LOCATIONS[case]
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(layers=[0, 2], rank=4, positions="f2+l2", share_weights=share),
                   verbose=False)
    randomize_(model.reft_interventions)
    ids, mask = padded_batch((6, 4), 6, "right")
    want = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(exc, match=match):
        model(input_ids=ids, attention_mask=mask, intervention_locations=loc)
    # the failed call leaves nothing behind: the next forward is the usual one
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
