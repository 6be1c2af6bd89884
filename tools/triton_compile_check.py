"""Compile every Triton kernel ahead of time for NVIDIA GPUs, with no GPU present, and check the
GPU-only constraints that the CPU interpreter cannot see.

For each kernel and a spread of the launch configurations the launchers pick on a GPU (tile
sizes from the ``plan.py`` tile functions of each op, every
dtype, rank, optional term, index and activation flag that changes the code), Triton compiles to a cubin for sm_80 (A100) and sm_90a (H100/H200);
``cuobjdump --dump-resource-usage`` then reports registers, stack and local memory. The check
fails on a compile error (e.g. a ``tl.dot`` dimension below 16), on any stack frame or local
memory beyond ``SPILL_BYTES_ALLOWED`` (register spills), or when the shared memory Triton asks
for exceeds the SM's limit. Each configuration is also compiled with every integer argument at 1
and at a multiple of 16, the values Triton's launcher specialises on, and traced with each one
alone at 1 (see "the integer sweep" below).

    python tools/triton_compile_check.py [--quick] [--arch 80 90] [--no-sweep]

Run without ``TRITON_INTERPRET`` (kernels must be real ``@triton.jit`` functions), once with each
supported Triton (the GPU machine's 3.6 and the latest): their register allocation differs, and a
tile that fits one may spill on the other. This is strong evidence, not proof; the device run
remains the final word.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402

from reft_kernels import _activations  # noqa: E402
from reft_kernels.ops.lowrank_edit import plan as lowrank_plan  # noqa: E402
from reft_kernels.ops.lowrank_edit.plan import (  # noqa: E402
    STRIDED_TILE, bias_block_m, padded_rank, strided, triton_max_rank,
)
from reft_kernels.ops.lowrank_edit.plan import rowblock_tile as _tiles  # noqa: E402
from reft_kernels.ops.lowrank_edit.plan import split_d_tile as small_n_tiles  # noqa: E402
from reft_kernels.ops.lowrank_edit.triton_impl import (  # noqa: E402
    _lowrank_bias_partials_kernel, _lowrank_edit_bwd_kernel, _lowrank_edit_bwd_latent_kernel,
    _lowrank_edit_fwd_kernel,
)
from reft_kernels.ops.finish import FINISH_BLOCK as _FINISH_BLOCK, _param_finish_kernel  # noqa: E402
from reft_kernels.ops.lowrank_edit.triton_fwd_resident import _lowrank_edit_fwd_resident_kernel  # noqa: E402
from reft_kernels.ops.lowrank_edit.triton_small_n import (  # noqa: E402
    _lowrank_apply_kernel, _lowrank_latent_part_kernel,
)
from reft_kernels.ops.red.plan import bwd_tile as _red_bwd_tiles, fwd_tile as _red_tiles  # noqa: E402
from reft_kernels.ops.red.triton_impl import _red_bwd_kernel, _red_fwd_kernel  # noqa: E402
from reft_kernels.ops.multi.triton_impl import (  # noqa: E402
    _lowrank_multi_fwd_kernel, _red_multi_fwd_kernel, red_tiles as _red_multi_tiles, tiles as _multi_tiles,
)
from reft_kernels._device import H100  # noqa: E402
from reft_kernels._triton import dot_precision  # noqa: E402

# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
# ptxas sometimes keeps an 8-16 byte stack frame in kernels using only 80-128 registers (seen at
# R_PAD = 64/128 with 8 warps): its own occupancy choice, not a
# shortage of registers. Anything larger is a real spill and fails the check.
SPILL_BYTES_ALLOWED = 16
# Ranks compiled: each padded rank (R_PAD = 16, 32, 64, 128) at a rank that is not a multiple of 16
# (no divisibility hint), 64 and 128 (with one), and r = 1; the sweep below adds multiples of 16
# and 1 for every configuration. --quick: per dtype a small padded rank and the largest the dtype
# takes (fp32: 16 and 64, else 32 and 128).
RANKS = [1, 8, 24, 33, 64, 100, 128]
RANKS_QUICK = {"fp32": [8, 64], "bf16": [24, 100], "fp16": [24, 100]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _source(kernel, values, constexprs):
    """ASTSource for ``kernel`` called with runtime ``values`` (name -> tensor or int), specialised
    exactly as Triton's launcher does (ints equal to 1 become constants, multiples of 16 and
    16-byte-aligned pointers get divisibility hints)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            sig[name] = "constexpr"
            continue
        ty, attr = native_specialize_impl(BaseBackend, values[name], False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = values[name]
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)


