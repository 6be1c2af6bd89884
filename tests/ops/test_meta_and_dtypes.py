"""Meta tensors (shape-only runs) and the module parameter dtypes: the backend errors say what
is wrong, the PyTorch path runs on meta tensors with or without an index, and a float64 module
keeps R in float64 (low-precision modules keep it in float32, as pyreft does)."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import _triton

D, R = 16, 4


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("op", ["red", "lowrank_edit", "lowrank_edit index"])
def test_triton_on_meta_says_meta_not_interpreter(op):
    h = _meta(6, D)
    with pytest.raises(RuntimeError) as info:
        if op == "red":
            rk.red(h, _meta(D), backend="triton")
        else:
            index = torch.tensor([0, 2], device="meta") if op.endswith("index") else None
            rk.lowrank_edit(h, _meta(R, D), index=index, backend="triton")
    msg = str(info.value)
    assert "meta" in msg and "backend='torch'" in msg
    if _triton.INTERPRET:  # the interpreter is on here: telling the user to set it would be wrong
        assert "TRITON_INTERPRET=1" not in msg


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
def test_torch_path_on_meta_with_index(inplace):
    h = _meta(2, 5, D, dtype=torch.bfloat16)
    B, A = _meta(R, D).requires_grad_(), _meta(R, D).requires_grad_()
    index = torch.tensor([0, 7, -1], device="meta")
    fn = rk.lowrank_edit_ if inplace else rk.lowrank_edit
    y = fn(h, B, A, C=B, act="gelu", index=index, backend="torch")
    assert y.shape == h.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y.sum().backward()
    assert B.grad.shape == B.shape and A.grad.shape == A.shape


def test_red_module_on_meta_with_index():
    m = rk.RED(D, device="meta")
    y = m(_meta(3, D), torch.tensor([2, -1], device="meta"))
    assert y.shape == (3, D) and y.device.type == "meta"


@pytest.mark.parametrize("cls", [rk.LoReFT, rk.DiReFT, rk.ConsReFT, rk.LoBiReFT])
@pytest.mark.parametrize("dtype,r_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (None, torch.float32)])
def test_rotation_dtype_follows_module(cls, dtype, r_dtype):
    m = cls(D, R, dtype=dtype)
    assert m.rotation.dtype == r_dtype and m.R.dtype == r_dtype
    eye = torch.eye(R, dtype=r_dtype)
    tol = 1e-12 if r_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(m.R @ m.R.T, eye, rtol=0, atol=tol)
    if dtype == torch.float64:  # a float64 module runs end to end in float64
        h = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
        y = m(h)
        y.sum().backward()
        assert y.dtype == torch.float64 and m.rotation.grad.dtype == torch.float64
