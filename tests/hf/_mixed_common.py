"""Helpers for the mixed-adapter batch tests (``adapter_names``): the reference that runs each
example alone with its adapter active."""
from __future__ import annotations

import torch


def grads_each_alone(model, names, params, loss_of):
    """``{adapter: [gradient per parameter]}`` summed over the examples run one at a time with
    their adapter active (``"__base__"`` examples skipped): the reference a mixed training batch
    must match. ``params``: ``{adapter: [its parameters]}`` for the adapters to check, the
    active one ``"default"``; ``loss_of(i)``: example i's loss. The inactive adapters of
    ``params`` are unfrozen again afterwards, as the mixed batch needs them."""
    want = {k: [torch.zeros_like(p) for p in ps] for k, ps in params.items()}
    for i, name in enumerate(names):
        if name == "__base__":
            continue
        model.zero_grad()
        model.reft.set_adapter(name)
        model.reft_interventions.requires_grad_(True)
        loss_of(i).backward()
        for acc, p in zip(want[name], model.reft_interventions.parameters()):
            acc += p.grad
        model.reft.set_adapter("default")
        for other in params:
            if other != "default":
                model.reft_adapters[other].requires_grad_(True)
    return want
