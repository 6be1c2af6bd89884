"""Training patched models: a plain loop, ``transformers.Trainer`` with ``ReftDataCollator`` and
``SaveInterventionsCallback``, gradient checkpointing, and ReFT dropout.

References, none of them the code under test: the base weights before training (bitwise), the
loss before training, a fresh model loaded from the saved folder, the gradients of the same
forwards without checkpointing, and the eval-mode (no dropout) outputs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest
import torch

from reft_kernels.hf import (REDConfig, ReftConfig, ReftDataCollator, SaveInterventionsCallback, get_reft_model,
                             intervention_locations, load_interventions)

from ._models import layers_of, padded_batch, tiny_model, tiny_tokenizer, transformers

EXAMPLES = [
    ("the cat sees a dog", "the dog runs"),
    ("what is red", "the sun is red"),
    ("who eats fish", "the cat eats fish"),
    ("how big is the moon", "small"),
]
PREFIX = "reft_interventions."

# transformers.Trainer needs accelerate (in the test extra; a GPU machine may lack it)
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers.Trainer needs accelerate")


def base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(PREFIX)}


def intervention_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(PREFIX)}


def assert_base_unchanged(model, before):
    after = base_params(model)
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"base parameters changed: {changed}"


def assert_all_changed(model, before):
    after = intervention_params(model)
    assert after.keys() == before.keys() and before
    same = [n for n in before if torch.equal(after[n], before[n])]
    assert not same, f"intervention parameters not trained: {same}"


def eval_loss(model, batch):
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was)
    return loss


# ---------------------------------------------------------------- 5. a plain loop
@pytest.mark.parametrize("cfg", [ReftConfig(method="loreft", layers="all", rank=4, positions="f1+l1"),
                                 REDConfig(layers="all")], ids=["loreft_f1+l1", "red"])
def test_plain_loop_lowers_loss_and_trains_only_interventions(cfg):
    model = tiny_model("llama")
    get_reft_model(model, cfg, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(PREFIX) for n in trainable)
    batch = ReftDataCollator(tiny_tokenizer(), "f1+l1")(EXAMPLES[:3])
    base0, iv0 = base_params(model), intervention_params(model)
    loss0 = eval_loss(model, batch)
    model.train()
    # every parameter handed to the optimizer: the frozen base must stay put by having no grad
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(PREFIX))
    loss1 = eval_loss(model, batch)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert_base_unchanged(model, base0)
    assert_all_changed(model, iv0)


# ---------------------------------------------------------------- 6. transformers.Trainer
def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", save_steps=3, use_cpu=True, logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def read_folder(folder):
    from safetensors.torch import load_file
    assert sorted(os.listdir(folder)) == ["README.md", "interventions.safetensors", "reft_config.json"], \
        os.listdir(folder)
    with open(os.path.join(folder, "reft_config.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(folder, "interventions.safetensors"))


@needs_accelerate
def test_trainer_trains_saves_and_reloads(tmp_path):
    cfg = ReftConfig(layers=[0, 2], rank=4, positions="f1+l1")
    model = tiny_model("llama", seed=0)
    get_reft_model(model, cfg, verbose=False)
    collator = ReftDataCollator(tiny_tokenizer(), "f1+l1")
    full = collator(EXAMPLES)
    base0, iv0 = base_params(model), intervention_params(model)
    loss0 = eval_loss(model, full)
    data = [{"prompt": p, "response": r} for p, r in EXAMPLES]
    # remove_unused_columns=False: see test_trainer_default_args_with_dicts_of_text
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, remove_unused_columns=False),
                                   train_dataset=data, data_collator=collator,
                                   callbacks=[SaveInterventionsCallback()])
    trainer.train()
    assert trainer.state.global_step == 6
    assert eval_loss(model, full) < loss0, "6 steps at lr 1e-2 did not lower the loss"
    assert_base_unchanged(model, base0)
    assert_all_changed(model, iv0)

    # the folders beside each checkpoint and at the end
    meta3, w3 = read_folder(tmp_path / "checkpoint-3" / "interventions")
    meta6, w6 = read_folder(tmp_path / "checkpoint-6" / "interventions")
    meta_end, w_end = read_folder(tmp_path / "interventions")
    assert meta6["configs"] == [cfg.to_dict()] == meta3["configs"]
    trained = {n.removeprefix(PREFIX): p for n, p in intervention_params(model).items()}
    assert w6.keys() == trained.keys() == w_end.keys() == w3.keys()
    assert all(torch.equal(w6[k], trained[k]) and torch.equal(w_end[k], trained[k]) for k in trained)
    assert any(not torch.equal(w3[k], w6[k]) for k in w3), "checkpoint-3 holds the final weights"

    # a fresh model of the same seed, loaded from checkpoint-6, computes the trained model's logits
    model.eval()
    with torch.no_grad():
        want = model(**full).logits
        fresh = tiny_model("llama", seed=0)
        load_interventions(fresh, str(tmp_path / "checkpoint-6" / "interventions"))
        assert torch.equal(fresh(**full).logits, want)
        early = tiny_model("llama", seed=0)
        load_interventions(early, str(tmp_path / "checkpoint-3" / "interventions"))
        assert not torch.equal(early(**full).logits, want)


@needs_accelerate
def test_trainer_default_args_with_tuples(tmp_path):
    """(prompt, response) tuples pass the Trainer's column removal untouched (it filters dicts only)."""
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(layers=[1], rank=4, positions="f1+l1"), verbose=False)
    iv0 = intervention_params(model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="no"),
                                   train_dataset=list(EXAMPLES),
                                   data_collator=ReftDataCollator(tiny_tokenizer(), "f1+l1"))
    trainer.train()
    assert_all_changed(model, iv0)


