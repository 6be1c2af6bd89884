"""Interventions on a quantized base: every linear layer of a tiny LLaMA int8 weight-only
quantized with torchao (``quantize_(model, Int8WeightOnlyConfig())``), RED on the quantized MLP
output projections and LoReFT on the layers, trained together.

Reference: the same model with plain fp32 linear layers holding the dequantized int8 weights,
so the arithmetic is the same up to the quantized matmul's rounding: loss and every intervention
gradient must match it, and differ from the unquantized model's (the quantization is real).
Training lowers the loss, leaves the int8 weights bitwise unchanged and keeps them int8.
"""
from __future__ import annotations

import pytest
import torch

from ..hf._models import tiny_model
from ._common import LOREFT, RED, assert_grads_close, batch, loss_and_grads, patched, trainable

torchao_quant = pytest.importorskip("torchao.quantization", reason="needs torchao (the test extra installs it)")

CONFIGS = [RED, LOREFT]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _quantized_base():
    base = tiny_model("llama", n_layers=2).to("cpu")
    torchao_quant.quantize_(base, torchao_quant.Int8WeightOnlyConfig())
    return base


def test_int8_weight_only_base_trains_and_matches_dequantized():
    qbase = _quantized_base()
    linears = _linears(qbase)
    assert linears and all(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears.values()), \
        "quantize_ left plain weights"
    deq_base = tiny_model("llama", n_layers=2).to("cpu")
    with torch.no_grad():
        for name, m in _linears(deq_base).items():
            m.weight.copy_(linears[name].weight.dequantize())
    quantized = patched(CONFIGS, base=qbase, device="cpu")
    dequantized = patched(CONFIGS, base=deq_base, device="cpu")
    unquantized = patched(CONFIGS, device="cpu")
    inputs = batch(device="cpu")

    loss, grads = loss_and_grads(quantized, inputs)
    want_loss, want = loss_and_grads(dequantized, inputs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, want, rtol=1e-4, atol=1e-6, what="int8 vs dequantized")
    other_loss, _ = loss_and_grads(unquantized, inputs)
    assert not torch.allclose(loss, other_loss, rtol=0, atol=1e-6), "quantization changed nothing"

    frozen = {n: m.weight.dequantize().clone() for n, m in linears.items()}
    opt = torch.optim.AdamW(trainable(quantized).values(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        quantized(**inputs).loss.backward()
        opt.step()
    with torch.no_grad():
        assert quantized(**inputs).loss < loss - 0.05
    for name, m in _linears(quantized).items():
        assert type(m.weight) is type(linears[name].weight)
        assert torch.equal(m.weight.dequantize(), frozen[name]), f"{name}: the int8 weights changed"
