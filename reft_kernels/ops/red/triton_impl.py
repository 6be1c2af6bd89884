"""Triton kernels of RED (``backend="triton"``) and their launchers, over (n, d) row matrices.

Numerics: every operand is loaded as fp32, the forward computes ``fma(h, s, t)`` and rounds once
to ``h``'s dtype. The backward is one pass over ``(g, h)`` writing ``dh = g * s`` and fp32 partial
column sums of ``g * h`` and ``g`` per program over a fixed range of rows, then summed over
programs in a fixed order (no atomics: bitwise reproducible).
"""
from __future__ import annotations

import os

import torch

from ... import _triton
from ..._triton import cdiv, next_pow2, tl, triton


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _red_fwd_kernel(
    h_ptr, s_ptr, t_ptr, y_ptr,
    n_rows, d,
    stride_h_row, stride_h_col, stride_y_row,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_D) tile of ``y = h * s + t``; grid (cdiv(N, BLOCK_M), cdiv(d, BLOCK_D))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :] * stride_h_col, mask=mask, other=0.0)
    y = h.to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            t = tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = tl.fma(y, s[None, :], t[None, :])
        else:
            y = y * s[None, :]
    elif HAS_BIAS:
        t = tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + t[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _red_bwd_kernel(
    g_ptr, h_ptr, s_ptr, dh_ptr, ds_part_ptr, dt_part_ptr,
    n_rows, d, rows_per_prog,
    stride_g_row, stride_g_col, stride_h_row, stride_h_col, stride_dh_row,
    HAS_SCALE: tl.constexpr, NEED_DH: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_2D: tl.constexpr,
):
    """One pass over ``(g, h)``: ``dh = g * s`` and fp32 partial column sums of ``g * h`` and ``g``.

    Grid (P, cdiv(d, BLOCK_D)): program (p, j) owns rows [p * rows_per_prog, (p+1) * rows_per_prog)
    (``rows_per_prog`` a multiple of BLOCK_M) and columns block j, and writes its partial sums to
    row p of the (P, d) buffers; the caller sums those P rows. ACC_2D: accumulate (BLOCK_M,
    BLOCK_D) fp32 tiles over the row loop and reduce them over rows once at the end, instead of a
    cross-warp column sum (shared memory and a barrier) every BLOCK_M rows; a different, still
    fixed, summation order.
    """
    pid_p = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    if HAS_SCALE:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ds_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dt_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ds_acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dt_acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for m0 in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col,
                    mask=mask, other=0.0).to(tl.float32)
        if NEED_DS:
            h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :] * stride_h_col,
                        mask=mask, other=0.0).to(tl.float32)
            if ACC_2D:
                ds_acc2 += g * h
            else:
                ds_acc += tl.sum(g * h, axis=0)
        if NEED_DT:
            if ACC_2D:
                dt_acc2 += g
            else:
                dt_acc += tl.sum(g, axis=0)
        if NEED_DH:
            dh = g
            if HAS_SCALE:
                dh = g * s[None, :]
            tl.store(dh_ptr + rows[:, None] * stride_dh_row + cols[None, :],
                     dh.to(dh_ptr.dtype.element_ty), mask=mask)
    if ACC_2D:
        ds_acc = tl.sum(ds_acc2, axis=0)
        dt_acc = tl.sum(dt_acc2, axis=0)
    if NEED_DS:
        tl.store(ds_part_ptr + pid_p.to(tl.int64) * d + cols, ds_acc, mask=col_ok)
    if NEED_DT:
        tl.store(dt_part_ptr + pid_p.to(tl.int64) * d + cols, dt_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _red_tiles(d: int, on_gpu: bool):
    """(BLOCK_M, BLOCK_D, num_warps). GPU: 4096-element tiles, at most 512 columns wide, so each of
    128 threads moves 32 elements (several 16-byte vectors). Interpreter: bigger tiles, since every
    program costs a fixed Python overhead there. Not yet tuned on a GPU."""
    if on_gpu:
        block_d = min(next_pow2(d), 512)
        return max(1, 4096 // block_d), block_d, 4
    block_d = min(next_pow2(d), 256)
    return max(1, 8192 // block_d), block_d, 4


# The backward's accumulation (REFT_KERNELS_RED_BWD): "rowsum" (the default) sums each (BLOCK_M,
# BLOCK_D) tile over its rows every step; "tile2d" keeps 2-D fp32 accumulators and reduces once.
# Compiled for sm_80 / sm_90a at d = 4096, HAS_SCALE and every gradient, 4 warps (registers, then
# resident blocks per SM by registers; no spills, 1-4 KiB shared memory), Triton 3.9 | 3.6:
#   rowsum (16, 256):  bf16 117/118 -> 4/4, fp32 124/119 -> 4/4 | bf16  96/111 -> 5/4, fp32  96/96 -> 5/5
#   tile2d (16, 256):  bf16 128/139 -> 4/3, fp32 168/166 -> 3/3 | bf16 136/128 -> 3/4, fp32 168/168 -> 3/3
#   tile2d (8, 256):   bf16  80/84  -> 6/5, fp32  96/96  -> 5/5 | bf16  80/80  -> 6/6, fp32  96/96 -> 5/5
#   tile2d (16, 128):  bf16  80/80  -> 6/6, fp32  96/96  -> 5/5 | bf16  80/84  -> 6/5, fp32  96/98 -> 5/4
# (16, 128) is chosen for both Tritons (the best on 3.9; on 3.6 (8, 256) keeps one block more per
# SM on sm_90, which only a GPU run could show to matter). tile2d stays opt-in until a GPU has
# measured both (fewer bytes per step in flight per block, more blocks; no per-step barrier).
RED_BWD_ENV_VAR = "REFT_KERNELS_RED_BWD"
RED_BWD_MODES = ("rowsum", "tile2d")


def red_bwd_mode() -> str:
    value = os.environ.get(RED_BWD_ENV_VAR, "rowsum").strip().lower() or "rowsum"
    if value not in RED_BWD_MODES:
        raise ValueError(f"{RED_BWD_ENV_VAR} must be one of {RED_BWD_MODES}, got {value!r}")
    return value


# With a column stride other than 1 (a transposed or sliced h or g): every element then needs its
# own 64-bit address, and Triton 3.6 compiled the fp32 rowsum backward at (16, 256) with a 344-byte
# (sm_80) / 760-byte (sm_90) stack (tools/triton_compile_check.py, column strides at 16). At most
# 128 columns it fits both Tritons without a stack; such loads are uncoalesced anyway, so the
# narrower tile costs little beside them.
RED_STRIDED_BLOCK_D = 128


def _red_bwd_tiles(d: int, on_gpu: bool, tile2d: bool = False, strided_cols: bool = False):
    """(BLOCK_M, BLOCK_D, num_warps) of the backward: each program loops over its rows in
    BLOCK_M-row steps, keeping two fp32 column accumulators of BLOCK_D (``tile2d``: two (BLOCK_M,
    BLOCK_D) accumulators); ``strided_cols``: some column stride is not 1. Not yet tuned on a GPU."""
    if on_gpu:
        widest = 128 if tile2d or strided_cols else 256
        return 16, min(next_pow2(d), widest), 4
    return 64, min(next_pow2(d), 128), 4


def fwd(h2, scale, bias):
    """(n, d) rows -> y (n, d) in h2's dtype."""
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    if n == 0:
        return y
    block_m, block_d, warps = _red_tiles(d, h2.is_cuda)
    grid = (cdiv(n, block_m), cdiv(d, block_d))
    _red_fwd_kernel[grid](
        h2, scale if scale is not None else h2, bias if bias is not None else h2, y,
        n, d, h2.stride(0), h2.stride(1), y.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y


def bwd(g2, h2, scale, need_dh, need_ds, need_dt):
    """Return (dh or None, ds fp32 or None, dt fp32 or None)."""
    n, d = g2.shape
    dev = g2.device
    dh = torch.empty((n, d), dtype=g2.dtype, device=dev) if need_dh else None
    if n == 0:
        zeros = torch.zeros(d, dtype=torch.float32, device=dev)
        return dh, (zeros if need_ds else None), (zeros.clone() if need_dt else None)
    tile2d = red_bwd_mode() == "tile2d"
    h2 = h2 if h2 is not None else g2  # only read when need_ds
    block_m, block_d, warps = _red_bwd_tiles(d, g2.is_cuda, tile2d, g2.stride(1) != 1 or h2.stride(1) != 1)
    n_dblocks = cdiv(d, block_d)
    consts = dict(HAS_SCALE=scale is not None, NEED_DH=need_dh, NEED_DS=need_ds, NEED_DT=need_dt,
                  BLOCK_M=block_m, BLOCK_D=block_d, ACC_2D=tile2d)

    def args(ds_part, dt_part, rows_per_prog):
        return (g2, h2, scale if scale is not None else g2, dh if dh is not None else g2,
                ds_part if ds_part is not None else g2, dt_part if dt_part is not None else g2,
                n, d, rows_per_prog, g2.stride(0), g2.stride(1), h2.stride(0), h2.stride(1), d)

    # one wave of the blocks the compiled kernel fits per SM (None off a GPU: the fixed plan); the
    # probe's one-row fp32 partials specialise like the real ones, so the query compiles the very
    # kernel the launch runs
    probe = torch.empty((1, d), dtype=torch.float32, device=dev) if g2.is_cuda else None
    per_sm = _triton.resident_blocks(_red_bwd_kernel, args(probe if need_ds else None, probe if need_dt else None,
                                                           block_m), consts, warps, dev)
    progs, rows_per_prog = _triton.row_split(n, block_m, n_dblocks, dev, per_sm)
    # both partial sums in one buffer, so that one reduction (or none, for one program per column
    # block) finishes them: one launch fewer per layer and step than a sum each
    n_parts = need_ds + need_dt
    parts = torch.empty((n_parts, progs, d), dtype=torch.float32, device=dev) if n_parts else None
    ds_part = parts[0] if need_ds else None
    dt_part = parts[n_parts - 1] if need_dt else None
    _red_bwd_kernel[(progs, n_dblocks)](*args(ds_part, dt_part, rows_per_prog), **consts, num_warps=warps)
    if parts is not None:
        sums = parts[:, 0] if progs == 1 else parts.sum(1)  # fixed order: deterministic
        ds = sums[0] if need_ds else None
        dt = sums[n_parts - 1] if need_dt else None
    else:
        ds = dt = None
    return dh, ds, dt
