"""Guarded Triton import and the launch helpers shared by the kernel files.

Triton decides at decoration time (``@triton.jit``) whether a kernel runs compiled for a GPU or
through its CPU interpreter, from the ``TRITON_INTERPRET`` environment variable. ``INTERPRET``
records that choice as it stood when this package was imported; changing the variable later has
no effect on kernels already decorated.

Where Triton cannot be imported (it ships for Linux only), a small stand-in keeps the kernel
definitions importable; the ``triton`` backend then reports itself unavailable.
"""
from __future__ import annotations

import os

import torch

from ._device import _device_index, blocks_per_sm, device_limits

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_VERSION = triton.__version__
    TRITON_IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install raising something else
    HAS_TRITON = False
    TRITON_VERSION = None
    TRITON_IMPORT_ERROR = repr(exc)

    class _Stub:
        """Just enough of ``triton`` / ``triton.language`` to define (never run) kernels."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _spec_key(args) -> tuple:
    """What Triton specialises a launch on, besides constexprs: per tensor its 16-byte alignment
    and dtype, per int whether it is 1, a multiple of 16, or beyond int32."""
    key = []
    for v in args:
        if isinstance(v, torch.Tensor):
            key.append((v.dtype, v.data_ptr() % 16 == 0))
        elif isinstance(v, bool) or not isinstance(v, int):
            key.append(v)
        else:
            key.append((v == 1, v % 16 == 0, v >= 2 ** 31))
    return tuple(key)


_RESIDENT: dict = {}


def compiled_resources(compiled) -> tuple[int, int, int]:
    """(registers per thread, shared memory bytes, warps) of a Triton ``CompiledKernel`` (the
    object ``kernel.warmup(...)`` or a launch returns), loading it on the current GPU."""
    compiled._init_handles()  # fills n_regs (lazily loaded otherwise)
    return int(compiled.n_regs), int(compiled.metadata.shared), int(compiled.metadata.num_warps)


def resident_blocks(kernel, args: tuple, constexprs: dict, num_warps: int, device: torch.device) -> int | None:
    """Resident blocks per SM of ``kernel`` compiled for these arguments, from the registers and
    shared memory of the compiled code (``blocks_per_sm`` with the device's limits).

    ``args``: the runtime arguments in order; ``constexprs``: the keyword constexprs. Compiles
    (``warmup``, no launch) on the first call and caches per (kernel, constexprs, warps, device,
    specialisation of the runtime arguments), so the answer, and the grid planned from it, is the
    same for every call with the same arguments. None off a GPU, under the interpreter, or where
    this Triton does not expose the compiled kernel (callers then keep ``PROGRAMS_PER_SM``).
    """
    if device.type != "cuda" or INTERPRET or not HAS_TRITON:
        return None
    if torch.compiler.is_compiling():
        # Dynamo traces the launchers: it cannot trace warmup() or data_ptr() of fake tensors,
        # so a compiled graph plans with the fixed PROGRAMS_PER_SM (same results to rounding;
        # bitwise determinism holds per path)
        return None
    key = (kernel, tuple(sorted(constexprs.items())), num_warps, _device_index(device), _spec_key(args))
    if key not in _RESIDENT:
        try:
            compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **constexprs)
            regs, smem, warps = compiled_resources(compiled)
            _RESIDENT[key] = max(1, blocks_per_sm(regs, smem, warps, device_limits(device)))
        except Exception:  # noqa: BLE001 - a Triton whose compiled-kernel API differs: plan without it
            _RESIDENT[key] = None
    return _RESIDENT[key]


def dot_precision(h_dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for activations of ``h_dtype``.

    Every dot runs on fp32 operands with fp32 accumulation, on tensor cores:
    - fp16/bf16 activations: TF32 products (10-bit mantissa), already more precise than the
      activations themselves (7 or 10 bits), so they cost no accuracy against eager math.
    - fp32 activations: "tf32x3", three TF32 products per multiply (hi*hi + hi*lo + lo*hi), about
      fp32 accuracy (~1e-6 relative against float64). Exact "ieee" products would run on the FMA
      units and keep the dot operands in registers: compiled for sm_80/sm_90 with this project's
      tiles they used all 255 registers and spilled (tools/triton_compile_check.py).
    The CPU interpreter ignores the setting and multiplies in fp32; the kernels call ``gpu_dot``,
    which makes the interpreter's products the GPU's.
    """
    return "tf32x3" if h_dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- dot operands
#
# What the compiled tl.dot does with fp32 operands on NVIDIA tensor cores (sm_80 mma.sync and
# sm_90a wgmma, read from the PTX and TTGIR that Triton 3.6 and 3.9 emit):
# - input_precision="tf32": no conversion instruction; the fp32 bits go to the tensor core as
#   they are and it reads only the top 19 (sign, exponent, 10 mantissa bits): the operand is
#   truncated toward zero ("tf32_rz" below), not rounded to nearest as cuBLAS's conversion does.
#   tests/ops/test_gpu_dot.py checks this against the GPU's products when it runs on one.
# - input_precision="tf32x3": Triton's F32DotTC pass splits each operand into big =
#   cvt.rna.tf32.f32(x) (round to nearest, ties away from zero: add 0x1000 to the bits, clear
#   the low 13) and small = x - big (exact in fp32, then truncated by the tensor core), and sums
#   small_a big_b + big_a small_b (NaN replaced by 0), then big_a big_b on top, then adds the
#   accumulator in a separate fp32 add.
# - input_precision="ieee": exact fp32 products (FMA units).
# The CPU interpreter multiplies every dot in full fp32, so under it ``gpu_dot`` first rounds the
# operands as above. bf16/fp16 operands (and fp32 values that came from them: 7 or 10 mantissa
# bits) pass through unchanged. What cannot be reproduced: the order in which the tensor core
# adds the products within a dot (the interpreter's BLAS sums in its own order).
_EMULATE_TC = tl.constexpr(INTERPRET)


@triton.jit
def tf32_rz(x):
    """fp32 ``x`` with its 13 low mantissa bits cleared: what a TF32 tensor core reads of an fp32
    operand (round toward zero; NaN payloads held only in those bits become infinities)."""
    bits = x.to(tl.uint32, bitcast=True)
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def tf32_rna(x):
    """``cvt.rna.tf32.f32``: fp32 ``x`` rounded to TF32's 10 mantissa bits, to nearest with ties
    away from zero (adding half a TF32 ulp to the magnitude bits carries into the exponent where
    it must; finite values beyond TF32's largest round to infinity), as an fp32 value."""
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True), x)


