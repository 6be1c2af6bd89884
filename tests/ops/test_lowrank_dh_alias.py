"""The low-rank edit's backward hands on ``dh`` as a tensor of its own, not as a view of a
larger buffer (the Python Functions: ``ops/_autograd.py``; the CPU extension: ``lowrank_rows.cpp``): a view
keeps its base alive, and the autograd engine then cannot add a later gradient into ``dh`` in
place (in a model, the residual stream's sum at the layer below the edit)."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import make_lowrank_params, seeded_index


@pytest.mark.parametrize("ext", [True, False], ids=["cpu_ext", "function"])
@pytest.mark.parametrize("rows", ["listed", "every"])
def test_dh_is_not_a_view(monkeypatch, backend, device, ext, rows):
    if ext and (backend != "torch" or device.type != "cpu" or cpu_ext.lowrank_rows_op() is None):
        pytest.skip("the CPU extension takes the PyTorch backend's calls on a CPU only (and must be built)")
    if not ext:
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    x = torch.randn(2, 6, 16, device=device, requires_grad=True)
    params = make_lowrank_params(16, 3, torch.float32, terms="BAa", tied=True, device=device)
    index = seeded_index(12, 5, 1, n_pad=1).to(device) if rows == "listed" else None
    y = rk.lowrank_edit_(x * 1.0, *(params[k] for k in "BAaCc"), index=index, backend=backend)
    seen = []  # dh as the next node (x * 1.0's) receives it
    y.grad_fn.next_functions[0][0].register_prehook(lambda grad_outputs: seen.append(grad_outputs[0]))
    (y * torch.randn_like(y)).sum().backward()
    assert len(seen) == 1 and seen[0].shape == x.shape and not seen[0]._is_view()
