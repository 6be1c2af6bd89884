"""The low-rank edit shared by the whole ReFT family:

    y = h + (act(h A^T + a) - h C^T - c) B

Shapes: ``h`` (..., d); ``A``, ``B``, ``C`` (r, d) in ``nn.Linear`` convention; ``a``, ``c`` (r,).
Only ``B`` is required: a missing ``A``/``a``/``C``/``c`` drops its term. When ``C is B`` (LoReFT,
NoReFT, ConsReFT) the kernels read that matrix once and its gradient carries both terms.
``index`` (optional, 1-D int64) lists rows of ``h.reshape(-1, d)`` to edit; -1 entries are padding.

Numerics (Triton): operands are loaded as fp32, every ``tl.dot`` accumulates in fp32 (3xTF32
products for fp32 activations, TF32 for fp16/bf16, see ``_triton.dot_precision``), the (rows, r) latent stays
in registers between the two passes over ``h`` and is saved in fp32 for the backward, and ``y`` is
rounded once to ``h``'s dtype. Parameter gradients are reduced deterministically: fp32 partials per
program over a fixed row range, then one fixed-order sum (no atomics).

Memory: the forward saves ``h`` by reference (out of place) or a copy of the listed rows only
(in place), plus the (rows, r) latent; the backward allocates ``dh`` and (P, r, d) fp32 partials
with P about 4 x the SM count / number of column blocks, never another (N, d) temporary.

CUDA backend (``backend="cuda"``, opt-in; ranks up to 64): ``csrc/lowrank_edit_fwd.cu`` and
``csrc/lowrank_edit_bwd.cu``, with fp32 FMA products (not TF32), the same saved tensors and the
same deterministic partial sums, reached through the torch.library ops
``reft_kernels::lowrank_edit_fwd``, ``reft_kernels::lowrank_edit_fwd_`` (in place) and
``reft_kernels::lowrank_edit_bwd``.

File layout: Triton kernels, launchers, the PyTorch path, the CUDA ops, ``LowrankEditFunction``,
public API.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _cuda, _triton
from ._activations import IDENTITY, act_code, act_fwd_tl, act_grad_tl, act_grad_torch, act_torch
from ._backend import resolve_backend
from ._rows import acc_dtype, as_rows
from ._triton import cdiv, next_pow2, tl, triton
from ._validate import check_backend_dtype, check_hidden, check_index, check_param

# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _row_source(idx_ptr, m, n_rows, HAS_INDEX: tl.constexpr):
    """For block rows ``m`` (int64): (row of the edited tensor, is a real row, m < n_rows).

    Without an index block row i is row i. With one it is row ``idx[i]``, and -1 padding (or a
    row past the end of the index) is not real: its loads and stores are masked off and it reads
    row 0's address, never a negative offset.
    """
    m_ok = m < n_rows
    if HAS_INDEX:
        src = tl.load(idx_ptr + m, mask=m_ok, other=-1)
        row_ok = src >= 0
        src = tl.where(row_ok, src, 0)
    else:
        row_ok = m_ok
        src = m
    return src, row_ok, m_ok


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
    src, row_ok, m_ok = _row_source(idx_ptr, m, n_rows, HAS_INDEX)
    h_row = src * stride_h_row
    y_row = src * stride_y_row
    k = tl.arange(0, R_PAD)
    k_ok = k < r

    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if HAS_A or HAS_C or TIED:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < d
            x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            wmask = col_ok[:, None] & k_ok[None, :]
            if HAS_A:
                at = tl.load(A_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
                u = tl.dot(x, at, u, input_precision=DOT_PREC)
            if HAS_C:
                ct = tl.load(C_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
                p = tl.dot(x, ct, p, input_precision=DOT_PREC)
            elif TIED:
                ct = tl.load(B_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
                p = tl.dot(x, ct, p, input_precision=DOT_PREC)
    if HAS_a:
        u += tl.load(a_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    z = act_fwd_tl(u, ACT) - p
    if HAS_c:
        z -= tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    lat_ok = row_ok[:, None] & k_ok[None, :]
    z = tl.where(lat_ok, z, 0.0)
    lat_off = m[:, None] * r + k[None, :]
    tl.store(z_ptr + lat_off, z, mask=m_ok[:, None] & k_ok[None, :])
    if SAVE_U:
        tl.store(u_ptr + lat_off, u, mask=m_ok[:, None] & k_ok[None, :])

    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < d
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col, mask=tile_ok, other=0.0)
        if SAVE_H:
            tl.store(hsave_ptr + m[:, None] * d + cols[None, :], x, mask=tile_ok)
        b = tl.load(B_ptr + k[:, None] * d + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        y = x.to(tl.float32) + tl.dot(z, b, input_precision=DOT_PREC)
        tl.store(y_ptr + y_row[:, None] + cols[None, :] * stride_y_col, y.to(y_ptr.dtype.element_ty),
                 mask=tile_ok)


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
    src, row_ok, m_ok = _row_source(idx_ptr, m, n_rows, HAS_INDEX)
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
        gz = tl.dot(g, bt, gz, input_precision=DOT_PREC)
    lat_off = m[:, None] * r + k[None, :]
    lat_mask = m_ok[:, None] & k_ok[None, :]
    tl.store(gz_ptr + lat_off, gz, mask=lat_mask)
    if ACT != 0:
        u = tl.load(u_ptr + lat_off, mask=lat_mask, other=0.0)
        ga = tl.where(row_ok[:, None] & k_ok[None, :], gz * act_grad_tl(u, ACT), 0.0)
        tl.store(ga_ptr + lat_off, ga, mask=lat_mask)


@triton.jit
def _lowrank_edit_bwd_kernel(
    g_ptr, h_ptr, dh_ptr, idx_ptr,
    A_ptr, B_ptr, C_ptr,
    z_ptr, gz_ptr, ga_ptr,
    dA_part_ptr, dB_part_ptr, dC_part_ptr,
    n_rows, d, r, rows_per_prog,
    stride_g_row, stride_g_col, stride_h_row, stride_h_col, stride_dh_row, stride_dh_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_C: tl.constexpr, TIED: tl.constexpr,
    ACT: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Backward pass 2; grid (P, cdiv(d, BLOCK_D)).

    Program (p, j) owns columns block j of rows [p * rows_per_prog, (p+1) * rows_per_prog) and
    computes ``dh = g + ga A - gz C`` there, plus fp32 partial parameter gradients over its rows,
    ``ga^T h``, ``z^T g`` (minus ``gz^T h`` when TIED) and ``gz^T h``, stored to row p of the
    (P, r, d) partial buffers. ``h`` rows are always the dense rows 0..n_rows-1 (the saved copy
    when HAS_INDEX); ``g``/``dh`` rows follow ``idx`` when HAS_INDEX (``dh`` may alias ``g``).
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
        src, row_ok, m_ok = _row_source(idx_ptr, m, n_rows, HAS_INDEX)
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
                dh += tl.dot(ga, a_w, input_precision=DOT_PREC)
            if HAS_C or TIED:
                dh -= tl.dot(gz, c_w, input_precision=DOT_PREC)
            tl.store(dh_ptr + src[:, None] * stride_dh_row + cols[None, :] * stride_dh_col,
                     dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DA:
            acc_a = tl.dot(tl.trans(ga), x, acc_a, input_precision=DOT_PREC)
        if NEED_DC:
            acc_c = tl.dot(tl.trans(gz), x, acc_c, input_precision=DOT_PREC)
        if NEED_DB:
            z = tl.load(z_ptr + lat_off, mask=lat_mask, other=0.0)
            acc_b = tl.dot(tl.trans(z), g, acc_b, input_precision=DOT_PREC)
            if TIED:
                acc_b -= tl.dot(tl.trans(gz), x, input_precision=DOT_PREC)
    part_off = pid_p.to(tl.int64) * r * d + w_off
    if NEED_DA:
        tl.store(dA_part_ptr + part_off, acc_a, mask=wmask)
    if NEED_DB:
        tl.store(dB_part_ptr + part_off, acc_b, mask=wmask)
    if NEED_DC:
        tl.store(dC_part_ptr + part_off, -acc_c, mask=wmask)


# ----------------------------------------------------------------------------- launchers

# GPU tiles (BLOCK_M, BLOCK_D, num_warps) per kernel, activation class and padded rank. Each was
# compiled ahead of time for sm_80 and sm_90a with Triton 3.9 at d = 4096 with the heaviest flags
# (NoReFT's terms, gelu, an index): among the tiles that used no local memory (no register
# spills) on both, the largest with some register headroom, BLOCK_M preferred (each program
# reads the whole weight matrices, so taller tiles amortise them). Larger tiles spilled, e.g. a
# (32, 128) fp32 forward tile at 255 registers. tools/triton_compile_check.py re-checks them all.
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


def _tiles(kind: str, n: int, d: int, r_pad: int, h_dtype: torch.dtype, on_gpu: bool):
    """(BLOCK_M, BLOCK_D, num_warps) for kernel ``kind`` ("fwd", "lat" or "bwd").

    GPU: from ``_GPU_TILES``, shrunk to the problem (BLOCK_M to the rows, BLOCK_D to d, never
    below 16, which ``tl.dot`` needs). Interpreter: big tiles, since every program costs a fixed
    Python overhead there.
    """
    d_pow, n_pow = max(16, next_pow2(d)), max(16, next_pow2(n))
    if not on_gpu:
        return min(64, n_pow), min(d_pow, 128), 4
    block_m, block_d, warps = _GPU_TILES[(kind, h_dtype == torch.float32)][r_pad]
    return min(block_m, n_pow), min(block_d, d_pow), warps


@dataclass(frozen=True)
class _Spec:
    """Non-tensor settings of one call: backend, activation code, ``C is B``."""
    backend: str
    act: int
    tied: bool


def _dummy(*ts):
    return next(t for t in ts if t is not None)


def _rows_addressing(h: torch.Tensor, index: torch.Tensor):
    """How a kernel finds row ``index[i]`` of ``h.reshape(-1, d)`` inside ``h`` itself.

    Returns (idx, stride_row, stride_col) such that the row starts at ``idx[i] * stride_row``
    elements. When the leading dimensions cannot be merged into one stride, ``idx`` becomes a
    table of element offsets (-1 kept for padding) and ``stride_row`` is 1.
    """
    d = h.shape[-1]
    try:
        v = h.view(-1, d)
        return index, v.stride(0), v.stride(1)
    except RuntimeError:
        pass
    pos = torch.unravel_index(index.clamp_min(0), h.shape[:-1])
    offs = sum(p * s for p, s in zip(pos, h.stride()[:-1]))
    return torch.where(index >= 0, offs, -1), 1, h.stride(-1)


def _fwd_triton(h, index, A, a, B, C, c, spec, save_u):
    """Triton forward. index None: out of place on all rows of ``h``, returns (y2, z, u, None).
    index given: edits the listed rows of ``h`` in place, returns (h, z, u, hsave)."""
    d = h.shape[-1]
    r = B.shape[0]
    r_pad = max(16, next_pow2(r))
    dev = h.device
    if index is None:
        x = as_rows(h)
        n = x.shape[0]
        y = torch.empty((n, d), dtype=h.dtype, device=dev)
        idx, s_h, s_hc, s_y, s_yc, hsave = x, x.stride(0), x.stride(1), d, 1, None
        src, dst = x, y
    else:
        n = index.shape[0]
        idx, s_h, s_hc = _rows_addressing(h, index)
        s_y, s_yc = s_h, s_hc
        hsave = torch.empty((n, d), dtype=h.dtype, device=dev)
        src = dst = h
    z = torch.empty((n, r), dtype=torch.float32, device=dev)
    u = torch.empty((n, r), dtype=torch.float32, device=dev) if save_u else None
    if n > 0:
        block_m, block_d, warps = _tiles("fwd", n, d, r_pad, h.dtype, h.is_cuda)
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
    r_pad = max(16, next_pow2(r))
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
    block_m, block_d, warps = _tiles("lat", n, d, r_pad, x.dtype, x.is_cuda)
    _lowrank_edit_bwd_latent_kernel[(cdiv(n, block_m),)](
        g2, idx, B, _dummy(u, gz), gz, _dummy(ga, gz),
        n, d, r, g2.stride(0), g2.stride(1),
        HAS_INDEX=index is not None, ACT=spec.act,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps,
    )
    need_dc = need_dc_w and C is not None
    block_m, block_d, warps = _tiles("bwd", n, d, r_pad, x.dtype, x.is_cuda)
    n_dblocks = cdiv(d, block_d)
    progs, rows_per_prog = _triton.row_split(n, block_m, n_dblocks, dev)
    da_part = torch.empty((progs, r, d), **f32) if need_da_w else None
    db_part = torch.empty((progs, r, d), **f32) if need_db else None
    dc_part = torch.empty((progs, r, d), **f32) if need_dc else None
    _lowrank_edit_bwd_kernel[(progs, n_dblocks)](
        g2, x, _dummy(dh, g2), idx,
        _dummy(A, B), B, _dummy(C, B),
        z, gz, _dummy(ga, gz),
        _dummy(da_part, gz), _dummy(db_part, gz), _dummy(dc_part, gz),
        n, d, r, rows_per_prog,
        g2.stride(0), g2.stride(1), x.stride(0), x.stride(1),
        dh.stride(0) if dh is not None else 0, dh.stride(1) if dh is not None else 0,
        HAS_INDEX=index is not None, HAS_A=A is not None, HAS_C=C is not None, TIED=spec.tied,
        ACT=spec.act, NEED_DH=need_dh, NEED_DA=need_da_w, NEED_DB=need_db, NEED_DC=need_dc,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps,
    )
    ga = ga if has_act else gz
    return (da_part.sum(0) if need_da_w else None,
            ga.sum(0) if need_da_b else None,
            db_part.sum(0) if need_db else None,
            dc_part.sum(0) if need_dc else None,
            -gz.sum(0) if need_dc_b else None)


def _bwd_triton(g, x, index, A, B, C, z, u, spec, need):
    """Triton backward: returns (dh shaped like ``g`` or None, fp32 parameter gradients)."""
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


# ----------------------------------------------------------------------------- PyTorch path

def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _latent_torch(x, A, a, B, C, c, spec):
    """(z, u) for rows ``x`` (n, d), parameters already in ``x``'s dtype."""
    n, r = x.shape[0], B.shape[0]
    if A is not None:
        u = F.linear(x, A, a)
    elif a is not None:
        u = a.expand(n, r)
    else:
        u = x.new_zeros(n, r)
    z = act_torch(u, spec.act)
    cm = B if spec.tied else C
    if cm is not None:
        z = z - F.linear(x, cm, c)
    elif c is not None:
        z = z - c
    return z, u