@triton.jit
def _interpreted_dot(a, b, acc, DOT_PREC: tl.constexpr):
    """``gpu_dot`` under the interpreter: the operands rounded as the tensor cores take them."""
    if DOT_PREC == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif a.dtype != tl.float32:  # bf16/fp16 operands: exact in TF32
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_PREC == "tf32x3":
        a_big = tf32_rna(a)
        b_big = tf32_rna(b)
        small = tl.dot(tf32_rz(a - a_big), b_big, input_precision="ieee")
        small = tl.dot(a_big, tf32_rz(b - b_big), small, input_precision="ieee")
        small = tl.where(small != small, 0.0, small)
        out = tl.dot(a_big, b_big, small, input_precision="ieee")
        if acc is not None:
            out = out + acc
    else:
        out = tl.dot(tf32_rz(a), tf32_rz(b), acc, input_precision="ieee")
    return out


@triton.jit
def gpu_dot(a, b, acc, DOT_PREC: tl.constexpr):
    """``tl.dot(a, b, acc, input_precision=DOT_PREC)`` (``acc`` may be None), whose products
    under the CPU interpreter are those of the compiled kernel on an NVIDIA GPU (see above);
    compiled, exactly ``tl.dot``. Every dot of the package's kernels goes through here."""
    if _EMULATE_TC:
        out = _interpreted_dot(a, b, acc, DOT_PREC)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out
