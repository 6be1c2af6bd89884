"""The split-d forward (and backward latent) for few rows (``ops/lowrank_edit/triton_small_n.py``), forced with
``REFT_KERNELS_SMALL_N=split``: forward and every gradient (its saved latents feed the backward)
against the float64 reference, over the layouts, index modes, terms, activations and dtypes it
must handle, with several column ranges (S > 1) and ragged edges; and the mode switch itself."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import lowrank_edit, lowrank_edit_
from reft_kernels._backend import available_backends
from reft_kernels.ops.lowrank_edit import triton_small_n

from .._helpers import check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, padded_index


@pytest.fixture
def split(monkeypatch, device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")
    monkeypatch.setenv(triton_small_n.ENV_VAR, "split")


def _check(base, view, params, *, inplace=False, act=None, index=None):
    fn = lowrank_edit_ if inplace else lowrank_edit
    return check_against_reference(fn, lowrank_ref_fn, base, view, params, inplace=inplace,
                                   kernel_kwargs=dict(act=act, index=index, backend="triton"),
                                   ref_kwargs=dict(act=act, index=index))


def test_split_path_runs_with_several_column_ranges(split, device, monkeypatch):
    """The cases below really take the split path with S > 1 (not the one-pass kernel)."""
    calls, bwd_calls = [], []
    real, real_bwd = triton_small_n.fwd_split, triton_small_n.bwd_latent_split
    monkeypatch.setattr(triton_small_n, "fwd_split", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    monkeypatch.setattr(triton_small_n, "bwd_latent_split",
                        lambda *a, **k: bwd_calls.append(a[6]) or real_bwd(*a, **k))
    base, view = make_base("contiguous", (9,), 300, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(300, 5, device=device))
    assert calls == [9] and bwd_calls == [9]
    block_d = triton_small_n.tiles(9, 300, 16, torch.float32, device.type == "cuda")[1]
    n_rb, n_cb = 1, -(-300 // block_d)
    assert n_cb > 1 and triton_small_n.splits(n_rb, n_cb, device) > 1


@pytest.mark.parametrize("d,r", [(1, 1), (100, 3), (257, 16), (300, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("terms,tied,act", [("BAaCc", False, None), ("BAa", True, "gelu"), ("Ba", False, None),
                                            ("BAaC", False, "tanh")], ids=["noreft", "loreft-gelu", "lobireft", "C-tanh"])
def test_split_forward_and_grads(split, device, d, r, terms, tied, act):
    base, view = make_base("contiguous", (23,), d, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, r, device=device, terms=terms, tied=tied), act=act)


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("mode", ["out_index", "inplace", "inplace_index"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (5, 7)), ("transposed", (3, 7)), ("strided_cols", (4, 5))])
def test_split_layouts_and_index(split, device, mode, layout, lead, act):
    """Padding (-1) entries included: their latent is masked in the forward and the backward."""
    d, r = 140, 4
    base, view = make_base(layout, lead, d, device=device)
    base.requires_grad_()
    n = lead[0] * lead[1]
    index = padded_index(n, n // 2, 2, device=device) if mode.endswith("index") else None
    _check(base, view, make_lowrank_params(d, r, device=device, tied=True, terms="BAa"),
           inplace=mode.startswith("inplace"), index=index, act=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_low_precision(split, device, dtype):
    base, view = make_base("contiguous", (11,), 200, dtype=dtype, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(200, 8, device=device, tied=True, terms="BAa"))


def test_split_is_deterministic(split, device):
    h = torch.randn(17, 333, device=device)
    p = make_lowrank_params(333, 6, device=device, requires_grad=False)
    a = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    b = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    assert torch.equal(a, b)


def test_mode_switch(monkeypatch):
    monkeypatch.setenv(triton_small_n.ENV_VAR, "one-pass")
    assert not triton_small_n.use_split(10, 64, torch.device("cpu"))
    monkeypatch.setenv(triton_small_n.ENV_VAR, "split")
    assert triton_small_n.use_split(10 ** 6, 64, torch.device("cpu"))
    monkeypatch.delenv(triton_small_n.ENV_VAR)
    assert not triton_small_n.use_split(10, 64, torch.device("cpu"))  # auto: GPU only
    monkeypatch.setenv(triton_small_n.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="REFT_KERNELS_SMALL_N must be one of"):
        triton_small_n.use_split(10, 64, torch.device("cpu"))
