"""Mixed-adapter batches (``reft_kernels/hf/mixed_batch.py``): ``model(..., adapter_names=[...])``
and ``generate(..., adapter_names=[...])``. Every check compares the mixed batch against each
example run alone with its adapter set active (``set_adapter``), or against the base model for
``"__base__"``, so a row edited with another example's adapter, or left unedited, would show."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ._attach_common import randomize_
from ._mixed_common import grads_each_alone
from ._models import padded_batch, tiny_model

NAMES = ("default", "b", "c")


def _model(configs_by_name):
    """A tiny LLaMA with one adapter per entry of ``configs_by_name`` (name -> configs), each
    with its own random values; the first is active."""
    model = tiny_model("llama", n_layers=3)
    (first, cfg), *rest = configs_by_name.items()
    get_reft_model(model, cfg, verbose=False, adapter_name=first)
    randomize_(model.reft_interventions, seed=1)
    for seed, (name, cfg) in enumerate(rest, start=2):
        model.reft.add_adapter(name, cfg)
        randomize_(model.reft_adapters[name], seed=seed)
    return model


def _alone(model, name, **kw):
    """``model``'s output for ``kw`` with adapter ``name`` active (the base model for __base__)."""
    handle = model.reft
    with torch.no_grad():
        if name == "__base__":
            with handle.disabled():
                return model(**kw).logits
        active = handle.active_adapter
        handle.set_adapter(name)
        try:
            return model(**kw).logits
        finally:
            handle.set_adapter(active)


