"""The records every op's ``plan.py`` returns (``Launch``, ``Plan``) and the grid arithmetic they
share (``target_programs``, ``row_split``). Pure: no tensor, no environment, no GPU."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .._device import PROGRAMS_PER_SM, SmLimits, cdiv


def target_programs(limits: Optional[SmLimits]) -> int:
    """Programs a grid aims for without the compiled kernel's occupancy: ``PROGRAMS_PER_SM`` per SM
    on a GPU; two through the interpreter (programs run one by one there; two exercise every
    second stage)."""
    return PROGRAMS_PER_SM * limits.sms if limits is not None else 2


def row_split(n: int, block_m: int, n_col_blocks: int, limits: Optional[SmLimits],
              per_sm: Optional[int] = None) -> tuple[int, int]:
    """(P, rows per program) of a (P, n_col_blocks) grid that reduces over ``n`` (> 0) rows, each
    program's rows a multiple of ``block_m``. With ``per_sm`` (the compiled kernel's resident
    blocks per SM, on a GPU): one whole wave, P = floor(per_sm x SMs / n_col_blocks), so no SM
    runs a second, partial wave. Otherwise P = ceil(target_programs / n_col_blocks). Either way
    P <= the row blocks, and the rows are spread evenly. Each program writes one fp32 partial row,
    summed over P in a fixed order."""
    n_row_blocks = cdiv(n, block_m)
    if per_sm is not None and limits is not None:
        want = (per_sm * limits.sms) // n_col_blocks
    else:
        want = cdiv(target_programs(limits), n_col_blocks)
    progs = max(1, min(n_row_blocks, want))
    rows_per_prog = cdiv(n_row_blocks, progs) * block_m
    return cdiv(n, rows_per_prog), rows_per_prog


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name, its grid, its tile; for the split-d partial kernel
    the columns of each range (``cols``), for a grid that reduces over rows the rows of each
    program (``rows``, from ``row_split``)."""
    kernel: str
    grid: tuple
    block_m: Optional[int] = None
    block_d: Optional[int] = None
    warps: Optional[int] = None
    stages: Optional[int] = None
    note: str = ""
    cols: Optional[int] = None
    rows: Optional[int] = None

    def __str__(self):
        tile = ", ".join(f"{k}={v}" for k, v in (("BLOCK_M", self.block_m), ("BLOCK_D", self.block_d),
                                                 ("warps", self.warps), ("stages", self.stages)) if v is not None)
        grid = "x".join(map(str, self.grid))
        return f"{self.kernel}[{grid}]" + (f" ({tile})" if tile else "") + (f"  # {self.note}" if self.note else "")


@dataclass(frozen=True)
class Plan:
    """What one call runs: ``fwd`` / ``bwd`` name the variants (``ops.variants.AXES``), the
    launches list each kernel launch in order; ``finish`` says how the parameter gradients are
    summed; ``measured`` is False while no GPU sweep has measured the choice against the others;
    ``chosen_by`` says whether a request or the rule picked each variant."""
    backend: str
    device: str
    fwd: str
    bwd: str
    fwd_launches: tuple = ()
    bwd_launches: tuple = ()
    finish: str = ""
    measured: bool = False
    chosen_by: tuple = field(default_factory=tuple)

    def kernels(self) -> tuple:
        """Names of every kernel launched, forward then backward."""
        return tuple(launch.kernel for launch in self.fwd_launches + self.bwd_launches)

    def __str__(self):
        lines = [f"backend {self.backend} on {self.device}"]
        lines.append(f"  forward  {self.fwd}" + (f" ({self.chosen_by[0]})" if self.chosen_by else ""))
        lines += [f"    {launch}" for launch in self.fwd_launches]
        lines.append(f"  backward {self.bwd}" + (f" ({self.chosen_by[1]})" if self.chosen_by else ""))
        lines += [f"    {launch}" for launch in self.bwd_launches]
        if self.finish:
            lines.append(f"  finish   {self.finish}")
        lines.append(f"  measured on a GPU: {'yes' if self.measured else 'no'}")
        return "\n".join(lines)
