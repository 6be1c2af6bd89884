"""One R for all layers per step (``reft_kernels/hf/shared_rotation.py``): a patched forward runs
one batched QR for every orthonormal-row intervention of the same shape, its gradients equal the
per-layer computation's (float64 model: tight tolerances), and the shared R never outlives what
it was computed from (an optimizer step, a direct call of the intervention, a deep copy)."""
from __future__ import annotations

import copy

import torch

from reft_kernels.benchmark.launches import counting
from reft_kernels.hf import ReftConfig, get_reft_model
from reft_kernels.orthogonal import orthonormal_rows

from ._attach_common import randomize_
from ._models import padded_batch, tiny_model

LOREFT = ReftConfig(method="loreft", rank=3, positions="f2+l2", layers="all", share_weights=False)
DIREFT = ReftConfig(method="direft", rank=2, positions="l3", layers=[0, 2])


def _model(configs, dtype=torch.float32):
    model = tiny_model("llama", n_layers=3, dtype=dtype)
    get_reft_model(model, configs, verbose=False)
    randomize_(model.reft_interventions, seed=3)
    return model.train()


def _inputs():
    ids, mask = padded_batch([9, 12], 12, "left", seed=2)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(torch.arange(12) < 8, -100))


def test_one_batched_qr_per_forward():
    model = _model([LOREFT, DIREFT])
    with counting() as c:
        model(**_inputs()).loss.backward()
    # LoReFT: 3 layers x 2 sides of rank 3 (one group), DiReFT: 2 layers of rank 2 (another)
    assert c.by_name["linalg_qr"] == 2, dict(c.by_name)


def test_the_shared_R_never_outlives_its_step():
    """After a step and an optimizer update, each intervention's R is its own rotation's again,
    and a direct call (outside the patched forward) differentiates through its own QR, not
    through the step's freed batched graph. (Gradients equal to the per-layer R's:
    tests/hf/test_attach_reference.py, float64, every method, on two layers.)"""
    model = _model([LOREFT, DIREFT])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**_inputs()).loss.backward()
    iv = model.reft_interventions[0]["layer1_first"]
    before = iv.rotation.grad.clone()
    h = torch.randn(4, 5, 32, dtype=torch.float32)
    iv(h).sum().backward()  # through the step's freed batched graph, this would raise
    assert not torch.equal(iv.rotation.grad, before)
    opt.step()
    assert torch.equal(iv.R, orthonormal_rows(iv.rotation))


def test_deepcopy_after_a_forward():
    """TRL copies the model for its reference; the shares live outside the modules."""
    model = _model([LOREFT])
    inputs = _inputs()
    loss = model(**inputs).loss
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).loss, loss.detach(), rtol=0, atol=0)
