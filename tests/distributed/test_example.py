"""``examples/train_distributed.py`` runs as documented, with torchrun and 2 processes on the CPU
(gloo), for DDP and for FSDP2 in a plain loop, and for ``transformers.Trainer`` (which sets up
DDP itself): the loss falls, the interventions are saved, and DDP and FSDP2 end with the same
interventions (same seeds and data; both average the ranks' gradients). A fresh model loads the
saved folder, and its loss on the training examples falls."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_distributed.py"
STEPS = 8


def _run(strategy, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--strategy", strategy, "--steps", str(STEPS), "--out", str(out), *extra]
    # on the CPU (gloo) whatever the machine: 2 processes need 2 GPUs otherwise
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss ([\d.]+)$", proc.stdout, re.M)]
    assert len(losses) == STEPS, proc.stdout
    assert re.search(r"^(trainer \(ddp\)|ddp|fsdp2): 2 processes", proc.stdout, re.M), proc.stdout
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    return {s: (_run(s, folder / s), folder / s) for s in ("ddp", "fsdp2")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_example_trains_and_saves(runs, strategy):
    from reft_kernels.hf.io import read_interventions

    losses, folder = runs[strategy]
    assert losses[-1] < losses[0] - 0.01, losses
    meta, configs, tensors = read_interventions(str(folder))
    assert configs[0].method == "loreft" and tensors


def test_example_with_trainer(tmp_path):
    from reft_kernels.hf.io import read_interventions

    losses = _run("ddp", tmp_path, "--trainer")
    assert losses[-1] < losses[0] - 0.01, losses
    _, configs, tensors = read_interventions(str(tmp_path / "interventions"))
    assert configs[0].method == "loreft" and tensors


def test_ddp_and_fsdp2_end_equal(runs):
    from reft_kernels.hf.io import read_interventions

    (ddp_losses, ddp_dir), (fsdp_losses, fsdp_dir) = runs["ddp"], runs["fsdp2"]
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(ddp_losses), rtol=1e-5, atol=1e-5)
    _, _, a = read_interventions(str(ddp_dir))
    _, _, b = read_interventions(str(fsdp_dir))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_saved_folder_loads_into_a_fresh_model(runs):
    """The example's default model, rebuilt from its seed with its initial interventions, takes
    the saved ones, which lower its loss on the training examples."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_distributed as ex
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from reft_kernels.hf import get_reft_model, load_interventions
    from reft_kernels.hf.io import read_interventions

    torch.manual_seed(0)  # as the example builds it (--seed 0)
    model = ex.tiny_llama(ex.ByteTokenizer.vocab_size)
    get_reft_model(model, ex.configs(argparse.Namespace(method="loreft", rank=4, positions="f5+l5")), verbose=False)
    batch = ex.ReftDataCollator(ex.ByteTokenizer(), positions="f5+l5")(ex.TRAIN)
    with torch.no_grad():
        before = model(**batch).loss.item()
        load_interventions(model, str(runs["ddp"][1]))
        after = model(**batch).loss.item()
    _, _, saved = read_interventions(str(runs["ddp"][1]))
    state = model.reft.interventions.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert after < before - 0.01, (before, after)
