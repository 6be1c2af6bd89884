"""GPU only: alongside Liger-Kernel. A tiny LLaMA patched with
``apply_liger_kernel_to_llama(model=...)`` (Liger's RoPE, RMSNorm, SwiGLU and fused linear
cross-entropy forward) and then with our interventions (RED and LoReFT) trains five AdamW steps
with the same losses, within rounding, as the same model and interventions without Liger.

Liger replaces functions of transformers' LLaMA module for the whole process, so both runs
happen in a child process (``_liger_run.py``), the reference first. Skipped without a GPU
(Liger's kernels are Triton GPU kernels) or without ``liger_kernel``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's kernels need a GPU")
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger_kernel")
def test_liger_patched_model_trains_like_the_unpatched_one():
    proc = subprocess.run([sys.executable, "-m", "tests.scale._liger_run", "cuda"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, liger = torch.tensor(result["reference"]), torch.tensor(result["liger"])
    assert len(ref) == len(liger) == 5 and ref[-1] < ref[0] - 0.05
    torch.testing.assert_close(liger, ref, rtol=1e-4, atol=1e-4)
