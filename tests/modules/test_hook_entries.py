"""The entry a model's ReFT hooks call (``modules._LowRankEdit._edit_fresh_rows_``): the module
forward's values and gradients, exactly; module hooks (the module's own, FSDP2 registers some,
and global ones) still run; bad parameters get the ops' errors."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.modules import LoReFT
from reft_kernels.ops.lowrank_edit import torch_listed
from reft_kernels import cpu_ext
from tests._helpers import count_calls, ops_called


@pytest.fixture
def spy(monkeypatch):
    return count_calls(monkeypatch, torch_listed, "bwd")


def _index(n_rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_rows, generator=gen)[:n]


@pytest.mark.parametrize("ext", ["on", "off"])
def test_fresh_rows_entry_matches_module_forward(spy, ext, monkeypatch):
    """The hooks' entry gives the module forward's values and gradients: through the CPU
    extension by default, through the PyTorch path's flat backward with the extension off."""
    if ext == "off":
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    elif not cpu_ext.enabled():
        pytest.skip(f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")
    torch.manual_seed(6)
    m = LoReFT(16, 3, dtype=torch.float64)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    index = _index(14, 6, 5)
    g = torch.randn(2, 7, 16, dtype=torch.float64)
    outs = []
    with ops_called() as names:
        for call in ("forward", "fresh"):
            h = x * 1.0  # a fresh non-leaf, as a layer's output
            y = m(h, index, inplace=True) if call == "forward" else m._edit_fresh_rows_(h, index)
            assert y is h
            grads = torch.autograd.grad(y, [x, m.rotation, m.weight, m.bias], g)
            outs.append((y.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert spy == {"bwd": 2 if ext == "off" else 0}
    assert names == ([] if ext == "off" else ["lowrank_rows_fwd", "lowrank_rows_bwd"] * 2)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "global_forward"])
def test_entries_run_module_hooks(kind):
    seen = []
    handles = []
    for m in (LoReFT(8, 2), LoReFT(8, 1, act="gelu")):
        if kind == "forward":
            handles.append(m.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__)))
        elif kind == "forward_pre":
            handles.append(m.register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__name__)))
        else:
            handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda mod, args, out: seen.append(type(mod).__name__)))
        try:
            m._edit_fresh_rows_(torch.randn(1, 4, 8) * 1.0, torch.tensor([0, 3]))
        finally:
            handles.pop().remove()
    assert seen == ["LoReFT", "LoReFT"]


def test_fresh_rows_entry_checks_the_index_against_h():
    """An index built for another shape (more rows than this h has) gets check_index's error."""
    m = LoReFT(8, 2)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 4\)"):
        m._edit_fresh_rows_(torch.randn(1, 4, 8) * 1.0, torch.tensor([0, 6]))
