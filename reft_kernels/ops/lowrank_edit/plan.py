"""What the low-rank edit runs for one call, as a value: ``plan(call, limits, variants)`` returns a
frozen, printable ``Plan`` (backend, the variant and the launches of the forward and of the
backward: kernel, grid, tiles, warps, stages; the finish of the parameter sums; whether a GPU has
measured the choice). Pure: it reads no tensor, no environment and no GPU. The Triton launchers
call the same functions (``fwd_launches``, ``bwd_launches``) for the tiles and grids they launch,
so what ``reft-kernels plan`` prints is what runs.

Inputs: a ``Call`` (rows, width, rank, dtype, index or not, column strides, the terms present),
the device's ``SmLimits`` (``reft_kernels._device``: H100 / A100 profiles, or the card in use;
None for Triton's CPU interpreter) and the requested ``Variants`` (``ops.variants``; None on an
axis: the rule). Where a grid depends on the compiled kernel's occupancy (the backward's row
split, the resident forward's programs), the launcher passes ``per_sm``, a function of the row
block giving the compiled kernel's resident blocks per SM; without it (a printed plan, the
interpreter, torch.compile) the fixed ``PROGRAMS_PER_SM`` / one program per SM is planned and the
plan says so.

The GPU tile tables live here, each with the ahead-of-time compile that chose it
(tools/triton_compile_check.py re-checks every entry, under Triton 3.6 and the latest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..._device import PROGRAMS_PER_SM, SmLimits, cdiv, next_pow2
from .. import variants as V
from ..plans import Launch, Plan, row_split, target_programs
from ..finish import FINISH_WARPS, finish_block

# ----------------------------------------------------------------------------- shapes


def padded_rank(r: int) -> int:
    """``R_PAD`` of the kernels for rank ``r``: the next power of two, at least 16 (``tl.dot``
    needs every dimension >= 16 on NVIDIA GPUs; ranks past ``r`` are masked to zero)."""
    return max(16, next_pow2(r))


def triton_max_rank(h_dtype: torch.dtype) -> int:
    """Largest rank the Triton kernels take for activations of ``h_dtype``: the (rows, r) latents
    and (r, BLOCK_D) accumulators live in registers, and no tile fits beyond these without
    spilling (fp32 needs more registers per dot, see ``_triton.dot_precision``)."""
    return 64 if h_dtype == torch.float32 else 128


# The GPU tile of every low-rank kernel (BLOCK_M, BLOCK_D, warps) when a column stride of the
# activations it reads or writes is not 1 (h.mT, h[..., ::2]): each element then needs its own
# 64-bit address, and the contiguous tiles spilled (tools/triton_compile_check.py's sweep at column
# stride 16, sm_80 / sm_90a: the fp32 R_PAD = 64 backward at (16, 32) 112-184 bytes with Triton
# 3.6 and 40-72 with 3.9, the fp32 R_PAD = 32 split-d latent at (32, 64) 200-224 bytes with 3.9,
# the bf16 R_PAD = 16 backward at (32, 128) 24-56 bytes on sm_90 with 3.6). (16, 16) with 8 warps
# fits every kernel on both Tritons (its worst case, that backward, 250-254 registers, no stack);
# such loads are uncoalesced anyway, so a narrow tile costs little beside them.
STRIDED_TILE = (16, 16, 8)


def strided(*col_strides: int) -> bool:
    """Whether the launch takes ``STRIDED_TILE``: some column stride is not 1."""
    return any(s != 1 for s in col_strides)


# Row-block kernels (the one-pass forward "fwd", the backward's latent "lat", the backward "bwd"):
# GPU tiles (BLOCK_M, BLOCK_D, num_warps) per kernel, activation class and padded rank. Each was
# compiled ahead of time for sm_80 and sm_90a with Triton 3.9 at d = 4096 with the heaviest flags
# (NoReFT's terms, gelu, an index): among the tiles that used no local memory (no register
# spills) on both, the largest with some register headroom, BLOCK_M preferred (each program
# reads the whole weight matrices, so taller tiles amortise them). Larger tiles spilled, e.g. a
# (32, 128) fp32 forward tile at 255 registers. tools/triton_compile_check.py re-checks them all,
# under Triton 3.6 (the GPU machine's) as well: none spills there either (at most the 8-16 byte
# stack frames it allows, e.g. 128 registers + 8 bytes for the bf16 R_PAD = 16 backward on sm_90).
# Speed on a GPU is not yet measured.
ROWBLOCK_TILES = {
    # kernel, fp32?: {r_pad: (BLOCK_M, BLOCK_D, warps)}
    ("fwd", True): {16: (64, 32, 4), 32: (64, 16, 8), 64: (32, 32, 8)},
    ("fwd", False): {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 32, 8), 128: (32, 32, 8)},
    ("lat", True): {16: (64, 64, 8), 32: (64, 32, 8), 64: (32, 64, 8)},
    ("lat", False): {16: (64, 128, 8), 32: (64, 128, 8), 64: (32, 128, 8), 128: (32, 64, 8)},
    ("bwd", True): {16: (16, 128, 8), 32: (16, 64, 8), 64: (16, 32, 8)},
    ("bwd", False): {16: (32, 128, 8), 32: (32, 64, 8), 64: (64, 16, 8), 128: (32, 16, 8)},
}


def rowblock_tile(kind: str, n: int, d: int, r_pad: int, h_dtype: torch.dtype, on_gpu: bool,
                  strided_cols: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for row-block kernel ``kind`` ("fwd", "lat" or "bwd").

    GPU: from ``ROWBLOCK_TILES`` (``STRIDED_TILE`` with ``strided_cols``), shrunk to the problem
    (BLOCK_M to the rows, BLOCK_D to d, never below 16, which ``tl.dot`` needs). Interpreter: big
    tiles, since every program costs a fixed Python overhead there.
    """
    d_pow, n_pow = max(16, next_pow2(d)), max(16, next_pow2(n))
    if not on_gpu:
        return min(64, n_pow), min(d_pow, 128), 4
    block_m, block_d, warps = STRIDED_TILE if strided_cols else ROWBLOCK_TILES[(kind, h_dtype == torch.float32)][r_pad]
    return min(block_m, n_pow), min(block_d, d_pow), warps


