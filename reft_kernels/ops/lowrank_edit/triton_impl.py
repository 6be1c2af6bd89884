"""Triton kernels of the low-rank edit (``backend="triton"``) and their launchers, following the
contract of ``contract.py``.

Numerics: operands are loaded as fp32, every ``tl.dot`` accumulates in fp32 (3xTF32 products for
fp32 activations, TF32 for fp16/bf16, see ``_triton.dot_precision``), the (rows, r) latent stays
in registers between the two passes over ``h`` and is saved in fp32 for the backward, and ``y``
is rounded once to ``h``'s dtype. Parameter gradients are reduced deterministically: fp32
partials per program over a fixed row range, then one fixed-order sum over the programs in one
launch (``_lowrank_param_finish_kernel``; no atomics, no torch reductions).

Memory: the forward saves ``h`` by reference (out of place) or a copy of the listed rows only
(in place), plus the (rows, r) latent; the backward allocates ``dh`` and one (P, width) fp32
partial buffer (width = r x d per needed weight gradient + r per needed bias), P = one wave of
the compiled kernel's resident blocks / number of column blocks on a GPU, never another (N, d)
temporary.

Forward kernels: ``_lowrank_edit_fwd_kernel`` below (64-row blocks, two passes over ``h``; the
default), ``triton_fwd_resident`` (L2-resident persistent one-pass, ``REFT_KERNELS_LOWRANK_FWD=
resident``) and ``triton_small_n`` (d split across programs for few rows), all three built from
the jit steps of ``triton_common``.
"""
from __future__ import annotations

import torch

from ... import _triton
from ..._activations import IDENTITY, act_grad_tl
from ..._rows import as_rows, rows_addressing
from ..._triton import cdiv, gpu_dot, next_pow2, tl, triton
from . import triton_fwd_resident, triton_small_n
from .triton_common import (
    STRIDED_TILE, apply_step, latent_finish, latent_step, padded_rank, row_source, strided,
)

# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _lowrank_edit_fwd_kernel(
    h_ptr, y_ptr, hsave_ptr, idx_ptr,
    A_ptr, a_ptr, B_ptr, C_ptr, c_ptr,
    z_ptr, u_ptr,
    n_rows, d, r,
    stride_h_row, stride_h_col, stride_y_row, stride_y_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_a: tl.constexpr, HAS_C: tl.constexpr,
    TIED: tl.constexpr, HAS_c: tl.constexpr, ACT: tl.constexpr,
    SAVE_H: tl.constexpr, SAVE_U: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Forward for BLOCK_M rows; grid (cdiv(n_rows, BLOCK_M),).

    Pass 1 streams the rows once to build the fp32 latent ``z`` (BLOCK_M, R_PAD) in registers;
    pass 2 streams them again and writes ``y = h + z B``. ``z`` (and the pre-activation ``u`` when
    ``act`` is not the identity) is stored as (n_rows, r) fp32 for the backward. With HAS_INDEX,
    row i of the block is row ``idx[i]`` of ``h`` (skipped when -1), ``y`` may alias ``h`` (each
    element is read before it is written, by the same program), and SAVE_H copies the original
    rows to the dense (n_rows, d) ``hsave``. R_PAD >= 16 and BLOCK_M, BLOCK_D >= 16: ``tl.dot``
    needs every dimension >= 16 on NVIDIA GPUs; padded latent columns are masked to zero.
    """
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
    h_row = src * stride_h_row
    y_row = src * stride_y_row
    k = tl.arange(0, R_PAD)
    k_ok = k < r

    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if HAS_A or HAS_C or TIED:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            u, p = latent_step(h_ptr, h_row, row_ok, cols, stride_h_col, d, k, k_ok, A_ptr, C_ptr, B_ptr, u, p,
                               HAS_A, HAS_C, TIED, DOT_PREC)
    u, z = latent_finish(u, p, a_ptr, c_ptr, row_ok, k, k_ok, ACT, HAS_a, HAS_c, False)
    lat_off = m[:, None] * r + k[None, :]
    tl.store(z_ptr + lat_off, z, mask=m_ok[:, None] & k_ok[None, :])
    if SAVE_U:
        tl.store(u_ptr + lat_off, u, mask=m_ok[:, None] & k_ok[None, :])

    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        apply_step(h_ptr, h_row, y_ptr, y_row, hsave_ptr, m, row_ok, cols, stride_h_col, stride_y_col, d, k, k_ok,
                   B_ptr, z, SAVE_H, DOT_PREC)


@triton.jit
def _lowrank_edit_bwd_latent_kernel(
    g_ptr, idx_ptr, B_ptr, u_ptr, gz_ptr, ga_ptr,
    n_rows, d, r,
    stride_g_row, stride_g_col,
    HAS_INDEX: tl.constexpr, ACT: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Backward pass 1 for BLOCK_M rows: ``gz = g B^T`` and ``ga = gz * act'(u)`` (when act is not
    the identity), stored as (n_rows, r) fp32, zero on padding rows. Grid (cdiv(n_rows, BLOCK_M),)."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
    g_row = src * stride_g_row
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    gz = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < d
        g = tl.load(g_ptr + g_row[:, None] + cols[None, :] * stride_g_col,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        bt = tl.load(B_ptr + k[None, :] * d + cols[:, None], mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        gz = gpu_dot(g, bt, gz, DOT_PREC)
    lat_off = m[:, None] * r + k[None, :]
    lat_mask = m_ok[:, None] & k_ok[None, :]
    tl.store(gz_ptr + lat_off, gz, mask=lat_mask)
    if ACT != 0:
        u = tl.load(u_ptr + lat_off, mask=lat_mask, other=0.0)
        ga = tl.where(row_ok[:, None] & k_ok[None, :], gz * act_grad_tl(u, ACT), 0.0)
        tl.store(ga_ptr + lat_off, ga, mask=lat_mask)


@triton.jit
def _lowrank_bias_partials_kernel(
    gz_ptr, ga_ptr, part_ptr, n_rows, r, rows_per_prog, part_width, off_da_vec, off_dc_vec,
    ACT: tl.constexpr, NEED_DA_VEC: tl.constexpr, NEED_DC_VEC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Bias partials of the backward, grid (P,): program p stores ``sum ga[:, k]`` and ``-sum
    gz[:, k]`` over rows [p * rows_per_prog, (p+1) * rows_per_prog) of the (n_rows, r) fp32
    latents (``ga`` is ``gz`` when ACT is the identity; padding rows hold 0 in both) to row p of
    the partial buffer at ``off_da_vec`` / ``off_dc_vec``, the row split of
    ``_lowrank_edit_bwd_kernel``, accumulated as (BLOCK_M, R_PAD) tiles and reduced once.

    A kernel of its own: accumulated inside ``_lowrank_edit_bwd_kernel`` (per step, as 2-D
    tiles, or in a branch for an extra column of programs) these sums pushed its fp32 R_PAD = 64
    and bf16 R_PAD = 128 tiles into register spills (tools/triton_compile_check.py). It reads
    n x r x 4 bytes per bias: 0.5 MB at the reference shape."""
    row0 = tl.program_id(0).to(tl.int64) * rows_per_prog
    da_out = part_ptr + tl.program_id(0).to(tl.int64) * part_width + off_da_vec
    dc_out = part_ptr + tl.program_id(0).to(tl.int64) * part_width + off_dc_vec
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    acc_a = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=NUM_STAGES):
        m = row0 + m0 + tl.arange(0, BLOCK_M)
        lat_off = m[:, None] * r + k[None, :]
        lat_mask = ((m < n_rows) & (m < row0 + rows_per_prog))[:, None] & k_ok[None, :]  # own rows only
        gz = tl.load(gz_ptr + lat_off, mask=lat_mask, other=0.0)
        if NEED_DA_VEC:
            if ACT != 0:
                acc_a += tl.load(ga_ptr + lat_off, mask=lat_mask, other=0.0)
            else:
                acc_a += gz
        if NEED_DC_VEC:
            acc_c += gz
    if NEED_DA_VEC:
        tl.store(da_out + k, tl.sum(acc_a, axis=0), mask=k_ok)
    if NEED_DC_VEC:
        tl.store(dc_out + k, -tl.sum(acc_c, axis=0), mask=k_ok)


