"""The life of an attached model: ``remove()`` restores it exactly, ``disabled()`` runs the base
model, dtype casts keep R in fp32, and batches without any position still give every
intervention parameter a (zero) gradient."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, intervention_locations

from ._attach_common import freeze_, gather_edit_scatter, randomize_, reft_sides, snapshot, weighted_sum
from ._models import device_for, layers_of, model_inputs, padded_batch, tiny_model, to_device

SEQ = 8
LENGTHS = (8, 5)


def _configs(arch, backend="torch"):
    cfgs = [REDConfig(layers=[0, 2], backend=backend)]
    if arch != "t5":
        cfgs.insert(0, ReftConfig(method="loreft", layers=[1, 2], rank=4, positions="f2+l2", share_weights=False,
                                  backend=backend))
    return cfgs


def _a_layer(model, arch):
    return model.encoder.block[1] if arch == "t5" else layers_of(model)[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_remove_restores_the_model_exactly(arch):
    model = tiny_model(arch)
    frozen_name, frozen = next(iter(model.named_parameters()))
    frozen.requires_grad_(False)  # the user's own choice, to be kept
    fired = []
    layer = _a_layer(model, arch)
    user_before = layer.register_forward_hook(lambda m, a, o: fired.append("before"))
    kw = model_inputs(arch, *padded_batch(LENGTHS, SEQ, "left"))
    base = model(**kw).logits
    fired.clear()
    before = snapshot(model)
    assert "forward" not in model.__dict__

    get_reft_model(model, _configs(arch), verbose=False)
    user_after = layer.register_forward_hook(lambda m, a, o: fired.append("after"))
    randomize_(model.reft_interventions)
    edited = model(**kw).logits
    assert not torch.allclose(edited, base, rtol=1e-3, atol=0)
    weighted_sum(edited).backward()
    handle = model.reft

    assert handle.remove() is model
    fired.clear()
    assert torch.equal(model(**kw).logits, base)
    assert fired == ["before", "after"]  # both user hooks survive and fire
    user_after.remove()
    after = snapshot(model)
    assert after == before
    assert not hasattr(model, "reft") and not hasattr(model, "reft_interventions")
    assert "forward" not in model.__dict__
    assert model.forward.__func__ is type(model).forward
    assert model.get_parameter(frozen_name).requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != frozen_name)
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    user_before.remove()


def test_remove_restores_a_user_instance_forward():
    model = tiny_model("llama")
    calls = []
    inner = model.forward

    @functools.wraps(inner)
    def user_forward(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = user_forward
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    base = model(input_ids=ids, attention_mask=mask).logits
    get_reft_model(model, _configs("llama"), verbose=False)
    randomize_(model.reft_interventions)
    calls.clear()
    edited = model(input_ids=ids, attention_mask=mask).logits
    assert calls == [1]  # the user's forward runs inside the patched one
    assert not torch.allclose(edited, base, rtol=1e-3, atol=0)
    model.reft.remove()
    assert model.__dict__["forward"] is user_forward
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_disabled_gives_the_base_model_nests_and_survives_exceptions(arch):
    model = tiny_model(arch)
    kw = model_inputs(arch, *padded_batch(LENGTHS, SEQ, "right"))
    base = freeze_(copy.deepcopy(model))(**kw).logits
    get_reft_model(model, _configs(arch), verbose=False)
    randomize_(model.reft_interventions)
    edited = model(**kw).logits
    assert not torch.allclose(edited, base, rtol=1e-3, atol=0)
    loc = torch.tensor([[[0, 1], [5, 6]], [[1, 2], [3, 4]]])
    with model.reft.disabled() as m:
        assert m is model and not model.reft.enabled
        assert torch.equal(model(**kw).logits, base)
        if arch != "t5":  # locations are accepted and ignored
            assert torch.equal(model(**kw, intervention_locations=loc).logits, base)
        with model.reft.disabled():
            assert torch.equal(model(**kw).logits, base)
        assert not model.reft.enabled  # the inner exit keeps the outer state
        assert torch.equal(model(**kw).logits, base)
    assert model.reft.enabled
    assert torch.equal(model(**kw).logits, edited)
    with pytest.raises(KeyError, match="boom"):
        with model.reft.disabled():
            raise KeyError("boom")
    assert model.reft.enabled
    assert torch.equal(model(**kw).logits, edited)


def test_bf16_cast_keeps_R_fp32_and_trains():
    model = tiny_model("llama")
    get_reft_model(model, [ReftConfig(method="loreft", layers=[0, 2], rank=4, positions="f2+l2", backend="torch"),
                           REDConfig(layers=[1], backend="torch")], verbose=False)
    randomize_(model.reft_interventions, std=0.2)
    ids, mask = padded_batch(LENGTHS, SEQ, "left")
    want = model(input_ids=ids, attention_mask=mask).logits.detach()
    model.to(torch.bfloat16)
    reft, red = model.reft_interventions
    for iv in reft.values():
        assert iv.rotation.dtype == torch.float32 and iv.R.dtype == torch.float32
        assert iv.weight.dtype == torch.bfloat16 and iv.bias.dtype == torch.bfloat16
    assert red["layer1"].scale.dtype == torch.bfloat16 and red["layer1"].bias.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.train()
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    weighted_sum(out.float()).backward()
    for name, p in model.reft_interventions.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert model.reft_interventions[0]["layer0"].rotation.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_without_positions_gives_zero_gradients_not_none(arch, backend):
    dev = device_for(backend)
    model = tiny_model(arch).to(dev)
    kw = to_device(model_inputs(arch, *padded_batch(LENGTHS, SEQ, "left")), dev)
    base = freeze_(copy.deepcopy(model)).train()(**kw).logits
    get_reft_model(model, [ReftConfig(method="noreft", layers=[0, 1], rank=4, positions="f2+l2", backend=backend),
                           ReftConfig(method="loreft", layers=[2], rank=4, positions="f2+l2", share_weights=False,
                                      backend=backend)], verbose=False)
    randomize_(model.reft_interventions)
    model.train()
    none = torch.full((2, 2, 3), -1, dtype=torch.long, device=dev)
    out = model(**kw, intervention_locations=none).logits
    assert torch.equal(out, base)
    weighted_sum(out).backward()
    names = [n for n, _ in model.reft_interventions.named_parameters()]
    assert len(names) == 2 * 4 + 2 * 3  # NoReFT: 4 tensors per layer; unshared LoReFT: 2 x 3
    for name, p in model.reft_interventions.named_parameters():
        assert p.grad is not None, f"{name}: no gradient (DDP would fail on an unused parameter)"
        assert torch.count_nonzero(p.grad) == 0, name


def test_print_trainable_parameters_counts_the_interventions(capsys):
    model = tiny_model("gpt2")
    n_base = sum(p.numel() for p in model.parameters())
    get_reft_model(model, [REDConfig(layers=[0]), ReftConfig(method="loreft", layers=[1, 2], rank=4)])
    line = capsys.readouterr().out.strip()
    # RED: scale + bias (32 each); LoReFT per layer: rotation 4x32, weight 4x32, bias 4
    n_iv = 2 * 32 + 2 * (4 * 32 + 4 * 32 + 4)
    assert model.reft.trainable_parameters() == (n_iv, n_base + n_iv)
    assert line == f"trainable params: {n_iv:,} || all params: {n_base + n_iv:,} || " \
                   f"trainable%: {100.0 * n_iv / (n_base + n_iv):.4f}"


def test_dropout_applies_to_whole_edited_rows_in_training_only():
    """pyreft's ``dropout(h + edit)`` on the edited rows: each element of an edited row is 0 or
    ``(h + edit) / (1 - p)``; rows that are not edited are untouched; in eval mode no dropout."""
    p = 0.5
    model = tiny_model("llama", dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, ReftConfig(method="loreft", layers=[1], rank=4, positions="f2+l2", dropout=p,
                                     backend="torch"), verbose=False)
    randomize_(model.reft_interventions)
    model.eval()  # see test_interventions_attached_to_an_eval_model_are_in_eval_mode
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    seen = {}

    def grab(m, a, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    layers_of(model)[1].register_forward_hook(grab)  # after the library's hook: sees the edited state
    layers_of(ref)[1].register_forward_hook(grab)
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)
        h = seen["h"]
        loc = intervention_locations(mask, "f2+l2")
        y = gather_edit_scatter(h, reft_sides(model.reft_interventions[0], 1, loc, True))
        model(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(seen["h"], y, rtol=1e-10, atol=1e-12)  # eval: no dropout
        model.train()
        model(input_ids=ids, attention_mask=mask)
    out = seen["h"]
    edited = torch.zeros(out.shape[:2], dtype=torch.bool)
    b_idx, p_idx = (loc >= 0).nonzero(as_tuple=True)
    edited[b_idx, loc[b_idx, p_idx]] = True
    assert torch.equal(out[~edited], h[~edited])
    dropped = out[edited] == 0
    kept = ~dropped
    assert 0.2 < dropped.double().mean() < 0.8
    torch.testing.assert_close(out[edited][kept], (y[edited] / (1 - p))[kept], rtol=1e-10, atol=1e-12)


def test_reft_under_a_plain_args_kwargs_instance_forward():
    model = tiny_model("llama")
    inner = model.forward

    def user_forward(*args, **kwargs):  # e.g. a wrapper without functools.wraps
        return inner(*args, **kwargs)

    model.forward = user_forward
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    base = model(input_ids=ids, attention_mask=mask).logits
    get_reft_model(model, ReftConfig(layers=[0], rank=4, positions="f2+l2"), verbose=False)
    randomize_(model.reft_interventions)
    edited = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(edited, base, rtol=1e-3, atol=0)


def test_interventions_attached_to_an_eval_model_are_in_eval_mode():
    model = tiny_model("llama")
    assert not model.training
    get_reft_model(model, [ReftConfig(layers=[1], rank=4, positions="f2+l2", dropout=0.5), REDConfig(layers=[0])],
                   verbose=False)
    assert [n for n, m in model.named_modules() if m.training] == []


def test_disable_model_grads_false_keeps_each_base_flag():
    """``disable_model_grads=False`` (pyreft's keyword; for adapters such as LoRA) leaves every base
    parameter's ``requires_grad`` as it was, trains both, and ``remove()`` keeps the flags; a
    non-bool is refused before anything changes."""
    model = tiny_model("llama")
    names = [n for n, _ in model.named_parameters()]
    trainable_base = {n for n in names if ".mlp.up_proj." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable_base)
    with pytest.raises(TypeError, match="disable_model_grads must be a bool"):
        get_reft_model(model, REDConfig(), verbose=False, disable_model_grads=0)
    assert not hasattr(model, "reft")
    get_reft_model(model, [REDConfig(), ReftConfig(rank=2, positions="f1+l1")], verbose=False,
                   disable_model_grads=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == trainable_base | {n for n in trainable if n.startswith("reft_interventions.")}
    assert any(n.startswith("reft_interventions.") for n in trainable)
    ids, mask = padded_batch([6, 4], 6, "left")
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.reft.remove()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_base