@needs_accelerate
def test_trainer_default_args_with_dicts_of_text_explains_the_fix(tmp_path):
    """The Trainer's default ``remove_unused_columns=True`` strips the text keys of dict examples
    (the forward does not name them) before the collator sees them, for a plain list too: the
    collator's error says how to keep them."""
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(layers=[1], rank=4, positions="f1+l1"), verbose=False)
    data = [{"prompt": p, "response": r} for p, r in EXAMPLES]
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="no"),
                                   train_dataset=data, data_collator=ReftDataCollator(tiny_tokenizer(), "f1+l1"))
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


@needs_accelerate
def test_trainer_keeps_intervention_locations_column(tmp_path):
    """Already-collated examples with an ``intervention_locations`` column, default arguments and
    the default collator: the Trainer keeps the column (forward names it) and the forward uses it.
    The evaluation column holds the positions of the whole sequence (every real token counted as
    the prompt), which differ from the prompt's that the forward takes from the labels without a
    column, so the loss tells which ones the forward got. Training takes the collator's column."""
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f1+l1"), verbose=False)
    batch = ReftDataCollator(tiny_tokenizer(), "f1+l1")(EXAMPLES)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(EXAMPLES))]
    whole = intervention_locations(batch["attention_mask"], "f1+l1")
    assert not torch.equal(batch["intervention_locations"], whole)
    batch["intervention_locations"] = whole
    eval_rows = [{k: v[i] for k, v in batch.items()} for i in range(len(EXAMPLES))]
    without = {k: v for k, v in batch.items() if k != "intervention_locations"}
    with_loc, without_loc = eval_loss(model, batch), eval_loss(model, without)
    assert abs(with_loc - without_loc) > 1e-4

    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="no",
                                                                   per_device_eval_batch_size=len(rows)),
                                   train_dataset=rows, eval_dataset=eval_rows)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(with_loc, rel=1e-6, abs=1e-7)
    iv0 = intervention_params(model)
    trainer.train()
    assert_all_changed(model, iv0)


