"""Adapter-only checkpoints: with interventions attached, ``model.save_pretrained`` (and so the
Trainer's ``checkpoint-N/`` and ``save_model()``) writes the interventions, the modules to save
and the configs, not the base weights; ``resume_from_checkpoint`` continues exactly; and
``from_pretrained(base) + load_interventions(folder)`` restores the model from any of them.

References: an uninterrupted Trainer run (its per-step losses and its parameters at each save,
recorded by a callback), a fresh model of the same seed, and the parameter names of the model.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from reft_kernels.hf import REDConfig, ReftConfig, ReftDataCollator, get_reft_model, load_interventions

from ._models import tiny_model, tiny_tokenizer, transformers

needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers.Trainer needs accelerate")

CONFIGS = [ReftConfig(layers="all", rank=4, positions="f1+l1"), REDConfig(layers=[1])]
EXAMPLES = [("the cat sees a dog", "the dog runs"), ("what is red", "the sun is red"),
            ("who eats fish", "the cat eats fish"), ("how big is the moon", "small")] * 2
ADAPTER_FILES = {"interventions.safetensors", "reft_config.json", "model.safetensors", "README.md"}
PREFIX = "reft_interventions."


def _patched(modules_to_save=("lm_head",)):
    model = tiny_model("llama")
    torch.manual_seed(1)
    get_reft_model(model, CONFIGS, verbose=False, modules_to_save=list(modules_to_save))
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch():
    return ReftDataCollator(tiny_tokenizer(), "f1+l1")(EXAMPLES[:4])


def test_save_pretrained_writes_the_adapter_only(tmp_path):
    model = _patched()
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(0.3)
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES
    want = {n for n, _ in model.named_parameters() if n.startswith((PREFIX, "lm_head."))}
    resume = load_file(tmp_path / "model.safetensors")
    assert set(resume) == want
    assert all(torch.equal(resume[n], p) for n, p in model.named_parameters() if n in want)
    with pytest.raises((OSError, ValueError)):  # no config.json: no model built around random base weights
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)

    fresh = tiny_model("llama")
    load_interventions(fresh, tmp_path)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_save_pretrained_arguments():
    model = _patched()
    with pytest.raises(TypeError, match=r"takes no \['push_to_hub'\]"):
        model.save_pretrained("unused", push_to_hub=True)
    with pytest.raises(TypeError, match="save_directory must be a path"):
        model.save_pretrained(3)


def test_remove_restores_the_full_save_pretrained(tmp_path):
    model = _patched(modules_to_save=())
    want = tiny_model("llama")
    model.reft.remove()
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), want.parameters()))


def test_untracked_trainable_parameters_warn(tmp_path):
    model = tiny_model("llama")
    get_reft_model(model, CONFIGS[1], verbose=False, disable_model_grads=False)
    with pytest.warns(UserWarning, match="load_interventions does not restore them"):
        model.save_pretrained(tmp_path)
    assert "model.embed_tokens.weight" in load_file(tmp_path / "model.safetensors")


class _Record(transformers.TrainerCallback):
    """The trainable parameters at every save of the run, by step."""

    def __init__(self):
        self.at = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = _trainable(model)


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", save_steps=2, use_cpu=True, logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _run(out, resume=None, callbacks=()):
    model = _patched()
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=list(EXAMPLES),
                                   data_collator=ReftDataCollator(tiny_tokenizer(), "f1+l1"),
                                   callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return model, trainer, losses


@needs_accelerate
def test_trainer_checkpoints_resume_exactly_and_reload(tmp_path):
    record = _Record()
    model, trainer, losses = _run(tmp_path / "run", callbacks=[record])
    assert sorted(record.at) == [2, 4, 6]
    trainer.save_model(str(tmp_path / "final"))
    for step in (2, 4, 6):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        files = set(os.listdir(folder))
        assert ADAPTER_FILES <= files and "config.json" not in files
        assert os.path.getsize(folder / "model.safetensors") < 64 * 1024  # the adapter, not the base
        fresh = tiny_model("llama")
        load_interventions(fresh, folder)
        assert all(torch.equal(p, record.at[step][n]) for n, p in _trainable(fresh).items())
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "final"))
    final = tiny_model("llama")
    load_interventions(final, tmp_path / "final")
    batch = _batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(final(**batch).logits, model(**batch).logits)

    # the Trainer's loader would list every frozen base weight as missing: quiet_resume names them
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    trainer_log = transformers.utils.logging.get_logger("transformers.trainer")
    trainer_log.addHandler(handler)
    try:
        resumed, _, resumed_losses = _run(tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))
    finally:
        trainer_log.removeHandler(handler)
    assert not [w for w in warnings if "keys in the checkpoint" in w], warnings
    assert {s: resumed_losses[s] for s in (3, 4, 5, 6)} == {s: losses[s] for s in (3, 4, 5, 6)}
    want = _trainable(model)
    got = _trainable(resumed)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