def _t(dtype):
    return torch.empty(16, dtype=DTYPES.get(dtype, dtype))


def red_configs(quick, n=16384):
    for dt, d in itertools.product(["fp32", "bf16"], [4096] if quick else [100, 4096]):
        block_m, block_d, warps = _red_tiles(d, on_gpu=True)
        vals = dict(h_ptr=_t(dt), s_ptr=_t("fp32"), t_ptr=_t("fp32"), y_ptr=_t(dt), n_rows=n, d=d,
                    stride_h_row=d, stride_h_col=1, stride_y_row=d)
        for scale, bias in [(True, True), (True, False), (False, True)]:
            yield _red_fwd_kernel, vals, dict(
                HAS_SCALE=scale, HAS_BIAS=bias, BLOCK_M=block_m, BLOCK_D=block_d), warps, dt
        for tile2d in (False, True):  # kernels(red_bwd='rowsum' / 'tile2d')
            block_m, block_d, warps = _red_bwd_tiles(d, on_gpu=True, tile2d=tile2d)
            vals = dict(g_ptr=_t(dt), h_ptr=_t(dt), s_ptr=_t("fp32"), dh_ptr=_t(dt), ds_part_ptr=_t("fp32"),
                        dt_part_ptr=_t("fp32"), n_rows=n, d=d, rows_per_prog=1024, stride_g_row=d,
                        stride_g_col=1, stride_h_row=d, stride_h_col=1, stride_dh_row=d, stride_part=2 * d)
            yield _red_bwd_kernel, vals, dict(
                HAS_SCALE=True, NEED_DH=True, NEED_DS=True, NEED_DT=True, BLOCK_M=block_m, BLOCK_D=block_d,
                ACC_2D=tile2d), warps, dt


# (name, HAS_A, HAS_a, HAS_C, TIED, HAS_c): the term patterns of pyreft's six methods
METHODS = [
    ("loreft", True, True, False, True, False),
    ("noreft", True, True, True, False, True),
    ("direft", True, True, False, False, False),
    ("lobireft", False, True, False, False, False),
]


