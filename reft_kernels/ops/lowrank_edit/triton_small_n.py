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

Selection (``plan.fwd_variant`` / ``bwd_variant``, variant ``split-d``): the rule takes it on a
GPU when the row-block grid would fill fewer than half the SMs; ``reft_kernels.kernels(lowrank_fwd=
"split-d", lowrank_bwd="split-d")`` forces it, ``"rowblock"`` keeps the row-block kernels. Tiles
and grids: ``plan.split_d_shape``. Not yet measured on a GPU.
"""
from __future__ import annotations

import torch

from ... import _triton
from ..._activations import IDENTITY, act_grad_torch
from ..._triton import tl, triton
from .plan import padded_rank
from .triton_common import apply_step, latent_finish, latent_step, row_source


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


def fwd_split(launches, p):
    """Launch both kernels: ``launches`` from ``plan.fwd_launches`` (the partial kernel, then the
    apply kernel), ``p`` a ``contract.FwdParams`` as ``triton_impl.fwd`` prepares it."""
    part, apply = launches
    n_rb, s_count = part.grid
    A, a, B, C, c = p.params
    s_h, s_hc, s_y, s_yc = p.strides
    has_cp = C is not None or p.spec.tied
    f32 = dict(dtype=torch.float32, device=p.z.device)
    up = torch.empty((s_count, p.n, p.r), **f32) if A is not None else None
    pp = torch.empty((s_count, p.n, p.r), **f32) if has_cp else None
    dummy = p.z
    prec = _triton.dot_precision(p.src.dtype)
    cols_per_prog = part.cols
    _lowrank_latent_part_kernel[part.grid](
        p.src, p.idx, A if A is not None else B, C if C is not None else B,
        up if up is not None else dummy, pp if pp is not None else dummy,
        p.n, p.d, p.r, cols_per_prog, s_h, s_hc,
        HAS_INDEX=p.indexed, HAS_A=A is not None, HAS_CP=has_cp,
        R_PAD=padded_rank(p.r), BLOCK_M=part.block_m, BLOCK_D=part.block_d, DOT_PREC=prec, num_warps=part.warps,
    )
    _lowrank_apply_kernel[apply.grid](
        p.src, p.dst, p.hsave if p.hsave is not None else dummy, p.idx,
        a if a is not None else B, B, c if c is not None else B,
        up if up is not None else dummy, pp if pp is not None else dummy, p.z, p.u if p.u is not None else dummy,
        p.n, p.d, p.r, s_count, s_h, s_hc, s_y, s_yc,
        HAS_INDEX=p.indexed, HAS_A=A is not None, HAS_a=a is not None, HAS_CP=has_cp,
        HAS_c=c is not None, ACT=p.spec.act, SAVE_H=p.hsave is not None, SAVE_U=p.u is not None,
        R_PAD=padded_rank(p.r), BLOCK_M=apply.block_m, BLOCK_D=apply.block_d, DOT_PREC=prec, num_warps=apply.warps,
    )


def bwd_latent_split(launch, g2, idx, index_given, B, u, spec):
    """The backward's latent for few rows: ``gz = g B^T`` from the partial kernel (column ranges
    of ``g`` times ``B^T``; ``launch`` from ``plan.bwd_launches``) summed over the ranges in a
    fixed order, and ``ga = gz * act'(u)`` (zero on padding rows, whose ``u`` is unspecified).
    Returns fp32 (gz, ga or None), (n, r)."""
    n, d, r = idx.shape[0] if index_given else g2.shape[0], g2.shape[1], B.shape[0]
    block_m, block_d, warps = launch.block_m, launch.block_d, launch.warps
    s_count = launch.grid[1]
    cols_per_prog = launch.cols
    r_pad = padded_rank(r)
    pp = torch.empty((s_count, n, r), dtype=torch.float32, device=g2.device)
    _lowrank_latent_part_kernel[launch.grid](
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