# Split-d kernels (few rows): GPU tiles (BLOCK_M, BLOCK_D, warps) by (fp32 activations?, padded
# rank), shared by the partial and the apply kernels: compiled ahead of time for sm_80 and sm_90a
# at d = 4096 with the heaviest flags, the largest row block without register spills
# (tools/triton_compile_check.py, Triton 3.6 and 3.9; e.g. (64, 64) with 4 warps spilled at R_PAD
# = 64 and above, and for fp32 activations already at R_PAD = 16). fp32 R_PAD = 32 (first compiled
# when the check took a rank of 17-32): (32, 64) spilled 32 bytes in the latent kernel on sm_90
# with Triton 3.9 (40 with 3.6 at integer arguments 1); (32, 32): latent 172/190 registers
# (sm_80/sm_90) with 3.9, 248/174 with 3.6, apply 119, no stack.
SPLIT_D_TILES = {
    True: {16: (64, 64, 8), 32: (32, 32, 8), 64: (16, 64, 8)},
    False: {16: (64, 64, 4), 32: (64, 64, 8), 64: (32, 64, 8), 128: (16, 64, 8)},
}


def split_d_tile(n: int, d: int, r_pad: int, h_dtype: torch.dtype, on_gpu: bool,
                 strided_cols: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, warps) of both split-d kernels: ``SPLIT_D_TILES`` (``STRIDED_TILE`` when
    a column stride is not 1) shrunk to the rows and to d on a GPU, wide tiles through the
    interpreter (each program costs a fixed Python overhead there)."""
    n_pow = max(16, next_pow2(n))
    if not on_gpu:
        return min(64, n_pow), min(128, max(16, next_pow2(d))), 4
    block_m, block_d, warps = STRIDED_TILE if strided_cols else SPLIT_D_TILES[h_dtype == torch.float32][r_pad]
    # BLOCK_D shrunk to d as the other launchers do (d = 1 with the bf16 R_PAD = 128 tile of 64
    # columns compiled the latent kernel to 255 registers and a 16-24 byte stack on sm_90 with
    # Triton 3.9; at 16 columns it fits)
    return min(block_m, n_pow), min(block_d, max(16, next_pow2(d))), warps


def split_d_shape(n: int, d: int, r_pad: int, h_dtype: torch.dtype, limits: Optional[SmLimits],
                  strided_cols: bool = False) -> tuple[int, int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, warps, row blocks, column blocks, S, columns per range) of a split-d
    launch pair: S column ranges, each a whole number of column blocks, enough programs for about
    two per SM (two through the interpreter)."""
    block_m, block_d, warps = split_d_tile(n, d, r_pad, h_dtype, limits is not None, strided_cols)
    n_rb, n_cb = cdiv(n, block_m), cdiv(d, block_d)
    target = 2 * target_programs(limits) // PROGRAMS_PER_SM if limits is not None else 2
    s_count = max(1, min(n_cb, cdiv(target, n_rb)))
    cols_per_prog = cdiv(n_cb, s_count) * block_d
    return block_m, block_d, warps, n_rb, n_cb, cdiv(d, cols_per_prog), cols_per_prog


