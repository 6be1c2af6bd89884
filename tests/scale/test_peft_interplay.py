"""PEFT's own ways out of its wrapper with interventions attached to the ``PeftModel``:
``disable_adapter()`` disables the interventions too, ``merge_and_unload()`` / ``unload()`` carry
them to the model they return, the Trainer's adapter-only checkpoints resume exactly, and
attaching to the model inside the PeftModel (where PEFT would miss them) warns.

References: a plain tiny LLaMA of the same seed (the base model), the same with LoRA merged by
hand (``W + (alpha / r) B A``), and interventions reloaded from ``save_interventions`` into
those models (not the carried ones).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from reft_kernels.hf import ReftDataCollator, get_reft_model, load_interventions, merge_and_unload, save_interventions

from ..hf._models import tiny_model, tiny_tokenizer, transformers
from ._common import LOREFT, RED, batch, patched

peft = pytest.importorskip("peft", reason="needs peft (the test extra installs it)")

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8


def _peft_model():
    base = tiny_model("llama", n_layers=2)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(2)
    return peft.get_peft_model(base, lora)


def _trained(configs=(RED, LOREFT)):
    """A PeftModel with LoRA and interventions away from their initial values, in eval mode."""
    pm = patched(list(configs), base=_peft_model(), device="cpu", disable_model_grads=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


def _merged_by_hand(pm):
    lora = {n: p.detach() for n, p in pm.named_parameters() if "lora_" in n}
    plain = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                key = f"base_model.model.{name}"
                A, B = lora[f"{key}.lora_A.default.weight"], lora[f"{key}.lora_B.default.weight"]
                module.weight += (ALPHA / RANK) * B @ A
    return plain


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_disable_adapter_disables_the_interventions_too():
    pm = _trained()
    inputs = batch(device="cpu")
    full = _logits(pm, inputs)
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm, inputs), _logits(tiny_model("llama", n_layers=2), inputs),
                                   rtol=0, atol=0)
        assert not pm.reft.enabled
    assert pm.reft.enabled and torch.equal(_logits(pm, inputs), full)


@pytest.mark.parametrize("method", ["merge_and_unload", "unload"])
def test_peft_unload_carries_the_interventions(method, tmp_path):
    pm = _trained()
    inputs = batch(device="cpu")
    full = _logits(pm, inputs)
    save_interventions(pm, tmp_path)
    reference = _merged_by_hand(pm) if method == "merge_and_unload" else tiny_model("llama", n_layers=2)
    load_interventions(reference, tmp_path)

    out = getattr(pm, method)()
    assert isinstance(out, transformers.LlamaForCausalLM)
    # the wrapper keeps nothing of ours (it still wraps ``out``, so attribute look-ups reach out.reft)
    assert "reft" not in vars(pm) and "reft_interventions" not in pm._modules
    assert out.reft.configs == (RED, LOREFT)
    torch.testing.assert_close(_logits(out, inputs), _logits(reference, inputs), rtol=1e-5, atol=1e-5)
    if method == "merge_and_unload":
        torch.testing.assert_close(_logits(out, inputs), full, rtol=1e-5, atol=1e-5)


def test_merge_then_export_red(tmp_path):
    """PEFT's merge, then ours: a plain model with LoRA and RED in its weights."""
    pm = _trained(configs=(RED,))
    inputs = batch(device="cpu")
    full = _logits(pm, inputs)
    with pytest.raises(ValueError, match="call PEFT's merge_and_unload"):
        merge_and_unload(pm)
    plain = merge_and_unload(pm.merge_and_unload())
    assert not hasattr(plain, "reft")
    torch.testing.assert_close(_logits(plain, inputs), full, rtol=1e-4, atol=1e-4)
    plain.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(back, inputs), _logits(plain, inputs))


def test_remove_restores_peft_methods():
    pm = _trained()
    pm.reft.remove()
    assert "disable_adapter" not in vars(pm) and "save_pretrained" not in vars(pm)
    assert not {"merge_and_unload", "unload"} & set(vars(pm.base_model))


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers.Trainer needs accelerate")
def test_trainer_with_lora_resumes_exactly(tmp_path):
    examples = [("the cat sees a dog", "the dog runs"), ("what is red", "the sun is red"),
                ("who eats fish", "the cat eats fish"), ("how big is the moon", "small")]

    def run(out, resume=None):
        pm = patched([LOREFT], base=_peft_model(), device="cpu", disable_model_grads=False)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                                              learning_rate=1e-2, report_to="none", save_steps=2, use_cpu=True,
                                              logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model=pm, args=args, train_dataset=examples,
                                       data_collator=ReftDataCollator(tiny_tokenizer(), "f2+l2"))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

    want = run(tmp_path / "run")
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert {"adapter_model.safetensors", "adapter_config.json", "interventions.safetensors",
            "reft_config.json", "model.safetensors"} <= files
    got = run(tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert got.keys() == want.keys() and any("lora_" in n for n in want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_attaching_inside_the_peft_model_warns():
    pm = _peft_model()
    with pytest.warns(UserWarning, match="attach the interventions to the peft.PeftModel itself"):
        get_reft_model(pm.base_model.model, RED, verbose=False, disable_model_grads=False)
