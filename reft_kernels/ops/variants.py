"""Kernel variants as named values: which of an op's kernels runs, chosen in Python and passed
down, never read from the environment.

Each *axis* is one choice some backend makes; each has a few named variants. ``None`` on an axis
means "the rule": the planner's choice from the call's shape and the device (``plan.py`` in each
op folder). A GPU sweep that measured an axis would go before the rule; none has yet, so every
variant that is not the rule's is kept "until a GPU measures it" and its plan says
``measured=False``.

    import reft_kernels as rk
    with rk.kernels(lowrank_fwd="resident", red_bwd="tile2d"):
        y = rk.loreft(h, R, W, b)          # the L2-resident forward, whatever the rule says

The selection is process-wide while the ``with`` block runs (like ``torch.backends`` flags), and
read when a call is planned: with ``torch.compile`` that is at trace time for the Triton kernels,
so choose before compiling. The CUDA kernels read it at every launch and get it through their
parameter structs (``csrc/reft_params.h``).

An unknown axis or variant raises ValueError naming the accepted ones; a variant that cannot take
a call's shape raises from the planner naming what can.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

# axis -> (backend it applies to, its variants (the first is the rule's usual pick), what it chooses)
AXES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "lowrank_fwd": ("triton", ("rowblock", "split-d", "resident"),
                    "the low-rank forward: 64-row blocks over all of d (rowblock), d split across "
                    "programs for few rows (split-d), or the persistent L2-resident one-pass kernel"),
    "lowrank_bwd": ("triton", ("rowblock", "split-d"),
                    "the low-rank backward's latent pass gz = g B^T: row blocks, or d split across "
                    "programs for few rows"),
    "red_bwd": ("triton", ("rowsum", "tile2d"),
                "RED's backward accumulation: sum each tile over its rows every step (rowsum), or 2-D "
                "fp32 accumulators reduced once (tile2d)"),
    "cuda_lowrank_bwd": ("cuda", ("split", "cluster"),
                         "the CUDA low-rank backward: a dh kernel and a parameter kernel (split), or one "
                         "pass with thread-block clusters (cluster; sm_90, r <= 16, d <= 4096)"),
    "cuda_params": ("cuda", ("scalar", "vector"),
                    "the CUDA parameter-gradient kernel of the split backward: one column per thread, "
                    "or 16-byte vectors"),
    "cuda_finish": ("cuda", ("serial", "split"),
                    "the CUDA fixed-order sum of the partials: one thread per column, or several and a "
                    "fixed tree"),
}

# Variants a GPU sweep has measured and found the best where the rule picks them. None yet: every
# plan says measured=False until a device run fills this (reft_kernels/_measured_table.py's sweep).
MEASURED: frozenset = frozenset()


@dataclass(frozen=True)
class Variants:
    """One requested variant per axis (``AXES``), None for the planner's rule."""
    lowrank_fwd: str | None = None
    lowrank_bwd: str | None = None
    red_bwd: str | None = None
    cuda_lowrank_bwd: str | None = None
    cuda_params: str | None = None
    cuda_finish: str | None = None

    def __post_init__(self):
        for axis in AXES:
            check(axis, getattr(self, axis))

    def merged(self, **choices) -> "Variants":
        """These variants with ``choices`` (axis=name or None) applied; raises ValueError for an
        unknown axis or name."""
        unknown = sorted(set(choices) - set(AXES))
        if unknown:
            raise ValueError(f"unknown kernel axis {unknown[0]!r}: the axes are {', '.join(AXES)}")
        return dataclasses.replace(self, **choices)

    def choice(self, axis: str) -> str:
        """The variant requested on ``axis``, else the axis's first (the rule's usual pick; the
        only pick for the CUDA axes, whose rule has no shape to read)."""
        return getattr(self, axis) or AXES[axis][1][0]

    def chosen(self) -> dict:
        """The axes with an explicit request, {axis: name}."""
        return {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) is not None}


def check(axis: str, name: str | None) -> None:
    """Raise ValueError unless ``name`` is None or a variant of ``axis``."""
    if name is None:
        return
    names = AXES[axis][1]
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"kernels({axis}={name!r}): {axis} must be one of {names} or None")


_ACTIVE = Variants()


def active() -> Variants:
    """The variants requested by the innermost ``kernels(...)`` block (all None outside one)."""
    return _ACTIVE


@contextlib.contextmanager
def kernels(**choices):
    """Run the block with the named kernel variants, e.g. ``kernels(lowrank_fwd="resident")``;
    axes not named keep the enclosing choice (the rule outside every block), ``axis=None`` goes back
    to the rule. Yields the ``Variants`` in force. See ``AXES`` for the axes and their variants and
    ``reft-kernels plan`` for what a call would run."""
    global _ACTIVE
    new = _ACTIVE.merged(**choices)
    prev, _ACTIVE = _ACTIVE, new
    try:
        yield new
    finally:
        _ACTIVE = prev
