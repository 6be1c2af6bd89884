"""Guarded Triton import and the launch helpers shared by the kernel files.

Triton decides at decoration time (``@triton.jit``) whether a kernel runs compiled for a GPU or
through its CPU interpreter, from the ``TRITON_INTERPRET`` environment variable. ``INTERPRET``
records that choice as it stood when this package was imported; changing the variable later has
no effect on kernels already decorated.

Where Triton cannot be imported (it ships for Linux only), a small stand-in keeps the kernel
definitions importable; the ``triton`` backend then reports itself unavailable.
"""
from __future__ import annotations

import functools
import os

import torch

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


def next_pow2(x: int) -> int:
    """Smallest power of two >= max(x, 1)."""
    return 1 << max(int(x) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should aim for on ``device``.

    Four per SM on a GPU keeps every SM busy while the fp32 partial buffers of the row-split
    reductions stay small; the CPU interpreter runs programs one after another, so there a couple
    of programs (enough to exercise the second reduction stage) is cheapest.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def row_split(n_rows: int, block_m: int, n_col_blocks: int, device: torch.device) -> tuple[int, int]:
    """Split ``n_rows`` (> 0) among the programs of a (P, n_col_blocks) grid that reduces over rows.

    Returns (P, rows_per_program), ``rows_per_program`` a multiple of ``block_m``, P close to
    ``target_programs(device) / n_col_blocks``. Each program writes one fp32 partial row, so the
    partial buffers hold P x (width) values and the final sum over P is fixed-order.
    """
    n_row_blocks = cdiv(n_rows, block_m)
    progs = max(1, min(n_row_blocks, cdiv(target_programs(device), n_col_blocks)))
    rows_per_prog = cdiv(n_row_blocks, progs) * block_m
    return cdiv(n_rows, rows_per_prog), rows_per_prog


def dot_precision(h_dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for activations of ``h_dtype``.

    Every dot runs on fp32 operands with fp32 accumulation, on tensor cores:
    - fp16/bf16 activations: TF32 products (10-bit mantissa), already more precise than the
      activations themselves (7 or 10 bits), so they cost no accuracy against eager math.
    - fp32 activations: "tf32x3", three TF32 products per multiply (hi*hi + hi*lo + lo*hi), about
      fp32 accuracy (~1e-6 relative against float64). Exact "ieee" products would run on the FMA
      units and keep the dot operands in registers: compiled for sm_80/sm_90 with this project's
      tiles they used all 255 registers and spilled (tools/triton_compile_check.py).
    The CPU interpreter ignores the setting and multiplies in fp32.
    """
    return "tf32x3" if h_dtype == torch.float32 else "tf32"
