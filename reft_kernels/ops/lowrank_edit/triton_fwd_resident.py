"""The low-rank forward in one HBM pass: row blocks small enough that every resident program's
rows stay in L2 between the latent and the write of ``y``, on a persistent grid, with both loops'
loads pipelined.

Why: ``triton_impl._lowrank_edit_fwd_kernel`` reads each program's rows twice (the latent
``z = act(h A^T + a) - h C^T - c``, then ``y = h + z B``). At the reference shape (bf16,
N = 16384, d = 4096) it holds 64 rows x 8 KB = 512 KB per program between the passes, and its
~264 resident programs (2 per SM on an H100) push ~135 MB through a 50 MB L2, so the second pass
goes back to HBM: about 6 bytes moved per element against the minimal 4 (tools/design_table.py,
estimated). Here:

- ``plan.resident_grid`` picks the row block BLOCK_M and the number of programs G so that the rows held by all
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
kernel below its HBM roofline; a GPU run decides (the benchmark's ``triton-resident`` provider).

Same contract and numerics as the previous kernel (``contract.py``; fp32 latent, TF32 / 3xTF32
dots, ``y`` rounded once) and the same summation order over ``d`` within a row, so ``z`` and
``y`` are the same up to the dot's internal order.

Selection: ``reft_kernels.kernels(lowrank_fwd="resident")`` takes this kernel; the rule never does
until a GPU run has measured both (``plan.fwd_variant``). Tiles: ``plan.RESIDENT_TILES``.
"""
from __future__ import annotations

from ... import _triton
from ..._triton import tl, triton
from . import plan as P
from .triton_common import apply_step, bias_vec, latent_finish, latent_step, row_source


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


def launch(call, limits, p):
    """Plan and launch the kernel: ``call`` a ``plan.Call``, ``limits`` the device's ``SmLimits``
    (None through the interpreter), ``p`` a ``contract.FwdParams`` (n > 0). On a GPU the programs
    per SM come from the compiled kernel (``_triton.resident_blocks``)."""
    A, a, B, C, c = p.params
    consts = dict(HAS_INDEX=p.indexed, HAS_A=A is not None, HAS_a=a is not None, HAS_C=C is not None,
                  TIED=p.spec.tied, HAS_c=c is not None, ACT=p.spec.act, SAVE_H=p.hsave is not None,
                  SAVE_U=p.u is not None, R_PAD=P.padded_rank(p.r), DOT_PREC=_triton.dot_precision(p.src.dtype))

    def args(progs):
        dummy = p.z
        return (p.src, p.dst, p.hsave if p.hsave is not None else dummy, p.idx,
                A if A is not None else B, a if a is not None else B, B, C if C is not None else B,
                c if c is not None else B, p.z, p.u if p.u is not None else dummy,
                p.n, p.d, p.r, progs, *p.strides)

    def tile(launch_):
        return dict(consts, BLOCK_M=launch_.block_m, BLOCK_D=launch_.block_d, NUM_STAGES=launch_.stages)

    per_sm = None
    if limits is not None:
        def per_sm(block_m):
            bd, warps, stages = P.resident_tile(block_m, p.d, P.padded_rank(p.r), p.src.dtype, call.strided_cols)
            tc = dict(consts, BLOCK_M=block_m, BLOCK_D=bd, NUM_STAGES=stages)
            # a typical program count (one per SM) for the compile's specialisation
            return _triton.resident_blocks(_lowrank_edit_fwd_resident_kernel, args(limits.sms), tc, warps, p.z.device)
    (launch_,) = P.fwd_launches(call, "resident", limits, per_sm)
    _lowrank_edit_fwd_resident_kernel[launch_.grid](*args(launch_.grid[0]), **tile(launch_), num_warps=launch_.warps)
