"""The Triton code every low-rank kernel file shares: the ``@triton.jit`` steps of the forward
(``row_source``, ``latent_step``, ``latent_finish``, ``apply_step``, ``bias_vec``). The shapes they
run with (tiles, grids, the padded rank) come from ``plan.py``.

The kernels live in ``triton_impl.py`` (the one-pass forward, the backward), ``triton_fwd_resident.py``
(the L2-resident forward) and ``triton_small_n.py`` (the split-d forward for few rows); each takes
these from here, so that they index rows, sum over ``d`` and form the latent in the same way. This
file imports none of them.

Numerics: every step loads its operands as fp32 and every ``tl.dot`` accumulates in fp32 (the
precision ``DOT_PREC`` from ``_triton.dot_precision``); the latent stays fp32, ``y`` is rounded
once to its dtype.
"""
from __future__ import annotations

from ..._activations import act_fwd_tl
from ..._triton import gpu_dot, tl, triton

# ----------------------------------------------------------------------------- jit steps


@triton.jit
def row_source(idx_ptr, m, n_rows, HAS_INDEX: tl.constexpr):
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
def latent_step(h_ptr, h_row, row_ok, cols, stride_h_col, d, k, k_ok, A_ptr, C_ptr, B_ptr, u, p,
                HAS_A: tl.constexpr, HAS_C: tl.constexpr, TIED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One column block ``cols`` (int64, BLOCK_D) of the latent pass over rows ``h_row`` (element
    offsets; ``row_ok`` masks padding rows): returns (u + x A^T, p + x C^T) for that block, fp32,
    ``x`` the (BLOCK_M, BLOCK_D) rows as fp32; C is ``B`` when TIED. Columns past ``d`` and ranks
    past ``r`` (``k_ok``) load as zero. Shared by every forward kernel (the one-pass, the
    L2-resident and the split-d ones) so that they sum over ``d`` in the same way."""
    col_ok = cols < d
    x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    wmask = col_ok[:, None] & k_ok[None, :]
    if HAS_A:
        at = tl.load(A_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
        u = gpu_dot(x, at, u, DOT_PREC)
    if HAS_C:
        ct = tl.load(C_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
        p = gpu_dot(x, ct, p, DOT_PREC)
    elif TIED:
        ct = tl.load(B_ptr + k[None, :] * d + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
        p = gpu_dot(x, ct, p, DOT_PREC)
    return u, p


@triton.jit
def bias_vec(ptr, k, k_ok):
    """The (R_PAD,) fp32 vector at ``ptr`` (``a`` or ``c``), zero past ``r`` (``k_ok``)."""
    return tl.load(ptr + k, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def latent_finish(u, p, a, c, row_ok, k, k_ok,
                  ACT: tl.constexpr, HAS_a: tl.constexpr, HAS_c: tl.constexpr, LOADED: tl.constexpr):
    """The latent from its sums, all fp32 (BLOCK_M, R_PAD): returns (``u + a``, ``z = act(u + a)
    - p - c``), ``z`` zero on padding rows (``row_ok``) and ranks past ``r`` (``k_ok``). ``u`` is
    ``x A^T`` and ``p`` is ``x C^T`` summed over ``d``. ``a`` / ``c``: the bias pointers, each
    loaded here just before its term (LOADED false), or their (R_PAD,) fp32 vectors from
    ``bias_vec`` (LOADED: the persistent forward loads them once per program); unused without
    HAS_a / HAS_c. Shared by every forward kernel."""
    if HAS_a:
        if LOADED:
            u += a[None, :]
        else:
            u += bias_vec(a, k, k_ok)[None, :]
    z = act_fwd_tl(u, ACT) - p
    if HAS_c:
        if LOADED:
            z -= c[None, :]
        else:
            z -= bias_vec(c, k, k_ok)[None, :]
    z = tl.where(row_ok[:, None] & k_ok[None, :], z, 0.0)
    return u, z


@triton.jit
def apply_step(h_ptr, h_row, y_ptr, y_row, hsave_ptr, m, row_ok, cols, stride_h_col, stride_y_col, d, k, k_ok,
               B_ptr, z, SAVE_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """One column block ``cols`` of the re-projection pass: ``y = h + z B`` for the block's rows,
    rounded once to ``y``'s dtype; with SAVE_H the original rows are also copied to the dense
    (n_rows, d) ``hsave`` (row ``m``). Each element is read before it is written, so ``y`` may
    alias ``h``. Shared by every forward kernel (the one-pass, the L2-resident and the split-d
    ones)."""
    col_ok = cols < d
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(h_ptr + h_row[:, None] + cols[None, :] * stride_h_col, mask=tile_ok, other=0.0)
    if SAVE_H:
        tl.store(hsave_ptr + m[:, None] * d + cols[None, :], x, mask=tile_ok)
    b = tl.load(B_ptr + k[:, None] * d + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    y = x.to(tl.float32) + gpu_dot(z, b, None, DOT_PREC)
    tl.store(y_ptr + y_row[:, None] + cols[None, :] * stride_y_col, y.to(y_ptr.dtype.element_ty), mask=tile_ok)
