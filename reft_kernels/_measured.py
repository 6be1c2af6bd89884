"""The default backend per op and shape, chosen from a GPU sweep's numbers.

``reft_kernels._measured_table.MEASURED`` (written by ``tools/pick_defaults.py`` from a device
run, never by hand) maps a card, named as the benchmark names its folder
(``benchmark.runner.device_name``, e.g. ``nvidia-h100-80gb-hbm3``), to the cases measured on it::

    {"date": "...", "commit": "...", "torch": "...", "triton": "...",
     "cases": [[op, dtype, n_rows, d, rank, backend], ...]}

``op`` is ``red``, ``lowrank_edit`` (every row) or ``lowrank_edit_index`` (listed rows; ``n_rows``
is then the number of listed rows), ``rank`` is 0 for RED, ``backend`` the fastest forward +
backward of ``torch``/``triton``/``cuda`` there (``cuda`` only when the device run's tests and
sanitizers passed). A call takes the backend of the nearest measured case of its op and dtype,
distance being the sum of |log2| ratios of rows, width and rank; ties go to the earlier case.

Cards that were never measured, and ops or dtypes a card's table lacks, keep the fixed rule of
``reft_kernels._backend``: Triton on CUDA tensors.
"""
from __future__ import annotations

import functools
import math
import re

import torch

OPS = ("red", "lowrank_edit", "lowrank_edit_index")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CHOICES = ("torch", "triton", "cuda")


def _distance(n_rows, d, rank, case) -> float:
    def lg(a, b):
        return abs(math.log2(max(a, 1) / max(b, 1)))
    return lg(n_rows, case[2]) + lg(d, case[3]) + lg(rank, case[4])


def pick(table: dict, card: str, op: str, dtype: str, n_rows: int, d: int, rank: int = 0) -> str | None:
    """The measured backend for a call (see the module docstring), or None when ``table`` has no
    case of ``op`` and ``dtype`` on ``card``."""
    entry = table.get(card)
    if not entry:
        return None
    best, best_dist = None, math.inf
    for case in entry["cases"]:
        if case[0] != op or case[1] != dtype:
            continue
        dist = _distance(n_rows, d, rank, case)
        if dist < best_dist:
            best, best_dist = case[5], dist
    return best


def card_slug(name: str) -> str:
    """A device name as a folder name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``
    (the benchmark's result folders use the same rule)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def card_of(index: int) -> str:
    return card_slug(torch.cuda.get_device_name(index))


def measured_backend(op: str, h: torch.Tensor, n_rows: int, d: int, rank: int = 0) -> str | None:
    """The measured default for a call on CUDA tensor ``h``, or None (no measurement applies)."""
    from ._measured_table import MEASURED

    dtype = DTYPE_NAMES.get(h.dtype)
    if not MEASURED or h.device.type != "cuda" or dtype is None:
        return None
    index = h.device.index if h.device.index is not None else torch.cuda.current_device()
    return pick(MEASURED, card_of(index), op, dtype, n_rows, d, rank)
