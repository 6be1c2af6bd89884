"""Run by ``test_liger.py`` in a process of its own (Liger patches transformers' LLaMA module
globally): trains a patched tiny LLaMA without Liger, then the same model (same seeds) patched
with ``apply_liger_kernel_to_llama(model=...)`` and then with our interventions, and prints the
two loss curves as JSON on its last line.

    python -m tests.scale._liger_run [device]
"""
from __future__ import annotations

import json
import sys

import torch


def train(model, inputs, steps: int = 5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(device: str) -> None:
    from ._common import LOREFT, RED, batch, patched
    from ..hf._models import tiny_model

    inputs = batch(device=device)
    # the reference first: Liger's patches replace functions of transformers' LLaMA module for
    # every model built or run afterwards
    reference = train(patched([RED, LOREFT], device=device), inputs)

    from liger_kernel.transformers import apply_liger_kernel_to_llama

    base = tiny_model("llama", n_layers=2).to(device)
    apply_liger_kernel_to_llama(model=base)  # RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    model = patched([RED, LOREFT], base=base, device=device)
    liger = train(model, inputs)
    print(json.dumps({"reference": reference, "liger": liger}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
