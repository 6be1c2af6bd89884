"""DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) over a patched tiny LLaMA, 2 processes
with the gloo backend on the CPU, against single-process training on the whole batch.

Each worker trains every case (RED; LoReFT with shared weights; LoReFT with first/last weights)
for 3 AdamW steps on its half of a 4-example, left-padded batch; the reference trains the same
model (same seeds) on the whole batch in this process. The per-step loss (mean over ranks) and
every intervention parameter after training must equal the reference within fp32 rounding, the
base must stay bitwise unchanged, and under FSDP2 the base and the interventions must have been
sharded (DTensors). For one case, ``save_interventions`` (FSDP2: on every rank, gathering the
shards) and ``load_interventions`` into a freshly wrapped model carry the trained values. The
halves hold equally many label tokens, so averaging the ranks' gradients (what DDP and FSDP2 do)
is the gradient of the whole batch's mean loss.
"""
from __future__ import annotations

import pytest
import torch

from . import _train as T
from ._workers import SAVED_CASE, train_cases

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def reference():
    """{case: (losses, interventions)} of single-process training on the whole batch."""
    torch.set_num_threads(1)
    batch = T.full_batch()
    out = {}
    for case in T.CASES:
        model = T.make_model(case)
        out[case] = (T.train(model, batch), T.intervention_state(model))
    return out


def _run(strategy, tmp_path_factory):
    folder = tmp_path_factory.mktemp(strategy)
    T.spawn(train_cases, strategy, str(folder))
    return [torch.load(folder / f"rank{r}.pt") for r in range(T.WORLD)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return _run("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    return _run("fsdp2", tmp_path_factory)


def test_halves_hold_equal_label_tokens():
    """The premise of the comparison (otherwise the mean of the halves' means is another loss)."""
    batch = T.full_batch()
    counts = [T.label_tokens(T.shard(batch, r)[2]) for r in range(T.WORLD)]
    assert counts[0] == counts[1] > 0, counts


def _check(results, reference, case):
    ref_losses, ref_params = reference[case]
    for rank, res in enumerate(results):
        r = res[case]
        assert r["base_unchanged"], f"rank {rank}: the frozen base changed"
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"rank {rank}, losses per step: {m}")
        assert r["interventions"].keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(r["interventions"][name], ref, rtol=1e-5, atol=2e-6,
                                       msg=lambda m, n=name: f"rank {rank}, {n}: {m}")
    if case == SAVED_CASE:  # save_interventions / load_interventions across the wrapper
        for rank, res in enumerate(results):
            for name, ref in ref_params.items():
                torch.testing.assert_close(res[case]["reloaded"][name], ref, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"rank {rank}, reloaded {n}: {m}")
    # training moved the parameters (so equality above is not equality of initial values)
    init = T.intervention_state(T.make_model(case))
    assert any(not torch.allclose(init[n], ref_params[n], atol=1e-4) for n in init)


@pytest.mark.parametrize("case", list(T.CASES))
def test_ddp_matches_single_process(ddp_results, reference, case):
    _check(ddp_results, reference, case)


@pytest.mark.parametrize("case", list(T.CASES))
def test_fsdp2_matches_single_process(fsdp2_results, reference, case):
    _check(fsdp2_results, reference, case)
    sharded = fsdp2_results[0][case]["sharded"]
    assert any(T.PREFIX in n for n in sharded), "the interventions were not sharded"
    assert any("layers.0.mlp" in n for n in sharded), "the base layers were not sharded"