# ---------------------------------------------------------------- 7. gradient checkpointing
def enable_checkpointing(model, reentrant: bool):
    """transformers 5.24 renamed the method (the old name warns); 5.17 has the old name only."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def checkpointed_model(arch, reentrant):
    model = tiny_model(arch)
    get_reft_model(model, [ReftConfig(layers="all", rank=4, positions="f2+l2", backend="torch"),
                           ReftConfig(layers=[0, 2], rank=4, positions="f1+l2", share_weights=False,
                                      backend="torch"),
                           REDConfig(layers="all", backend="torch")], verbose=False)
    if reentrant is not None:
        enable_checkpointing(model, reentrant)
    return model.train()


def grads_of(model, batches):
    """Intervention gradients of the summed losses of several forwards, then one backward; and how
    many times layer 0's MLP was entered (twice per forward when its layer is recomputed; a pre-hook,
    because non-reentrant checkpointing stops a recompute once it has what the backward needs)."""
    mlp = layers_of(model)[0].mlp
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model.zero_grad(set_to_none=True)
        loss = 0
        for ids, mask in batches:
            loss = loss + model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                                use_cache=False).loss
        loss.backward()
    finally:
        handle.remove()
    return {n: p.grad for n, p in model.named_parameters() if n.startswith(PREFIX)}, loss.detach(), len(calls)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("n_forwards", [1, 2])
def test_gradient_checkpointing_same_gradients(arch, reentrant, n_forwards):
    batches = [padded_batch([5, 3, 6], 6, "left", seed=2), padded_batch([4, 7], 7, "right", seed=3)][:n_forwards]
    want, loss_want, calls_plain = grads_of(checkpointed_model(arch, None), batches)
    assert calls_plain == n_forwards
    assert all(g is not None and g.abs().sum() > 0 for g in want.values()), "a parameter without gradient"
    got, loss_got, calls_ckpt = grads_of(checkpointed_model(arch, reentrant), batches)
    assert calls_ckpt == 2 * n_forwards, "checkpointing did not recompute the layers"
    assert torch.equal(loss_got, loss_want)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9, msg=n)


# ---------------------------------------------------------------- 8. dropout
def dropout_model(arch, dropout, share, layers):
    model = tiny_model(arch, seed=0)
    cfg = ReftConfig(layers=layers, rank=4, positions="f2+l2", share_weights=share, dropout=dropout,
                     backend="torch")
    get_reft_model(model, cfg, verbose=False)
    return model


def run(model, ids, mask, layer):
    """(logits, output of decoder layer ``layer`` after the interventions)."""
    seen = []
    hook = layers_of(model)[layer].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    return logits, seen[0]


def intervened(mask, share):
    loc = intervention_locations(mask, "f2+l2", share_weights=share).reshape(mask.shape[0], -1)
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for b in range(mask.shape[0]):
        out[b, loc[b][loc[b] >= 0]] = True
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_dropout_only_on_intervened_rows(arch, share):
    ids, mask = padded_batch([5, 3, 6], 6, "left", seed=2)
    rows = intervened(mask, share)
    assert 0 < rows.sum() < rows.numel()
    # the last layer only: the logits of other positions cannot see the dropped rows
    last = len(layers_of(tiny_model(arch))) - 1
    model = dropout_model(arch, 0.5, share, [last])
    eval_logits, eval_h = run(model.eval(), ids, mask, last)
    torch.manual_seed(123)
    train_logits, train_h = run(model.train(), ids, mask, last)
    changed = (train_logits != eval_logits).any(-1)
    assert torch.equal(changed, rows), (changed, rows)
    # pyreft's dropout(h + edit): each element of an edited row is dropped or scaled by 1 / (1 - p)
    # (to rounding: the edit in training runs out of place on the gathered rows, in eval in place,
    # on the CPU through the CPU extension, whose sums round otherwise)
    kept = train_h[rows] != 0
    torch.testing.assert_close(train_h[rows][kept], 2 * eval_h[rows][kept], rtol=1e-6, atol=1e-6)
    assert 0.25 < kept.float().mean() < 0.75
    assert torch.equal(train_h[~rows], eval_h[~rows])

    # every layer: layer 0's output (its input is the same in both modes) changes at the rows only
    model = dropout_model(arch, 0.5, share, "all")
    _, eval_h0 = run(model.eval(), ids, mask, 0)
    _, train_h0 = run(model.train(), ids, mask, 0)
    assert torch.equal((train_h0 != eval_h0).any(-1), rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_dropout_eval_equals_no_dropout(arch, share):
    ids, mask = padded_batch([5, 3, 6], 6, "left", seed=2)
    with_dropout = dropout_model(arch, 0.5, share, "all")
    plain = dropout_model(arch, 0.0, share, "all")
    plain.reft_interventions.load_state_dict(with_dropout.reft_interventions.state_dict())
    want, _ = run(plain.eval(), ids, mask, 0)
    got, _ = run(with_dropout.eval(), ids, mask, 0)
    assert torch.equal(got, want)
    train_plain, _ = run(plain.train(), ids, mask, 0)
    assert torch.equal(train_plain, want)
    # and the interventions are not the identity here, so the comparison means something
    base, _ = run(tiny_model(arch, seed=0), ids, mask, 0)
    assert not torch.allclose(base, want)