def _bwd_rows_torch(g, x, z, u, A, B, C, spec, need):
    """Backward on row matrices: (dh, dA, da, dB, dC, dc) in ``x``'s dtype or the accumulation
    dtype for the sums; only ``dh`` is (n, d), built by ``addmm`` straight from ``g``."""
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    acc = acc_dtype(x.dtype)
    gz = g @ B.t()
    ga = gz
    if spec.act != IDENTITY:
        # act'(u) in fp32 and one rounding, as eager autograd does: in fp16/bf16 the derivative's
        # ten-odd separately rounded ops cost 2-6x accuracy in the parameter gradients.
        ga = (gz.to(acc) * act_grad_torch(u.to(acc), spec.act)).to(gz.dtype)
    cm = B if spec.tied else C
    dh = None
    if need_dh:
        dh = g
        if A is not None:
            dh = torch.addmm(dh, ga, A)
        if cm is not None:
            dh = dh.addmm_(gz, cm, alpha=-1) if dh is not g else torch.addmm(g, gz, cm, alpha=-1)
    da_w = ga.t() @ x if need_da_w else None
    da_b = ga.sum(0, dtype=acc) if need_da_b else None
    db = None
    if need_db:
        db = z.t() @ g
        if spec.tied:
            db = db.addmm_(gz.t(), x, alpha=-1)
    dc_w = -(gz.t() @ x) if need_dc_w and C is not None else None
    dc_b = -gz.sum(0, dtype=acc) if need_dc_b else None
    return dh, da_w, da_b, db, dc_w, dc_b