def _each_alone(model, names, ids, mask):
    return torch.cat([_alone(model, n, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
                      for i, n in enumerate(names)])


CASES = {
    "loreft": lambda r: [ReftConfig(method="loreft", rank=r, positions="f2+l2", layers=[0, 2])],
    "red": lambda r: [REDConfig(layers=[1, 2])],
    "red+noreft-unshared": lambda r: [REDConfig(layers=[1]),
                                      ReftConfig(method="noreft", rank=r, positions="f1+l2", layers=[1, 2],
                                                 share_weights=False)],
    "direft-act": lambda r: [ReftConfig(method="direft", rank=r, positions="l3", layers=[1], act="tanh")],
    "nodireft": lambda r: [ReftConfig(method="nodireft", rank=r, positions="f3", layers=[0, 1])],
    "consreft+lobireft": lambda r: [ReftConfig(method="consreft", rank=r, positions="f1+l1", layers=[0]),
                                    ReftConfig(method="lobireft", rank=r, positions="l2", layers=[0, 2])],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mixed_batch_equals_each_example_alone(case):
    # ranks differ between adapters (padded to the largest inside the batch)
    model = _model({name: CASES[case](r) for name, r in zip(NAMES, (3, 2, 1))})
    ids, mask = padded_batch([9, 12, 7, 12, 10], 12, "left", seed=3)
    names = ["b", "default", "__base__", "c", "b"]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    want = _each_alone(model, names, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the active adapter is untouched, and a plain forward still uses it alone
    assert model.reft.active_adapter == "default"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   _alone(model, "default", input_ids=ids, attention_mask=mask), rtol=0, atol=0)


def test_adapter_ids_as_a_tensor_equal_names():
    model = _model({name: CASES["red+noreft-unshared"](2) for name in NAMES})
    ids, mask = padded_batch([6, 8, 8], 8, "left", seed=4)
    with torch.no_grad():
        by_name = model(input_ids=ids, attention_mask=mask, adapter_names=["c", "__base__", "default"]).logits
        by_id = model(input_ids=ids, attention_mask=mask, adapter_names=torch.tensor([2, -1, 0])).logits
    torch.testing.assert_close(by_id, by_name, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["loreft", "red"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names_equals_each_prompt_alone(case, beams):
    model = _model({name: CASES[case](2) for name in NAMES})
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # every example runs all its new tokens
    ids, mask = padded_batch([5, 8, 6], 8, "left", seed=5)
    names = ["c", "default", "b"]
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        want = []
        for i, name in enumerate(names):
            model.reft.set_adapter(name)
            want.append(model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw))
        model.reft.set_adapter("default")
    assert got.shape == (3, 8 + 4)
    for i in range(len(names)):
        assert torch.equal(got[i], want[i][0]), (names[i], got[i], want[i][0])


def test_training_two_adapters_in_one_batch_gives_each_its_own_gradient():
    cfg = CASES["red+noreft-unshared"](2)
    model = _model({"default": cfg, "b": cfg})
    model.reft_adapters["b"].requires_grad_(True)
    ids, mask = padded_batch([7, 9, 9, 6], 9, "right", seed=6)
    names = ["b", "default", "b", "__base__"]
    weights = torch.randn(4, 9, model.config.vocab_size, generator=torch.Generator().manual_seed(7))

    model.zero_grad()
    (model(input_ids=ids, attention_mask=mask, adapter_names=names).logits * weights).sum().backward()
    params = {"default": list(model.reft_interventions.parameters()), "b": list(model.reft_adapters["b"].parameters())}
    got = {k: [p.grad.clone() for p in ps] for k, ps in params.items()}

    # reference: each example alone through its adapter's own path, gradients summed
    want = grads_each_alone(model, names, params, lambda i: (
        model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits * weights[i:i + 1]).sum())
    for k in params:
        assert any(g.abs().sum() > 0 for g in got[k])
        for g, w in zip(got[k], want[k]):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_bad_adapter_names_raise_naming_the_argument():
    model = _model({name: CASES["loreft"](2) for name in NAMES[:2]})
    ids, mask = padded_batch([5, 6], 6, "left", seed=8)
    kw = dict(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapter 'zzz'.*\['default', 'b'\]"):
        model(**kw, adapter_names=["default", "zzz"])
    with pytest.raises(ValueError, match="one adapter per example: 2 for this batch, got 3"):
        model(**kw, adapter_names=["b", "b", "b"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(**kw, adapter_names="b")
    with pytest.raises(ValueError, match=r"ids must lie in \[-1, 2\)"):
        model(**kw, adapter_names=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="float32 tensor"):
        model(**kw, adapter_names=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown adapter"):
        model.generate(**kw, adapter_names=["nope", "b"], max_new_tokens=1)


def test_adapters_that_differ_in_more_than_rank_cannot_share_a_batch():
    model = _model({"default": CASES["loreft"](2),
                    "other": [ReftConfig(method="loreft", rank=2, positions="f1+l1", layers=[0, 2])]})
    ids, mask = padded_batch([5, 6], 6, "left", seed=9)
    with pytest.raises(ValueError, match="same configs but for their rank"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"])
    # one adapter per batch still works
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def test_red_merged_into_the_weights_refuses_a_mixed_batch():
    from reft_kernels.hf import merge_red, unmerge_red

    model = _model({name: CASES["red"](1) for name in NAMES[:2]})
    ids, mask = padded_batch([5, 6], 6, "left", seed=11)
    merge_red(model)
    with pytest.raises(ValueError, match="RED is merged"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "b"])
    unmerge_red(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=["b", "default"]).logits
    torch.testing.assert_close(got, _each_alone(model, ["b", "default"], ids, mask), rtol=1e-5, atol=1e-5)


def test_red_under_gradient_checkpointing_refuses_a_mixed_training_batch():
    model = _model({name: CASES["red"](1) for name in NAMES[:2]})
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask = padded_batch([5, 6], 6, "left", seed=10)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "b"])


def test_a_mixed_batch_adds_no_host_synchronisation():
    from reft_kernels.benchmark.launches import counting

    model = _model({name: CASES["red+noreft-unshared"](2) for name in NAMES})
    ids, mask = padded_batch([9, 12, 7], 12, "left", seed=3)
    kw = dict(input_ids=ids, attention_mask=mask)
    ids_tensor = torch.tensor([1, 2, 0])
    with torch.no_grad():
        model(**kw, adapter_names=ids_tensor)  # a tensor's values are checked once (one sync)
        with counting() as plain:
            model(**kw)
        with counting() as by_name:
            model(**kw, adapter_names=["b", "c", "default"])
        with counting() as by_tensor:
            model(**kw, adapter_names=ids_tensor)
    assert by_name.syncs == plain.syncs and by_tensor.syncs == plain.syncs