# Resident forward (persistent, L2-resident one pass): share of the L2 the rows held between the
# two passes may fill (see triton_fwd_resident.py), and the BLOCK_M candidates, tallest first.
L2_BUDGET_FRACTION = 0.5
ROW_BLOCKS = (64, 32, 16)

# Resident forward GPU tiles (BLOCK_D, warps, NUM_STAGES) by (fp32 activations?, R_PAD) and
# BLOCK_M, one table for both supported Tritons. Compiled ahead of time for sm_80 and sm_90a with
# Triton 3.9 at d = 4096 with the heaviest flags (NoReFT's terms, gelu, an index): for each row
# block the widest column block with no spill on either (registers sm_80/sm_90 in the comments;
# tools/triton_compile_check.py re-checks every method, under 3.6 and the latest). With 16 or 32
# rows the latent dots are narrower than the warps' MMA tiles, so every warp holds whole operand
# tiles and registers grow with BLOCK_D x R_PAD: e.g. bf16 R_PAD = 32 with (16, 128) took 255/248
# registers, (16, 256) spilled 216 bytes. A missing row block spilled at every width tried (bf16
# R_PAD = 128 with 64 rows: 32 bytes at (64, 16), 2 stages); fp32 R_PAD = 16 with (64, 32) spilled
# 24 bytes on sm_80 for DiReFT's terms, bf16 R_PAD = 16 with (16, 256) and 3 stages 24 bytes on
# sm_90 with an index. Triton 3.6 (the GPU machine's) allocates differently; two tiles that fit
# 3.9 spilled there and were narrowed to fit both (registers over every method, index and
# activation, 3.9 / 3.6):
# - bf16 R_PAD = 16, 16 rows: (256, 8, 2) compiled to 128 registers and a 24-byte stack on sm_90
#   under 3.6 (DiReFT + index; 16 bytes for LoReFT); (128, 8, 2): 128/148 and 128/128, no stack.
# - 16-bit R_PAD = 128, 32 rows: (32, 8, 3) spilled 40 bytes under 3.6 (LoBiReFT, sm_90) and 24
#   under 3.9 at a rank that is not a multiple of 16 (sm_80); (16, 8, 3): 210/206 and 212/212.
# Not tuned on a GPU.
RESIDENT_TILES = {
    (False, 16): {64: (64, 8, 3), 32: (128, 8, 3), 16: (128, 8, 2)},    # 186/174, 186/154, 128/148
    (False, 32): {64: (32, 8, 3), 32: (64, 8, 3), 16: (64, 8, 3)},      # 190/172, 186/194, 128/144
    (False, 64): {64: (16, 8, 3), 32: (32, 8, 3), 16: (64, 8, 3)},      # 255/193, 164/162, 186/180
    (False, 128): {32: (16, 8, 3), 16: (32, 8, 3)},                     # 210/206, 188/178
    (True, 16): {64: (16, 8, 3), 32: (32, 8, 3), 16: (32, 8, 3)},       # 128/120, 185/187, 183/185
    (True, 32): {64: (16, 8, 3), 32: (16, 8, 3), 16: (64, 8, 3)},       # 223/168, 202/199, 243/239
    (True, 64): {64: (16, 8, 2), 32: (16, 8, 3), 16: (32, 8, 3)},       # 255/231, 170/172, 172/182
}
# With a column stride that is not 1: STRIDED_TILE's 16 x 16 tile (8 warps), 2 stages.
STRIDED_ROW_BLOCKS = (16,)


def resident_row_blocks(r_pad: int, h_dtype: torch.dtype) -> tuple[int, ...]:
    """The BLOCK_M values with a resident GPU tile for this rank and dtype, tallest first."""
    return tuple(sorted(RESIDENT_TILES[(h_dtype == torch.float32, r_pad)], reverse=True))


