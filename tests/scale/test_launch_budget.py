"""Kernel launches per layer in one training step of a patched LLaMA, counted exactly
(``reft_kernels.benchmark.launches``: ATen calls that reach a kernel plus Triton kernel calls,
the Triton kernels through the interpreter): the marginal cost of one more layer with the
intervention, less a frozen layer's own forward and backward. On a GPU each is a launch of a few
microseconds, whatever the rows edited, so these numbers are the fixed cost of a step.

``BUDGET`` holds, per case and backend, the counts as they are (a ceiling, so that a change can
only lower them) and the budget of the issue that asked for them beside (every target is met:
the PyTorch path's LoReFT came down from 18 to 16 when its backward's ``dh`` moved into a buffer
with a zero scratch row, and to 15 when the CPU writes rows back with ``index_add_``,
``ops/lowrank_edit/torch_impl.py``).
The per-step counts (the batched R, the index bookkeeping done once per index) are bounded
too, loosely: they do not grow with the layers.

On a CPU the PyTorch backend's calls go to the CPU extension (``reft_kernels/cpu_ext``) where it
is built: one op forward and one backward per layer (``cpu_ext``; inside, its allocations and
copies do not dispatch). The ``torch`` rows count the PyTorch path itself, with the extension
off: what the PyTorch backend runs on a GPU, and on a CPU without a compiler.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from reft_kernels import cpu_ext  # noqa: E402
from reft_kernels._triton import HAS_TRITON  # noqa: E402
from reft_kernels.benchmark.launches import counting, per_layer  # noqa: E402
from reft_kernels.hf import REDConfig, ReftConfig  # noqa: E402

LOREFT = ReftConfig(method="loreft", layers="all", rank=8, positions="f7+l7", share_weights=True)
RED = REDConfig(layers="all")
# (config, backend) -> (ceiling per layer, target per layer, ceiling per step)
BUDGET = {
    ("loreft_f7l7", "torch"): (15, 16, 80),
    ("loreft_f7l7", "triton"): (5, 6, 80),
    ("red", "torch"): (5, 6, 10),
    ("red", "triton"): (3, 3, 10),  # 2 here: one program per column block needs no finishing sum
    ("loreft_f7l7", "cpu_ext"): (2, 16, 80),
    ("red", "cpu_ext"): (2, 6, 10),
}
CONFIGS = {"loreft_f7l7": LOREFT, "red": RED}


@pytest.mark.parametrize("case,backend", list(BUDGET), ids=[f"{c}-{b}" for c, b in BUDGET])
def test_launches_per_layer(case, backend, monkeypatch):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "cpu_ext" and not cpu_ext.enabled():
        pytest.skip(f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")
    if backend == "torch":  # the PyTorch path itself (see the docstring)
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    ceiling, target, step_ceiling = BUDGET[(case, backend)]
    counts = per_layer(CONFIGS[case], backend="torch" if backend == "cpu_ext" else backend)
    layer, step = counts["per_layer"], counts["per_step"]
    # no host synchronisation per layer; per step, the one read of the labels' flag (hf/flag_watch.py
    # reads it at once on a CPU, where it is free; on a GPU it copies it without waiting)
    assert layer["syncs"] == 0 and step["syncs"] <= (1 if case != "red" else 0), counts
    if backend == "triton":
        assert layer["triton"] >= 2, counts  # the op ran as Triton kernels (forward and backward)
    elif backend == "cpu_ext":  # the extension's forward and backward ran, nothing else per layer
        fwd, bwd = ("lowrank_rows_fwd", "lowrank_rows_bwd") if case != "red" else ("red_fwd", "red_bwd")
        assert counts["layer_names"] == {fwd: 1, bwd: 1}, counts
    else:
        assert layer["triton"] == 0, counts
    assert layer["total"] <= ceiling, (f"{case} on {backend}: {layer['total']} launches per layer, "
                                       f"ceiling {ceiling} (target {target}): {counts['layer_names']}")
    # (per step can come out slightly negative: the frozen baseline's backward starts at layer 0's
    # output, made to require grad by a hook of its own)
    assert step["total"] <= step_ceiling, counts


def test_the_counter_counts_kernels_not_views():
    """Views, allocations and wrapped scalars are free; compute ops count; .item() is a sync."""
    import torch

    x = torch.randn(4, 8)
    with counting() as c:
        y = x.view(8, 4).t().unsqueeze(0)[0]  # views only
        torch.empty(3)
        z = torch.where(x > 0, x, 0)  # gt, where (the 0 is a wrapped scalar)
        (y.sum() + z.sum()).item()  # sum, sum, add; then a sync
    assert c.aten == 5 and c.syncs == 1 and c.triton == 0, dict(c.by_name)
