"""The one rule for parameter gradients on the Triton backends: every backward writes fp32
partial sums, one row per program over a fixed range of rows, and one launch of
``_param_finish_kernel`` adds those rows in row order (no atomics, no torch reduction): bitwise
reproducible for a given grid. The low-rank edit (dA, dB, dC, da, dc side by side in one row) and
RED (ds, dt) both finish here; the CUDA extension follows the same rule with its own kernel
(``csrc/partial_sum.cu``), the PyTorch backend with torch's matmuls and sums.
"""
from __future__ import annotations

import torch

from .._device import next_pow2
from .._triton import tl, triton

# 512 columns per program, 4 warps, so each thread moves one 16-byte vector per partial row. At
# the reference shape (LoReFT r = 8, d = 4096: 65,544 columns, P <= 32 rows) that is 129 programs
# and at most 8.4 MB read: a few microseconds (estimated, not measured).
FINISH_BLOCK = 512
FINISH_WARPS = 4


def finish_block(width: int, on_gpu: bool) -> int:
    """Columns per program of the finish: ``FINISH_BLOCK`` on a GPU; through the interpreter one
    program of up to 4096 columns (programs run one by one there)."""
    return FINISH_BLOCK if on_gpu else min(4096, next_pow2(width))


@triton.jit
def _param_finish_kernel(part_ptr, out_ptr, n_parts, width, stride, BLOCK: tl.constexpr):
    """``out[j] = part[0, j] + part[1, j] + ... + part[n_parts-1, j]`` in that order, fp32, rows
    ``stride`` apart; grid (cdiv(width, BLOCK),)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + cols
    for _ in range(0, n_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += stride  # pointer steps: no int32 product of p and the stride
    tl.store(out_ptr + cols, acc, mask=ok)


def finish(part: torch.Tensor, progs: int, width: int) -> torch.Tensor:
    """The (width,) fp32 sum over the first ``progs`` rows of ``part[:, :width]`` (fp32, unit
    column stride), in row order: one launch, or ``part[0, :width]`` itself for one row."""
    if progs == 1 or width == 0:
        return part[0, :width]
    out = torch.empty(width, dtype=torch.float32, device=part.device)
    block = finish_block(width, part.is_cuda)
    _param_finish_kernel[(-(-width // block),)](part, out, progs, width, part.stride(0), BLOCK=block,
                                                num_warps=FINISH_WARPS)
    return out
