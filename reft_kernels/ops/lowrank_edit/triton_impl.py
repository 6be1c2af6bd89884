"""Triton kernels of the low-rank edit (``backend="triton"``) and their launchers, following the
contract of ``contract.py``.

Numerics: operands are loaded as fp32, every ``tl.dot`` accumulates in fp32 (3xTF32 products for
fp32 activations, TF32 for fp16/bf16, see ``_triton.dot_precision``), the (rows, r) latent stays
in registers between the two passes over ``h`` and is saved in fp32 for the backward, and ``y``
is rounded once to ``h``'s dtype. Parameter gradients are reduced deterministically: fp32
partials per program over a fixed row range, then one fixed-order sum over the programs in one
launch (``ops/finish.py``; no atomics, no torch reductions).

Memory: the forward saves ``h`` by reference (out of place) or a copy of the listed rows only
(in place), plus the (rows, r) latent; the backward allocates ``dh`` and one (P, width) fp32
partial buffer (width = r x d per needed weight gradient + r per needed bias), P = one wave of
the compiled kernel's resident blocks / number of column blocks on a GPU, never another (N, d)
temporary.

Forward kernels, one per variant of ``plan.fwd_variant``: ``_lowrank_edit_fwd_kernel`` below
(``rowblock``: 64-row blocks, two passes over ``h``), ``triton_small_n`` (``split-d``: d split
across programs for few rows) and ``triton_fwd_resident`` (``resident``: L2-resident persistent
one pass, opt-in), all three built from the jit steps of ``triton_common``. Every tile and grid
comes from ``plan.py`` (``reft-kernels plan`` prints them).
"""
from __future__ import annotations

import torch

from ... import _triton
from ..._activations import IDENTITY, act_grad_tl
from ..._device import plan_limits
from ..._rows import as_rows, rows_addressing
from ..._triton import gpu_dot, tl, triton
from .. import variants
from ..finish import finish
from . import plan as P
from . import triton_fwd_resident, triton_small_n
from .contract import FwdParams
from .triton_common import apply_step, latent_finish, latent_step, row_source

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
    one fixed-order sum over P (``ops/finish.py``) finishes every parameter
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


# ----------------------------------------------------------------------------- launchers


def _dummy(*ts):
    return next(t for t in ts if t is not None)


def _call(n, d, r, dtype, index, A, a, C, c, spec, col_strides) -> P.Call:
    return P.Call(n, d, r, dtype, index is not None, P.strided(*col_strides), A is not None, a is not None,
                  C is not None, spec.tied, c is not None, spec.act)


def fwd_addressing(h, index):
    """What a forward launch reads and writes: (n rows, ``idx`` the rows' index (any tensor
    without one), strides (s_h, s_hc, s_y, s_yc), ``hsave`` (n, d) for the edited rows' copy or
    None, ``src``, ``dst``). Without ``index`` the rows of ``h`` go to a new (N, d) ``dst``;
    with it the listed rows of ``h`` are edited in place (``dst is src is h``)."""
    d = h.shape[-1]
    if index is None:
        x = as_rows(h)
        n = x.shape[0]
        y = torch.empty((n, d), dtype=h.dtype, device=h.device)
        return n, x, (x.stride(0), x.stride(1), d, 1), None, x, y
    n = index.shape[0]
    idx, s_h, s_hc = rows_addressing(h, index)
    return n, idx, (s_h, s_hc, s_h, s_hc), torch.empty((n, d), dtype=h.dtype, device=h.device), h, h


def fwd(h, index, A, a, B, C, c, spec, save_u):
    """Forward; see ``contract.py``. ``hsave`` rows of -1 entries are left unwritten. The kernel
    and its tiles: ``plan.fwd_variant`` and ``plan.fwd_launches``."""
    d = h.shape[-1]
    r = B.shape[0]
    dev = h.device
    n, idx, strides, hsave, src, dst = fwd_addressing(h, index)
    z = torch.empty((n, r), dtype=torch.float32, device=dev)
    u = torch.empty((n, r), dtype=torch.float32, device=dev) if save_u else None
    if n > 0:
        limits = plan_limits(dev)
        call = _call(n, d, r, h.dtype, index, A, a, C, c, spec, strides[1::2])
        p = FwdParams(src, dst, hsave, idx, index is not None, n, d, r, strides, (A, a, B, C, c), spec, z, u)
        variant, _ = P.fwd_variant(call, limits, variants.active().lowrank_fwd)
        if variant == "split-d":
            triton_small_n.fwd_split(P.fwd_launches(call, variant, limits), p)
        elif variant == "resident":
            triton_fwd_resident.launch(call, limits, p)
        else:
            _launch_rowblock_fwd(P.fwd_launches(call, variant, limits)[0], p)
    return dst, z, u, hsave


def _launch_rowblock_fwd(launch, p):
    """``_lowrank_edit_fwd_kernel`` with ``launch``'s grid and tile over ``p`` (``FwdParams``)."""
    A, a, B, C, c = p.params
    _lowrank_edit_fwd_kernel[launch.grid](
        p.src, p.dst, _dummy(p.hsave, p.z), p.idx,
        _dummy(A, B), _dummy(a, B), B, _dummy(C, B), _dummy(c, B),
        p.z, _dummy(p.u, p.z), p.n, p.d, p.r, *p.strides,
        HAS_INDEX=p.indexed, HAS_A=A is not None, HAS_a=a is not None,
        HAS_C=C is not None, TIED=p.spec.tied, HAS_c=c is not None, ACT=p.spec.act,
        SAVE_H=p.hsave is not None, SAVE_U=p.u is not None,
        R_PAD=P.padded_rank(p.r), BLOCK_M=launch.block_m, BLOCK_D=launch.block_d,
        DOT_PREC=_triton.dot_precision(p.src.dtype), num_warps=launch.warps,
    )