def _selected_rows(t, index):
    """Advanced-indexing selector of the rows ``index`` (-1 dropped) of ``t.reshape(-1, d)``,
    usable on ``_as_2d_plus(t)`` whatever ``t``'s strides."""
    return torch.unravel_index(index[index >= 0], _as_2d_plus(t).shape[:-1])


def _as_2d_plus(t):
    """``t`` with at least two dimensions (a 1-D ``h`` is one row)."""
    return t.unsqueeze(0) if t.dim() == 1 else t


def _fwd_torch(h, index, A, a, B, C, c, spec, save_u):
    """PyTorch forward with ``_fwd_triton``'s contract; ``hsave`` holds only the valid listed rows."""
    A, a, B, C, c = (_cast(t, h.dtype) for t in (A, a, B, C, c))
    if index is None:
        x = as_rows(h)
        z, u = _latent_torch(x, A, a, B, C, c, spec)
        return torch.addmm(x, z, B), z, (u if save_u else None), None
    rows = _selected_rows(h, index)
    hv = _as_2d_plus(h)
    hsave = hv[rows]
    z, u = _latent_torch(hsave, A, a, B, C, c, spec)
    hv.index_put_(rows, torch.addmm(hsave, z, B))
    return h, z, (u if save_u else None), hsave


def _bwd_torch(g, x, index, A, B, C, z, u, spec, need):
    """PyTorch backward with ``_bwd_triton``'s contract."""
    A, B, C = (_cast(t, x.dtype) for t in (A, B, C))
    if index is None:
        out = _bwd_rows_torch(as_rows(g), as_rows(x), z, u, A, B, C, spec, need)
        return (out[0].reshape(g.shape) if need[0] else None), out[1:]
    rows = _selected_rows(g, index)
    out = _bwd_rows_torch(_as_2d_plus(g)[rows], x, z, u, A, B, C, spec, need)
    dh = None
    if need[0]:
        dh = g.clone()
        _as_2d_plus(dh)[rows] = out[0]
    return dh, out[1:]