def lowrank_configs(quick, d=4096):
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]
    for dt, r, (name, has_A, has_a, has_C, tied, has_c), index, act in itertools.product(
            dtypes, RANKS, METHODS, [False, True], [_activations.IDENTITY, _activations.GELU]):
        if (quick and (index and act or r not in RANKS_QUICK[dt])) or r > triton_max_rank(DTYPES[dt]):
            continue
        r_pad = padded_rank(r)
        prec = dot_precision(DTYPES[dt])
        f32 = _t("fp32")
        for n in [16384] if quick else [40, 16384]:
            block_m, block_d, warps = _tiles("fwd", n, d, r_pad, DTYPES[dt], on_gpu=True)
            vals = dict(h_ptr=_t(dt), y_ptr=_t(dt), hsave_ptr=_t(dt), idx_ptr=_t(torch.int64),
                        A_ptr=f32, a_ptr=f32, B_ptr=f32, C_ptr=f32, c_ptr=f32, z_ptr=f32, u_ptr=f32,
                        n_rows=n, d=d, r=r, stride_h_row=d, stride_h_col=1, stride_y_row=d, stride_y_col=1)
            yield _lowrank_edit_fwd_kernel, vals, dict(
                HAS_INDEX=index, HAS_A=has_A, HAS_a=has_a, HAS_C=has_C, TIED=tied, HAS_c=has_c,
                ACT=act, SAVE_H=index, SAVE_U=act != 0, R_PAD=r_pad, BLOCK_M=block_m,
                BLOCK_D=block_d, DOT_PREC=prec), warps, dt
            vals = dict(g_ptr=_t(dt), idx_ptr=_t(torch.int64), B_ptr=f32, u_ptr=f32, gz_ptr=f32, ga_ptr=f32,
                        n_rows=n, d=d, r=r, stride_g_row=d, stride_g_col=1)
            block_m, block_d, warps = _tiles("lat", n, d, r_pad, DTYPES[dt], on_gpu=True)
            yield _lowrank_edit_bwd_latent_kernel, vals, dict(
                HAS_INDEX=index, ACT=act, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d,
                DOT_PREC=prec), warps, dt
        block_m, block_d, warps = _tiles("bwd", 16384, d, r_pad, DTYPES[dt], on_gpu=True)
        vals = bwd_values(dt, d, r, has_A, has_a, has_C, has_c)
        yield _lowrank_edit_bwd_kernel, vals, dict(
            HAS_INDEX=index, HAS_A=has_A, HAS_C=has_C, TIED=tied, ACT=act, NEED_DH=True,
            NEED_DA=has_A, NEED_DB=True, NEED_DC=has_C, R_PAD=r_pad,
            BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec), warps, dt
        if has_a or has_c:
            yield _lowrank_bias_partials_kernel, bias_values(d, r, has_A, has_a, has_C, has_c), dict(
                ACT=act, NEED_DA_VEC=has_a, NEED_DC_VEC=has_c, R_PAD=r_pad, BLOCK_M=bias_block_m(r_pad),
                NUM_STAGES=3), 8, dt
        # the L2-resident forward (ops/lowrank_edit/triton_fwd_resident.py): every row block the
        # planner may pick (the one it picks at this shape on an H100 with --quick)
        elem = DTYPES[dt].itemsize
        blocks = lowrank_plan.resident_row_blocks(r_pad, DTYPES[dt])
        picked = lowrank_plan.resident_grid(16384, d, elem, H100, lambda bm: 1, blocks)[0]
        for bm in [picked] if quick else blocks:
            block_d, warps, stages = lowrank_plan.resident_tile(bm, d, r_pad, DTYPES[dt])
            vals = dict(h_ptr=_t(dt), y_ptr=_t(dt), hsave_ptr=_t(dt), idx_ptr=_t(torch.int64),
                        A_ptr=f32, a_ptr=f32, B_ptr=f32, C_ptr=f32, c_ptr=f32, z_ptr=f32, u_ptr=f32,
                        n_rows=16384, d=d, r=r, n_progs=132, stride_h_row=d, stride_h_col=1, stride_y_row=d,
                        stride_y_col=1)
            yield _lowrank_edit_fwd_resident_kernel, vals, dict(
                HAS_INDEX=index, HAS_A=has_A, HAS_a=has_a, HAS_C=has_C, TIED=tied, HAS_c=has_c,
                ACT=act, SAVE_H=index, SAVE_U=act != 0, R_PAD=r_pad, BLOCK_M=bm, BLOCK_D=block_d,
                NUM_STAGES=stages, DOT_PREC=prec), warps, dt


