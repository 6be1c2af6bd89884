"""Shared pieces of the scale tests: a patched tiny LLaMA built from fixed seeds, a left-padded
batch with labels, and gradient helpers."""
from __future__ import annotations

import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ..hf._models import padded_batch, tiny_model

PREFIX = "reft_interventions."
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

RED = REDConfig(layers="all")
LOREFT = ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2")
LOREFT_UNSHARED = ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2", share_weights=False)


def batch(lengths=(8, 5, 7), seq: int = 8, seed: int = 3, device=DEVICE) -> dict:
    """input_ids, attention_mask (left padding) and labels (-100 on padding)."""
    ids, mask = padded_batch(lengths, seq, "left", seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def patched(configs, *, dtype=torch.float32, n_layers: int = 2, device=DEVICE, disable_model_grads=True,
            base=None):
    """A tiny LLaMA (seed 0, or ``base`` when given) with ``configs`` attached (interventions from
    seed 1, so two calls build identical models), in train mode on ``device``."""
    model = base if base is not None else tiny_model("llama", n_layers=n_layers, dtype=dtype)
    model = model.to(device)
    torch.manual_seed(1)
    get_reft_model(model, configs, verbose=False, disable_model_grads=disable_model_grads)
    return model.train()


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in trainable(model).items() if p.grad is not None}


def loss_and_grads(model, inputs) -> tuple:
    """One forward and backward; (loss, {name: grad}) with the model's grads cleared after."""
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    out = grads_of(model)
    for p in model.parameters():
        p.grad = None
    return loss.detach(), out


def assert_grads_close(got: dict, want: dict, *, rtol: float, atol: float, what: str = ""):
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what} gradient of {n}: {m}")