# ----------------------------------------------------------------------------- CUDA ops

# torch.library ops. CUDA tensors run reft_kernels._C; other devices run the PyTorch path above
# (so the registration and the fake implementations are testable anywhere). Latents (n, r) and
# parameter gradients are in the accumulation dtype (float32; float64 for float64 h); an output
# that was not asked for is an empty tensor. With an index, the (n, r) latents and the (n, d)
# saved rows have one row per index entry, zero (latents) on -1 padding.

_FWD_SCHEMA = "int act, bool tied, bool save_u) -> (Tensor, Tensor, Tensor)"
_PARAMS_SCHEMA = "Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, "


def _latents_fake(n, r, like, save_u):
    acc = acc_dtype(like.dtype)
    return like.new_empty((n, r), dtype=acc), like.new_empty((n, r) if save_u else (0,), dtype=acc)


@torch.library.custom_op("reft_kernels::lowrank_edit_fwd", mutates_args=(),
                         schema="(Tensor h2, " + _PARAMS_SCHEMA + _FWD_SCHEMA)
def _lowrank_edit_fwd_op(h2, A, a, B, C, c, act, tied, save_u):
    """Out of place on the rows of ``h2`` (n, d): returns (y, z, u)."""
    acc = acc_dtype(h2.dtype)
    y, z, u, _ = _fwd_torch(h2, None, A, a, B, C, c, _Spec("torch", act, tied), save_u)
    return y, z.to(acc, copy=True), (u.to(acc, copy=True) if save_u else _cuda.empty(h2, acc))


