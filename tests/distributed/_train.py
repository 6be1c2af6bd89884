"""Shared pieces of the multi-process tests: the cases, one patched tiny LLaMA per case, the batch
split between ranks, the training loop, and a launcher for worker processes (gloo, CPU).

Everything here is deterministic: the base model and the interventions are built from fixed
seeds in every process, so single-process training on the whole batch is the reference that
distributed training on its halves must reproduce (within fp32 rounding).
"""
from __future__ import annotations

import gc
import os
import socket

import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model

from ..hf._models import padded_batch, tiny_model

WORLD = 2
STEPS = 3
LR = 1e-2
PREFIX = "reft_interventions."

# case -> configs; RED edits every token, LoReFT the first/last 2 prompt tokens with one
# intervention per layer (shared) or two (first and last: share_weights=False)
CASES = {
    "red": [REDConfig(layers="all")],
    "loreft_shared": [ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2")],
    "loreft_unshared": [ReftConfig(method="loreft", layers="all", rank=4, positions="f2+l2", share_weights=False)],
}

# real lengths per example (left padding, width 9); rank 0 takes examples 0-1, rank 1 takes 2-3.
# Each half has 13 label tokens, so the mean of the two halves' mean losses (what DDP's gradient
# averaging optimises) is the whole batch's mean loss.
LENGTHS = (8, 5, 6, 7)
SEQ = 9


def make_model(case: str):
    """A 2-layer tiny LLaMA (fixed seed) with the case's interventions (fixed seed), train mode."""
    model = tiny_model("llama", n_layers=2, seed=0)
    torch.manual_seed(1)
    get_reft_model(model, CASES[case], verbose=False)
    return model.train()


def full_batch():
    """(input_ids, attention_mask, labels) of the whole batch; labels -100 on padding."""
    ids, mask = padded_batch(LENGTHS, SEQ, "left", seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def label_tokens(labels) -> int:
    """Tokens the causal-LM loss averages over (labels shifted by one, -100 ignored)."""
    return int((labels[:, 1:] != -100).sum())


def shard(batch, rank: int, world: int = WORLD):
    """This rank's contiguous slice of every tensor of ``batch``."""
    n = batch[0].shape[0] // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: gathered from its shards when FSDP2 made it a DTensor."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def intervention_state(model) -> dict:
    """{name: whole value} of the intervention parameters (names without wrapper prefixes)."""
    out = {}
    for name, p in model.named_parameters():
        if PREFIX in name:
            out[name[name.index(PREFIX):]] = full(p).clone()
    return out


def base_state(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if PREFIX not in name:
            out[name.replace("module.", "")] = full(p).clone()
    return out


def train(model, batch, steps: int = STEPS, loss_hook=None):
    """AdamW on the trainable parameters for ``steps`` steps on ``batch``; returns the losses
    (``loss_hook(loss)`` maps each local loss to the value recorded, e.g. an all-reduce mean)."""
    ids, mask, labels = batch
    opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss_hook(loss.detach()) if loss_hook else loss.detach()))
    return losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """One thread per process (2 processes on a 2-core machine) and a gloo process group."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def shutdown() -> None:
    """Collect the process's garbage (the FSDP2-wrapped models among it), then destroy the
    process group. With torch 2.13 on CPU, a process that still held FSDP2 modules when it
    exited after ``destroy_process_group`` aborted now and then ("terminate called without an
    active exception"; 2 of 20 runs of a 20-line FSDP2 script); collected first, 0 of 50."""
    gc.collect()
    torch.distributed.destroy_process_group()


def spawn(fn, *args, world: int = WORLD):
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes; raises if any fails."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)
