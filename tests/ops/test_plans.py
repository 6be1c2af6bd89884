"""What runs, as a value: the planners (``ops/lowrank_edit/plan.py``, ``ops/red/plan.py``) with the
fixed H100 / A100 profiles, the variant selection (``reft_kernels.kernels``), and on the CPU
interpreter that the kernels launched by a call are exactly the plan's (counted with
``reft_kernels.benchmark.launches.counting``, no spy), with a float64 check of every named Triton
variant, every gradient included."""
from __future__ import annotations

import collections

import pytest
import torch

import reft_kernels as rk
from reft_kernels._backend import available_backends
from reft_kernels._device import A100, H100
from reft_kernels.benchmark.launches import counting
from reft_kernels.ops import variants as V
from reft_kernels.ops.lowrank_edit import plan as P
from reft_kernels.ops.red import plan as RP

from .._helpers import check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, make_red_params, \
    padded_index, red_ref_fn

LORA_TERMS = dict(has_A=True, has_a=True, has_C=False, tied=True, has_c=False)  # LoReFT's terms


# ----------------------------------------------------------------------------- pure planning

def test_rule_takes_split_d_for_few_rows_on_a_gpu_only():
    f7l7 = P.Call(448, 4096, 8, torch.bfloat16, indexed=True, **LORA_TERMS)
    assert (P.plan(f7l7, H100).fwd, P.plan(f7l7, H100).bwd) == ("split-d", "split-d")
    assert P.plan(f7l7, None).fwd == "rowblock"  # the interpreter runs programs one by one
    full = P.Call(16384, 4096, 8, torch.bfloat16, **LORA_TERMS)
    plan = P.plan(full, H100)
    assert (plan.fwd, plan.bwd, plan.chosen_by) == ("rowblock", "rowblock", ("rule", "rule"))
    assert plan.kernels() == ("_lowrank_edit_fwd_kernel", "_lowrank_edit_bwd_latent_kernel", "_lowrank_edit_bwd_kernel",
                              "_lowrank_bias_partials_kernel", "_param_finish_kernel")
    assert plan.fwd_launches[0].grid == (16384 // 64,) and plan.fwd_launches[0].block_m == 64


def test_requested_variant_wins_and_is_reported():
    call = P.Call(16384, 4096, 8, torch.bfloat16, **LORA_TERMS)
    with rk.kernels(lowrank_fwd="resident"):
        plan = P.plan(call, H100)
    assert plan.fwd == "resident" and plan.chosen_by[0] == "requested"
    (launch,) = plan.fwd_launches
    # 16-row blocks, one program per SM: 132 x 16 x 8 KB = 17 MB held of the 50 MB L2
    assert (launch.kernel, launch.grid, launch.block_m) == ("_lowrank_edit_fwd_resident_kernel", (132,), 16)
    assert P.plan(call, H100).fwd == "rowblock"  # outside the block: the rule again


def test_plans_follow_the_device_profile():
    call = P.Call(16384, 4096, 8, torch.bfloat16, **LORA_TERMS)
    with rk.kernels(lowrank_fwd="resident"):
        assert P.plan(call, A100).fwd_launches[0].grid == (108,)
    bwd_h100 = P.plan(call, H100).bwd_launches[1].grid
    bwd_a100 = P.plan(call, A100).bwd_launches[1].grid
    assert bwd_h100 != bwd_a100 and bwd_h100[1] == bwd_a100[1]  # same tile, programs from the SM count


def test_every_plan_is_unmeasured_and_says_so():
    for plan in (P.plan(P.Call(64, 256, 4), H100), RP.plan(64, 256, H100), P.plan(P.Call(64, 256, 4), backend="cuda")):
        assert plan.measured is False and "measured on a GPU: no" in str(plan)


def test_unknown_or_impossible_variants_raise_naming_what_can():
    with pytest.raises(ValueError, match=r"lowrank_fwd must be one of \('rowblock', 'split-d', 'resident'\)"):
        with rk.kernels(lowrank_fwd="fast"):
            pass
    with pytest.raises(ValueError, match="unknown kernel axis 'lowrank'"):
        with rk.kernels(lowrank="resident"):
            pass
    with rk.kernels(cuda_lowrank_bwd="cluster"):
        with pytest.raises(ValueError, match="r <= 16 and d <= 4096.*use 'split'"):
            P.plan(P.Call(64, 8192, 8), H100, backend="cuda")
        with pytest.raises(ValueError, match="r <= 16"):
            P.plan(P.Call(64, 4096, 8), A100, backend="cuda")  # no clusters on sm_80
        assert P.plan(P.Call(64, 4096, 8), H100, backend="cuda").bwd == "cluster"
    with pytest.raises(ValueError, match="ranks up to 64"):
        P.plan(P.Call(64, 256, 65, torch.float32), H100)


def test_kernels_nests_and_restores():
    assert V.active() == V.Variants()
    with rk.kernels(red_bwd="tile2d") as outer:
        with rk.kernels(lowrank_fwd="split-d", red_bwd=None) as inner:
            assert inner == V.Variants(lowrank_fwd="split-d")
        assert V.active() is outer and outer.chosen() == {"red_bwd": "tile2d"}
    assert V.active() == V.Variants()
    with pytest.raises(RuntimeError):
        with rk.kernels(red_bwd="tile2d"):
            raise RuntimeError("boom")
    assert V.active() == V.Variants()


def test_red_plan():
    plan = RP.plan(16384, 4096, H100)
    assert (plan.bwd, plan.kernels()) == ("rowsum", ("_red_fwd_kernel", "_red_bwd_kernel", "_param_finish_kernel"))
    with rk.kernels(red_bwd="tile2d"):
        tile2d = RP.plan(16384, 4096, H100)
    assert tile2d.bwd == "tile2d" and tile2d.bwd_launches[0].block_d == 128 < plan.bwd_launches[0].block_d


# ----------------------------------------------------------------------------- what the launchers run

def _triton_launches(counter) -> collections.Counter:
    return collections.Counter({k.split(":", 1)[1]: v for k, v in counter.by_name.items() if k.startswith("triton:")})


@pytest.fixture
def triton_cpu(device):
    if "triton" not in available_backends(device) or device.type != "cpu":
        pytest.skip("the launch counts are compared with the interpreter's plan")


LOWRANK_CASES = [
    # (lowrank_fwd, lowrank_bwd, rows, d, rank, indexed)
    (None, None, 150, 40, 3, False),
    ("split-d", "split-d", 9, 300, 5, False),
    ("split-d", "rowblock", 30, 300, 5, True),
    ("resident", None, 150, 40, 3, False),
    ("resident", "split-d", 40, 72, 5, True),
]


@pytest.mark.parametrize("fwd,bwd,n,d,r,indexed", LOWRANK_CASES)
def test_lowrank_runs_its_plan_and_matches_float64(triton_cpu, device, fwd, bwd, n, d, r, indexed):
    """Every named Triton variant of the low-rank edit: the launched kernels are the plan's, and
    the forward and every gradient match the float64 reference (NoReFT's terms: all five)."""
    base, view = make_base("contiguous", (n,), d, device=device)
    base.requires_grad_()
    params = make_lowrank_params(d, r, device=device)
    index = padded_index(n, n // 2, 2, device=device) if indexed else None
    call = P.Call(len(index) if indexed else n, d, r, torch.float32, indexed=indexed, has_C=True, tied=False,
                  has_c=True)
    with rk.kernels(lowrank_fwd=fwd, lowrank_bwd=bwd):
        plan = P.plan(call)
        with counting() as counter:
            check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                    kernel_kwargs=dict(index=index, backend="triton"), ref_kwargs=dict(index=index))
    assert (plan.fwd, plan.bwd) == (fwd or "rowblock", bwd or "rowblock")
    assert _triton_launches(counter) == collections.Counter(plan.kernels())


@pytest.mark.parametrize("variant", ["rowsum", "tile2d"])
def test_red_runs_its_plan_and_matches_float64(triton_cpu, device, variant):
    base, view = make_base("contiguous", (300,), 100, device=device)
    base.requires_grad_()
    with rk.kernels(red_bwd=variant):
        plan = RP.plan(300, 100)
        with counting() as counter:
            check_against_reference(rk.red, red_ref_fn, base, view, make_red_params(100, device=device),
                                    kernel_kwargs=dict(backend="triton"))
    assert plan.bwd == variant and "_param_finish_kernel" in plan.kernels()  # two programs: one finish
    assert _triton_launches(counter) == collections.Counter(plan.kernels())