def resident_tile(block_m: int, d: int, r_pad: int, h_dtype: torch.dtype,
                  strided_cols: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, warps, NUM_STAGES) of the resident forward on a GPU, BLOCK_D shrunk to d (never
    below 16)."""
    if strided_cols:
        block_d, warps, stages = STRIDED_TILE[1], STRIDED_TILE[2], 2
    else:
        block_d, warps, stages = RESIDENT_TILES[(h_dtype == torch.float32, r_pad)][block_m]
    return min(block_d, max(16, next_pow2(d))), warps, stages


def resident_grid(n: int, d: int, elem_bytes: int, limits: SmLimits,
                  resident_per_sm: Callable[[int], Optional[int]], row_blocks=ROW_BLOCKS,
                  budget_fraction: float = L2_BUDGET_FRACTION) -> tuple[int, int]:
    """(BLOCK_M, programs) of the persistent forward over ``n`` (> 0) rows of width ``d``.
    ``limits`` gives the SM count and L2 size; ``resident_per_sm(block_m)`` how many programs of
    that row block fit on an SM at once (from the compiled kernel; None when unknown, read as
    one). BLOCK_M is the tallest candidate for which one program per SM keeps ``sms x BLOCK_M x
    d x elem_bytes`` within ``budget_fraction`` of the L2 (taller blocks re-read the weights less
    often); the programs per SM are then as many as both the L2 budget and the occupancy allow.
    When even the smallest block does not fit (very wide rows), the smallest block with one
    program per SM: the second pass then partly misses L2, but no SM idles. Programs never exceed
    the row blocks.
    """
    budget = int(limits.l2_bytes * budget_fraction)
    per_row = d * elem_bytes
    block_m, per_sm = min(row_blocks), 1
    for bm in sorted(row_blocks, reverse=True):
        fit = budget // (limits.sms * bm * per_row)
        if fit >= 1:
            block_m = bm
            per_sm = fit if fit == 1 else max(1, min(fit, resident_per_sm(bm) or 1))
            break
    return block_m, max(1, min(cdiv(n, block_m), per_sm * limits.sms))


def bias_block_m(r_pad: int) -> int:
    """Rows per step of the bias-partials kernel on a GPU: 16 KB fp32 tiles (256 rows at R_PAD =
    16), pipelined 3 deep, since only P programs (4 at the reference shape) share the (n, r)
    latents: 0.5 MB each at the reference shape, 16 steps per program (estimated a few
    microseconds, not measured)."""
    return max(16, 4096 // r_pad)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Call:
    """What a planner needs to know of one call. ``n``: rows edited (index entries with an
    index, else every row); ``d``, ``r``: width and rank; ``has_*``: the terms present (``tied``:
    C is B); ``strided_cols``: some column stride of h (or g) is not 1."""
    n: int
    d: int
    r: int
    dtype: torch.dtype = torch.bfloat16
    indexed: bool = False
    strided_cols: bool = False
    has_A: bool = True
    has_a: bool = True
    has_C: bool = False
    tied: bool = True
    has_c: bool = False
    act: int = 0


def cluster_shape_ok(d: int, r: Optional[int]) -> bool:
    """The shapes the CUDA cluster backward takes (``csrc/lowrank_edit_bwd_cluster.cu``): r <= 16
    (its partials stay in registers), d <= 4096. It also needs an sm_90 GPU and a build with sm_90
    code, which the extension checks (``cuda_impl.bwd_plan``)."""
    return r is not None and 1 <= r <= 16 and d <= 4096


def few_rows(row_blocks: int, limits: Optional[SmLimits]) -> bool:
    """The rule for split-d: on a GPU, when the row-block grid would fill fewer than half the
    SMs (448 f7+l7 rows make 7 row blocks on a 132-SM H100). Never through the interpreter, which
    runs programs one by one (more programs only cost time there)."""
    return limits is not None and 2 * row_blocks < target_programs(limits) // PROGRAMS_PER_SM


def _variant(axis: str, kind: str, call: Call, limits: Optional[SmLimits], requested: Optional[str]):
    """(variant of ``axis``, "requested" or "rule"): the request, else split-d for few rows of
    row-block kernel ``kind``'s tile, else rowblock."""
    if requested is not None:
        V.check(axis, requested)
        return requested, "requested"
    block_m = rowblock_tile(kind, max(call.n, 1), call.d, padded_rank(call.r), call.dtype, limits is not None,
                            call.strided_cols)[0]
    return ("split-d" if call.n > 0 and few_rows(cdiv(call.n, block_m), limits) else "rowblock"), "rule"


