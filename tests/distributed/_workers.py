"""Worker processes of the distributed tests (started by ``torch.multiprocessing.spawn``): each
trains every case on its half of the batch and saves its losses and final parameters for the
test process to compare with single-process training."""
from __future__ import annotations

import os

import torch

from . import _train as T


def _mean_over_ranks(loss):
    loss = loss.clone()
    torch.distributed.all_reduce(loss)
    return loss / torch.distributed.get_world_size()


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def _fsdp2(model):
    """FSDP2: each decoder layer its own group, the root (embeddings, head, interventions) one
    more; parameters become DTensors sharded over the ranks."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


WRAP = {"ddp": _ddp, "fsdp2": _fsdp2}
SAVED_CASE = "loreft_unshared"


def _save_and_reload(model, case, strategy, rank, out_dir):
    """``save_interventions`` as each strategy calls it (FSDP2: every rank, a collective that
    gathers the shards, rank 0 writes; DDP: rank 0), then ``load_interventions`` into a fresh
    model wrapped the same way; returns the fresh model's intervention parameters."""
    from reft_kernels.hf import load_interventions, save_interventions

    folder = os.path.join(out_dir, f"saved-{case}")
    if strategy == "fsdp2" or rank == 0:
        save_interventions(model, folder)
    torch.distributed.barrier()
    fresh = T.make_model(case)
    torch.manual_seed(100 + rank)  # other initial values, so the load must overwrite them
    with torch.no_grad():
        for p in T.trainable(fresh):
            p.add_(torch.randn_like(p))
    WRAP[strategy](fresh)
    load_interventions(fresh, folder)
    return T.intervention_state(fresh)


def _train_case(case, rank, world, strategy, out_dir):
    model = T.make_model(case)
    before = T.base_state(model)
    wrapped = WRAP[strategy](model)
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
    losses = T.train(wrapped, T.shard(T.full_batch(), rank, world), loss_hook=_mean_over_ranks)
    after = T.base_state(model)
    result = {
        "losses": losses,
        "interventions": T.intervention_state(model),
        "base_unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "sharded": sharded,
    }
    if case == SAVED_CASE:
        result["reloaded"] = _save_and_reload(model, case, strategy, rank, out_dir)
    return result


def train_cases(rank, world, port, strategy, out_dir):
    T.init_gloo(rank, world, port)
    try:
        results = {case: _train_case(case, rank, world, strategy, out_dir) for case in T.CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        T.shutdown()
