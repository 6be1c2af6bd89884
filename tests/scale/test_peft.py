"""Interventions beside PEFT's LoRA: ``peft.get_peft_model`` first, then ``get_reft_model`` on
the ``PeftModel`` with ``disable_model_grads=False`` (pyreft's keyword), so that the LoRA
adapters and the interventions train together (RED sits on the LoRA-wrapped MLP output
projection and edits its output, LoRA's update included).

References: at initialisation (LoRA's B is zero) the model computes what the patched model
without LoRA computes, gradients of the interventions included. After training, a plain model
whose weights are merged by hand (``W + (alpha / r) B A`` for every adapted layer), carrying the
interventions reloaded from ``save_interventions``, gives the trained model's logits; with the
interventions disabled, it gives the merged model's own logits.
"""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import load_interventions, save_interventions

from ..hf._models import tiny_model
from ._common import LOREFT, RED, PREFIX, assert_grads_close, batch, loss_and_grads, patched, trainable

peft = pytest.importorskip("peft", reason="needs peft (the test extra installs it)")

CONFIGS = [RED, LOREFT]
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8


def _peft_model():
    base = tiny_model("llama", n_layers=2).to("cpu")
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(2)
    return peft.get_peft_model(base, lora)


def _merged_by_hand(pm):
    """A plain tiny LLaMA whose adapted weights are ``W + (alpha / r) B A``."""
    lora = {n: p.detach() for n, p in pm.named_parameters() if "lora_" in n}
    plain = tiny_model("llama", n_layers=2).to("cpu")
    merged = 0
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                key = f"base_model.model.{name}"
                A, B = lora[f"{key}.lora_A.default.weight"], lora[f"{key}.lora_B.default.weight"]
                module.weight += (ALPHA / RANK) * B @ A
                merged += 1
    assert merged == 2 * len(TARGETS)
    return plain


def test_lora_and_interventions_train_together(tmp_path):
    inputs = batch(device="cpu")
    pm = patched(CONFIGS, base=_peft_model(), device="cpu", disable_model_grads=False)
    names = set(trainable(pm))
    lora_names = {n for n in names if "lora_" in n}
    assert lora_names and names == lora_names | {n for n in names if PREFIX in n}
    assert {n for n in names if PREFIX in n} == {n for n, _ in pm.named_parameters() if PREFIX in n}

    # at init LoRA adds zero: the interventions see what they see without LoRA
    loss0, grads0 = loss_and_grads(pm, inputs)
    plain_loss, plain_grads = loss_and_grads(patched(CONFIGS, device="cpu"), inputs)
    torch.testing.assert_close(loss0, plain_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close({n: g for n, g in grads0.items() if PREFIX in n},
                       {n: g for n, g in plain_grads.items()}, rtol=1e-5, atol=1e-7, what="LoRA at init vs none")
    assert all(grads0[n].abs().sum() > 0 for n in lora_names if "lora_B" in n)

    base_before = {n: p.detach().clone() for n, p in pm.named_parameters() if n not in names}
    start = {n: p.detach().clone() for n, p in trainable(pm).items()}
    opt = torch.optim.AdamW(trainable(pm).values(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        pm(**inputs).loss.backward()
        opt.step()
    with torch.no_grad():
        assert pm(**inputs).loss < loss0 - 0.05
    assert all(not torch.equal(p.detach(), start[n]) for n, p in trainable(pm).items()), "a parameter did not train"
    assert all(torch.equal(p, base_before[n]) for n, p in pm.named_parameters() if n not in names)

    pm.eval()
    save_interventions(pm, tmp_path / "iv")
    merged = _merged_by_hand(pm)
    with torch.no_grad():
        with pm.reft.disabled():
            torch.testing.assert_close(pm(**inputs).logits, merged(**inputs).logits, rtol=1e-5, atol=1e-5)
        load_interventions(merged, tmp_path / "iv")
        torch.testing.assert_close(pm(**inputs).logits, merged(**inputs).logits, rtol=1e-5, atol=1e-5)