@_lowrank_edit_fwd_op.register_kernel("cuda")
def _lowrank_edit_fwd_op_cuda(h2, A, a, B, C, c, act, tied, save_u):
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    z, u, _ = _cuda.extension().lowrank_edit_fwd(
        h2, y, None, n, d, h2.stride(0), h2.stride(1), d, 1,
        A, a, B, (B if tied else C), c, act, False, save_u)
    return y, z, u


@_lowrank_edit_fwd_op.register_fake
def _lowrank_edit_fwd_op_fake(h2, A, a, B, C, c, act, tied, save_u):
    return (h2.new_empty(h2.shape), *_latents_fake(h2.shape[0], B.shape[0], h2, save_u))


@torch.library.custom_op("reft_kernels::lowrank_edit_fwd_", mutates_args=("h",),
                         schema="(Tensor(a!) h, Tensor index, " + _PARAMS_SCHEMA + _FWD_SCHEMA)
def _lowrank_edit_fwd_inplace_op(h, index, A, a, B, C, c, act, tied, save_u):
    """Edits rows ``index`` of ``h.reshape(-1, d)`` in place: returns (z, u, hsave)."""
    acc = acc_dtype(h.dtype)
    n, r, d = index.shape[0], B.shape[0], h.shape[-1]
    _, zv, uv, hs = _fwd_torch(h, index, A, a, B, C, c, _Spec("torch", act, tied), save_u)
    valid = index >= 0
    z = h.new_zeros((n, r), dtype=acc)
    z[valid] = zv.to(acc)
    u = _cuda.empty(h, acc)
    if save_u:
        u = h.new_zeros((n, r), dtype=acc)
        u[valid] = uv.to(acc)
    hsave = h.new_zeros((n, d))
    hsave[valid] = hs
    return z, u, hsave


