"""The low-rank forward in one HBM pass: row blocks small enough that every resident program's
rows stay in L2 between the latent and the write of ``y``, on a persistent grid, with both loops'
loads pipelined.

Why: ``triton_impl._lowrank_edit_fwd_kernel`` reads each program's rows twice (the latent
``z = act(h A^T + a) - h C^T - c``, then ``y = h + z B``). At the reference shape (bf16,
N = 16384, d = 4096) it holds 64 rows x 8 KB = 512 KB per program between the passes, and its
~264 resident programs (2 per SM on an H100) push ~135 MB through a 50 MB L2, so the second pass
goes back to HBM: about 6 bytes moved per element against the minimal 4 (tools/design_table.py,
estimated). Here:

- ``plan`` picks the row block BLOCK_M and the number of programs G so that the rows held by all
  programs at once, G x BLOCK_M x d x element size, stay within ``L2_BUDGET_FRACTION`` of the L2
  (the rest for ``y``'s write-back, the weights and the other partition of a split L2). The grid
  is persistent: program p handles row blocks p, p + G, p + 2G, ..., so G, not the hardware's
  occupancy, bounds the footprint. At the reference shape: BLOCK_M = 16, G = 132 (one per SM),
  132 x 16 x 8 KB = 17 MB, a third of the L2; the second pass then hits L2 and HBM sees 4 bytes
  per element (estimated, not measured).
- Both loops over ``d`` use ``tl.range(..., num_stages=NUM_STAGES)``, which software-pipelines
  every load of the loop (the launch's ``num_stages`` only pipelines the loads feeding a
  ``tl.dot``, so the previous kernel's second pass, whose ``h`` tile feeds an add, waited on
  each load). The stages hold the ``h`` tile and the weight tiles in shared memory.

The cost of small row blocks: every row block reads the weight tiles (``A``, ``C`` or ``B`` in
pass 1, ``B`` in pass 2) from L2 again, about 3 x r x d x 4 bytes per block for LoReFT; at
BLOCK_M = 16 and r = 8 that is 1.5 bytes of L2 traffic per byte of ``h``, on top of the two L2
reads of ``h``. On an H100 the L2 serves roughly twice HBM's bandwidth, so this may cap the
kernel below its HBM roofline; a GPU run decides (``REFT_KERNELS_LOWRANK_FWD``).

Same contract and numerics as the previous kernel (``contract.py``; fp32 latent, TF32 / 3xTF32
dots, ``y`` rounded once) and the same summation order over ``d`` within a row, so ``z`` and
``y`` are the same up to the dot's internal order.

Selection (``use_resident``): ``REFT_KERNELS_LOWRANK_FWD=resident`` takes this kernel,
``=rowblock`` (and ``auto``, for now) the previous one; ``auto`` stays on the previous kernel
until a GPU run has measured both.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ... import _triton
from ..._triton import SmLimits, cdiv, next_pow2, tl, triton
from .triton_common import (
    STRIDED_TILE, apply_step, bias_vec, latent_finish, latent_step, padded_rank, row_source, strided,
)

ENV_VAR = "REFT_KERNELS_LOWRANK_FWD"
MODES = ("auto", "rowblock", "resident")

# Share of the L2 the rows held between the two passes may fill (see the module docstring).
L2_BUDGET_FRACTION = 0.5
ROW_BLOCKS = (64, 32, 16)  # BLOCK_M candidates, tallest first (tl.dot needs >= 16)


@triton.jit
def _lowrank_edit_fwd_resident_kernel(
    h_ptr, y_ptr, hsave_ptr, idx_ptr,
    A_ptr, a_ptr, B_ptr, C_ptr, c_ptr,
    z_ptr, u_ptr,
    n_rows, d, r, n_progs,
    stride_h_row, stride_h_col, stride_y_row, stride_y_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_a: tl.constexpr, HAS_C: tl.constexpr,
    TIED: tl.constexpr, HAS_c: tl.constexpr, ACT: tl.constexpr,
    SAVE_H: tl.constexpr, SAVE_U: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Persistent forward; grid (n_progs,). Program p handles row blocks p, p + n_progs, ...;
    for each, pass 1 builds the fp32 latent ``z`` (BLOCK_M, R_PAD) in registers and pass 2
    writes ``y = h + z B`` while the block's rows are still in L2. Row, index, aliasing and
    padding conventions as ``triton_impl._lowrank_edit_fwd_kernel`` (``y`` may alias ``h`` with
    HAS_INDEX: each element is read by its own program before that program writes it)."""
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    a_vec = bias_vec(a_ptr, k, k_ok) if HAS_a else None  # once per program: every row block adds them
    c_vec = bias_vec(c_ptr, k, k_ok) if HAS_c else None
    for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), n_progs):
        m = (tl.zeros((BLOCK_M,), dtype=tl.int64) + rb) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 rows
        src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
        h_row = src * stride_h_row
        y_row = src * stride_y_row
        u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if HAS_A or HAS_C or TIED:
            for d0 in tl.range(0, d, BLOCK_D, num_stages=NUM_STAGES):
                cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                u, p = latent_step(h_ptr, h_row, row_ok, cols, stride_h_col, d, k, k_ok, A_ptr, C_ptr, B_ptr, u,
                                   p, HAS_A, HAS_C, TIED, DOT_PREC)
        u, z = latent_finish(u, p, a_vec, c_vec, row_ok, k, k_ok, ACT, HAS_a, HAS_c, True)
        lat_off = m[:, None] * r + k[None, :]
        tl.store(z_ptr + lat_off, z, mask=m_ok[:, None] & k_ok[None, :])
        if SAVE_U:
            tl.store(u_ptr + lat_off, u, mask=m_ok[:, None] & k_ok[None, :])
        for d0 in tl.range(0, d, BLOCK_D, num_stages=NUM_STAGES):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            apply_step(h_ptr, h_row, y_ptr, y_row, hsave_ptr, m, row_ok, cols, stride_h_col, stride_y_col, d, k,
                       k_ok, B_ptr, z, SAVE_H, DOT_PREC)


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {value!r}")
    return value


