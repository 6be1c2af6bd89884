"""The parameter-gradient finish and grid planning: one deterministic launch (``ops/finish.py``)
sums every needed dA, dB, dC, da, dc over the row-split programs in a fixed order; the grid is one
whole wave of the compiled kernel's resident blocks (``_triton.resident_blocks`` /
``ops.plans.row_split``, pure arithmetic tested here with the H100's figures; the compiled-kernel
read-out itself needs a GPU). Which kernels a backward launches: tests/ops/test_plans.py."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import _device, _triton, lowrank_edit, lowrank_edit_
from reft_kernels._backend import available_backends
from reft_kernels.benchmark.launches import counting
from reft_kernels.ops.finish import finish
from reft_kernels.ops.lowrank_edit import plan as P
from reft_kernels.ops.lowrank_edit import triton_impl
from reft_kernels.ops.plans import row_split

from .._helpers import bits, check_against_reference, lowrank_ref_fn, make_lowrank_params, padded_index, \
    run_with_grads


@pytest.fixture
def triton_here(device):
    if "triton" not in available_backends(device):
        pytest.skip("Triton does not run here")


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("terms,tied", [("BAaCc", False), ("BAa", True), ("Ba", False), ("BC", False), ("BAc", False)],
                         ids=["noreft", "loreft", "lobireft", "B_C", "B_A_c"])
def test_every_param_grad_in_one_finish_launch(triton_here, device, terms, tied, act):
    """All needed parameter gradients come from one finish launch, match the float64 reference,
    and are bitwise the same on a second run."""
    d, r, n = 70, 5, 300  # 300 rows: 5 row blocks of 64 on the interpreter, split over 2 programs
    params = make_lowrank_params(d, r, device=device, terms=terms, tied=tied)
    base = torch.randn(n, d, device=device, requires_grad=True)
    g = torch.randn(n, d, device=device)
    with counting() as counter:
        check_against_reference(lowrank_edit, lowrank_ref_fn, base, lambda t: t, params, g=g,
                                kernel_kwargs=dict(act=act, backend="triton"), ref_kwargs=dict(act=act))
    assert counter.by_name["triton:_param_finish_kernel"] == 1
    runs = [run_with_grads(lowrank_edit, base, lambda t: t, params, g, act=act, backend="triton")[1]
            for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(bits(runs[0][k]), bits(runs[1][k])), k


def test_bias_grads_only(triton_here, device):
    """Only a and c require grad (no weight, no h): their sums still come from the kernels."""
    d, r, n = 33, 3, 260
    params = make_lowrank_params(d, r, device=device, requires_grad=False)
    params["a"].requires_grad_()
    params["c"].requires_grad_()
    h = torch.randn(n, d, device=device)
    check_against_reference(lowrank_edit, lowrank_ref_fn, h, lambda t: t, params,
                            kernel_kwargs=dict(act="tanh", backend="triton"), ref_kwargs=dict(act="tanh"))


def test_index_padding_rows_add_nothing(triton_here, device):
    d, r, n = 40, 4, 320
    params = make_lowrank_params(d, r, device=device)
    base = torch.randn(n, d, device=device, requires_grad=True)
    index = padded_index(n, 290, 20, device=device)
    check_against_reference(lowrank_edit_, lowrank_ref_fn, base, lambda t: t * 1.0, params, inplace=True,
                            kernel_kwargs=dict(act="silu", index=index, backend="triton"),
                            ref_kwargs=dict(act="silu", index=index))


def test_one_program_needs_no_finish(triton_here, device):
    params = make_lowrank_params(24, 3, device=device)
    base = torch.randn(10, 24, device=device, requires_grad=True)  # one row block: P = 1
    with counting() as counter:
        check_against_reference(lowrank_edit, lowrank_ref_fn, base, lambda t: t, params,
                                kernel_kwargs=dict(backend="triton"), ref_kwargs={})
    assert counter.by_name["triton:_param_finish_kernel"] == 0
    assert "_param_finish_kernel" not in P.plan(P.Call(10, 24, 3, torch.float32)).kernels()


@pytest.mark.parametrize("progs,width", [(2, 1), (5, 1000), (7, 4099), (33, 20)])
def test_finish_sums_in_row_order(triton_here, device, progs, width):
    """Bitwise the left-to-right fp32 sum over the partial rows (padded to a longer row stride, as
    the launcher pads them), close to the float64 sum."""
    padded = torch.randn(progs, width + 13, device=device) * torch.logspace(-3, 3, progs, device=device)[:, None]
    part = padded[:, :width]
    out = finish(padded, progs, width)
    want = part[0].clone()
    for p in range(1, progs):
        want = want + part[p]
    assert torch.equal(bits(out), bits(want))
    torch.testing.assert_close(out.double(), part.double().sum(0), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- occupancy (pure)

def test_blocks_per_sm_h100():
    """The design table's figures: the backward's 146 registers and 56 KiB fit one 8-warp block per
    SM; RED forward's 56 registers, 2 KiB, 4 warps fit nine (by registers)."""
    assert _device.blocks_per_sm(146, 56 * 1024, 8) == 1
    assert _device.blocks_per_sm(56, 2048, 4) == 9
    assert _device.blocks_per_sm(32, 0, 4) == 16  # threads: 2048 / 128
    assert _device.blocks_per_sm(32, 0, 1) == 32  # the block limit
    assert _device.blocks_per_sm(40, 120 * 1024, 4) == 1  # shared memory
    assert _device.blocks_per_sm(255, 0, 8) == 1 and _device.blocks_per_sm(255, 0, 16) == 0
    a100 = _device.SmLimits(sms=108, smem=167936)
    assert _device.blocks_per_sm(100, 80 * 1024, 4, a100) == 2


def test_row_split_one_wave():
    """Reference shape (N = 16384, 32-row blocks, 32 column blocks, 132 SMs): one resident block
    per SM gives P = 4 (128 programs, one wave) where four per SM gave 17 (544, 4.1 waves)."""
    h100 = _device.H100
    assert row_split(16384, 32, 32, h100, per_sm=1) == (4, 4096)
    assert row_split(16384, 32, 32, h100)[0] == 17  # occupancy unknown: PROGRAMS_PER_SM
    assert row_split(16384, 16, 16, h100, per_sm=4) == (32, 512)  # 33 wanted, evened out
    assert row_split(16384, 32, 200, h100, per_sm=1) == (1, 16384)  # at least one
    assert row_split(40, 32, 1, h100, per_sm=1) == (2, 32)  # at most the row blocks
    progs, rows = row_split(1000, 16, 3, h100, per_sm=2)
    assert progs * 3 <= 2 * 132 and rows % 16 == 0 and (progs - 1) * rows < 1000 <= progs * rows


def test_row_split_off_gpu_keeps_the_small_count():
    assert row_split(1000, 64, 1, None) == (2, 512)
    assert row_split(1000, 64, 1, None, per_sm=3) == (2, 512)  # per_sm is a GPU notion
    assert _triton.resident_blocks(triton_impl._lowrank_edit_bwd_kernel, (), {}, 8, torch.device("cpu")) is None


def test_spec_key_follows_triton_specialisation():
    t = torch.empty(8)
    key = _triton._spec_key((t, t[1:], 1, 32, 33, 2 ** 31, "tf32"))
    assert key == ((torch.float32, True), (torch.float32, False), (True, False, False), (False, True, False),
                   (False, False, False), (False, True, True), "tf32")
