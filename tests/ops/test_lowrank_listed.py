"""The flat per-layer backward of the PyTorch backend (``ops/lowrank_edit/torch_listed.py``):
the in-place edit of listed rows (padding entries included), float32/float64 CPU rows. Checked
against the float64 reference, output and every gradient, for every term pattern and activation
it takes, with each subset of inputs requiring grad; a spy confirms the path ran (or, for the
calls it must leave to the general path, that it did not). The hooks' entry that leads here is tested in
``tests/modules/test_hook_entries.py``."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from reft_kernels.ops.lowrank_edit import torch_listed
from tests._helpers import count_calls, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params
from tests._helpers import one_gradient_inputs, seeded_index

# (terms, tied): LoReFT/NoReFT (tied, W and b), DiReFT/NodiReFT (no C), ConsReFT (tied, b
# only), the general pattern with every term, and C without A
PATTERNS = [("BAa", True), ("BAa", False), ("Ba", True), ("BAaCc", False), ("BCc", False), ("BA", True)]


@pytest.fixture
def spy(monkeypatch):
    # the CPU extension takes these calls by default (tests/ops/test_cpu_ext.py): off here, so
    # that the PyTorch path's flat backward is what runs
    monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    return count_calls(monkeypatch, torch_listed, "bwd")


@pytest.mark.parametrize("terms,tied", PATTERNS)
@pytest.mark.parametrize("act", [None, "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_pad", [0, 3])
def test_listed_against_reference(spy, terms, tied, act, dtype, n_pad):
    torch.manual_seed(hash((terms, tied, act, str(dtype), n_pad)) % 2**31)
    base, view = make_base("contiguous", (3, 9), 20, dtype)
    base.requires_grad_(True)
    params = make_lowrank_params(20, 4, dtype, terms=terms, tied=tied)
    index = seeded_index(27, 11, 1, n_pad)
    check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                            kernel_kwargs={"act": act, "index": index, "backend": "torch"},
                            ref_kwargs={"act": act, "index": index})
    assert spy == {"bwd": 1}


@pytest.mark.parametrize("grad_of", ["h", "B", "A", "a", "C", "c", "params"])
def test_listed_each_gradient_alone(spy, grad_of):
    """Each input alone requiring grad (and every parameter but not h): the backward computes
    only what is asked, every answer against the reference."""
    base, view, params, index = one_gradient_inputs(grad_of)
    check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                            kernel_kwargs={"index": index, "backend": "torch", "act": "tanh"},
                            ref_kwargs={"index": index, "act": "tanh"})
    assert spy == {"bwd": 1}


def test_listed_noncontiguous_gradient(spy):
    """An upstream gradient that is an expanded view (``sum().backward()`` gives one) is read
    through a copy, and ``dh`` comes back right."""
    torch.manual_seed(4)
    h0 = torch.randn(2, 6, 10, dtype=torch.float64, requires_grad=True)
    params = make_lowrank_params(10, 2, torch.float64, terms="BAa", tied=True)
    index = seeded_index(12, 5, 3)
    h = h0.clone()
    rk.lowrank_edit_(h, params["B"], params["A"], params["a"], params["C"], index=index, backend="torch").sum().backward()
    h1 = h0.detach().requires_grad_(True)
    p1 = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    p1["C"] = p1["B"]
    lowrank_ref_fn(h1, **p1, index=index).sum().backward()
    torch.testing.assert_close(h0.grad, h1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params["B"].grad, p1["B"].grad, rtol=1e-12, atol=1e-12)
    assert spy == {"bwd": 1}


@pytest.mark.parametrize("case", ["all_padding", "bf16", "out_of_place_rows", "transposed", "constant_latent"])
def test_general_path_keeps_other_calls(spy, case):
    """Which path the calls around the flat path's case take (low precision, rows that do not
    merge and a latent without A or C go to the general one), each still right."""
    torch.manual_seed(5)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    layout = "transposed" if case == "transposed" else "contiguous"
    base, view = make_base(layout, (3, 5), 16, dtype)
    base.requires_grad_(True)
    terms, tied = ("Ba", False) if case == "constant_latent" else ("BAa", True)
    params = make_lowrank_params(16, 2, dtype, terms=terms, tied=tied)
    index = torch.full((4,), -1) if case == "all_padding" else seeded_index(15, 6, 4, n_pad=1)
    fn = rk.lowrank_edit if case == "out_of_place_rows" else rk.lowrank_edit_
    check_against_reference(fn, lowrank_ref_fn, base, view, params, inplace=fn is rk.lowrank_edit_,
                            kernel_kwargs={"index": index, "backend": "torch"}, ref_kwargs={"index": index})
    if case in ("out_of_place_rows", "all_padding"):  # (the edit of a contiguous copy; an index
        assert spy == {"bwd": 1}              # that edits nothing, all gradients zero)
    elif case == "transposed":  # the backward's g arrives as a fresh (N, d) tensor: flat
        assert spy == {"bwd": 1}
    else:
        assert spy == {"bwd": 0}