@triton.jit
def _lowrank_edit_bwd_kernel(
    g_ptr, h_ptr, dh_ptr, idx_ptr,
    A_ptr, B_ptr, C_ptr,
    z_ptr, gz_ptr, ga_ptr,
    dA_part_ptr, dB_part_ptr, dC_part_ptr,
    n_rows, d, r, rows_per_prog, part_width,
    stride_g_row, stride_g_col, stride_h_row, stride_h_col, stride_dh_row, stride_dh_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_C: tl.constexpr, TIED: tl.constexpr,
    ACT: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Backward pass 2; grid (P, cdiv(d, BLOCK_D)).

    Program (p, j) owns columns block j of rows [p * rows_per_prog, (p+1) * rows_per_prog) and
    computes ``dh = g + ga A - gz C`` there, plus fp32 partial parameter gradients over its rows,
    ``ga^T h``, ``z^T g`` (minus ``gz^T h`` when TIED) and ``-gz^T h``, stored as (r, d) blocks
    to row p of the (P, part_width) partial buffer (``d*_part_ptr`` point at each block's column
    offset in row 0); ``_lowrank_bias_partials_kernel`` fills the bias columns of the same rows, so that
    one fixed-order sum over P (``_lowrank_param_finish_kernel``) finishes every parameter
    gradient.
    ``h`` rows are always the dense rows 0..n_rows-1 (the saved copy when HAS_INDEX); ``g``/``dh``
    rows follow ``idx`` when HAS_INDEX (``dh`` may alias ``g``).
    """
    pid_p = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    wmask = k_ok[:, None] & col_ok[None, :]
    w_off = k[:, None] * d + cols[None, :]
    if NEED_DH:
        if HAS_A:
            a_w = tl.load(A_ptr + w_off, mask=wmask, other=0.0).to(tl.float32)
        if HAS_C:
            c_w = tl.load(C_ptr + w_off, mask=wmask, other=0.0).to(tl.float32)
        elif TIED:
            c_w = tl.load(B_ptr + w_off, mask=wmask, other=0.0).to(tl.float32)
    acc_a = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    acc_c = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for m0 in range(0, rows_per_prog, BLOCK_M):
        m = row0 + m0 + tl.arange(0, BLOCK_M)
        src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        lat_off = m[:, None] * r + k[None, :]
        lat_mask = m_ok[:, None] & k_ok[None, :]
        gz = tl.load(gz_ptr + lat_off, mask=lat_mask, other=0.0)
        if ACT != 0:
            ga = tl.load(ga_ptr + lat_off, mask=lat_mask, other=0.0)
        else:
            ga = gz
        g = tl.load(g_ptr + src[:, None] * stride_g_row + cols[None, :] * stride_g_col,
                    mask=tile_ok, other=0.0).to(tl.float32)
        if NEED_DA or NEED_DC or (NEED_DB and TIED):
            x = tl.load(h_ptr + m[:, None] * stride_h_row + cols[None, :] * stride_h_col,
                        mask=tile_ok, other=0.0).to(tl.float32)
        if NEED_DH:
            dh = g
            if HAS_A:
                dh += gpu_dot(ga, a_w, None, DOT_PREC)
            if HAS_C or TIED:
                dh -= gpu_dot(gz, c_w, None, DOT_PREC)
            tl.store(dh_ptr + src[:, None] * stride_dh_row + cols[None, :] * stride_dh_col,
                     dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DA:
            acc_a = gpu_dot(tl.trans(ga), x, acc_a, DOT_PREC)
        if NEED_DC:
            acc_c = gpu_dot(tl.trans(gz), x, acc_c, DOT_PREC)
        if NEED_DB:
            z = tl.load(z_ptr + lat_off, mask=lat_mask, other=0.0)
            acc_b = gpu_dot(tl.trans(z), g, acc_b, DOT_PREC)
            if TIED:
                acc_b -= gpu_dot(tl.trans(gz), x, None, DOT_PREC)
    part_off = pid_p.to(tl.int64) * part_width + w_off
    if NEED_DA:
        tl.store(dA_part_ptr + part_off, acc_a, mask=wmask)
    if NEED_DB:
        tl.store(dB_part_ptr + part_off, acc_b, mask=wmask)
    if NEED_DC:
        tl.store(dC_part_ptr + part_off, -acc_c, mask=wmask)


@triton.jit
def _lowrank_param_finish_kernel(part_ptr, out_ptr, n_parts, width, stride, BLOCK: tl.constexpr):
    """``out[j] = part[0, j] + part[1, j] + ... + part[n_parts-1, j]`` in that order, fp32: the
    deterministic finish of the backward's parameter gradients (every needed dA, dB, dC, da, dc
    side by side in one row of ``part``, rows ``stride`` apart), one launch; grid (cdiv(width, BLOCK),)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + cols
    for _ in range(0, n_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += stride  # pointer steps: no int32 product of p and the stride
    tl.store(out_ptr + cols, acc, mask=ok)


# ----------------------------------------------------------------------------- launchers

# GPU tiles (BLOCK_M, BLOCK_D, num_warps) per kernel, activation class and padded rank. Each was
# compiled ahead of time for sm_80 and sm_90a with Triton 3.9 at d = 4096 with the heaviest flags
# (NoReFT's terms, gelu, an index): among the tiles that used no local memory (no register
# spills) on both, the largest with some register headroom, BLOCK_M preferred (each program
# reads the whole weight matrices, so taller tiles amortise them). Larger tiles spilled, e.g. a
# (32, 128) fp32 forward tile at 255 registers. tools/triton_compile_check.py re-checks them all,
# under Triton 3.6 (the GPU machine's) as well: none spills there either (at most the 8-16 byte
# stack frames it allows, e.g. 128 registers + 8 bytes for the bf16 R_PAD = 16 backward on sm_90).
# Speed on a GPU is not yet measured.
_GPU_TILES = {
    # kernel, fp32?: {r_pad: (BLOCK_M, BLOCK_D, warps)}
    ("fwd", True): {16: (64, 32, 4), 32: (64, 16, 8), 64: (32, 32, 8)},
    ("fwd", False): {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 32, 8), 128: (32, 32, 8)},
    ("lat", True): {16: (64, 64, 8), 32: (64, 32, 8), 64: (32, 64, 8)},
    ("lat", False): {16: (64, 128, 8), 32: (64, 128, 8), 64: (32, 128, 8), 128: (32, 64, 8)},
    ("bwd", True): {16: (16, 128, 8), 32: (16, 64, 8), 64: (16, 32, 8)},
    ("bwd", False): {16: (32, 128, 8), 32: (32, 64, 8), 64: (64, 16, 8), 128: (32, 16, 8)},
}


