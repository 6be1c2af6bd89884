"""Triton kernels of RED (``backend="triton"``) and their launchers, over (n, d) row matrices.

Numerics: every operand is loaded as fp32, the forward computes ``fma(h, s, t)`` and rounds once
to ``h``'s dtype. The backward is one pass over ``(g, h)`` writing ``dh = g * s`` and fp32 partial
column sums of ``g * h`` and ``g`` per program over a fixed range of rows, then summed over
programs in a fixed order (``ops/finish.py``; no atomics, no torch reduction: bitwise reproducible).
Tiles, grids and the backward's variant come from ``plan.py`` (``reft-kernels plan --op red``).
"""
from __future__ import annotations

import torch

from ... import _triton
from ..._device import plan_limits
from ..._triton import tl, triton
from .. import variants
from ..finish import finish
from . import plan as P


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
    stride_g_row, stride_g_col, stride_h_row, stride_h_col, stride_dh_row, stride_part,
    HAS_SCALE: tl.constexpr, NEED_DH: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_2D: tl.constexpr,
):
    """One pass over ``(g, h)``: ``dh = g * s`` and fp32 partial column sums of ``g * h`` and ``g``.

    Grid (P, cdiv(d, BLOCK_D)): program (p, j) owns rows [p * rows_per_prog, (p+1) * rows_per_prog)
    (``rows_per_prog`` a multiple of BLOCK_M) and columns block j, and writes its partial sums to
    row p of the partial buffer (rows ``stride_part`` apart; ``ds_part_ptr`` / ``dt_part_ptr``
    point at each sum's columns in row 0); ``ops/finish.py`` sums those P rows. ACC_2D: accumulate (BLOCK_M,
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
        tl.store(ds_part_ptr + pid_p.to(tl.int64) * stride_part + cols, ds_acc, mask=col_ok)
    if NEED_DT:
        tl.store(dt_part_ptr + pid_p.to(tl.int64) * stride_part + cols, dt_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers


def fwd(h2, scale, bias):
    """(n, d) rows -> y (n, d) in h2's dtype; tile and grid from ``plan.fwd_launches``."""
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    for launch in P.fwd_launches(n, d, plan_limits(h2.device)):
        _red_fwd_kernel[launch.grid](
            h2, scale if scale is not None else h2, bias if bias is not None else h2, y,
            n, d, h2.stride(0), h2.stride(1), y.stride(0),
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
            BLOCK_M=launch.block_m, BLOCK_D=launch.block_d, num_warps=launch.warps,
        )
    return y


def bwd(g2, h2, scale, need_dh, need_ds, need_dt):
    """Return (dh or None, ds fp32 or None, dt fp32 or None). The variant (``rowsum`` or
    ``tile2d``), tiles and grid: ``plan.bwd_variant`` / ``plan.bwd_launches``; the partial sums of
    ds and dt sit side by side in one row per program, finished by one ``ops/finish.py`` launch."""
    n, d = g2.shape
    dev = g2.device
    dh = torch.empty((n, d), dtype=g2.dtype, device=dev) if need_dh else None
    if n == 0:
        zeros = torch.zeros(d, dtype=torch.float32, device=dev)
        return dh, (zeros if need_ds else None), (zeros.clone() if need_dt else None)
    h2 = h2 if h2 is not None else g2  # only read when need_ds
    limits = plan_limits(dev)
    variant, _ = P.bwd_variant(variants.active().red_bwd)
    strided_cols = g2.stride(1) != 1 or h2.stride(1) != 1
    n_sums = need_ds + need_dt
    launch = P.bwd_launches(n, d, variant, limits, n_sums, strided_cols)[0]
    consts = dict(HAS_SCALE=scale is not None, NEED_DH=need_dh, NEED_DS=need_ds, NEED_DT=need_dt,
                  BLOCK_M=launch.block_m, BLOCK_D=launch.block_d, ACC_2D=variant == "tile2d")
    width = n_sums * d

    def args(part, rows_per_prog):
        ds_part = part.view(-1) if need_ds else g2
        dt_part = part.view(-1)[(n_sums - 1) * d:] if need_dt else g2
        return (g2, h2, scale if scale is not None else g2, dh if dh is not None else g2, ds_part, dt_part,
                n, d, rows_per_prog, g2.stride(0), g2.stride(1), h2.stride(0), h2.stride(1), d,
                part.stride(0) if n_sums else 0)

    # On a GPU the grid is one wave of the blocks the compiled kernel fits per SM (the plan above
    # assumed the fixed PROGRAMS_PER_SM); the probe's one-row fp32 partials specialise like the
    # real ones, so the query compiles the very kernel the launch runs.
    # (no sums asked for: no partial buffer, g2 stands in for it)
    if limits is not None:
        probe = torch.empty((1, width), dtype=torch.float32, device=dev) if n_sums else g2
        per_sm = _triton.resident_blocks(_red_bwd_kernel, args(probe, launch.block_m), consts, launch.warps, dev)
        if per_sm is not None:
            launch = P.bwd_launches(n, d, variant, limits, n_sums, strided_cols, per_sm)[0]
    progs, rows_per_prog = launch.grid[0], launch.rows
    part = torch.empty((progs, width), dtype=torch.float32, device=dev) if n_sums else g2
    _red_bwd_kernel[launch.grid](*args(part, rows_per_prog), **consts, num_warps=launch.warps)
    if not n_sums:
        return dh, None, None
    sums = finish(part, progs, width)  # the plan's _param_finish_kernel when progs > 1
    return dh, (sums[:d] if need_ds else None), (sums[(n_sums - 1) * d:] if need_dt else None)
