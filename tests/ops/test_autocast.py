"""One autocast policy for every backend: the ops run outside autocast. Inside
``torch.autocast`` they compute exactly what they compute outside it (inputs in their own
dtypes, output in ``h``'s dtype), forward and backward. (Before: under CPU autocast the PyTorch
path returned bf16 for fp32 ``h`` and its backward crashed; Triton ignored autocast.) Runs on
the test device: CPU here, CUDA where a GPU is present."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk

from .._helpers import bits

D, R = 24, 4
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _run(make, h0, backend, autocast_dtype):
    torch.manual_seed(3)
    module = make().to(h0.device)
    module.backend = backend
    h = h0.clone().requires_grad_()
    ctx = torch.autocast(h0.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
        h0.device.type, enabled=False)
    with ctx:
        y = module(h)
        loss = (y.float() * torch.linspace(-1, 1, D, device=h0.device)).sum()
    loss.backward()
    grads = [h.grad] + [p.grad for p in module.parameters()]
    return y, grads


MODULES = {
    "LoReFT": lambda: rk.LoReFT(D, R),
    "NoReFT": lambda: rk.NoReFT(D, R, act="gelu"),
    "DiReFT": lambda: rk.DiReFT(D, R),
    "RED": lambda: rk.RED(D),
}


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16], ids=["h_fp32", "h_bf16"])
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_under_autocast_compute_as_without(backend, device, name, h_dtype, autocast_dtype):
    h0 = torch.randn(3, 5, D, device=device).to(h_dtype)
    y_ref, g_ref = _run(MODULES[name], h0, backend, None)
    y, g = _run(MODULES[name], h0, backend, autocast_dtype)
    assert y.dtype == h_dtype, f"output {y.dtype} for h in {h_dtype}"
    assert torch.equal(bits(y), bits(y_ref)), "autocast changed the forward"
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), "autocast changed a gradient"


@pytest.mark.parametrize("with_index", [False, True], ids=["all_rows", "index"])
def test_functional_ops_under_autocast(backend, device, with_index):
    h0 = torch.randn(6, D, device=device)
    B = torch.randn(R, D, device=device) / D ** 0.5
    s = torch.randn(D, device=device)
    index = torch.tensor([0, 5, -1], device=device) if with_index else None

    def f(h):
        y = rk.red(h, s, s, backend=backend)
        return rk.lowrank_edit(y, B, B, None, B, act="silu", index=index, backend=backend)

    ref = f(h0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = f(h0)
    assert y.dtype == torch.float32 and torch.equal(bits(y), bits(ref))