def triton_max_rank(h_dtype: torch.dtype) -> int:
    """Largest rank the Triton kernels take for activations of ``h_dtype``: the (rows, r) latents
    and (r, BLOCK_D) accumulators live in registers, and no tile fits beyond these without
    spilling (fp32 needs more registers per dot, see ``_triton.dot_precision``)."""
    return 64 if h_dtype == torch.float32 else 128


def _tiles(kind: str, n: int, d: int, r_pad: int, h_dtype: torch.dtype, on_gpu: bool, strided_cols: bool = False):
    """(BLOCK_M, BLOCK_D, num_warps) for kernel ``kind`` ("fwd", "lat" or "bwd").

    GPU: from ``_GPU_TILES`` (``STRIDED_TILE`` with ``strided_cols``), shrunk to the problem
    (BLOCK_M to the rows, BLOCK_D to d, never below 16, which ``tl.dot`` needs). Interpreter: big
    tiles, since every program costs a fixed Python overhead there.
    """
    d_pow, n_pow = max(16, next_pow2(d)), max(16, next_pow2(n))
    if not on_gpu:
        return min(64, n_pow), min(d_pow, 128), 4
    block_m, block_d, warps = STRIDED_TILE if strided_cols else _GPU_TILES[(kind, h_dtype == torch.float32)][r_pad]
    return min(block_m, n_pow), min(block_d, d_pow), warps


def _dummy(*ts):
    return next(t for t in ts if t is not None)


def fwd(h, index, A, a, B, C, c, spec, save_u):
    """Forward; see ``contract.py``. ``hsave`` rows of -1 entries are left
    unwritten."""
    d = h.shape[-1]
    r = B.shape[0]
    r_pad = padded_rank(r)
    dev = h.device
    if index is None:
        x = as_rows(h)
        n = x.shape[0]
        y = torch.empty((n, d), dtype=h.dtype, device=dev)
        idx, s_h, s_hc, s_y, s_yc, hsave = x, x.stride(0), x.stride(1), d, 1, None
        src, dst = x, y
    else:
        n = index.shape[0]
        idx, s_h, s_hc = rows_addressing(h, index)
        s_y, s_yc = s_h, s_hc
        hsave = torch.empty((n, d), dtype=h.dtype, device=dev)
        src = dst = h
    z = torch.empty((n, r), dtype=torch.float32, device=dev)
    u = torch.empty((n, r), dtype=torch.float32, device=dev) if save_u else None
    block_m, block_d, warps = _tiles("fwd", max(n, 1), d, r_pad, h.dtype, h.is_cuda, strided(s_hc, s_yc))
    if n > 0 and triton_small_n.use_split(n, block_m, dev):
        triton_small_n.fwd_split(src, dst, hsave, idx, index is not None, n, d, r, s_h, s_hc, s_y, s_yc,
                                 A, a, B, C, c, spec, z, u)
    elif n > 0 and triton_fwd_resident.use_resident():
        triton_fwd_resident.launch(src, dst, hsave, idx, index is not None, n, d, r, s_h, s_hc, s_y, s_yc,
                                   A, a, B, C, c, spec, z, u)
    elif n > 0:
        _lowrank_edit_fwd_kernel[(cdiv(n, block_m),)](
            src, dst, _dummy(hsave, z), idx,
            _dummy(A, B), _dummy(a, B), B, _dummy(C, B), _dummy(c, B),
            z, _dummy(u, z),
            n, d, r, s_h, s_hc, s_y, s_yc,
            HAS_INDEX=index is not None, HAS_A=A is not None, HAS_a=a is not None,
            HAS_C=C is not None, TIED=spec.tied, HAS_c=c is not None, ACT=spec.act,
            SAVE_H=hsave is not None, SAVE_U=save_u,
            R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PREC=_triton.dot_precision(h.dtype), num_warps=warps,
        )
    return (dst if index is not None else y), z, u, hsave


