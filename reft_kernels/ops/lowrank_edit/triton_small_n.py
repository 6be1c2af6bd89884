"""The low-rank forward for few rows (the f7+l7 regime): ``d`` split across programs.

Why: the one-pass forward (``triton_impl._lowrank_edit_fwd_kernel``) gives each program a block
of rows and loops over all of ``d``, so 448 indexed rows (f7+l7 of a 32 x 512 batch) make 7
programs on a 132-SM GPU, each streaming 64 rows x d through one SM (tools/design_table.py). Here
two launches cover a (row blocks x column ranges) grid instead:

1. ``_lowrank_latent_part_kernel``, grid (row blocks, S): program (i, s) multiplies its rows'
   columns of range s by ``A^T`` and ``C^T`` (or the tied ``B^T``) into fp32 partials
   ``up[s]``, ``pp[s]`` of shape (S, n, r);
2. ``_lowrank_apply_kernel``, grid (row blocks, column blocks): program (i, j) sums the S
   partials of its rows in the fixed order s = 0..S-1 (deterministic, no atomics), forms
   ``z = act(u + a) - p - c`` and writes ``y = h + z B`` for its columns; the programs of column
   block 0 store ``z`` (and ``u``) for the backward.

Same contract and numerics as the one-pass kernel (``contract.py``; fp32 accumulation, ``y``
rounded once), a different summation order over ``d``. Extra traffic: the (S, n, r) fp32 partials,
written once and read once per column block: small beside (n, d) when r << d.

The backward's latent ``gz = g B^T`` (``bwd_latent_split``) takes the same split for few rows:
the partial kernel on ``g`` with ``B``, a fixed-order sum over the ranges, then ``ga = gz *
act'(u)`` with PyTorch ops on the small (n, r) latent.

Selection (``use_split``): on a GPU when the one-pass grid would fill fewer than half the SMs;
``REFT_KERNELS_SMALL_N=one-pass`` keeps the one-pass kernel everywhere (the previous behaviour,
kept selectable until a GPU has measured both), ``=split`` forces this path (benchmarks, tests).
Not yet measured on a GPU.
"""
from __future__ import annotations

import os

import torch

from ... import _triton
from ..._activations import IDENTITY, act_grad_torch
from ..._triton import cdiv, next_pow2, tl, triton
from .triton_common import (
    STRIDED_TILE, apply_step, latent_finish, latent_step, padded_rank, row_source, strided,
)

ENV_VAR = "REFT_KERNELS_SMALL_N"
MODES = ("auto", "one-pass", "split")


