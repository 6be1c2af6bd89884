"""Triton forward kernels of the multi-adapter ops (``backend="triton"``) and their launchers. The
backward of both ops runs ``torch_impl``'s PyTorch math on the same device (matmuls against a
block mask or a one-hot matrix: deterministic, no atomics); a backward kernel is future work.

Each row block loads its rows' adapter ids and gathers, by id, the parameters it needs: RED's
(BLOCK_M, BLOCK_D) scale and bias tiles, the low-rank edit's (BLOCK_M, R_PAD, BLOCK_D) tiles of
A, C and B (row i reads adapter ids[i]'s slice). The per-row dots are fp32 multiply-and-sum over
the tile (no ``tl.dot``: the matrix differs from row to row), the latent stays in registers
between the two passes over ``h`` and is saved in fp32, ``y`` is rounded once. Offsets are int64,
every ragged edge (rows, columns, ranks past r, rows with id -1 or index -1) is masked, and
nothing synchronises with the host.

Tiles are fixed by ``tiles``; no GPU has timed them yet.
"""
from __future__ import annotations

import torch

from ..._activations import act_fwd_tl
from ..._device import next_pow2
from ..._triton import tl, triton
from ..lowrank_edit.triton_common import row_source
from ..lowrank_edit.triton_impl import fwd_addressing

# ----------------------------------------------------------------------------- RED