def fwd_variant(call: Call, limits: Optional[SmLimits], requested: Optional[str]) -> tuple[str, str]:
    """(variant of the Triton forward, "requested" or "rule")."""
    return _variant("lowrank_fwd", "fwd", call, limits, requested)


def bwd_variant(call: Call, limits: Optional[SmLimits], requested: Optional[str]) -> tuple[str, str]:
    """(variant of the Triton backward's latent pass, "requested" or "rule")."""
    return _variant("lowrank_bwd", "lat", call, limits, requested)


def fwd_launches(call: Call, variant: str, limits: Optional[SmLimits],
                 per_sm: Optional[Callable[[int], Optional[int]]] = None) -> tuple:
    """The Triton forward's launches for ``variant`` (none for zero rows). ``per_sm``: the
    resident kernel's blocks per SM for a row block (on a GPU, from the compiled kernel)."""
    n, d, r_pad, dt, gpu = call.n, call.d, padded_rank(call.r), call.dtype, limits is not None
    if n == 0:
        return ()
    if variant == "split-d":
        bm, bd, w, n_rb, n_cb, s, cols = split_d_shape(n, d, r_pad, dt, limits, call.strided_cols)
        return (Launch("_lowrank_latent_part_kernel", (n_rb, s), bm, bd, w, note=f"{s} column ranges", cols=cols),
                Launch("_lowrank_apply_kernel", (n_rb, n_cb), bm, bd, w))
    if variant == "resident":
        if gpu:
            blocks = STRIDED_ROW_BLOCKS if call.strided_cols else resident_row_blocks(r_pad, dt)
            bm, progs = resident_grid(n, d, dt.itemsize, limits, per_sm or (lambda bm: None), blocks)
            bd, w, stages = resident_tile(bm, d, r_pad, dt, call.strided_cols)
            note = "persistent" + ("" if per_sm else "; programs per SM from the compiled kernel on a GPU")
        else:  # the interpreter: big tiles, two programs (each loops over several row blocks)
            bm = min(64, max(16, next_pow2(n)))
            progs, bd, w, stages, note = min(cdiv(n, bm), 2), min(128, max(16, next_pow2(d))), 4, 2, "persistent"
        return (Launch("_lowrank_edit_fwd_resident_kernel", (progs,), bm, bd, w, stages, note),)
    bm, bd, w = rowblock_tile("fwd", n, d, r_pad, dt, gpu, call.strided_cols)
    return (Launch("_lowrank_edit_fwd_kernel", (cdiv(n, bm),), bm, bd, w),)


def grad_layout(call: Call, need: Optional[tuple] = None) -> tuple[dict, int]:
    """The backward's partial-buffer row: {name: (offset, size)} for each needed parameter
    gradient (dA, dB, dC as r x d blocks, then da, dc), and the row's width. ``need``: flags for
    (dh, dA, da, dB, dC, dc); None: every term present."""
    r, d = call.r, call.d
    if need is None:
        need = (True, call.has_A, call.has_a, True, call.has_C, call.has_c)
    _, need_da_w, need_da_b, need_db, need_dc_w, need_dc_b = need
    layout, width = {}, 0
    for name, needed, size in (("dA", need_da_w, r * d), ("dB", need_db, r * d),
                               ("dC", need_dc_w and call.has_C, r * d), ("da", need_da_b, r), ("dc", need_dc_b, r)):
        if needed:
            layout[name], width = (width, size), width + size
    return layout, width