def use_resident() -> bool:
    """Whether the forward takes this kernel: only when asked for, until a GPU has measured it
    against the previous one (``auto`` means ``rowblock`` for now)."""
    return mode() == "resident"


def plan(n: int, d: int, elem_bytes: int, limits: SmLimits,
         resident_per_sm: Callable[[int], Optional[int]], row_blocks=ROW_BLOCKS,
         budget_fraction: float = L2_BUDGET_FRACTION) -> tuple[int, int]:
    """(BLOCK_M, programs) of the persistent forward over ``n`` (> 0) rows of width ``d``.

    Pure: ``limits`` gives the SM count and L2 size; ``resident_per_sm(block_m)`` how many
    programs of that row block fit on an SM at once (from the compiled kernel; None when
    unknown, read as one). BLOCK_M is the tallest candidate for which one program per SM keeps
    ``sms x BLOCK_M x d x elem_bytes`` within ``budget_fraction`` of the L2 (taller blocks
    re-read the weights less often); the programs per SM are then as many as both the L2
    budget and the occupancy allow. When even the smallest block does not fit (very wide rows),
    the smallest block with one program per SM: the second pass then partly misses L2, but no
    SM idles. Programs never exceed the row blocks.
    """
    budget = int(limits.l2_bytes * budget_fraction)
    per_row = d * elem_bytes
    block_m, per_sm = min(row_blocks), 1
    for bm in sorted(row_blocks, reverse=True):
        fit = budget // (limits.sms * bm * per_row)
        if fit >= 1:
            block_m = bm
            per_sm = fit if fit == 1 else max(1, min(fit, resident_per_sm(bm) or 1))
            break
    return block_m, max(1, min(cdiv(n, block_m), per_sm * limits.sms))


# GPU tiles (BLOCK_D, warps, NUM_STAGES) by (fp32 activations?, R_PAD) and BLOCK_M, one table for
# both supported Tritons. Compiled ahead of time for sm_80 and sm_90a with Triton 3.9 at d = 4096
# with the heaviest flags (NoReFT's terms, gelu, an index): for each row block the widest column
# block with no spill on either (registers sm_80/sm_90 in the comments; tools/triton_compile_check.py
# re-checks every method, under 3.6 and the latest). With 16 or 32 rows the latent dots are
# narrower than the warps' MMA tiles, so every warp holds whole operand tiles and registers grow
# with BLOCK_D x R_PAD: e.g. bf16 R_PAD = 32 with (16, 128) took 255/248 registers, (16, 256)
# spilled 216 bytes. A missing row block spilled at every width tried (bf16 R_PAD = 128 with 64
# rows: 32 bytes at (64, 16), 2 stages); fp32 R_PAD = 16 with (64, 32) spilled 24 bytes on sm_80
# for DiReFT's terms, bf16 R_PAD = 16 with (16, 256) and 3 stages 24 bytes on sm_90 with an index.
# Triton 3.6 (the GPU machine's) allocates differently; two tiles that fit 3.9 spilled there and
# were narrowed to fit both (registers over every method, index and activation, 3.9 / 3.6):
# - bf16 R_PAD = 16, 16 rows: (256, 8, 2) compiled to 128 registers and a 24-byte stack on sm_90
#   under 3.6 (DiReFT + index; 16 bytes for LoReFT); (128, 8, 2): 128/148 and 128/128, no stack.
# - 16-bit R_PAD = 128, 32 rows: (32, 8, 3) spilled 40 bytes under 3.6 (LoBiReFT, sm_90) and 24
#   under 3.9 at a rank that is not a multiple of 16 (sm_80); (16, 8, 3): 210/206 and 212/212.
# Not tuned on a GPU.
_GPU_TILES = {
    (False, 16): {64: (64, 8, 3), 32: (128, 8, 3), 16: (128, 8, 2)},    # 186/174, 186/154, 128/148
    (False, 32): {64: (32, 8, 3), 32: (64, 8, 3), 16: (64, 8, 3)},      # 190/172, 186/194, 128/144
    (False, 64): {64: (16, 8, 3), 32: (32, 8, 3), 16: (64, 8, 3)},      # 255/193, 164/162, 186/180
    (False, 128): {32: (16, 8, 3), 16: (32, 8, 3)},                     # 210/206, 188/178
    (True, 16): {64: (16, 8, 3), 32: (32, 8, 3), 16: (32, 8, 3)},       # 128/120, 185/187, 183/185
    (True, 32): {64: (16, 8, 3), 32: (16, 8, 3), 16: (64, 8, 3)},       # 223/168, 202/199, 243/239
    (True, 64): {64: (16, 8, 2), 32: (16, 8, 3), 16: (32, 8, 3)},       # 255/231, 170/172, 172/182
}


