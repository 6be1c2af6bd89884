"""The L2-resident one-pass forward (``ops/lowrank_edit/triton_fwd_resident.py``), forced with
``reft_kernels.kernels(lowrank_fwd="resident")``: forward and every gradient (its saved latents feed
the backward) against the float64 reference with programs looping over several row blocks, over
the layouts, index modes, terms, activations and dtypes; and its grid planner
(``plan.resident_grid``) with the H100's figures and at the small-d / large-d edges."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import kernels, lowrank_edit, lowrank_edit_
from reft_kernels._backend import available_backends
from reft_kernels._device import H100, SmLimits
from reft_kernels.ops.lowrank_edit import plan as P

from .._helpers import check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, padded_index

MB = 1024 * 1024


@pytest.fixture
def forced(device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")
    with kernels(lowrank_fwd="resident"):
        yield


def _check(base, view, params, *, inplace=False, act=None, index=None):
    fn = lowrank_edit_ if inplace else lowrank_edit
    return check_against_reference(fn, lowrank_ref_fn, base, view, params, inplace=inplace,
                                   kernel_kwargs=dict(act=act, index=index, backend="triton"),
                                   ref_kwargs=dict(act=act, index=index))


def test_resident_path_loops_over_several_row_blocks_per_program(forced, device):
    """On the interpreter a program of the resident grid loops over more than one row block (150
    rows: 3 blocks of 64 over 2 programs), the plan the launcher follows."""
    if device.type != "cpu":
        pytest.skip("the interpreter's plan")
    (launch,) = P.plan(P.Call(150, 40, 3, torch.float32, has_C=True, tied=False, has_c=True)).fwd_launches
    assert (launch.kernel, launch.grid, launch.block_m) == ("_lowrank_edit_fwd_resident_kernel", (2,), 64)


@pytest.mark.parametrize("d,r", [(1, 1), (100, 3), (257, 16), (300, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("terms,tied,act", [("BAaCc", False, None), ("BAa", True, "gelu"), ("Ba", False, None),
                                            ("BAaC", False, "tanh")], ids=["noreft", "loreft-gelu", "lobireft", "C-tanh"])
def test_resident_forward_and_grads(forced, device, d, r, terms, tied, act):
    base, view = make_base("contiguous", (150,), d, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, r, device=device, terms=terms, tied=tied), act=act)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("mode", ["out", "out_index", "inplace", "inplace_index"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (10, 15)), ("transposed", (9, 15)), ("strided_cols", (6, 25)),
                                         ("strided_rows", (5, 27))])
def test_resident_layouts_and_index(forced, device, mode, layout, lead, act):
    """Padding (-1) entries included: their rows are skipped and their latent is zero."""
    d, r = 72, 5
    base, view = make_base(layout, lead, d, device=device)
    base.requires_grad_()
    n = lead[0] * lead[1]
    index = padded_index(n, n // 2, 3, device=device) if mode.endswith("index") else None
    _check(base, view, make_lowrank_params(d, r, device=device, tied=True, terms="BAa"),
           inplace=mode.startswith("inplace"), index=index, act=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resident_low_precision(forced, device, dtype):
    base, view = make_base("contiguous", (140,), 96, dtype=dtype, device=device)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(96, 8, device=device, tied=True, terms="BAa"), act="gelu")


def test_resident_matches_rowblock_and_is_deterministic(forced, device):
    """Same latent and output as the previous kernel up to rounding, bitwise the same twice."""
    h = torch.randn(200, 130, device=device)
    p = make_lowrank_params(130, 6, device=device, requires_grad=False)
    a = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    b = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    assert torch.equal(a, b)
    with kernels(lowrank_fwd="rowblock"):
        c = lowrank_edit(h, p["B"], p["A"], p["a"], p["C"], p["c"], backend="triton")
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_resident_empty_and_all_padding(forced, device):
    h = torch.randn(0, 16, device=device)
    p = make_lowrank_params(16, 2, device=device, requires_grad=False)
    assert lowrank_edit(h, **p, backend="triton").shape == (0, 16)
    h = torch.randn(70, 16, device=device)
    before = h.clone()
    lowrank_edit_(h, **p, index=torch.full((70,), -1, device=device), backend="triton")
    assert torch.equal(h, before)


# ----------------------------------------------------------------------------- planner (pure)

def test_plan_h100_reference_shape():
    """bf16, N = 16384, d = 4096: 16-row blocks, one program per SM, 17 MB held of a 50 MB L2."""
    block_m, progs = P.resident_grid(16384, 4096, 2, H100, lambda bm: 2)
    assert (block_m, progs) == (16, 132)
    assert progs * block_m * 4096 * 2 <= H100.l2_bytes // 2
    # the previous kernel's footprint at this shape, for the record: 264 programs x 512 KB
    assert 2 * 132 * 64 * 4096 * 2 > H100.l2_bytes


def test_plan_taller_blocks_when_they_fit():
    # d = 2048 bf16: 132 x 32 rows x 4 KB = 17 MB fits, 64 rows would not
    assert P.resident_grid(16384, 2048, 2, H100, lambda bm: 4) == (32, 132)
    # fp32 d = 4096 is as wide as bf16 d = 8192: back to 16 rows
    assert P.resident_grid(16384, 4096, 4, H100, lambda bm: 4)[0] == 16


def test_plan_small_d_uses_the_occupancy():
    """d = 256 bf16: 64-row blocks leave room for 6 programs per SM; the occupancy decides."""
    seen = []
    assert P.resident_grid(65536, 256, 2, H100, lambda bm: seen.append(bm) or 3) == (64, 3 * 132)
    assert seen == [64]
    assert P.resident_grid(65536, 256, 2, H100, lambda bm: 20) == (64, 6 * 132)  # the L2 budget caps it
    assert P.resident_grid(65536, 256, 2, H100, lambda bm: None) == (64, 132)  # unknown occupancy: one


def test_plan_large_d_falls_back_to_one_program_per_sm():
    """d = 65536 fp32: even 16 rows per SM overflow half the L2 (553 MB): keep every SM busy."""
    assert P.resident_grid(16384, 65536, 4, H100, lambda bm: 1) == (16, 132)
    assert P.resident_grid(40, 65536, 4, H100, lambda bm: 1) == (16, 3)


def test_plan_never_more_programs_than_row_blocks_and_reads_the_card():
    assert P.resident_grid(100, 4096, 2, H100, lambda bm: 1) == (16, 7)
    assert P.resident_grid(1, 8, 2, H100, lambda bm: 8) == (64, 1)
    small_l2 = SmLimits(sms=108, l2_bytes=40 * MB)  # an A100: 108 SMs, 40 MB
    block_m, progs = P.resident_grid(16384, 4096, 2, small_l2, lambda bm: 1)
    assert (block_m, progs) == (16, 108) and progs * block_m * 4096 * 2 <= 20 * MB


def test_gpu_tiles_cover_every_rank_and_dtype():
    for fp32, ranks in ((True, (16, 32, 64)), (False, (16, 32, 64, 128))):
        dtype = torch.float32 if fp32 else torch.bfloat16
        for r_pad in ranks:
            assert 16 in P.resident_row_blocks(r_pad, dtype)  # the planner's last resort
            for bm in P.resident_row_blocks(r_pad, dtype):
                block_d, warps, stages = P.resident_tile(bm, 4096, r_pad, dtype)
                assert block_d >= 16 and warps in (4, 8) and stages >= 2
                assert P.resident_tile(bm, 20, r_pad, dtype)[0] == min(block_d, 32)  # shrunk to d