def bwd_values(dt, d, r, has_A, has_a, has_C, has_c, n=16384):
    """Runtime arguments of ``_lowrank_edit_bwd_kernel`` with the partial layout of the launcher
    (dA, dB, dC, da, dc side by side, those needed)."""
    f32 = _t("fp32")
    sizes = [r * d if has_A else 0, r * d, r * d if has_C else 0, r if has_a else 0, r if has_c else 0]
    return dict(g_ptr=_t(dt), h_ptr=_t(dt), dh_ptr=_t(dt), idx_ptr=_t(torch.int64), A_ptr=f32, B_ptr=f32,
                C_ptr=f32, z_ptr=f32, gz_ptr=f32, ga_ptr=f32, dA_part_ptr=f32, dB_part_ptr=f32, dC_part_ptr=f32,
                n_rows=n, d=d, r=r, rows_per_prog=1024, part_width=-(-sum(sizes) // 16) * 16, stride_g_row=d, stride_g_col=1, stride_h_row=d, stride_h_col=1,
                stride_dh_row=d, stride_dh_col=1)


def bias_values(d, r, has_A, has_a, has_C, has_c):
    """Runtime arguments of ``_lowrank_bias_partials_kernel`` (the launcher's partial layout)."""
    f32 = _t("fp32")
    sizes = [r * d if has_A else 0, r * d, r * d if has_C else 0, r if has_a else 0, r if has_c else 0]
    return dict(gz_ptr=f32, ga_ptr=f32, part_ptr=f32, n_rows=16384, r=r, rows_per_prog=1024,
                part_width=-(-sum(sizes) // 16) * 16, off_da_vec=sum(sizes[:3]), off_dc_vec=sum(sizes[:4]))


def finish_configs(quick):
    """The one-launch finish of the backward's parameter gradients (LoReFT r = 8, d = 4096)."""
    vals = dict(part_ptr=_t("fp32"), out_ptr=_t("fp32"), n_parts=4, width=2 * 8 * 4096 + 8, stride=2 * 8 * 4096 + 16)
    yield _param_finish_kernel, vals, dict(BLOCK=_FINISH_BLOCK), 4, "fp32"


def small_n_configs(quick, d=4096, n=448):
    """The split-d forward for few rows (ops/lowrank_edit/triton_small_n.py) at the f7+l7 size."""
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]
    for dt, r, (name, has_A, has_a, has_C, tied, has_c), act in itertools.product(
            dtypes, RANKS, METHODS, [_activations.IDENTITY, _activations.GELU]):
        if (quick and r not in RANKS_QUICK[dt]) or r > triton_max_rank(DTYPES[dt]):
            continue
        r_pad, prec, f32 = padded_rank(r), dot_precision(DTYPES[dt]), _t("fp32")
        block_m, block_d, warps = small_n_tiles(n, d, r_pad, DTYPES[dt], on_gpu=True)
        has_cp = has_C or tied
        vals = dict(h_ptr=_t(dt), idx_ptr=_t(torch.int64), A_ptr=f32, C_ptr=f32, up_ptr=f32, pp_ptr=f32,
                    n_rows=n, d=d, r=r, cols_per_prog=512, stride_h_row=d, stride_h_col=1)
        yield _lowrank_latent_part_kernel, vals, dict(
            HAS_INDEX=True, HAS_A=has_A, HAS_CP=has_cp, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PREC=prec), warps, dt
        # the backward's latent gz = g B^T (triton_small_n.bwd_latent_split)
        yield _lowrank_latent_part_kernel, vals, dict(
            HAS_INDEX=True, HAS_A=False, HAS_CP=True, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PREC=prec), warps, dt
        vals = dict(h_ptr=_t(dt), y_ptr=_t(dt), hsave_ptr=_t(dt), idx_ptr=_t(torch.int64), a_ptr=f32, B_ptr=f32,
                    c_ptr=f32, up_ptr=f32, pp_ptr=f32, z_ptr=f32, u_ptr=f32, n_rows=n, d=d, r=r, n_splits=8,
                    stride_h_row=d, stride_h_col=1, stride_y_row=d, stride_y_col=1)
        yield _lowrank_apply_kernel, vals, dict(
            HAS_INDEX=True, HAS_A=has_A, HAS_a=has_a, HAS_CP=has_cp, HAS_c=has_c, ACT=act, SAVE_H=True,
            SAVE_U=act != 0, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec), warps, dt


def multi_configs(quick, d=4096, n=16384):
    """The multi-adapter forward kernels (``ops/multi/triton_impl.py``): RED's with each term
    pattern; the low-rank edit's with each method's terms, with and without an index, at the ranks
    and activations of ``lowrank_configs``; their tiles from the package's ``red_tiles`` and
    ``tiles``."""
    f32 = _t("fp32")
    for dt, dd in itertools.product(["fp32", "bf16"], [d] if quick else [100, d]):
        block_m, block_d, warps = _red_multi_tiles(dd)
        vals = dict(h_ptr=_t(dt), ids_ptr=_t(torch.int64), s_ptr=f32, t_ptr=f32, y_ptr=_t(dt), n_rows=n, d=dd,
                    stride_h_row=dd, stride_h_col=1, stride_y_row=dd)
        for scale, bias in [(True, True), (True, False), (False, True)]:
            yield _red_multi_fwd_kernel, vals, dict(HAS_SCALE=scale, HAS_BIAS=bias, BLOCK_M=block_m,
                                                    BLOCK_D=block_d), warps, dt
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]
    for dt, r, (name, has_A, has_a, has_C, tied, has_c), index, act in itertools.product(
            dtypes, RANKS, METHODS, [False, True], [_activations.IDENTITY, _activations.GELU]):
        if (quick and (index and act or r not in RANKS_QUICK[dt])) or r > triton_max_rank(DTYPES[dt]):
            continue
        r_pad, block_m, block_d, warps = _multi_tiles(r, d)
        vals = dict(h_ptr=_t(dt), y_ptr=_t(dt), hsave_ptr=_t(dt), idx_ptr=_t(torch.int64), ids_ptr=_t(torch.int64),
                    A_ptr=f32, a_ptr=f32, B_ptr=f32, C_ptr=f32, c_ptr=f32, z_ptr=f32, u_ptr=f32,
                    n_rows=n, d=d, r=r, stride_h_row=d, stride_h_col=1, stride_y_row=d, stride_y_col=1)
        yield _lowrank_multi_fwd_kernel, vals, dict(
            HAS_INDEX=index, HAS_A=has_A, HAS_a=has_a, HAS_C=has_C, TIED=tied, HAS_c=has_c, ACT=act,
            SAVE_H=index, SAVE_U=act != 0, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d), warps, dt


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


KERNELS = {k.fn.__name__: k for k in (_red_fwd_kernel, _red_bwd_kernel, _lowrank_edit_fwd_kernel,
                                       _lowrank_edit_fwd_resident_kernel, _lowrank_edit_bwd_latent_kernel,
                                       _lowrank_edit_bwd_kernel, _lowrank_bias_partials_kernel,
                                       _param_finish_kernel,
                                       _lowrank_latent_part_kernel, _lowrank_apply_kernel,
                                       _red_multi_fwd_kernel, _lowrank_multi_fwd_kernel)}


def _error_line(exc: Exception) -> str:
    """One line for a compile error: Triton's ``at line:col:`` and the error itself (the last line;
    the lines between repeat the kernel's source)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return text[:300]


def _compile_one(job):
    """Compile one configuration; return (registers, shared bytes, spill bytes) or an error line."""
    name, values, consts, warps, _dt, arch = job[:6]
    try:
        k = triton.compile(_source(KERNELS[name], values, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps})
        use = resource_usage(k.asm["cubin"])
    except Exception as exc:  # a compile error is a finding, reported per configuration
        return _error_line(exc)
    return use.get("REG", -1), k.metadata.shared, use.get("STACK", 0) + use.get("LOCAL", 0)


def _trace_one(job):
    """Trace one configuration to Triton IR (the frontend only, ~30 ms against ~1 s for a whole
    compile): where a specialised integer argument breaks the kernel's code (``n_rows.to(...)``
    on a constant, a loop-carried value changing type), it breaks here. Returns None or an error
    line."""
    name, values, consts, warps, _dt, arch = job[:6]
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": warps})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        codegen_fns, module_map = backend.get_codegen_implementation(options), backend.get_module_map()
    except Exception:  # noqa: BLE001 - a Triton whose internals differ: compile the whole way instead
        res = _compile_one(job)
        return res if isinstance(res, str) else None
    try:
        _source(KERNELS[name], values, consts).make_ir(target, options, codegen_fns, module_map, context)
    except Exception as exc:  # noqa: BLE001 - a finding
        return _error_line(exc)
    return None


def _run(job):
    return _trace_one(job) if job[6] == "trace" else _compile_one(job)


# ----------------------------------------------------------------------------- the integer sweep
#
# Triton's launcher specialises every integer argument on its value: 1 becomes a compile-time
# constant (a Python int inside the kernel: ``n_rows.to(tl.int64)`` fails to compile, a one-row
# launch of the split-d forward did on a GPU) and a multiple of 16 gets a divisibility hint (wider
# vector loads, other register use). The launch values of the configurations above are the
# typical ones; the sweep adds, per configuration:
# - "ints=1": every integer argument at 1 (all constants at once; those in NEVER_ONE keep their
#   launch value, and so does r where R_PAD > 16: r = 1 pads to 16), compiled: errors and spills;
# - "ints%16": every integer argument rounded up to a multiple of 16 (column strides included,
#   as for a transposed h: the low-rank launchers then take STRIDED_TILE), compiled: errors and
#   spills;
# each compiled with the tile the launchers pick for those values (``launch_tile``: d = 1 shrinks
# BLOCK_D to 16, one row BLOCK_M to 16, RED's tiles follow d);
# - "<name>=1": each integer argument alone at 1 (NEVER_ONE excepted), the others as launched,
#   traced to Triton IR only (cheap): what breaks when one argument is a constant and the next
#   is not.
# The compiled variants run for the widest tile (the most registers) of each kernel, term flags,
# fp32 or 16-bit activations and padded rank (with --quick: of each kernel and term flags), the
# traced ones for every configuration.

TILE_KEYS = ("BLOCK_M", "BLOCK_D", "NUM_STAGES", "R_PAD", "BLOCK")

# Integer arguments that no launcher ever passes as 1, and why: the sweep keeps their launch
# value (at 1 they would compile code that never runs: e.g. rows_per_prog = 1, a row loop of one
# iteration, compiled ``_lowrank_edit_bwd_kernel`` for fp32 R_PAD = 64 with a 400-byte stack).
NEVER_ONE = {
    "rows_per_prog": "a multiple of BLOCK_M (ops.plans.row_split)",
    "cols_per_prog": "a multiple of BLOCK_D (plan.split_d_shape)",
    "part_width": "the partial rows' stride, padded to a multiple of 16",
    "stride": "the partial rows' stride, padded to a multiple of 16",
    "n_parts": "at least 2 (one partial row is returned without the finish kernel)",
}


def _int_args(values: dict) -> list:
    return [k for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)]


# Kernels whose R_PAD is r's next power of two (no tl.dot, so no padding to 16): any r can be 1
# (``launch_tile`` then gives R_PAD = 1).
R_PAD_FROM_R = ("_lowrank_multi_fwd_kernel",)


def _can_be_one(values: dict, consts: dict, name: str = "") -> list:
    """The integer arguments a launch can pass as 1 (r only where it pads to R_PAD = 16, or where
    R_PAD follows r: ``R_PAD_FROM_R``)."""
    r_ok = name in R_PAD_FROM_R or consts.get("R_PAD", 16) == 16
    return [k for k in _int_args(values) if k not in NEVER_ONE and (k != "r" or r_ok)]


def spec_class(v: int) -> str:
    """How Triton's launcher specialises the integer ``v``."""
    if v == 1:
        return "1"
    if not -2 ** 31 <= v < 2 ** 31:
        return "i64"
    return "16" if v % 16 == 0 else "-"