def row_blocks(r_pad: int, h_dtype: torch.dtype) -> tuple[int, ...]:
    """The BLOCK_M values with a GPU tile for this rank and dtype, tallest first."""
    return tuple(sorted(_GPU_TILES[(h_dtype == torch.float32, r_pad)], reverse=True))


# With a column stride that is not 1: triton_common.STRIDED_TILE's 16 x 16 tile (8 warps), 2 stages.
STRIDED_ROW_BLOCKS = (16,)


def gpu_tile(block_m: int, d: int, r_pad: int, h_dtype: torch.dtype,
             strided_cols: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, warps, NUM_STAGES) for a GPU, BLOCK_D shrunk to d (never below 16)."""
    if strided_cols:
        block_d, warps, stages = STRIDED_TILE[1], STRIDED_TILE[2], 2
    else:
        block_d, warps, stages = _GPU_TILES[(h_dtype == torch.float32, r_pad)][block_m]
    return min(block_d, max(16, next_pow2(d))), warps, stages


def launch(src, dst, hsave, idx, index_given, n, d, r, s_h, s_hc, s_y, s_yc, A, a, B, C, c, spec, z, u):
    """Plan and launch the kernel; arguments as prepared by ``triton_impl.fwd`` (n > 0)."""
    dev = z.device
    r_pad = padded_rank(r)
    dummy = z
    consts = dict(HAS_INDEX=index_given, HAS_A=A is not None, HAS_a=a is not None, HAS_C=C is not None,
                  TIED=spec.tied, HAS_c=c is not None, ACT=spec.act, SAVE_H=hsave is not None,
                  SAVE_U=u is not None, R_PAD=r_pad, DOT_PREC=_triton.dot_precision(src.dtype))

    def args(progs):
        return (src, dst, hsave if hsave is not None else dummy, idx,
                A if A is not None else B, a if a is not None else B, B, C if C is not None else B,
                c if c is not None else B, z, u if u is not None else dummy,
                n, d, r, progs, s_h, s_hc, s_y, s_yc)

    if dev.type == "cuda":
        cols_strided = strided(s_hc, s_yc)

        def tile_consts(bm):
            block_d, warps, stages = gpu_tile(bm, d, r_pad, src.dtype, cols_strided)
            return dict(consts, BLOCK_M=bm, BLOCK_D=block_d, NUM_STAGES=stages), warps

        def resident(bm):
            tc, warps = tile_consts(bm)
            sms = _triton.device_limits(dev).sms  # a typical program count, for the compile's specialisation
            return _triton.resident_blocks(_lowrank_edit_fwd_resident_kernel, args(sms), tc, warps, dev)

        block_m, progs = plan(n, d, src.element_size(), _triton.device_limits(dev), resident,
                              STRIDED_ROW_BLOCKS if cols_strided else row_blocks(r_pad, src.dtype))
        tc, warps = tile_consts(block_m)
    else:
        # the interpreter runs programs one by one: big tiles, two programs (each then loops
        # over several row blocks, which exercises the persistent loop)
        block_m = min(64, max(16, next_pow2(n)))
        progs = min(cdiv(n, block_m), 2)
        tc, warps = dict(consts, BLOCK_M=block_m, BLOCK_D=min(128, max(16, next_pow2(d))), NUM_STAGES=2), 4
    _lowrank_edit_fwd_resident_kernel[(progs,)](*args(progs), **tc, num_warps=warps)
