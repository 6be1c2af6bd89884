"""Mixed-adapter batches on an encoder-decoder model (T5): ``model(..., adapter_names=[...])`` and
``generate(..., adapter_names=[...])`` edit the encoder's and the decoder's rows (ReFT) and every
token (RED) of each example with its own adapter. Every check compares the mixed batch against
each example run alone with its adapter active, or against the base model for ``"__base__"``."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ._attach_common import randomize_
from ._mixed_common import grads_each_alone
from ._models import padded_batch, tiny_model

NAMES = ("default", "b", "c")
CASES = {
    "loreft": lambda r: [ReftConfig(method="loreft", rank=r, positions="f2+l2", layers=[0, 2])],
    "red": lambda r: [REDConfig(layers=[0, 1])],
    "red+direft-unshared": lambda r: [REDConfig(layers=[1]),
                                      ReftConfig(method="direft", rank=r, positions="f1+l2", layers=[1],
                                                 share_weights=False)],
}


def _model(case, ranks=(3, 2, 1)):
    model = tiny_model("t5", dtype=torch.float64)
    for seed, (name, r) in enumerate(zip(NAMES, ranks), start=1):
        if name == NAMES[0]:
            get_reft_model(model, CASES[case](r), verbose=False, adapter_name=name)
            randomize_(model.reft_interventions, std=0.3, seed=seed)
        else:
            model.reft.add_adapter(name, CASES[case](r))
            randomize_(model.reft_adapters[name], std=0.3, seed=seed)
    return model


def _alone(model, name, fn):
    handle = model.reft
    if name == "__base__":
        with handle.disabled():
            return fn()
    active = handle.active_adapter
    handle.set_adapter(name)
    try:
        return fn()
    finally:
        handle.set_adapter(active)


def _inputs(seed):
    ids, mask = padded_batch((7, 5, 6, 4), 7, "right", seed=seed)
    dec, dec_mask = padded_batch((5, 3, 5, 4), 5, "right", seed=seed + 1)
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mixed_batch_equals_each_example_alone(case):
    model = _model(case)
    ids, mask, dec, dec_mask = _inputs(3)
    names = ["b", "__base__", "c", "default"]
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    with torch.no_grad():
        got = model(**kw, adapter_names=names).logits
        want = torch.cat([_alone(model, n, lambda i=i: model(**{k: v[i:i + 1] for k, v in kw.items()}).logits)
                          for i, n in enumerate(names)])
        assert model.reft._mixed is None
        plain = model(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got[0], plain[0]), "adapter b should edit example 0 differently from the default"


def test_training_with_labels_gives_each_adapter_its_own_gradient():
    model = _model("red+direft-unshared", ranks=(2, 2, 2))
    model.reft_adapters["b"].requires_grad_(True)
    ids, mask, _, _ = _inputs(5)
    labels = padded_batch((4, 3, 4, 2), 4, "right", seed=9)[0]
    labels[1, 3:] = -100
    names = ["b", "default", "__base__", "b"]
    weights = torch.randn(4, 4, model.config.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(7))
    params = {"default": list(model.reft_interventions.parameters()), "b": list(model.reft_adapters["b"].parameters())}
    model.zero_grad()
    (model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names).logits * weights).sum().backward()
    got = {k: [p.grad.clone() for p in ps] for k, ps in params.items()}
    want = grads_each_alone(model, names, params, lambda i: (model(
        input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).logits * weights[i:i + 1]).sum())
    for k in params:
        assert all(g.abs().sum() > 0 for g in got[k])
        for g, w in zip(got[k], want[k]):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["loreft", "red"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names_equals_each_prompt_alone(case, beams):
    model = _model(case, ranks=(2, 2, 2))
    ids, mask, _, _ = _inputs(7)
    # a decoder prompt of 3 tokens (the start token and 2): f2+l2 has positions in it
    dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), padded_batch((2,) * 4, 2, "right", seed=8)[0]], 1)
    names = ["c", "default", "__base__", "b"]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=beams)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=names, **kw)
        assert model.reft._mixed is None
        want = [_alone(model, n, lambda i=i: model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                                                               decoder_input_ids=dec[i:i + 1], **kw))
                for i, n in enumerate(names)]
        with model.reft.disabled():
            base = model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **kw)
    assert got.shape == (4, 3 + 4)
    for i, name in enumerate(names):
        assert torch.equal(got[i], want[i][0]), (name, got[i], want[i][0])
    assert not torch.equal(got, base), "the adapters should change the generation"


def test_bad_adapter_names_in_generate_raise_and_leave_no_state():
    model = _model("red+direft-unshared")
    ids, mask, _, _ = _inputs(11)
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=["b", "zzz", "c", "b"], max_new_tokens=1)
    with pytest.raises(ValueError, match="one adapter per example: 4 for this batch, got 2"):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=["b", "c"], max_new_tokens=1)
    assert model.reft._mixed is None
    pre = next(h for h in model.get_encoder()._forward_pre_hooks.values() if hasattr(h, "restore"))
    assert pre._saved == []
