"""Mixed precision: bf16 and fp16 base models carrying fp32 interventions (pyreft keeps R in
fp32), with and without ``torch.autocast``; an fp32 base under autocast; intervention
parameters in the model's low precision beside an fp32 R; fp16 training with a GradScaler.

Reference: the same model in float64 (base weights holding exactly the low-precision model's
values, interventions the same initial values), so the only difference is the low-precision
arithmetic. Each gradient must come back in its parameter's dtype, finite, and within a bound
of the float64 gradient (relative to its largest entry) that fits the base's precision: bf16
keeps 8 mantissa bits (measured here 1.0-1.3% error), fp16 11 (0.13-0.16%).
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig

from ..hf._models import tiny_model
from ._common import DEVICE, batch, patched, trainable

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# relative error bounds against float64, about 3x what was measured (bf16 base 1.3e-2, fp16 base
# 1.4e-3, fp32 base under bf16 / fp16 autocast 1.0e-2 / 1.6e-3)
BOUND = {BF16: 4e-2, FP16: 6e-3}


def configs(param_dtype):
    return [ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2", dtype=param_dtype),
            REDConfig(layers="all", dtype=param_dtype)]


def _model(base_dtype, param_dtype):
    """The tiny LLaMA with its weights rounded to ``base_dtype`` (kept in that dtype), patched."""
    return patched(configs(param_dtype), base=tiny_model("llama", n_layers=2).to(base_dtype))


def _reference_grads(base_dtype, param_dtype):
    """Loss and gradients of the float64 twin: base weights = the low-precision values,
    interventions = the same initial values, every operation in float64."""
    low = _model(base_dtype, param_dtype)
    # the PyTorch path: the only one that takes float64 (the default on a GPU is Triton)
    ref_configs = [dataclasses.replace(c, backend="torch") for c in configs("float64")]
    ref = patched(ref_configs, base=tiny_model("llama", n_layers=2).to(base_dtype).double())
    with torch.no_grad():
        for (n, p), (n2, q) in zip(low.named_parameters(), ref.named_parameters()):
            assert n == n2
            q.copy_(p.double())
    inputs = batch()
    loss = ref(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainable(ref).items()}


def _grads(model, autocast_dtype):
    inputs = batch()
    ctx = torch.autocast(DEVICE.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainable(model).items()}


def _check(grads, ref, params, bound):
    for name, g in grads.items():
        assert g is not None, f"{name} got no gradient"
        assert g.dtype == params[name].dtype, f"{name}: gradient in {g.dtype}, parameter in {params[name].dtype}"
        assert torch.isfinite(g).all(), name
        scale = ref[name].abs().max()
        err = (g.double() - ref[name]).abs().max() / scale
        assert scale > 0 and err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e} against float64"


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("base_dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_low_precision_base_fp32_interventions(base_dtype, autocast):
    model = _model(base_dtype, "float32")
    params = trainable(model)
    assert {p.dtype for p in params.values()} == {FP32}
    loss, grads = _grads(model, base_dtype if autocast else None)
    ref_loss, ref = _reference_grads(base_dtype, "float32")
    _check(grads, ref, params, BOUND[base_dtype])
    assert abs(loss.double() - ref_loss) <= BOUND[base_dtype] * ref_loss


@pytest.mark.parametrize("base_dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_params_in_model_dtype_beside_fp32_rotation(base_dtype):
    """dtype=None: LoReFT's W, b and RED's scale, bias take the model's dtype, R stays fp32; each
    gradient comes back in its own parameter's dtype."""
    model = _model(base_dtype, None)
    params = trainable(model)
    dtypes = {n.rsplit(".", 1)[-1]: p.dtype for n, p in params.items()}
    assert dtypes["rotation"] == FP32 and dtypes["weight"] == base_dtype and dtypes["scale"] == base_dtype
    loss, grads = _grads(model, None)
    ref_loss, ref = _reference_grads(base_dtype, None)
    # gradients rounded to bf16/fp16 add one rounding of their own
    _check(grads, ref, params, 2 * BOUND[base_dtype])


@pytest.mark.parametrize("autocast_dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_fp32_model_under_autocast(autocast_dtype):
    """An fp32 model and fp32 interventions under autocast: the base's matmuls run in low
    precision and hand low-precision activations to the edits, which take them beside fp32
    parameters; compared with the fp32 model's float64 twin."""
    model = _model(FP32, None)
    params = trainable(model)
    loss, grads = _grads(model, autocast_dtype)
    ref_loss, ref = _reference_grads(FP32, None)
    _check(grads, ref, params, BOUND[autocast_dtype])
    # the same model without autocast is much closer: the bound above is not vacuous
    model.zero_grad(set_to_none=True)
    _, plain = _grads(model, None)
    _check(plain, ref, params, 1e-5 if DEVICE.type == "cpu" else 1e-4)


def test_fp16_grad_scaler():
    """fp16 base, fp32 interventions, AdamW with a GradScaler: (1) the unscaled gradients equal
    the float64 twin's within fp16 error; (2) a scale that overflows fp16 makes the step skip
    (parameters bitwise unchanged) and halves the scale; (3) training lowers the loss."""
    model = _model(FP16, "float32")
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10)
    inputs = batch()
    _, ref = _reference_grads(FP16, "float32")

    loss0 = model(**inputs).loss
    scaler.scale(loss0).backward()
    scaler.unscale_(opt)
    _check({n: p.grad for n, p in params.items()}, ref, params, BOUND[FP16])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no overflow at this scale

    overflow = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 40)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.zero_grad(set_to_none=True)
    overflow.scale(model(**inputs).loss).backward()
    overflow.step(opt)
    overflow.update()
    assert overflow.get_scale() == 2.0 ** 39
    assert all(torch.equal(p, before[n]) for n, p in params.items()), "a step with inf gradients was taken"

    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(**inputs).loss).backward()
        scaler.step(opt)
        scaler.update()
    with torch.no_grad():
        assert model(**inputs).loss < loss0.detach() - 0.05