@_lowrank_edit_fwd_inplace_op.register_kernel("cuda")
def _lowrank_edit_fwd_inplace_op_cuda(h, index, A, a, B, C, c, act, tied, save_u):
    d = h.shape[-1]
    idx, s_row, s_col = _rows_addressing(h, index)
    z, u, hsave = _cuda.extension().lowrank_edit_fwd(
        h, h, idx, index.shape[0], d, s_row, s_col, s_row, s_col,
        A, a, B, (B if tied else C), c, act, True, save_u)
    return z, u, hsave


@_lowrank_edit_fwd_inplace_op.register_fake
def _lowrank_edit_fwd_inplace_op_fake(h, index, A, a, B, C, c, act, tied, save_u):
    n = index.shape[0]
    return (*_latents_fake(n, B.shape[0], h, save_u), h.new_empty((n, h.shape[-1])))


@torch.library.custom_op(
    "reft_kernels::lowrank_edit_bwd", mutates_args=(),
    schema="(Tensor g, Tensor x, Tensor? index, Tensor? A, Tensor B, Tensor? C, Tensor z, Tensor? u, int act, "
           "bool tied, bool need_dh, bool need_dA, bool need_da, bool need_dB, bool need_dC, bool need_dc) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _lowrank_edit_bwd_op(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB, need_dC,
                         need_dc):
    """Backward: (dh shaped like g, dA, da, dB, dC, dc). ``x`` (n, d): the input rows (with an
    index, the forward's hsave); z, u (n, r) from the forward."""
    acc = acc_dtype(x.dtype)
    need = (need_dh, need_dA, need_da, need_dB, need_dC, need_dc)
    if index is not None:
        valid = index >= 0
        x, z = x[valid], z[valid]
        u = u[valid] if u is not None else None
    u = u.to(x.dtype) if u is not None and u.numel() else None
    dh, grads = _bwd_torch(g, x, index, A, B, C, z.to(x.dtype), u, _Spec("torch", act, tied), need)
    dh = dh.contiguous().clone() if need_dh else _cuda.empty(g)
    return (dh, *(gr.to(acc, copy=True) if gr is not None else _cuda.empty(g, acc) for gr in grads))