def _launch_bwd_triton(g2, x, dh, index, A, B, C, z, u, spec, need):
    """Triton backward on row matrices.

    ``g2`` (N, d): gradient of the output rows; ``x`` (n, d): the input rows (all of ``h`` when
    ``index`` is None, the saved listed rows otherwise); ``dh``: output buffer, (N, d), may be
    ``g2`` itself when indexed (the listed rows are overwritten in place); ``need`` = flags for
    (dh, dA, da, dB, dC, dc). Returns fp32 (dA, da, dB, dC, dc), each None when not needed.
    """
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    n, d = x.shape
    r = B.shape[0]
    r_pad = padded_rank(r)
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        zero = lambda *s: torch.zeros(*s, **f32)  # noqa: E731
        return (zero(r, d) if need_da_w else None, zero(r) if need_da_b else None,
                zero(r, d) if need_db else None, zero(r, d) if need_dc_w else None,
                zero(r) if need_dc_b else None)
    prec = _triton.dot_precision(x.dtype)
    has_act = spec.act != IDENTITY
    gz = torch.empty((n, r), **f32)
    ga = torch.empty((n, r), **f32) if has_act else None
    idx = index if index is not None else gz
    block_m, block_d, warps = _tiles("lat", n, d, r_pad, x.dtype, x.is_cuda, strided(g2.stride(1)))
    if triton_small_n.use_split(n, block_m, dev):
        # few rows: gz = g B^T with d split across programs, as the small-n forward does
        gz, ga = triton_small_n.bwd_latent_split(g2, idx, index is not None, B, u, spec, n, d, r)
    else:
        _lowrank_edit_bwd_latent_kernel[(cdiv(n, block_m),)](
            g2, idx, B, _dummy(u, gz), gz, _dummy(ga, gz),
            n, d, r, g2.stride(0), g2.stride(1),
            HAS_INDEX=index is not None, ACT=spec.act,
            R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps,
        )
    need_dc = need_dc_w and C is not None
    block_m, block_d, warps = _tiles("bwd", n, d, r_pad, x.dtype, x.is_cuda,
                                     strided(g2.stride(1), x.stride(1), dh.stride(1) if dh is not None else 1))
    n_dblocks = cdiv(d, block_d)
    # every needed parameter gradient side by side in one fp32 row per program: dA, dB, dC as
    # (r, d) blocks, then da, dc (r values each)
    layout, width = {}, 0
    for name, needed, size in (("dA", need_da_w, r * d), ("dB", need_db, r * d), ("dC", need_dc, r * d),
                               ("da", need_da_b, r), ("dc", need_dc_b, r)):
        if needed:
            layout[name], width = (width, size), width + size
    off = lambda name: layout.get(name, (0, 0))[0]  # noqa: E731
    # rows padded to 16 floats: a row stride divisible by 16 lets the compiler vectorise the
    # partial stores (an odd stride cost the fp32 r = 1 tile a 24-byte spill on sm_90a)
    stride = cdiv(width, 16) * 16
    consts = dict(HAS_INDEX=index is not None, HAS_A=A is not None, HAS_C=C is not None, TIED=spec.tied,
                  ACT=spec.act, NEED_DH=need_dh, NEED_DA=need_da_w, NEED_DB=need_db, NEED_DC=need_dc,
                  R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec)

    def args(part, rows_per_prog):
        blocks = [part.view(-1)[off(name):] if name in layout else gz for name in ("dA", "dB", "dC")]
        return (g2, x, _dummy(dh, g2), idx, _dummy(A, B), B, _dummy(C, B), z, gz, _dummy(ga, gz), *blocks,
                n, d, r, rows_per_prog, stride,
                g2.stride(0), g2.stride(1), x.stride(0), x.stride(1),
                dh.stride(0) if dh is not None else 0, dh.stride(1) if dh is not None else 0)

    # one wave of the blocks the compiled kernel fits per SM (None off a GPU: the fixed plan). The
    # probe's one-row partial buffer is allocated like the real one (same offsets of dA, dB, dC,
    # so the same pointer alignment) and rows_per_prog = block_m is specialised like any multiple
    # of it: the kernel compiled for the query is the one the launch below runs, not an extra one.
    probe = torch.empty((1, stride), **f32) if (width and x.is_cuda) else gz
    per_sm = _triton.resident_blocks(_lowrank_edit_bwd_kernel, args(probe, block_m), consts, warps, dev)
    progs, rows_per_prog = _triton.row_split(n, block_m, n_dblocks, dev, per_sm)
    part = torch.empty((progs, stride), **f32) if width else gz
    _lowrank_edit_bwd_kernel[(progs, n_dblocks)](*args(part, rows_per_prog), **consts, num_warps=warps)
    if need_da_b or need_dc_b:
        _lowrank_bias_partials_kernel[(progs,)](
            gz, _dummy(ga, gz), part, n, r, rows_per_prog, stride, off("da"), off("dc"),
            ACT=spec.act, NEED_DA_VEC=need_da_b, NEED_DC_VEC=need_dc_b, R_PAD=r_pad,
            BLOCK_M=bias_block_m(r_pad) if x.is_cuda else block_m, NUM_STAGES=3, num_warps=8)
    out = _finish_param_grads(part, progs, width)
    grads = {name: out[o:o + size] for name, (o, size) in layout.items()}
    mat = lambda name: grads[name].view(r, d) if name in grads else None  # noqa: E731
    return mat("dA"), grads.get("da"), mat("dB"), mat("dC"), grads.get("dc")


