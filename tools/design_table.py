"""The kernel design table: for each Triton kernel at the reference shapes, the bytes it moves per
activation element (against the minimum), its launches, and what the compiled code asks of an
H100: registers and shared memory per block (compiled ahead of time for sm_90a, no GPU needed),
the resident blocks per SM that follow, and the waves of its grid.

    python tools/design_table.py            # prints docs/design.md's table for the installed Triton

Register allocation, and so the occupancy and the grids sized from it, changes between Triton
releases (3.6 against 3.9: 3-35 registers per kernel), so docs/design.md keeps one table per
supported Triton, each under the line this script prints first ("Compiled with Triton X for
sm_90a:"), and tests/ops/test_design_table.py compares the installed Triton's output with its
own table.

Reference shapes: bf16 activations, N = 16384 rows, d = 4096, LoReFT at r = 8 (R_PAD 16), RED
with scale and bias, and the f7+l7 regime (448 indexed rows of a 16384-row batch). Bytes per
element count the (N, d) streams only (the (N, r) latents and fp32 partials add under 2% here);
"expected" is what the kernel's loops read and write, "min" what any implementation must. A GPU
run measures the real figures (``reft-kernels bench``'s ``gbps`` column); until then these are
estimates. Occupancy uses the H100's limits (``reft_kernels._device.H100``: 65536 registers, 2048
threads, 32 blocks and 228 KiB of shared memory per SM, 132 SMs, 50 MB of L2, registers allocated
per warp in units of 256) through ``_device.blocks_per_sm``, the function the launchers use on a
GPU with the compiled kernel's own figures; grids that the launchers size from the occupancy are
sized here the same way.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_compile_check as tcc  # noqa: E402  (sets up Triton without the interpreter)

from reft_kernels._device import H100, blocks_per_sm, cdiv  # noqa: E402
from reft_kernels.ops.plans import row_split  # noqa: E402
from reft_kernels.ops.lowrank_edit import plan as lowrank_plan  # noqa: E402
from reft_kernels.ops.finish import FINISH_BLOCK as _FINISH_BLOCK  # noqa: E402
from reft_kernels.ops.lowrank_edit.plan import rowblock_tile as _tiles  # noqa: E402
from reft_kernels.ops.red.plan import bwd_tile as _red_bwd_tiles, fwd_tile as _red_tiles  # noqa: E402

SMS = H100.sms
N, D, R, R_PAD, N_SMALL = 16384, 4096, 8, 16, 448
E = 2  # bytes per bf16 element


def _row_split_progs(n, block_m, n_col_blocks, per_sm=None):
    """Programs along rows of ``ops.plans.row_split`` on the H100: one whole wave of ``per_sm``
    resident blocks when the launcher sizes the grid from the compiled kernel, else the fixed
    ``PROGRAMS_PER_SM``."""
    return row_split(n, block_m, n_col_blocks, H100, per_sm)[0]


def rows():
    """(label, kernel, runtime values, constexprs, warps, grid, bytes expected, bytes min, launches);
    ``grid`` is a number, or a function of the compiled kernel's resident blocks per SM."""
    out = []
    t = tcc._t
    bm, bd, w = _red_tiles(D, on_gpu=True)
    vals = dict(h_ptr=t("bf16"), s_ptr=t("fp32"), t_ptr=t("fp32"), y_ptr=t("bf16"), n_rows=N, d=D,
                stride_h_row=D, stride_h_col=1, stride_y_row=D)
    out.append(("RED forward", tcc._red_fwd_kernel, vals, dict(HAS_SCALE=True, HAS_BIAS=True, BLOCK_M=bm, BLOCK_D=bd),
                w, cdiv(N, bm) * cdiv(D, bd), 2 * E, 2 * E, "1"))
    for label, tile2d in (("RED backward", False), ("RED backward, 2-D accumulators (opt-in)", True)):
        bm, bd, w = _red_bwd_tiles(D, on_gpu=True, tile2d=tile2d)
        vals = dict(g_ptr=t("bf16"), h_ptr=t("bf16"), s_ptr=t("fp32"), dh_ptr=t("bf16"), ds_part_ptr=t("fp32"),
                    dt_part_ptr=t("fp32"), n_rows=N, d=D, rows_per_prog=1024, stride_g_row=D, stride_g_col=1,
                    stride_h_row=D, stride_h_col=1, stride_dh_row=D, stride_part=2 * D)
        n_cb = cdiv(D, bd)
        out.append((label, tcc._red_bwd_kernel, vals,
                    dict(HAS_SCALE=True, NEED_DH=True, NEED_DS=True, NEED_DT=True, BLOCK_M=bm, BLOCK_D=bd,
                         ACC_2D=tile2d),
                    w, lambda per_sm, bm=bm, n_cb=n_cb: _row_split_progs(N, bm, n_cb, per_sm) * n_cb, 3 * E, 3 * E,
                    "1 + finish"))
    f32 = t("fp32")
    lora = dict(HAS_A=True, HAS_a=True, HAS_C=False, TIED=True, HAS_c=False, ACT=0)
    for label, n, index in [("LoReFT forward", N, False), ("LoReFT forward, f7+l7", N_SMALL, True)]:
        bm, bd, w = _tiles("fwd", n, D, R_PAD, tcc.DTYPES["bf16"], on_gpu=True)
        vals = dict(h_ptr=t("bf16"), y_ptr=t("bf16"), hsave_ptr=t("bf16"), idx_ptr=t(tcc.torch.int64),
                    A_ptr=f32, a_ptr=f32, B_ptr=f32, C_ptr=f32, c_ptr=f32, z_ptr=f32, u_ptr=f32,
                    n_rows=n, d=D, r=R, stride_h_row=D, stride_h_col=1, stride_y_row=D, stride_y_col=1)
        consts = dict(HAS_INDEX=index, **lora, SAVE_H=index, SAVE_U=False, R_PAD=R_PAD, BLOCK_M=bm, BLOCK_D=bd,
                      DOT_PREC="tf32")
        # two passes over h, one write of y (+ the saved copy of the rows when indexed)
        exp, low = (4 * E, 3 * E) if index else (3 * E, 2 * E)
        out.append((label, tcc._lowrank_edit_fwd_kernel, vals, consts, w, cdiv(n, bm), exp, low, "1"))
        if index:
            continue
        # the L2-resident persistent forward (kernels(lowrank_fwd="resident")): one HBM read of
        # h when its second pass hits L2, as planned
        blocks = lowrank_plan.resident_row_blocks(R_PAD, tcc.DTYPES["bf16"])
        rbm, progs = lowrank_plan.resident_grid(n, D, E, H100, lambda bm: None, blocks)
        rbd, rw, stages = lowrank_plan.resident_tile(rbm, D, R_PAD, tcc.DTYPES["bf16"])
        rvals = dict(vals, n_progs=progs)
        rconsts = dict(consts, BLOCK_M=rbm, BLOCK_D=rbd, NUM_STAGES=stages)
        out.append(("LoReFT forward, L2-resident (opt-in)", tcc._lowrank_edit_fwd_resident_kernel, rvals, rconsts,
                    rw, progs, 2 * E, 2 * E, "1"))
    # the same f7+l7 forward through the split-d path (ops/lowrank_edit/triton_small_n.py)
    bm, bd, w = lowrank_plan.split_d_tile(N_SMALL, D, R_PAD, tcc.DTYPES["bf16"], on_gpu=True)
    n_rb, n_cb = cdiv(N_SMALL, bm), cdiv(D, bd)
    s_count = max(1, min(n_cb, cdiv(2 * SMS, n_rb)))  # small_n.splits on a 132-SM GPU
    cols = cdiv(n_cb, s_count) * bd
    s_count = cdiv(D, cols)
    vals = dict(h_ptr=t("bf16"), idx_ptr=t(tcc.torch.int64), A_ptr=f32, C_ptr=f32, up_ptr=f32, pp_ptr=f32,
                n_rows=N_SMALL, d=D, r=R, cols_per_prog=cols, stride_h_row=D, stride_h_col=1)
    out.append(("LoReFT forward, f7+l7, split d: latent parts", tcc._lowrank_latent_part_kernel, vals,
                dict(HAS_INDEX=True, HAS_A=True, HAS_CP=True, R_PAD=R_PAD, BLOCK_M=bm, BLOCK_D=bd, DOT_PREC="tf32"),
                w, n_rb * s_count, 1 * E, 1 * E, "2 (with the next)"))
    vals = dict(h_ptr=t("bf16"), y_ptr=t("bf16"), hsave_ptr=t("bf16"), idx_ptr=t(tcc.torch.int64), a_ptr=f32,
                B_ptr=f32, c_ptr=f32, up_ptr=f32, pp_ptr=f32, z_ptr=f32, u_ptr=f32, n_rows=N_SMALL, d=D, r=R,
                n_splits=s_count, stride_h_row=D, stride_h_col=1, stride_y_row=D, stride_y_col=1)
    out.append(("LoReFT forward, f7+l7, split d: apply", tcc._lowrank_apply_kernel, vals,
                dict(HAS_INDEX=True, HAS_A=True, HAS_a=True, HAS_CP=True, HAS_c=False, ACT=0, SAVE_H=True,
                     SAVE_U=False, R_PAD=R_PAD, BLOCK_M=bm, BLOCK_D=bd, DOT_PREC="tf32"),
                w, n_rb * n_cb, 3 * E, 2 * E, "(see above)"))
    bm, bd, w = _tiles("lat", N, D, R_PAD, tcc.DTYPES["bf16"], on_gpu=True)
    vals = dict(g_ptr=t("bf16"), idx_ptr=t(tcc.torch.int64), B_ptr=f32, u_ptr=f32, gz_ptr=f32, ga_ptr=f32,
                n_rows=N, d=D, r=R, stride_g_row=D, stride_g_col=1)
    out.append(("LoReFT backward, latent", tcc._lowrank_edit_bwd_latent_kernel, vals,
                dict(HAS_INDEX=False, ACT=0, R_PAD=R_PAD, BLOCK_M=bm, BLOCK_D=bd, DOT_PREC="tf32"),
                w, cdiv(N, bm), 1 * E, 0, "1"))
    bm, bd, w = _tiles("bwd", N, D, R_PAD, tcc.DTYPES["bf16"], on_gpu=True)
    vals = tcc.bwd_values("bf16", D, R, True, True, False, False, n=N)
    split = {}  # the backward's P, shared with its bias-partials row
    n_cb = cdiv(D, bd)
    out.append(("LoReFT backward, dh + params", tcc._lowrank_edit_bwd_kernel, vals,
                dict(HAS_INDEX=False, HAS_A=True, HAS_C=False, TIED=True, ACT=0, NEED_DH=True, NEED_DA=True,
                     NEED_DB=True, NEED_DC=False, R_PAD=R_PAD, BLOCK_M=bm,
                     BLOCK_D=bd, DOT_PREC="tf32"),
                w, lambda per_sm: split.setdefault("P", _row_split_progs(N, bm, n_cb, per_sm)) * n_cb, 3 * E, 3 * E,
                "1 + bias + finish"))
    # the bias partials (da = sum of ga) over the same row split (P programs), then the finish
    out.append(("LoReFT backward, bias partials", tcc._lowrank_bias_partials_kernel,
                tcc.bias_values(D, R, True, True, False, False),
                dict(ACT=0, NEED_DA_VEC=True, NEED_DC_VEC=False, R_PAD=R_PAD, BLOCK_M=tcc.bias_block_m(R_PAD),
                     NUM_STAGES=3),
                8, lambda per_sm: split["P"], 0, 0, "(see above)"))
    # the finish: dA, dB (r x d each) and da summed over the P partial rows, in one launch
    width = 2 * R * D + R  # dA, dB, da
    fvals = dict(part_ptr=f32, out_ptr=f32, n_parts=4, width=width, stride=vals["part_width"])
    out.append(("LoReFT backward, param finish", tcc._param_finish_kernel, fvals, dict(BLOCK=_FINISH_BLOCK),
                4, cdiv(width, _FINISH_BLOCK), 0, 0, "(see above)"))
    return out


def heading() -> str:
    """The line above each table in docs/design.md, naming the Triton that compiled it."""
    return f"Compiled with Triton {tcc.triton.__version__} for sm_90a:"


def main() -> int:
    print(heading())
    print()
    print("| kernel (bf16, d = 4096) | rows | bytes/element expected (min) | launches | registers | "
          "shared KiB | warps | blocks/SM | grid | waves |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, kernel, vals, consts, warps, grid, exp, low, launches in rows():
        job = (kernel.fn.__name__, vals, consts, warps, "bf16", 90)
        res = tcc._compile_one(job)
        if isinstance(res, str):
            print(f"| {label} | compile failed: {res} |")
            continue
        regs, smem, _ = res
        per_sm = blocks_per_sm(regs, smem, warps, H100)
        grid = grid(per_sm) if callable(grid) else grid
        waves = grid / max(1, per_sm * SMS)
        n = N_SMALL if "f7+l7" in label else N
        low_txt = f"{low}" if low else "-"
        exp_txt = f"{exp} ({low_txt})" if exp else "~0 (fp32 latents / partials)"
        print(f"| {label} | {n} | {exp_txt} | {launches} | {regs} | {smem / 1024:.0f} | {warps} | {per_sm} | "
              f"{grid} | {waves:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