@_lowrank_edit_bwd_op.register_kernel("cuda")
def _lowrank_edit_bwd_op_cuda(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB, need_dC,
                              need_dc):
    n, d = x.shape
    g2 = as_rows(g)  # one index serves g and dh: g needs a single row stride (a copy otherwise)
    dh = None
    if need_dh:
        dh = g2.clone(memory_format=torch.contiguous_format) if index is not None else torch.empty_like(
            g2, memory_format=torch.contiguous_format)
    need_dc_w = need_dC and C is not None
    gz, ga, dA, dB, dC = _cuda.extension().lowrank_edit_bwd(
        g2, dh, index, n, d, g2.stride(0), g2.stride(1), d, 1, x, A, B, (B if tied else C), z,
        (u if act != IDENTITY else None), act, tied, need_dA, need_dB, need_dc_w)
    lat = ga if act != IDENTITY else gz
    empty = _cuda.empty(g, torch.float32)
    return (dh.view(g.shape) if need_dh else _cuda.empty(g), dA, lat.sum(0) if need_da else empty,
            dB, dC if need_dc_w else empty.clone(), gz.sum(0).neg_() if need_dc else empty.clone())


@_lowrank_edit_bwd_op.register_fake
def _lowrank_edit_bwd_op_fake(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB,
                              need_dC, need_dc):
    acc = acc_dtype(x.dtype)
    r, d = B.shape

    def out(need, shape):
        return g.new_empty(shape if need else (0,), dtype=acc)

    return (g.new_empty(g.shape) if need_dh else g.new_empty((0,)), out(need_dA, (r, d)), out(need_da, (r,)),
            out(need_dB, (r, d)), out(need_dC and C is not None, (r, d)), out(need_dc, (r,)))


def _fwd_cuda(h, index, A, a, B, C, c, spec, save_u):
    """CUDA forward with ``_fwd_triton``'s contract."""
    if index is None:
        y, z, u = _lowrank_edit_fwd_op(as_rows(h), A, a, B, C, c, spec.act, spec.tied, save_u)
        return y, z, (u if save_u else None), None
    z, u, hsave = _lowrank_edit_fwd_inplace_op(h, index, A, a, B, C, c, spec.act, spec.tied, save_u)
    return h, z, (u if save_u else None), hsave


def _bwd_cuda(g, x, index, A, B, C, z, u, spec, need):
    """CUDA backward with ``_bwd_triton``'s contract."""
    x2 = as_rows(x) if index is None else x
    dh, *grads = _lowrank_edit_bwd_op(g, x2, index, A, B, C, z, u, spec.act, spec.tied, *need)
    need_grads = (need[1], need[2], need[3], need[4] and C is not None, need[5])
    return (dh if need[0] else None), tuple(_cuda.if_needed(gr, nd) for gr, nd in zip(grads, need_grads))


_FWD = {"triton": _fwd_triton, "cuda": _fwd_cuda, "torch": _fwd_torch}
_BWD = {"triton": _bwd_triton, "cuda": _bwd_cuda, "torch": _bwd_torch}


# ----------------------------------------------------------------------------- autograd

class LowrankEditFunction(torch.autograd.Function):
    """Autograd Function for the low-rank edit.

    ``index`` None: out of place over every row, returns a new tensor. ``index`` given: edits the
    listed rows of ``h`` in place (``ctx.mark_dirty``) and returns ``h``. ``C`` is None when
    ``spec.tied`` (``C is B``): then ``B``'s gradient carries both of its terms.
    """

    @staticmethod
    def forward(ctx, h, A, a, B, C, c, spec, index):
        ctx.spec = spec
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (A, a, B, C, c))
        out, z, u, hsave = _FWD[spec.backend](h, index, A, a, B, C, c, spec, spec.act != IDENTITY)
        if index is not None:
            ctx.mark_dirty(h)
            ctx.save_for_backward(hsave, index, z, u, A, B, C)
            return out
        ctx.save_for_backward(h, None, z, u, A, B, C)
        return out.view(h.shape)

    @staticmethod
    def backward(ctx, g):
        x, index, z, u, A, B, C = ctx.saved_tensors
        # (dh, dA, da, dB, dC, dc); with spec.tied, C is None and dB carries both of B's terms
        need = tuple(ctx.needs_input_grad[:6])
        dh, grads = _BWD[ctx.spec.backend](g, x, index, A, B, C, z, u, ctx.spec, need)
        grads = tuple(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))
        return (dh, *grads, None, None)


# ----------------------------------------------------------------------------- public API

