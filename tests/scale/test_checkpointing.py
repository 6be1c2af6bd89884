"""Activation checkpointing with ``torch.utils.checkpoint`` around decoder layers that carry
interventions (ReFT hooks on the layer, RED hooks on its MLP output projection), reentrant and
not, the layer wrapped after ``get_reft_model`` so that every hook runs inside the checkpointed
region and again in the backward's recompute. (Hugging Face's own gradient checkpointing on a
patched model is tested in ``tests/hf/test_train.py``.)

Reference: the same model without checkpointing, same seeds; loss and every intervention
gradient must match, with ReFT dropout too (the recompute must replay the same dropout mask).
Each layer must have run twice per step (forward and recompute), so the checkpoint really
recomputed the edits.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._common import LOREFT, LOREFT_UNSHARED, RED, assert_grads_close, batch, loss_and_grads, patched


class Checkpointed(nn.Module):
    """Runs ``layer`` under ``torch.utils.checkpoint`` (keyword arguments, ``reft_batch`` among
    them, are closed over for the reentrant form, which takes positional tensors only)."""

    def __init__(self, layer: nn.Module, reentrant: bool):
        super().__init__()
        self.layer, self.reentrant = layer, reentrant

    def forward(self, *args, **kwargs):
        if self.reentrant:
            return checkpoint(functools.partial(self.layer, **kwargs), *args, use_reentrant=True)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


CASES = {
    "red+loreft": [RED, LOREFT],
    "loreft_unshared_dropout": [dataclasses.replace(LOREFT_UNSHARED, dropout=0.2)],
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_layers_give_the_same_gradients(case, reentrant):
    # no KV cache: a recompute would append the layer's keys and values to it a second time (what
    # transformers' own gradient checkpointing turns off too)
    inputs = dict(batch(), use_cache=False)
    plain = patched(CASES[case])
    torch.manual_seed(5)  # dropout draws
    want_loss, want = loss_and_grads(plain, inputs)

    model = patched(CASES[case])
    if reentrant:  # a reentrant checkpoint passes gradients only to inputs that require grad
        model.enable_input_require_grads()
    calls = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
        layers[i] = Checkpointed(layer, reentrant)
    torch.manual_seed(5)
    got_loss, got = loss_and_grads(model, inputs)
    assert sorted(calls) == [0, 0, 1, 1], f"layer calls {calls}: the checkpoint did not recompute each layer once"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(got, want, rtol=1e-5, atol=1e-7, what="checkpointed vs plain")