@triton.jit
def _red_multi_fwd_kernel(
    h_ptr, ids_ptr, s_ptr, t_ptr, y_ptr,
    n_rows, d,
    stride_h_row, stride_h_col, stride_y_row,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_D) tile of ``y = h * s[id] + t[id]`` (``y = h`` where id is -1), fp32
    FMA, one rounding; grid (cdiv(N, BLOCK_M), cdiv(d, BLOCK_D))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    kid = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    edit = (kid >= 0)[:, None] & mask
    w_off = tl.where(kid >= 0, kid, 0).to(tl.int64)[:, None] * d + cols[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :] * stride_h_col, mask=mask, other=0.0)
    y = h.to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + w_off, mask=edit, other=1.0).to(tl.float32)
        if HAS_BIAS:
            t = tl.load(t_ptr + w_off, mask=edit, other=0.0).to(tl.float32)
            y = tl.fma(y, s, t)
        else:
            y = y * s
    elif HAS_BIAS:
        y = y + tl.load(t_ptr + w_off, mask=edit, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def red_tiles(d: int) -> tuple:
    """(BLOCK_M, BLOCK_D, warps) of the RED kernel: 16 rows of up to 128 columns, 4 warps (not
    yet timed on a GPU; compiled ahead of time by ``tools/triton_compile_check.py``)."""
    return 16, min(128, max(16, next_pow2(d))), 4


def red_fwd(h2, scale, bias, ids):
    """(N, d) rows -> y (N, d) in h2's dtype; ``scale`` / ``bias`` contiguous (K, d) or None."""
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    if n == 0:
        return y
    block_m, block_d, warps = red_tiles(d)
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
    _red_multi_fwd_kernel[grid](
        h2, ids, scale if scale is not None else h2, bias if bias is not None else h2, y,
        n, d, h2.stride(0), h2.stride(1), y.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=warps,
    )
    return y


# ----------------------------------------------------------------------------- low-rank edit


@triton.jit
def _gathered_dot(x, w_ptr, w_off, w_mask):
    """(BLOCK_M, R_PAD): ``sum_d x[m, d] * W[id_m, j, d]`` for one column block, fp32; ``w_off``
    (BLOCK_M, R_PAD, BLOCK_D) element offsets of each row's adapter slice."""
    w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
    return tl.sum(x[:, None, :] * w, axis=2)


@triton.jit
def _lowrank_multi_fwd_kernel(
    h_ptr, y_ptr, hsave_ptr, idx_ptr, ids_ptr,
    A_ptr, a_ptr, B_ptr, C_ptr, c_ptr,
    z_ptr, u_ptr,
    n_rows, d, r,
    stride_h_row, stride_h_col, stride_y_row, stride_y_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_a: tl.constexpr, HAS_C: tl.constexpr,
    TIED: tl.constexpr, HAS_c: tl.constexpr, ACT: tl.constexpr,
    SAVE_H: tl.constexpr, SAVE_U: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward for BLOCK_M rows (or index entries), each with its own adapter; grid
    (cdiv(n_rows, BLOCK_M),).

    Pass 1 streams the rows once and builds the fp32 latent (BLOCK_M, R_PAD) from each row's
    gathered A and C (B when TIED) slices; pass 2 streams them again and writes ``y = h + z B``
    with each row's B slice. ``z`` (and ``u`` with SAVE_U) are stored as (n_rows, r) fp32, zero
    on rows with id -1 or index -1 (which are copied unchanged, or skipped with an index). With
    HAS_INDEX, block row i is row ``idx[i]`` of ``h``; ``y`` may alias ``h`` (each element is read
    before it is written, by the same program), and SAVE_H copies the original rows to ``hsave``
    (zeros for padding entries: finite rows for the backward, which masks them).
    """
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
    kid = tl.load(ids_ptr + m, mask=m_ok, other=-1)
    edit = row_ok & (kid >= 0)
    slab = tl.where(edit, kid, 0).to(tl.int64) * r  # first parameter row of each row's adapter
    h_row = src * stride_h_row
    y_row = src * stride_y_row
    j = tl.arange(0, R_PAD)
    j_ok = j < r
    lat_ok = edit[:, None] & j_ok[None, :]
    w_row = (slab[:, None] + j[None, :]) * d  # (BLOCK_M, R_PAD) int64

    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if HAS_A or HAS_C or TIED:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < d
            x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col,
                        mask=edit[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            w_off = w_row[:, :, None] + cols[None, None, :]
            w_mask = lat_ok[:, :, None] & col_ok[None, None, :]
            if HAS_A:
                u += _gathered_dot(x, A_ptr, w_off, w_mask)
            if HAS_C:
                p += _gathered_dot(x, C_ptr, w_off, w_mask)
            elif TIED:
                p += _gathered_dot(x, B_ptr, w_off, w_mask)
    vec_off = slab[:, None] + j[None, :]
    if HAS_a:
        u += tl.load(a_ptr + vec_off, mask=lat_ok, other=0.0).to(tl.float32)
    z = act_fwd_tl(u, ACT) - p
    if HAS_c:
        z -= tl.load(c_ptr + vec_off, mask=lat_ok, other=0.0).to(tl.float32)
    z = tl.where(lat_ok, z, 0.0)
    lat_off = m[:, None] * r + j[None, :]
    tl.store(z_ptr + lat_off, z, mask=m_ok[:, None] & j_ok[None, :])
    if SAVE_U:
        tl.store(u_ptr + lat_off, tl.where(lat_ok, u, 0.0), mask=m_ok[:, None] & j_ok[None, :])

    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < d
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col, mask=tile_ok, other=0.0)
        if SAVE_H:  # padding entries' rows are stored as zeros (the backward reads them)
            tl.store(hsave_ptr + m[:, None] * d + cols[None, :], x, mask=m_ok[:, None] & col_ok[None, :])
        b = tl.load(B_ptr + w_row[:, :, None] + cols[None, None, :],
                    mask=lat_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        y = x.to(tl.float32) + tl.sum(z[:, :, None] * b, axis=1)
        tl.store(y_ptr + y_row[:, None] + cols[None, :] * stride_y_col, y.to(y_ptr.dtype.element_ty), mask=tile_ok)


TILE_ELEMS = 4096


def tiles(r: int, d: int) -> tuple:
    """(R_PAD, BLOCK_M, BLOCK_D, warps) of the low-rank kernel: the (BLOCK_M, R_PAD, BLOCK_D)
    parameter tile holds ``TILE_ELEMS`` elements or fewer (32 per thread of 4 warps), up to 16
    rows and 16 to 128 columns. Compiled ahead of time for sm_80 and sm_90a (Triton 3.9), 8192
    elements spilled at R_PAD = 128 (about 600 bytes) and with an index at R_PAD = 4 and 8. These
    tiles are in ``tools/triton_compile_check.py`` (every method's terms, with and without an
    index, d = 4096, its ranks): with ``--quick``, at most 144 registers and no spill with Triton
    3.6, at most 168 registers and an 8-byte stack (fp32, R_PAD = 64, sm_80) with Triton 3.9. Not
    yet timed on a GPU."""
    r_pad = next_pow2(r)
    block_m = max(1, min(16, TILE_ELEMS // (r_pad * 16)))
    block_d = max(16, min(next_pow2(d), TILE_ELEMS // (block_m * r_pad), 128))
    return r_pad, block_m, block_d, 4


def fwd(h, index, ids, A, a, B, C, c, spec, save_u):
    """Forward; ``torch_impl.fwd``'s contract (``ops/lowrank_edit/contract.py`` with one adapter
    id per row or index entry). Parameters contiguous, ``C`` None when ``spec.tied``."""
    d = h.shape[-1]
    r = B.shape[1]
    dev = h.device
    n, idx, strides, hsave, src, dst = fwd_addressing(h, index)
    z = torch.zeros((n, r), dtype=torch.float32, device=dev)
    u = torch.zeros((n, r), dtype=torch.float32, device=dev) if save_u else None
    if n > 0 and h.numel() > 0:
        r_pad, block_m, block_d, warps = tiles(r, d)
        dummy = B
        _lowrank_multi_fwd_kernel[(triton.cdiv(n, block_m),)](
            src, dst, hsave if hsave is not None else z, idx, ids,
            A if A is not None else dummy, a if a is not None else dummy, B,
            C if C is not None else dummy, c if c is not None else dummy,
            z, u if u is not None else z, n, d, r, *strides,
            HAS_INDEX=index is not None, HAS_A=A is not None, HAS_a=a is not None,
            HAS_C=C is not None, TIED=spec.tied, HAS_c=c is not None, ACT=spec.act,
            SAVE_H=hsave is not None, SAVE_U=u is not None,
            R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )
    elif hsave is not None:
        hsave.zero_()
    return dst, z, u, hsave