def _prepare(h, B, A, a, C, c, act, index, backend, inplace):
    d = check_hidden(h)
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"B must be a torch.Tensor of shape (r, d), got {type(B).__name__}")
    if B.dim() != 2 or B.shape[0] < 1 or B.shape[1] != d:
        raise ValueError(
            f"B must have shape (r, d) with r >= 1 and d = {d} (h has shape {tuple(h.shape)}), "
            f"got {tuple(B.shape)}"
        )
    r = B.shape[0]
    check_param(B, "B", (r, d), h, optional=False)
    check_param(A, "A", (r, d), h, optional=True)
    check_param(C, "C", (r, d), h, optional=True)
    check_param(a, "a", (r,), h, optional=True)
    check_param(c, "c", (r,), h, optional=True)
    code = act_code(act)
    tied = C is not None and C is B
    reason = cuda_reason = None
    if r > triton_max_rank(h.dtype):
        reason = f"the Triton kernels take ranks up to {triton_max_rank(h.dtype)} for {h.dtype} h, got r = {r}"
    if r > _cuda.CUDA_MAX_RANK:
        cuda_reason = f"the CUDA kernels take ranks up to {_cuda.CUDA_MAX_RANK}, got r = {r}"
    be = resolve_backend(backend, h.device, triton_unsupported=reason, cuda_unsupported=cuda_reason)
    check_backend_dtype(be, h)
    n_rows = h.numel() // d
    if index is not None:
        index = check_index(index, n_rows, h)
    elif inplace:
        index = torch.arange(n_rows, device=h.device)
    if be == "triton":
        A, a, B, C, c = (t.contiguous() if t is not None else None for t in (A, a, B, C, c))
    elif be == "cuda":
        A, a, B, C, c = _cuda.kernel_params(h.dtype, A, a, B, (None if tied else C), c)
    return _Spec(be, code, tied), A, a, B, (None if tied else C), c, index


def lowrank_edit(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None, backend=None):
    """Low-rank edit ``y = h + (act(h A^T + a) - h C^T - c) B``, out of place.

    Args:
        h: (..., d) activations, float16 / bfloat16 / float32 (float64 with backend="torch").
        B: (r, d), required. A, C: (r, d) or None. a, c: (r,) or None. Any r >= 1 and any d;
            parameters may be in a different floating dtype than ``h``. Pass the same tensor as
            ``C`` and ``B`` (LoReFT, NoReFT, ConsReFT) to have it read once.
        act: None (identity) or an activation name (``reft_kernels.ACTIVATION_NAMES``).
        index: optional 1-D int64 tensor of row numbers into ``h.reshape(-1, d)``; only those rows
            are edited, -1 entries are skipped, a row may be listed once (duplicates raise
            ValueError). The result equals ``h.clone()`` followed by ``lowrank_edit_`` on it.
        backend: None (default dispatch), "triton", "cuda" or "torch" (see ``reft_kernels._backend``).

    Returns ``y`` with ``h``'s shape and dtype; gradients flow to ``h`` and every parameter, each
    in its own dtype.
    """
    spec, A, a, B, C, c, index = _prepare(h, B, A, a, C, c, act, index, backend, inplace=False)
    if index is not None:
        h = h.clone(memory_format=torch.contiguous_format)
    return LowrankEditFunction.apply(h, A, a, B, C, c, spec, index)


def lowrank_edit_(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None, backend=None):
    """In-place ``lowrank_edit``: edits the rows of ``h`` listed by ``index`` (all rows when None)
    and returns ``h``. Forward time and memory scale with ``len(index)``: it reads and writes only
    the listed rows and saves a copy of them (n, d) plus the (n, r) latent for the backward. The
    backward's gradient for ``h`` is the incoming gradient with the listed rows updated, one
    (N, d) copy. ``h`` must not be a leaf that requires grad (autograd forbids in-place edits of
    those); views are fine."""
    spec, A, a, B, C, c, index = _prepare(h, B, A, a, C, c, act, index, backend, inplace=True)
    return LowrankEditFunction.apply(h, A, a, B, C, c, spec, index)