def all_ones(values: dict, consts: dict, name: str = "") -> dict:
    return {**values, **{k: 1 for k in _can_be_one(values, consts, name)}}


def all_sixteens(values: dict) -> dict:
    return {**values, **{k: max(16, -(-values[k] // 16) * 16) for k in _int_args(values)}}


def _spec_key(name, values, consts, warps, dt, tiles=True):
    kept = consts.items() if tiles else ((k, v) for k, v in consts.items() if k not in TILE_KEYS)
    return (name, tuple(sorted(kept)), dt, warps if tiles else None,
            tuple(sorted((k, spec_class(values[k])) for k in _int_args(values))))


def _weight(consts) -> int:
    return consts.get("R_PAD", 0) * consts.get("BLOCK_M", 1) * consts.get("BLOCK_D", 1)


def launch_tile(name: str, values: dict, consts: dict, warps: int, dt: str):
    """(constexprs, warps) with the tile the launchers pick on a GPU for these integer arguments
    (the package's own tile functions: BLOCK_M shrunk to the rows, BLOCK_D to d, RED's tiles from
    d, ``STRIDED_TILE`` with a column stride other than 1), so that a swept value compiles the
    kernel a launch with it would run."""
    cols = [v for k, v in values.items() if k.startswith("stride_") and k.endswith("_col")]
    dtype, n, d = DTYPES[dt], values.get("n_rows"), values.get("d")
    consts = dict(consts)
    if name == "_red_fwd_kernel":
        block_m, block_d, warps = _red_tiles(d, on_gpu=True)
    elif name == "_red_bwd_kernel":
        block_m, block_d, warps = _red_bwd_tiles(d, on_gpu=True, tile2d=consts["ACC_2D"], strided_cols=strided(*cols))
    elif name in _KINDS:
        block_m, block_d, warps = _tiles(_KINDS[name], n, d, consts["R_PAD"], dtype, True, strided(*cols))
    elif name in ("_lowrank_latent_part_kernel", "_lowrank_apply_kernel"):
        block_m, block_d, warps = small_n_tiles(n, d, consts["R_PAD"], dtype, True, strided(*cols))
    elif name == "_red_multi_fwd_kernel":
        block_m, block_d, warps = _red_multi_tiles(d)
    elif name == "_lowrank_multi_fwd_kernel":  # its R_PAD is r's next power of two (no tl.dot)
        consts["R_PAD"], block_m, block_d, warps = _multi_tiles(values["r"], d)
    elif name == "_lowrank_edit_fwd_resident_kernel":
        block_m = STRIDED_TILE[0] if strided(*cols) else consts["BLOCK_M"]
        block_d, warps, consts["NUM_STAGES"] = lowrank_plan.resident_tile(block_m, d, consts["R_PAD"], dtype,
                                                                           strided(*cols))
    else:  # the bias partials and the finish: tiles that do not depend on the integer arguments
        return consts, warps
    consts.update(BLOCK_M=block_m, BLOCK_D=block_d)
    return consts, warps


_KINDS = {"_lowrank_edit_fwd_kernel": "fwd", "_lowrank_edit_bwd_latent_kernel": "lat", "_lowrank_edit_bwd_kernel": "bwd"}


def jobs_for(configs, archs, quick: bool, sweep: bool = True):
    """(kernel name, values, constexprs, warps, dtype, arch, "compile" | "trace", variant) for
    every configuration and sweep variant, each specialisation once."""
    configs = list(configs)
    plain = []  # (kernel name, values, constexprs, warps, dtype, variant, stage)
    for kernel, values, consts, warps, dt in configs:
        plain.append((kernel.fn.__name__, values, consts, warps, dt, "as launched", "compile"))
    if sweep:
        # the compiled variants: one configuration per kernel and term flags (with --quick), or per
        # kernel, term flags, fp32 or not and padded rank (without; bf16 and fp16 share their tiles
        # and compile alike): the widest tile (the most registers)
        best = {}
        for cfg in configs:
            kernel, values, consts, warps, dt = cfg
            flags = tuple(sorted((k, v) for k, v in consts.items() if k not in TILE_KEYS + ("DOT_PREC",)))
            key = ((kernel.fn.__name__, flags) if quick else
                   (kernel.fn.__name__, flags, dt == "fp32", consts.get("R_PAD")))  # bf16 stands for fp16
            if key not in best or _weight(consts) > _weight(best[key][2]):
                best[key] = cfg
        compiled = list(best.values())
        for kernel, values, consts, warps, dt in compiled:
            plain.append((kernel.fn.__name__, all_ones(values, consts, kernel.fn.__name__), consts, warps, dt,
                          "ints=1", "compile"))
            plain.append((kernel.fn.__name__, all_sixteens(values), consts, warps, dt, "ints%16", "compile"))
        for kernel, values, consts, warps, dt in configs:
            for k in _can_be_one(values, consts, kernel.fn.__name__):
                plain.append((kernel.fn.__name__, {**values, k: 1}, consts, warps, dt, f"{k}=1", "trace"))
    seen, jobs = set(), []
    for name, values, consts, warps, dt, variant, stage in plain:
        consts, warps = launch_tile(name, values, consts, warps, dt)
        # a traced variant's errors do not depend on the tile sizes: trace each once
        key = (stage, _spec_key(name, values, consts, warps, dt, tiles=stage == "compile"))
        if key in seen or (stage == "trace" and ("compile", _spec_key(name, values, consts, warps, dt)) in seen):
            continue
        seen.add(key)
        jobs += [(name, values, consts, warps, dt, arch, stage, variant) for arch in archs]
    return jobs


def all_configs(quick: bool):
    return (list(red_configs(quick)) + list(lowrank_configs(quick)) + list(finish_configs(quick))
            + list(small_n_configs(quick)) + list(multi_configs(quick)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller spread of configurations")
    ap.add_argument("--no-sweep", action="store_true",
                    help="only the launch values, not the sweep of integer arguments at 1 and at multiples of 16")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compile processes")
    ap.add_argument("--verbose", action="store_true", help="print every compiled configuration, not only failures")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--dry-run", action="store_true",
                    help="list what would be compiled or traced (kernel, arch, stage, variant, dtype, integer "
                         "arguments; tab-separated)")
    args = ap.parse_args(argv)
    t0 = time.time()
    jobs = jobs_for(all_configs(args.quick), args.arch, args.quick, sweep=not args.no_sweep)
    if args.dry_run:
        for name, values, _consts, _warps, dt, arch, stage, variant in jobs:
            print("\t".join([name, str(arch), stage, variant, dt, *(f"{k}={values[k]}" for k in _int_args(values))]))
        return 0
    print(f"Triton {triton.__version__}")
    print(f"{'kernel':34s} {'arch':>4s} {'regs':>4s} {'smem':>6s} {'spill':>5s}  variant: constexprs "
          "(failures only unless --verbose)")
    failures = 0
    counts = {"compile": 0, "trace": 0}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for job, res in zip(jobs, pool.map(_run, jobs, chunksize=4)):
            name, values, consts, warps, dt, arch, stage, variant = job
            counts[stage] += 1
            ints = " ".join(f"{k}={values[k]}" for k in _int_args(values))
            desc = (f"{variant}: " + " ".join(f"{k}={v}" for k, v in consts.items())
                    + f" warps={warps} {dt} [{ints}]")
            if isinstance(res, str):
                failures += 1
                print(f"{name:34s} {arch:4d} FAILED to {stage}: {res}  {desc}")
                continue
            if res is None:  # traced without error
                continue
            regs, smem, spill = res
            bad = spill > SPILL_BYTES_ALLOWED or smem > SHARED_LIMIT[arch]
            failures += bad
            if bad or args.verbose:
                print(f"{name:34s} {arch:4d} {regs:4d} {smem:6d} {spill:5d}  {desc}{'  <-- FAIL' if bad else ''}")
    print(f"Triton {triton.__version__}: {counts['compile']} compiled and {counts['trace']} traced "
          f"(configurations x archs {args.arch}) in {time.time() - t0:.0f} s: "
          f"{'all compiled within limits' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
