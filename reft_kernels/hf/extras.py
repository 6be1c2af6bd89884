"""``modules_to_save`` (PEFT's name): base modules that train beside the interventions and are
saved and loaded with them, e.g. the new classification head of ``AutoModelForSequenceClassification``
(BERT's and RoBERTa's ``classifier``) or an embedding.

An entry names a module of ``model.named_modules()`` exactly, or by its last dotted parts
(``"classifier"`` matches ``bert.classifier`` and ``classifier``; ``"dense"`` matches every
``...dense``), as PEFT matches them; every module matched counts, and each entry must match at
least one. The modules stay in place (their parameter names do not change, so the model still
loads and saves as before): attaching sets ``requires_grad`` on their parameters and keeps a CPU
copy of their state, which ``model.reft.remove()`` puts back (values and ``requires_grad``).

In the saved folder their state sits in ``interventions.safetensors`` beside the interventions,
under ``modules_to_save.<module name>.<tensor name>``, covered by the same checksum.
"""
from __future__ import annotations

import torch
from torch import nn

PREFIX = "modules_to_save."


def check_modules_to_save(modules_to_save) -> tuple:
    """``modules_to_save`` as a tuple of names (empty for None); TypeError / ValueError naming
    the argument for anything else."""
    if modules_to_save is None:
        return ()
    if isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple)):
        raise TypeError("modules_to_save must be None or a list of module names such as ['classifier'], "
                        f"got {type(modules_to_save).__name__}")
    for name in modules_to_save:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"modules_to_save entries must be module names such as 'classifier', got {name!r}")
    if len(set(modules_to_save)) != len(modules_to_save):
        raise ValueError(f"modules_to_save lists a name more than once: {list(modules_to_save)!r}")
    return tuple(modules_to_save)


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def resolve_modules_to_save(model: nn.Module, entries: tuple, skip: str) -> list:
    """[(module name, module)] that ``entries`` select, in module order, outermost only (a module
    inside another selected one is covered by it). ``skip``: a submodule name never selected
    (the interventions). ValueError naming ``modules_to_save`` for an entry that matches nothing
    or a module without parameters."""
    found = {}
    for entry in entries:
        hits = [(n, m) for n, m in model.named_modules()
                if n and _matches(n, entry) and n != skip and not n.startswith(skip + ".")]
        if not hits:
            top = [n for n, _ in model.named_children() if n != skip]
            raise ValueError(f"modules_to_save: no module of the model is named {entry!r} (or ends with "
                             f"'.{entry}'); its top-level modules are {top}")
        for n, m in hits:
            if not any(True for _ in m.parameters()):
                raise ValueError(f"modules_to_save: {n!r} ({type(m).__name__}) has no parameters to train")
            found[n] = m
    names = sorted(found, key=list(dict(model.named_modules())).index)
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    return [(n, found[n]) for n in outer]


def extras_state(modules) -> dict:
    """{``modules_to_save.<module>.<tensor>``: tensor} of ``[(name, module)]`` (their state dicts:
    parameters and persistent buffers), the tensors as the modules hold them."""
    out = {}
    for name, module in modules:
        for key, value in module.state_dict().items():
            out[f"{PREFIX}{name}.{key}"] = value
    return out


def snapshot(modules) -> dict:
    """CPU copies of the modules' state dicts, {module name: {tensor name: tensor}}."""
    return {name: {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            for name, module in modules}


def restore(modules, saved: dict) -> None:
    """Write ``snapshot``'s copies back into the modules, bit for bit."""
    with torch.no_grad():
        for name, module in modules:
            for key, value in module.state_dict().items():
                value.copy_(saved[name][key])


def unfreeze(modules) -> None:
    """``requires_grad`` on every floating-point parameter of the modules."""
    for _, module in modules:
        for p in module.parameters():
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)