def _launch_bwd_triton(g2, x, dh, index, A, B, C, z, u, spec, need):
    """Triton backward on row matrices.

    ``g2`` (N, d): gradient of the output rows; ``x`` (n, d): the input rows (all of ``h`` when
    ``index`` is None, the saved listed rows otherwise); ``dh``: output buffer, (N, d), may be
    ``g2`` itself when indexed (the listed rows are overwritten in place); ``need`` = flags for
    (dh, dA, da, dB, dC, dc). Returns fp32 (dA, da, dB, dC, dc), each None when not needed.
    Kernels, tiles and grids: ``plan.bwd_variant`` and ``plan.bwd_launches``.
    """
    need_dh, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    n, d = x.shape
    r = B.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        zero = lambda *s: torch.zeros(*s, **f32)  # noqa: E731
        return (zero(r, d) if need_da_w else None, zero(r) if need_da_b else None,
                zero(r, d) if need_db else None, zero(r, d) if need_dc_w else None,
                zero(r) if need_dc_b else None)
    limits = plan_limits(dev)
    col_strides = (g2.stride(1), x.stride(1), dh.stride(1) if dh is not None else 1)
    call = _call(n, d, r, x.dtype, index, A, None, C, None, spec, col_strides)
    variant, _ = P.bwd_variant(call, limits, variants.active().lowrank_bwd)
    layout, width = P.grad_layout(call, need)
    prec = _triton.dot_precision(x.dtype)
    has_act = spec.act != IDENTITY
    idx = index if index is not None else z
    launches = P.bwd_launches(call, variant, limits, need)
    if variant == "split-d":
        gz, ga = triton_small_n.bwd_latent_split(launches[0], g2, idx, index is not None, B, u, spec)
    else:
        lat = launches[0]
        gz = torch.empty((n, r), **f32)
        ga = torch.empty((n, r), **f32) if has_act else None
        _lowrank_edit_bwd_latent_kernel[lat.grid](
            g2, idx, B, _dummy(u, gz), gz, _dummy(ga, gz),
            n, d, r, g2.stride(0), g2.stride(1),
            HAS_INDEX=index is not None, ACT=spec.act,
            R_PAD=P.padded_rank(r), BLOCK_M=lat.block_m, BLOCK_D=lat.block_d, DOT_PREC=prec, num_warps=lat.warps,
        )
    main = launches[1]
    block_m, block_d, warps = main.block_m, main.block_d, main.warps
    off = lambda name: layout.get(name, (0, 0))[0]  # noqa: E731
    # rows padded to 16 floats: a row stride divisible by 16 lets the compiler vectorise the
    # partial stores (an odd stride cost the fp32 r = 1 tile a 24-byte spill on sm_90a)
    stride = -(-width // 16) * 16
    consts = dict(HAS_INDEX=index is not None, HAS_A=A is not None, HAS_C=C is not None, TIED=spec.tied,
                  ACT=spec.act, NEED_DH=need_dh, NEED_DA=need_da_w, NEED_DB=need_db, NEED_DC="dC" in layout,
                  R_PAD=P.padded_rank(r), BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec)

    def args(part, rows_per_prog):
        blocks = [part.view(-1)[off(name):] if name in layout else gz for name in ("dA", "dB", "dC")]
        return (g2, x, _dummy(dh, g2), idx, _dummy(A, B), B, _dummy(C, B), z, gz, _dummy(ga, gz), *blocks,
                n, d, r, rows_per_prog, stride,
                g2.stride(0), g2.stride(1), x.stride(0), x.stride(1),
                dh.stride(0) if dh is not None else 0, dh.stride(1) if dh is not None else 0)

    # On a GPU the grid is one wave of the blocks the compiled kernel fits per SM (the plan
    # above assumed the fixed PROGRAMS_PER_SM). The probe's one-row partial buffer is allocated
    # like the real one (same offsets of dA, dB, dC, so the same pointer alignment) and
    # rows_per_prog = block_m is specialised like any multiple of it: the kernel compiled for the
    # query is the one the launch below runs, not an extra one.
    if limits is not None:
        probe = torch.empty((1, stride), **f32) if width else gz
        per_sm = _triton.resident_blocks(_lowrank_edit_bwd_kernel, args(probe, block_m), consts, warps, dev)
        if per_sm is not None:
            launches = P.bwd_launches(call, variant, limits, need, per_sm)
            main = launches[1]
    progs, rows_per_prog = main.grid[0], main.rows
    part = torch.empty((progs, stride), **f32) if width else gz
    _lowrank_edit_bwd_kernel[main.grid](*args(part, rows_per_prog), **consts, num_warps=warps)
    for launch in launches[2:]:
        if launch.kernel == "_lowrank_bias_partials_kernel":
            _lowrank_bias_partials_kernel[launch.grid](
                gz, _dummy(ga, gz), part, n, r, rows_per_prog, stride, off("da"), off("dc"),
                ACT=spec.act, NEED_DA_VEC=need_da_b, NEED_DC_VEC=need_dc_b, R_PAD=P.padded_rank(r),
                BLOCK_M=launch.block_m, NUM_STAGES=launch.stages, num_warps=launch.warps)
    out = finish(part, progs, width) if width else part.new_empty(0)  # plan's _param_finish_kernel
    grads = {name: out[o:o + size] for name, (o, size) in layout.items()}
    mat = lambda name: grads[name].view(r, d) if name in grads else None  # noqa: E731
    return mat("dA"), grads.get("da"), mat("dB"), mat("dC"), grads.get("dc")


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
