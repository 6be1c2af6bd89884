"""``reft_kernels._triton.gpu_dot`` and its operand rounding (``tf32_rz``, ``tf32_rna``): the dot every
kernel calls, whose products under the CPU interpreter are the compiled kernel's on an NVIDIA GPU.

The references here are written independently of the helpers: TF32 rounding from the sign,
exponent and mantissa fields of each fp32 value (integer numpy), and the dots from those rounded
operands in float64. On a GPU the same tests compare the hardware's products with the references,
which is the check that the emulation models the tensor cores (truncated ``tf32`` operands, the
``tf32x3`` split)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reft_kernels import _triton
from reft_kernels._backend import available_backends
from reft_kernels._triton import gpu_dot, tf32_rna, tf32_rz, tl, triton

pytestmark = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def triton_device(device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")
    return device


# ----------------------------------------------------------------------------- references

def _fields(x: np.ndarray):
    bits = x.astype(np.float32).view(np.uint32).astype(np.int64)
    return bits >> 31, (bits >> 23) & 0xFF, bits & 0x7FFFFF


def _assemble(sign, exp, mant) -> np.ndarray:
    return ((sign << 31) | (exp << 23) | mant).astype(np.uint32).view(np.float32)


def ref_tf32_rz(x: np.ndarray) -> np.ndarray:
    """Keep the top 10 of the 23 mantissa bits (toward zero); sign and exponent unchanged."""
    sign, exp, mant = _fields(x)
    return _assemble(sign, exp, (mant >> 13) << 13)


def ref_tf32_rna(x: np.ndarray) -> np.ndarray:
    """Round the 23-bit mantissa to 10 bits, to nearest with ties away from zero (magnitude up
    when the dropped 13 bits are >= half); a mantissa that overflows moves to the next binade
    (the largest binade to infinity); infinities and NaNs unchanged."""
    sign, exp, mant = _fields(x)
    kept, dropped = mant >> 13, mant & 0x1FFF
    kept = kept + (dropped >= 0x1000)
    carry = kept >> 10
    exp2 = exp + carry
    mant2 = np.where(carry == 1, 0, kept << 13)
    mant2 = np.where(exp2 == 0xFF, 0, mant2)  # rounded past the largest finite value: infinity
    out = _assemble(sign, exp2, mant2)
    return np.where(exp == 0xFF, x.astype(np.float32), out)


def _special_values() -> np.ndarray:
    tie = np.array([0x3F801000, 0x3F803000, 0xBF801000, 0x00001000, 0x00003000], dtype=np.uint32)  # exact ties
    near = np.array([0x3F800FFF, 0x3F801001, 0x3FFFF000, 0x3FFFFFFF,   # around half, carry into the exponent
                     0x7F7FF000, 0x7F7FFFFF, 0xFF7FF000,                # largest binade: to infinity
                     0x00000001, 0x007FFFFF, 0x00800000, 0x80001FFF,    # subnormals, smallest normal
                     0x7F800000, 0xFF800000, 0x00000000, 0x80000000],   # infinities, signed zeros
                    dtype=np.uint32)
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2 ** 32, size=4096 - tie.size - near.size, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([tie, near, rand])
    bits = bits[((bits >> 23) & 0xFF) != 0xFF]  # no NaN (random payloads): checked separately for infinities
    bits = np.concatenate([bits, np.array([0x7F800000, 0xFF800000], dtype=np.uint32)])
    return bits.view(np.float32)


# ----------------------------------------------------------------------------- rounding helpers

@triton.jit
def _round_kernel(x_ptr, rz_ptr, rna_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(rz_ptr + offs, tf32_rz(x), mask=ok)
    tl.store(rna_ptr + offs, tf32_rna(x), mask=ok)


def test_tf32_rounding_matches_the_bit_level_reference(triton_device):
    x = _special_values()
    xt = torch.from_numpy(x.copy()).to(triton_device)
    rz, rna = torch.empty_like(xt), torch.empty_like(xt)
    _round_kernel[(triton.cdiv(x.size, 1024),)](xt, rz, rna, x.size, BLOCK=1024)
    got_rz, got_rna = rz.cpu().numpy(), rna.cpu().numpy()
    np.testing.assert_array_equal(got_rz.view(np.uint32), ref_tf32_rz(x).view(np.uint32))
    np.testing.assert_array_equal(got_rna.view(np.uint32), ref_tf32_rna(x).view(np.uint32))
    # ties go away from zero (round to nearest even would keep 0x3F800000 here)
    assert got_rna[0].view(np.uint32) == 0x3F802000 and got_rna[2].view(np.uint32) == 0xBF802000
    # both keep 10 mantissa bits, and round to nearest is never further than truncation
    assert not (got_rz.view(np.uint32) & 0x1FFF).any() and not (got_rna.view(np.uint32) & 0x1FFF).any()
    finite = np.isfinite(got_rna)
    assert (np.abs(got_rna[finite].astype(np.float64) - x[finite])
            <= np.abs(got_rz[finite].astype(np.float64) - x[finite])).all()


# ----------------------------------------------------------------------------- the dot

@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                HAS_ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    if HAS_ACC:
        out = gpu_dot(a, b, tl.load(c_ptr + m[:, None] * N + n[None, :]), DOT_PREC)
    else:
        out = gpu_dot(a, b, None, DOT_PREC)
    tl.store(out_ptr + m[:, None] * N + n[None, :], out)


def _run_dot(a, b, c, prec, device):
    M, K = a.shape
    N = b.shape[1]
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    out = torch.empty((M, N), dtype=torch.float32, device=device)
    _dot_kernel[(1,)](t(a), t(b), t(c if c is not None else a), out, M=M, N=N, K=K, HAS_ACC=c is not None,
                      DOT_PREC=prec)
    return out.cpu().numpy().astype(np.float64)


def _ref_dot(a, b, c, prec):
    """float64 products of the operands as the tensor cores take them."""
    if prec == "tf32":
        out = ref_tf32_rz(a).astype(np.float64) @ ref_tf32_rz(b).astype(np.float64)
    elif prec == "tf32x3":
        a_big, b_big = ref_tf32_rna(a), ref_tf32_rna(b)
        a_small, b_small = ref_tf32_rz(a - a_big), ref_tf32_rz(b - b_big)
        f = lambda x: x.astype(np.float64)  # noqa: E731
        out = f(a_small) @ f(b_big) + f(a_big) @ f(b_small) + f(a_big) @ f(b_big)
    else:
        out = a.astype(np.float64) @ b.astype(np.float64)
    return out + (c.astype(np.float64) if c is not None else 0.0)


@pytest.mark.parametrize("has_acc", [False, True], ids=["no_acc", "acc"])
@pytest.mark.parametrize("prec", ["tf32", "tf32x3", "ieee"])
def test_gpu_dot_products_are_the_tensor_cores(triton_device, prec, has_acc):
    rng = np.random.default_rng(1)
    M = N = K = 32
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32) if has_acc else None
    got = _run_dot(a, b, c, prec, triton_device)
    want = _ref_dot(a, b, c, prec)
    exact = a.astype(np.float64) @ b.astype(np.float64) + (c if c is not None else 0.0)
    # fp32 accumulation in some order (the tensor core's or the interpreter's BLAS): within K fp32
    # ulps of the sum of |terms|
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + (np.abs(c) if c is not None else 0.0)
    tol = K * np.finfo(np.float32).eps * scale
    assert (np.abs(got - want) <= tol).all(), np.abs(got - want).max()
    if prec == "tf32":
        # truncated operands: about 2^-11 relative per product, far beyond fp32 rounding, so the
        # check above tells the truncation apart from fp32 products (and from rounded operands)
        assert (np.abs(got - exact) > tol).mean() > 0.5
    else:
        assert (np.abs(got - exact) <= tol).all()


def test_bf16_valued_operands_are_not_rounded(triton_device):
    """fp32 operands holding bf16 values (the kernels' activations, loaded and widened) are exact
    in TF32: their dot is the fp32 product sum."""
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32)).to(torch.bfloat16).float().numpy()
    b = torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32)).to(torch.bfloat16).float().numpy()
    got = _run_dot(a, b, None, "tf32", triton_device)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(got - exact).max() <= 8 * 16 * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(b)).max()
