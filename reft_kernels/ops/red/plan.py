"""What RED runs for one call, as a value: ``plan(n, d, ...)`` returns a frozen, printable ``Plan``
(``ops/plans.py``'s records). Pure: it reads no
tensor, no environment and no GPU; the Triton launchers take their tiles and grids from the same
functions, so ``reft-kernels plan --op red`` prints what runs.

Forward: ``_red_fwd_kernel`` over (row blocks, column blocks). Backward: ``_red_bwd_kernel``
(variant ``rowsum`` or ``tile2d``, ``reft_kernels.kernels(red_bwd=...)``) writing fp32 partial
column sums per program, then ``ops/finish.py``'s fixed-order sum (none for one program row).
"""
from __future__ import annotations

from typing import Optional

from ..._device import SmLimits, cdiv, next_pow2
from .. import variants as V
from ..finish import FINISH_WARPS, finish_block
from ..plans import Launch, Plan, row_split


def fwd_tile(d: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the forward. GPU: 4096-element tiles, at most 512 columns
    wide, so each of 128 threads moves 32 elements (several 16-byte vectors). Interpreter: bigger
    tiles, since every program costs a fixed Python overhead there. Not yet tuned on a GPU."""
    if on_gpu:
        block_d = min(next_pow2(d), 512)
        return max(1, 4096 // block_d), block_d, 4
    block_d = min(next_pow2(d), 256)
    return max(1, 8192 // block_d), block_d, 4


# The backward's accumulation (variant): "rowsum" (the rule) sums each (BLOCK_M, BLOCK_D) tile over
# its rows every step; "tile2d" keeps 2-D fp32 accumulators and reduces once.
# Compiled for sm_80 / sm_90a at d = 4096, HAS_SCALE and every gradient, 4 warps (registers, then
# resident blocks per SM by registers; no spills, 1-4 KiB shared memory), Triton 3.9 | 3.6:
#   rowsum (16, 256):  bf16 117/118 -> 4/4, fp32 124/119 -> 4/4 | bf16  96/111 -> 5/4, fp32  96/96 -> 5/5
#   tile2d (16, 256):  bf16 128/139 -> 4/3, fp32 168/166 -> 3/3 | bf16 136/128 -> 3/4, fp32 168/168 -> 3/3
#   tile2d (8, 256):   bf16  80/84  -> 6/5, fp32  96/96  -> 5/5 | bf16  80/80  -> 6/6, fp32  96/96 -> 5/5
#   tile2d (16, 128):  bf16  80/80  -> 6/6, fp32  96/96  -> 5/5 | bf16  80/84  -> 6/5, fp32  96/98 -> 5/4
# (16, 128) is chosen for both Tritons (the best on 3.9; on 3.6 (8, 256) keeps one block more per
# SM on sm_90, which only a GPU run could show to matter). tile2d stays opt-in until a GPU has
# measured both (fewer bytes per step in flight per block, more blocks; no per-step barrier).
#
# With a column stride other than 1 (a transposed or sliced h or g): every element then needs its
# own 64-bit address, and Triton 3.6 compiled the fp32 rowsum backward at (16, 256) with a 344-byte
# (sm_80) / 760-byte (sm_90) stack (tools/triton_compile_check.py, column strides at 16). At most
# 128 columns it fits both Tritons without a stack; such loads are uncoalesced anyway, so the
# narrower tile costs little beside them.
RED_STRIDED_BLOCK_D = 128


def bwd_tile(d: int, on_gpu: bool, tile2d: bool = False, strided_cols: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the backward: each program loops over its rows in
    BLOCK_M-row steps, keeping two fp32 column accumulators of BLOCK_D (``tile2d``: two (BLOCK_M,
    BLOCK_D) accumulators); ``strided_cols``: some column stride is not 1. Not yet tuned on a GPU."""
    if on_gpu:
        widest = RED_STRIDED_BLOCK_D if tile2d or strided_cols else 256
        return 16, min(next_pow2(d), widest), 4
    return 64, min(next_pow2(d), 128), 4


def bwd_variant(requested: Optional[str]) -> tuple[str, str]:
    """(variant of the backward's accumulation, "requested" or "rule"): the rule is rowsum."""
    if requested is not None:
        V.check("red_bwd", requested)
        return requested, "requested"
    return "rowsum", "rule"


def fwd_launches(n: int, d: int, limits: Optional[SmLimits]) -> tuple:
    if n == 0:
        return ()
    bm, bd, w = fwd_tile(d, limits is not None)
    return (Launch("_red_fwd_kernel", (cdiv(n, bm), cdiv(d, bd)), bm, bd, w),)


def bwd_launches(n: int, d: int, variant: str, limits: Optional[SmLimits], sums: int = 2,
                 strided_cols: bool = False, per_sm: Optional[int] = None) -> tuple:
    """The backward's launches: ``_red_bwd_kernel`` over a (P, column blocks) grid, then the finish
    of the ``sums`` (0-2: ds, dt) partial rows when P > 1. ``per_sm``: the compiled kernel's
    resident blocks per SM (on a GPU; the grid is then one wave)."""
    if n == 0:
        return ()
    gpu = limits is not None
    bm, bd, w = bwd_tile(d, gpu, variant == "tile2d", strided_cols)
    n_db = cdiv(d, bd)
    progs, rows = row_split(n, bm, n_db, limits, per_sm)
    out = [Launch("_red_bwd_kernel", (progs, n_db), bm, bd, w, note=f"{rows} rows per program", rows=rows)]
    if progs > 1 and sums:
        block = finish_block(sums * d, gpu)
        out.append(Launch("_param_finish_kernel", (cdiv(sums * d, block),), None, block, FINISH_WARPS,
                          note=f"{sums * d} fp32 sums over {progs} rows"))
    return tuple(out)


def plan(n: int, d: int, limits: Optional[SmLimits] = None, variants: Optional[V.Variants] = None,
         backend: str = "triton", device: str = "", strided_cols: bool = False) -> Plan:
    """The plan of one RED call over ``n`` rows of width ``d`` (scale and bias both trained) on
    ``backend``. ``limits`` None: the CPU (Triton's interpreter); ``variants`` None: the active ones."""
    variants = variants if variants is not None else V.active()
    device = device or (limits.name if limits is not None else "cpu")
    if backend == "torch":
        return Plan("torch", device, "torch", "torch", finish="torch sums (deterministic per device)")
    if backend == "cuda":
        return Plan("cuda", device, "cuda", "cuda",
                    finish=f"extension partial sums, {variants.choice('cuda_finish')} finish")
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'cuda' or 'torch', got {backend!r}")
    bwd, by = bwd_variant(variants.red_bwd)
    bwd_l = bwd_launches(n, d, bwd, limits, strided_cols=strided_cols)
    finish = ("one fixed-order fp32 sum over the programs' partial rows (ops/finish.py)" if len(bwd_l) > 1
              else "the one program row's partials (no sum)")
    return Plan("triton", device, "rowblock", bwd, fwd_launches(n, d, limits), bwd_l, finish,
                ("red_bwd", bwd) in V.MEASURED, ("rule", by))
