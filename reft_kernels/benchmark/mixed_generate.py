"""End-to-end generation with many adapters in one batch (``reft-kernels bench --mixed-generate``).

One batch of B prompts (no padding), greedy, ``new_tokens`` new tokens each, with K different
adapters (K divides B; example i takes adapter i mod K). Providers, each timed in interleaved
rounds (one round runs every provider once, so a load change hits them all alike):

- ``single``: the whole batch through one adapter (no ``adapter_names``): the cost to match;
- ``mixed``: ``generate(..., adapter_names=[...])``, one name per example, K adapters;
- ``switching``: each example generated alone, its adapter set active first (``set_adapter``):
  what serving many adapters costs without mixed batches;
- ``lora_mixed``: PEFT's mixed LoRA batch on the same base model (``generate(adapter_names=...)``
  with K LoRA adapters of rank 8 on q/k/v/o), the established way of serving many adapters.

The ReFT adapters are ``method`` (LoReFT at ``positions`` f7+l7, rank 8, by default) on every
layer, with random values (a trained adapter's cost is the same). Reported: tokens/s of each
(B * new_tokens / median seconds) and the ratios the targets speak of, mixed against single and
against switching.
"""
from __future__ import annotations

import copy
import time

import torch

from .e2e_models import ModelSpec, build_base

MODELS = {
    # the end-to-end sweep's CPU model (``e2e.py``), and a tiny one for tests
    "d256": ModelSpec("d256", 256, 6, 688, 4, 2, 2048),
    "tiny": ModelSpec("tiny", 32, 2, 64, 4, 2, 64),
}
PROVIDERS = ("single", "mixed", "switching", "lora_mixed")


def _adapter_config(method: str, rank: int, positions: str):
    from ..hf import REDConfig, ReftConfig

    if method == "red":
        return REDConfig(layers="all")
    return ReftConfig(method=method, layers="all", rank=rank, positions=positions)


def _reft_model(base, k: int, method: str, rank: int, positions: str):
    from ..hf import get_reft_model

    model = copy.deepcopy(base)
    cfg = _adapter_config(method, rank, positions)
    get_reft_model(model, cfg, verbose=False, adapter_name="a0")
    for i in range(1, k):
        model.reft.add_adapter(f"a{i}", cfg)
    gen = torch.Generator().manual_seed(0)
    adapters = [model.reft_interventions] + ([model.reft_adapters] if k > 1 else [])
    with torch.no_grad():  # away from the identity init, as training leaves them
        for p in (p for m in adapters for p in m.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p))
    return model.eval()


def _lora_model(base, k: int):
    import peft

    cfg = peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
                          init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def _setups(base, prompts, k: int, new_tokens: int, method: str, rank: int, positions: str, providers):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    bsz = prompts.shape[0]
    names = [f"a{i % k}" for i in range(bsz)]
    reft = _reft_model(base, k, method, rank, positions)
    out = {}

    def single():
        return reft.generate(input_ids=prompts, **kw)

    def mixed():
        return reft.generate(input_ids=prompts, adapter_names=names, **kw)

    def switching():
        for i, name in enumerate(names):
            reft.reft.set_adapter(name)
            reft.generate(input_ids=prompts[i:i + 1], **kw)
        reft.reft.set_adapter("a0")

    for name, fn in (("single", single), ("mixed", mixed), ("switching", switching)):
        if name in providers:
            out[name] = fn
    if "lora_mixed" in providers:
        lora = _lora_model(base, k)
        out["lora_mixed"] = lambda: lora.generate(input_ids=prompts, adapter_names=names, **kw)
    return out


def run(*, model: str = "d256", batch: int = 16, adapters=(1, 4, 16), prompt_len: int = 32, new_tokens: int = 16,
        method: str = "loreft", rank: int = 8, positions: str = "f7+l7", rounds: int = 3, providers=PROVIDERS,
        base=None, name=None, device="cpu", log=print) -> list:
    """Time every provider for each K in ``adapters``; returns rows (dicts) and logs a table.
    ``base``: a built causal LM to use instead of ``model`` (e.g. SmolLM2), on ``device``, called
    ``name`` in the rows."""
    for k in adapters:
        if k < 1 or batch % k:
            raise ValueError(f"adapters: each K must divide the batch of {batch}, got {k}")
    if base is None:
        base = build_base(MODELS[model], device)
        name = model
    elif name is None:
        name = type(base).__name__
    base.eval()
    base.config.use_cache = True
    base.generation_config.pad_token_id = base.generation_config.pad_token_id or 0
    base.generation_config.eos_token_id = None  # every example runs all its new tokens
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, base.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    rows = []
    for k in adapters:
        fns = _setups(base, prompts, k, new_tokens, method, rank, positions, providers)
        times = {p: [] for p in fns}
        with torch.no_grad():
            outs = {p: fn() for p, fn in fns.items()}  # warm-up
            if k == 1 and "single" in outs and "mixed" in outs and not torch.equal(outs["single"], outs["mixed"]):
                raise RuntimeError("mixed_generate: one adapter named per example generated other tokens than "
                                   "the same adapter active")
            for _ in range(rounds):
                for p, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[p].append(time.perf_counter() - t0)
        med = {p: sorted(ts)[len(ts) // 2] for p, ts in times.items()}
        row = {"model": name, "batch": batch, "adapters": k, "new_tokens": new_tokens, "method": method,
               **{f"{p}_tok_s": batch * new_tokens / med[p] for p in med}}
        if "single" in med and "mixed" in med:
            row["mixed_vs_single"] = med["mixed"] / med["single"]  # time ratio: target <= 1.15
        if "switching" in med and "mixed" in med:
            row["mixed_speedup_vs_switching"] = med["switching"] / med["mixed"]  # target >= 5
        if "lora_mixed" in med and "mixed" in med:
            row["mixed_vs_lora_mixed"] = med["mixed"] / med["lora_mixed"]
        rows.append(row)
        log(format_row(row))
    return rows


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def format_row(row: dict) -> str:
    toks = "  ".join(f"{p} {row[f'{p}_tok_s']:8.1f} tok/s" for p in PROVIDERS if f"{p}_tok_s" in row)
    ratios = "  ".join(f"{k} {row[k]:.2f}" for k in ("mixed_vs_single", "mixed_speedup_vs_switching",
                                                      "mixed_vs_lora_mixed") if k in row)
    return f"{row['model']} B={row['batch']} K={row['adapters']:>3} {row['method']}: {toks}  |  {ratios}"