@triton.jit
def _lowrank_latent_part_kernel(
    h_ptr, idx_ptr, A_ptr, C_ptr, up_ptr, pp_ptr,
    n_rows, d, r, cols_per_prog,
    stride_h_row, stride_h_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_CP: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial latents over one column range; grid (cdiv(n_rows, BLOCK_M), S). ``C_ptr`` is C, or
    B when tied; ``up``/``pp`` are (S, n_rows, r) fp32, row s written by programs (*, s)."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.program_id(1).to(tl.int64)
    src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
    h_row = src * stride_h_row
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    c0 = s * cols_per_prog
    for dd in range(0, cols_per_prog, BLOCK_D):
        cols = c0 + dd + tl.arange(0, BLOCK_D).to(tl.int64)
        u, p = latent_step(h_ptr, h_row, row_ok, cols, stride_h_col, d, k, k_ok, A_ptr, C_ptr, C_ptr, u, p,
                           HAS_A, HAS_CP, False, DOT_PREC)
    off = s * n_rows * r + m[:, None] * r + k[None, :]
    lat_mask = m_ok[:, None] & k_ok[None, :]
    if HAS_A:
        tl.store(up_ptr + off, u, mask=lat_mask)
    if HAS_CP:
        tl.store(pp_ptr + off, p, mask=lat_mask)


@triton.jit
def _lowrank_apply_kernel(
    h_ptr, y_ptr, hsave_ptr, idx_ptr,
    a_ptr, B_ptr, c_ptr, up_ptr, pp_ptr, z_ptr, u_ptr,
    n_rows, d, r, n_splits,
    stride_h_row, stride_h_col, stride_y_row, stride_y_col,
    HAS_INDEX: tl.constexpr, HAS_A: tl.constexpr, HAS_a: tl.constexpr, HAS_CP: tl.constexpr,
    HAS_c: tl.constexpr, ACT: tl.constexpr, SAVE_H: tl.constexpr, SAVE_U: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Finish the latent and write one (BLOCK_M, BLOCK_D) tile of ``y = h + z B``; grid
    (cdiv(n_rows, BLOCK_M), cdiv(d, BLOCK_D)). With HAS_INDEX, ``y`` may alias ``h`` (each element
    is read before it is written, by the same program; every read of ``h`` by the partial kernel
    finished before this launch) and SAVE_H copies the original rows to the dense ``hsave``."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1)
    src, row_ok, m_ok = row_source(idx_ptr, m, n_rows, HAS_INDEX)
    k = tl.arange(0, R_PAD)
    k_ok = k < r
    lat = m[:, None] * r + k[None, :]
    lat_mask = m_ok[:, None] & k_ok[None, :]
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # tl.cast, not n_rows.to(): Triton's launcher turns an integer argument equal to 1 into a
    # compile-time constant (a Python int, which has no .to), so a one-row launch failed to
    # compile on a GPU; tl.cast takes a tensor or a constant (tools/triton_compile_check.py
    # compiles every kernel with each integer argument at 1)
    plane = tl.cast(n_rows, tl.int64) * r
    for s in range(0, n_splits):  # fixed order: bitwise reproducible
        off = s * plane + lat
        if HAS_A:
            u += tl.load(up_ptr + off, mask=lat_mask, other=0.0)
        if HAS_CP:
            p += tl.load(pp_ptr + off, mask=lat_mask, other=0.0)
    u, z = latent_finish(u, p, a_ptr, c_ptr, row_ok, k, k_ok, ACT, HAS_a, HAS_c, False)
    if j == 0:
        tl.store(z_ptr + lat, z, mask=lat_mask)
        if SAVE_U:
            tl.store(u_ptr + lat, u, mask=lat_mask)
    cols = j.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    apply_step(h_ptr, src * stride_h_row, y_ptr, src * stride_y_row, hsave_ptr, m, row_ok, cols, stride_h_col,
               stride_y_col, d, k, k_ok, B_ptr, z, SAVE_H, DOT_PREC)


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {value!r}")
    return value


def use_split(n: int, one_pass_block_m: int, device: torch.device) -> bool:
    """Whether the forward of ``n`` rows takes this path (see the module docstring)."""
    m = mode()
    if m != "auto":
        return m == "split"
    if device.type != "cuda":
        return False  # the interpreter runs programs one by one: more programs only cost time
    return 2 * cdiv(n, one_pass_block_m) < _triton.target_programs(device) // 4


# GPU tiles (BLOCK_M, BLOCK_D, warps) by (fp32 activations?, padded rank), shared by both kernels:
# compiled ahead of time for sm_80 and sm_90a at d = 4096 with the heaviest flags, the largest row
# block without register spills (tools/triton_compile_check.py, Triton 3.6 and 3.9; e.g. (64, 64)
# with 4 warps spilled at R_PAD = 64 and above, and for fp32 activations already at R_PAD = 16).
# fp32 R_PAD = 32 (first compiled when the check took a rank of 17-32): (32, 64) spilled 32 bytes
# in the latent kernel on sm_90 with Triton 3.9 (40 with 3.6 at integer arguments 1); (32, 32):
# latent 172/190 registers (sm_80/sm_90) with 3.9, 248/174 with 3.6, apply 119, no stack.
_GPU_TILES = {
    True: {16: (64, 64, 8), 32: (32, 32, 8), 64: (16, 64, 8)},
    False: {16: (64, 64, 4), 32: (64, 64, 8), 64: (32, 64, 8), 128: (16, 64, 8)},
}


def tiles(n: int, d: int, r_pad: int, h_dtype: torch.dtype, on_gpu: bool, strided_cols: bool = False):
    """(BLOCK_M, BLOCK_D, warps) of both kernels: ``_GPU_TILES`` (``triton_common.STRIDED_TILE`` when
    a column stride is not 1) shrunk to the rows and to d on a GPU, wide tiles through the
    interpreter (each program costs a fixed Python overhead there)."""
    n_pow = max(16, next_pow2(n))
    if not on_gpu:
        return min(64, n_pow), min(128, max(16, next_pow2(d))), 4
    block_m, block_d, warps = STRIDED_TILE if strided_cols else _GPU_TILES[h_dtype == torch.float32][r_pad]
    # BLOCK_D shrunk to d as the other launchers do (d = 1 with the bf16 R_PAD = 128 tile of 64
    # columns compiled the latent kernel to 255 registers and a 16-24 byte stack on sm_90 with
    # Triton 3.9; at 16 columns it fits)
    return min(block_m, n_pow), min(block_d, max(16, next_pow2(d))), warps


def splits(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """Column ranges S: enough programs for about two per SM (two on the interpreter)."""
    target = 2 * _triton.target_programs(device) // 4 if device.type == "cuda" else 2
    return max(1, min(n_col_blocks, cdiv(target, n_row_blocks)))


def _plan(n, d, r_pad, h_dtype, device, strided_cols=False):
    """(BLOCK_M, BLOCK_D, warps, row blocks, column blocks, S, columns per range) of one launch
    pair: S column ranges, each a whole number of column blocks."""
    block_m, block_d, warps = tiles(n, d, r_pad, h_dtype, device.type == "cuda", strided_cols)
    n_rb, n_cb = cdiv(n, block_m), cdiv(d, block_d)
    cols_per_prog = cdiv(n_cb, splits(n_rb, n_cb, device)) * block_d
    return block_m, block_d, warps, n_rb, n_cb, cdiv(d, cols_per_prog), cols_per_prog


def fwd_split(src, dst, hsave, idx, index_given, n, d, r, s_h, s_hc, s_y, s_yc, A, a, B, C, c, spec, z, u):
    """Launch both kernels; arguments as prepared by ``triton_impl.fwd``."""
    dev = z.device
    r_pad = padded_rank(r)
    block_m, block_d, warps, n_rb, n_cb, s_count, cols_per_prog = _plan(n, d, r_pad, src.dtype, dev,
                                                                        strided(s_hc, s_yc))
    has_cp = C is not None or spec.tied
    f32 = dict(dtype=torch.float32, device=dev)
    up = torch.empty((s_count, n, r), **f32) if A is not None else None
    pp = torch.empty((s_count, n, r), **f32) if has_cp else None
    dummy = z
    prec = _triton.dot_precision(src.dtype)
    _lowrank_latent_part_kernel[(n_rb, s_count)](
        src, idx, A if A is not None else B, C if C is not None else B,
        up if up is not None else dummy, pp if pp is not None else dummy,
        n, d, r, cols_per_prog, s_h, s_hc,
        HAS_INDEX=index_given, HAS_A=A is not None, HAS_CP=has_cp,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps,
    )
    _lowrank_apply_kernel[(n_rb, n_cb)](
        src, dst, hsave if hsave is not None else dummy, idx,
        a if a is not None else B, B, c if c is not None else B,
        up if up is not None else dummy, pp if pp is not None else dummy, z, u if u is not None else dummy,
        n, d, r, s_count, s_h, s_hc, s_y, s_yc,
        HAS_INDEX=index_given, HAS_A=A is not None, HAS_a=a is not None, HAS_CP=has_cp,
        HAS_c=c is not None, ACT=spec.act, SAVE_H=hsave is not None, SAVE_U=u is not None,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, num_warps=warps,
    )


def bwd_latent_split(g2, idx, index_given, B, u, spec, n, d, r):
    """The backward's latent for few rows: ``gz = g B^T`` from the partial kernel (column ranges
    of ``g`` times ``B^T``) summed over the ranges in a fixed order, and ``ga = gz * act'(u)``
    (zero on padding rows, whose ``u`` is unspecified). Returns fp32 (gz, ga or None), (n, r)."""
    dev = g2.device
    r_pad = padded_rank(r)
    block_m, block_d, warps, n_rb, _, s_count, cols_per_prog = _plan(n, d, r_pad, g2.dtype, dev,
                                                                     strided(g2.stride(1)))
    pp = torch.empty((s_count, n, r), dtype=torch.float32, device=dev)
    _lowrank_latent_part_kernel[(n_rb, s_count)](
        g2, idx, B, B, pp, pp, n, d, r, cols_per_prog, g2.stride(0), g2.stride(1),
        HAS_INDEX=index_given, HAS_A=False, HAS_CP=True,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=_triton.dot_precision(g2.dtype), num_warps=warps,
    )
    gz = pp.sum(0)  # padding rows: their loads were masked, so their gz is 0
    if spec.act == IDENTITY:
        return gz, None
    ga = gz * act_grad_torch(u, spec.act)
    if index_given:
        ga = torch.where((idx >= 0)[:, None], ga, 0.0)
    return gz, ga
