"""``reft-kernels plan``: the plan a call would take, printed from the planners themselves
(``ops/lowrank_edit/plan.py``, ``ops/red/plan.py``), on this machine or for a fixed GPU profile.

The README's "What runs" section is ``reference_report()``'s output (tests/test_readme.py keeps
the two equal).
"""
from __future__ import annotations

import torch

from . import _device
from .methods import METHODS
from .ops import variants as V
from .ops.lowrank_edit import plan as lowrank_plan
from .ops.red import plan as red_plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("h100", "a100", "this", "cpu")
# The reference shapes of docs/design.md: a 16384-row bf16 batch at d = 4096, LoReFT at r = 8, and
# pyreft's f7+l7 positions of a 32 x 512 batch (448 rows).
REFERENCE = dict(rows=16384, d=4096, rank=8, dtype="bf16")
F7L7_ROWS = 448


def limits_for(device: str):
    """(SmLimits or None, label): a fixed profile, the GPU in use ("this", the CPU without one), or
    the CPU (Triton's interpreter)."""
    if device in _device.PROFILES:
        return _device.PROFILES[device], f"{_device.PROFILES[device].name} (profile)"
    if device == "this" and torch.cuda.is_available():
        limits = _device.device_limits(torch.device("cuda"))
        return limits, limits.name
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
    return None, "cpu (Triton's interpreter)"


def lowrank_call(method: str, rows: int, d: int, rank: int, dtype: str, index: int | None) -> lowrank_plan.Call:
    """The planner's ``Call`` for ``method`` (``methods.METHODS``) on ``rows`` rows, or on ``index``
    listed rows of them."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {tuple(METHODS)} or red, got {method!r}")
    m = METHODS[method]
    return lowrank_plan.Call(index if index is not None else rows, d, rank, DTYPES[dtype], indexed=index is not None,
                             has_A=m.A is not None, has_a=m.a is not None, has_C=m.C is not None and not m.tied,
                             tied=m.tied, has_c=m.c is not None)


def report(method: str = "loreft", rows: int = REFERENCE["rows"], d: int = REFERENCE["d"],
           rank: int = REFERENCE["rank"], dtype: str = REFERENCE["dtype"], index: int | None = None,
           device: str = "h100", backend: str = "triton", variants: V.Variants | None = None) -> str:
    """The plan of one call as text (see ``Plan.__str__``), headed by the call."""
    limits, label = limits_for(device)
    variants = variants if variants is not None else V.active()
    rows_text = f"{index} listed rows of {rows}" if index is not None else f"{rows} rows"
    if method == "red":
        head = f"red, {rows_text} x d={d}, {dtype}"
        if index is not None:
            raise ValueError("--index: RED edits every row (no index)")
        plan = red_plan.plan(rows, d, limits, variants, backend, label)
    else:
        head = f"{method}, {rows_text} x d={d}, rank {rank}, {dtype}"
        plan = lowrank_plan.plan(lowrank_call(method, rows, d, rank, dtype, index), limits, variants, backend, label)
    chosen = variants.chosen()
    if chosen:
        head += "; kernels(" + ", ".join(f"{k}={v!r}" for k, v in chosen.items()) + ")"
    return head + "\n" + str(plan)


def reference_report(device: str = "h100") -> str:
    """The README's "What runs" (on the H100 profile): the reference shapes, every row and f7+l7,
    and RED."""
    return "\n\n".join((report(device=device), report(index=F7L7_ROWS, device=device), report("red", device=device)))


def parse_kernels(text: str | None) -> V.Variants:
    """``axis=name,axis=name`` (``--kernels``) as ``Variants``; raises ValueError naming the axes."""
    choices = {}
    for item in filter(None, (text or "").split(",")):
        axis, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--kernels takes axis=variant pairs (axes: {', '.join(V.AXES)}), got {item!r}")
        choices[axis.strip()] = name.strip()
    return V.active().merged(**choices)