def bwd_launches(call: Call, variant: str, limits: Optional[SmLimits], need: Optional[tuple] = None,
                 per_sm: Optional[int] = None) -> tuple:
    """The Triton backward's launches: the latent pass (``variant``), the dh-and-partials kernel
    over a (P, column blocks) grid, the bias partials, and the fixed-order finish over P (none
    for one program row). ``per_sm``: the backward kernel's resident blocks per SM (on a GPU)."""
    n, d, r_pad, dt, gpu = call.n, call.d, padded_rank(call.r), call.dtype, limits is not None
    if n == 0:
        return ()
    out = []
    if variant == "split-d":
        bm, bd, w, n_rb, _, s, cols = split_d_shape(n, d, r_pad, dt, limits, call.strided_cols)
        out.append(Launch("_lowrank_latent_part_kernel", (n_rb, s), bm, bd, w,
                          note=f"gz = g B^T over {s} column ranges, summed in order", cols=cols))
    else:
        bm, bd, w = rowblock_tile("lat", n, d, r_pad, dt, gpu, call.strided_cols)
        out.append(Launch("_lowrank_edit_bwd_latent_kernel", (cdiv(n, bm),), bm, bd, w))
    bm, bd, w = rowblock_tile("bwd", n, d, r_pad, dt, gpu, call.strided_cols)
    n_db = cdiv(d, bd)
    progs, rows = row_split(n, bm, n_db, limits, per_sm)
    sized = ("about two programs through the interpreter" if not gpu else "one wave of the compiled kernel"
             if per_sm is not None else f"{PROGRAMS_PER_SM} per SM; one wave of the compiled kernel on a GPU")
    out.append(Launch("_lowrank_edit_bwd_kernel", (progs, n_db), bm, bd, w, note=f"{rows} rows per program ({sized})",
                      rows=rows))
    layout, width = grad_layout(call, need)
    if "da" in layout or "dc" in layout:
        out.append(Launch("_lowrank_bias_partials_kernel", (progs,), bias_block_m(r_pad) if gpu else bm, None, 8, 3))
    if progs > 1 and width:
        block = finish_block(width, gpu)
        out.append(Launch("_param_finish_kernel", (cdiv(width, block),), None, block, FINISH_WARPS,
                          note=f"{width} fp32 sums over {progs} rows"))
    return tuple(out)


def plan(call: Call, limits: Optional[SmLimits] = None, variants: Optional[V.Variants] = None,
         backend: str = "triton", device: str = "") -> Plan:
    """The plan of one low-rank edit call (forward and backward) on ``backend``: for "triton"
    the launches of every kernel, for "cuda" and "torch" the variants only. ``limits`` None: Triton's
    CPU interpreter (or the CPU for the other backends); ``variants`` None: the active ones
    (``reft_kernels.kernels``). Raises ValueError for a variant the call cannot take."""
    variants = variants if variants is not None else V.active()
    device = device or (limits.name if limits is not None else "cpu")
    if backend == "torch":
        return Plan("torch", device, "torch", "torch", finish="torch matmuls and sums (deterministic per device)",
                    measured=False)
    if backend == "cuda":
        bwd = variants.choice("cuda_lowrank_bwd")
        if bwd == "cluster" and not (limits is not None and limits.clusters and cluster_shape_ok(call.d, call.r)):
            raise ValueError(f"kernels(cuda_lowrank_bwd='cluster') takes r <= 16 and d <= 4096 on a GPU with "
                             f"thread-block clusters (sm_90), got r={call.r}, d={call.d} on {device}; use 'split'")
        finish = f"extension partial sums, {variants.choice('cuda_finish')} finish"
        if bwd == "split":
            finish += f", {variants.choice('cuda_params')} parameter kernel"
        return Plan("cuda", device, "cuda", bwd, finish=finish,
                    measured=False, chosen_by=("rule", "requested" if variants.cuda_lowrank_bwd else "rule"))
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'cuda' or 'torch', got {backend!r}")
    limit = triton_max_rank(call.dtype)
    if call.r > limit:
        raise ValueError(f"the Triton kernels take ranks up to {limit} for {call.dtype} activations, got r={call.r}")
    fwd, fwd_by = fwd_variant(call, limits, variants.lowrank_fwd)
    bwd, bwd_by = bwd_variant(call, limits, variants.lowrank_bwd)
    bwd_l = bwd_launches(call, bwd, limits)
    finish = ("one fixed-order fp32 sum over the programs' partial rows (ops/finish.py)"
              if any(launch.kernel == "_param_finish_kernel" for launch in bwd_l)
              else "the one program row's partials (no sum)")
    measured = ("lowrank_fwd", fwd) in V.MEASURED and ("lowrank_bwd", bwd) in V.MEASURED
    return Plan("triton", device, fwd, bwd, fwd_launches(call, fwd, limits), bwd_l, finish, measured,
                (fwd_by, bwd_by))