def bias_block_m(r_pad: int) -> int:
    """Rows per step of ``_lowrank_bias_partials_kernel`` on a GPU: 16 KB fp32 tiles (256 rows at
    R_PAD = 16), pipelined 3 deep, since only P programs (4 at the reference shape) share the
    (n, r) latents: 0.5 MB each at the reference shape, 16 steps per program (estimated a few
    microseconds, not measured)."""
    return max(16, 4096 // r_pad)


# Finish: 512 columns per program, 4 warps, so each thread moves one 16-byte vector per partial
# row. At the reference shape (LoReFT r = 8, d = 4096: 65,544 columns, P <= 32 rows) that is
# 129 programs and at most 8.4 MB read: a few microseconds (estimated, not measured).
_FINISH_BLOCK = 512


def _finish_param_grads(part: torch.Tensor, progs: int, width: int) -> torch.Tensor:
    """The (width,) fp32 sum over the ``progs`` rows of ``part[:, :width]``, in row order: one
    launch of ``_lowrank_param_finish_kernel``, or ``part[0]`` itself when there is one row."""
    if progs == 1 or width == 0:
        return part[0, :width] if width else part.new_empty(0)
    out = torch.empty(width, dtype=torch.float32, device=part.device)
    block = _FINISH_BLOCK if part.is_cuda else min(4096, next_pow2(width))
    _lowrank_param_finish_kernel[(cdiv(width, block),)](part, out, progs, width, part.stride(0), BLOCK=block,
                                                         num_warps=4)
    return out


def bwd(g, x, index, A, B, C, z, u, spec, need):
    """Backward; see ``contract.py``."""
    if index is not None:
        # dh is g with the listed rows replaced: copy g once, then the kernels read each listed
        # row of the copy and overwrite it in place.
        buf = g.clone(memory_format=torch.contiguous_format).view(-1, g.shape[-1]) if need[0] else as_rows(g)
        grads = _launch_bwd_triton(buf, x, buf if need[0] else None, index, A, B, C, z, u, spec, need)
        return (buf.view(g.shape) if need[0] else None), grads
    g2 = as_rows(g)
    dh = torch.empty(g2.shape, dtype=g.dtype, device=g.device) if need[0] else None
    grads = _launch_bwd_triton(g2, as_rows(x), dh, None, A, B, C, z, u, spec, need)
    return (dh.view(g.shape) if need[0] else None), grads
