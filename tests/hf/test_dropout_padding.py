"""ReFT dropout in training with padding slots in the positions: a dropout that keeps every element
must give the gradients of no dropout.

With mixed prompt lengths, ``f3+l3`` leaves -1 slots for the short prompt; with row 0 (token 0 of
example 0) edited, a put that autograd differentiates would count row 0's gradient once more per
slot (the dropout branch of the hooks gathers, edits, drops out and puts the rows back). A dropout
of p = 1e-7 keeps every element here (a few hundred draws) and scales by 1 / (1 - p), so its
gradients equal the no-dropout ones to about 1e-7 relative.
"""
from __future__ import annotations

import copy

import pytest
import torch

from reft_kernels.hf import ReftConfig, get_reft_model, intervention_locations

from ._attach_common import randomize_, weighted_sum
from ._models import device_for, model_inputs, padded_batch, tiny_model, to_device

SEQ = 8
TINY_P = 1e-7


def _grads(model, arch, ids, mask, p, method, backend):
    torch.manual_seed(0)
    get_reft_model(model, ReftConfig(method=method, layers=[0, 1], rank=4, positions="f3+l3", dropout=p,
                                     share_weights=False, backend=backend), verbose=False)
    randomize_(model.reft_interventions, std=0.3)
    model.train()
    device = device_for(backend)
    model.to(device)
    kw = to_device(model_inputs(arch, ids, mask), device)
    weighted_sum(model(**kw).logits.double().cpu()).backward()
    return {n: q.grad.detach().cpu().clone() for n, q in model.reft_interventions.named_parameters()}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_dropout_keeping_every_element_gives_the_no_dropout_gradients(arch, side):
    # example 0 is the longest (row 0 is a real token under either padding side), example 1 has a
    # 2-token prompt: f3+l3 gives it one first and one last position and two -1 slots on each side
    ids, mask = padded_batch((SEQ, 2, 5), SEQ, side)
    loc = intervention_locations(mask, "f3+l3")
    assert (loc == -1).any() and loc[0, 0] == 0
    base = tiny_model(arch, dtype=torch.float64)
    want = _grads(copy.deepcopy(base), arch, ids, mask, 0.0, "loreft", "torch")
    got = _grads(copy.deepcopy(base), arch, ids, mask, TINY_P, "loreft", "torch")
    assert want.keys() == got.keys() and want
    for name in want:  # the 1 / (1 - p) scale moves every gradient by about 1e-7 of its tensor's scale
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 * scale, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("method", ["noreft", "direft", "consreft"])
def test_dropout_padding_gradients_other_methods_on_triton(method):
    """The same on the Triton backend (fp32; the interpreter on a CPU machine), for methods with
    other parameter sets (no tied R, bias-only edits)."""
    ids, mask = padded_batch((SEQ, 2), SEQ, "right")
    base = tiny_model("llama", dtype=torch.float32)
    want = _grads(copy.deepcopy(base), "llama", ids, mask, 0.0, method, "triton")
    got = _grads(copy.deepcopy(base), "llama", ids, mask, TINY_P, method, "triton")
    assert want.keys() == got.keys() and want
    for name in want:  # fp32: the same bound, above fp32 rounding of these tiny sums
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4 * scale, msg=lambda s, n=name: f"{n}: {s}")
