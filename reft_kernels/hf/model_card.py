"""The model card (``README.md``) of a saved intervention folder: the base model, the methods,
layers, positions, ranks and the library's version, for people and for the Hugging Face Hub. It is
written by ``save_interventions`` (and so by ``save_pretrained`` of an attached model); loading
never reads it.

The card is one section between two HTML comments. A folder without ``README.md`` gets the
section under a YAML header (``base_model``, ``library_name``, ``tags``: the Hub's metadata); a
``README.md`` that is already there (PEFT's card, or one written by hand) keeps its text and gets
the section appended; a re-save replaces the section.
"""
from __future__ import annotations

import os
import re

from .config import REDConfig

NAME = "README.md"
BEGIN = "<!-- reft_kernels model card: rewritten by save_interventions -->"
END = "<!-- end of reft_kernels model card -->"


def base_model_name(model) -> str | None:
    """The base model's hub id or path, as ``from_pretrained`` recorded it (None when unknown)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _layers(sites) -> str:
    layers = sorted({layer for _, layer, _ in sites})
    stacks = sorted({re.match(r"\D*", key).group(0) for key, _, _ in sites} - {"layer"})
    text = ", ".join(str(x) for x in layers)
    return f"{text} ({' and '.join(stacks)})" if stacks else text


def _rows(handle) -> list:
    rows = []
    for cfg, sites in zip(handle.configs, handle.sites):
        if isinstance(cfg, REDConfig):
            rows.append(("RED", "MLP output", _layers(sites), "every token", "-"))
        else:
            shared = "" if cfg.share_weights else " (first and last: separate weights)"
            rows.append((f"ReFT ({cfg.method})", cfg.component, _layers(sites), cfg.positions + shared,
                         str(cfg.rank)))
    return rows


def render(model, handle, version: str) -> str:
    """The card's section (between ``BEGIN`` and ``END``)."""
    base = base_model_name(model)
    lines = [BEGIN, "", "# Interventions for " + (f"`{base}`" if base else f"a {handle.model_type} model"), "",
             f"Saved by reft_kernels {version}: the interventions only, not the base model's weights.", "",
             f"- base model: {base or 'unknown'}",
             f"- model type: {handle.model_type}"]
    if handle.hidden_size is not None:
        lines.append(f"- hidden size: {handle.hidden_size}")
    if handle.modules_to_save:
        lines.append(f"- modules saved with them: {', '.join(handle.modules_to_save)}")
    lines += ["", "| method | site | layers | positions | rank |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(handle)]
    load_base = f'"{base}"' if base else "base_model_path"
    lines += ["", "Load them into the base model:", "", "```python",
              "from transformers import AutoModel  # the Auto class of the model's task",
              "from reft_kernels.hf import load_interventions", "",
              f"model = load_interventions(AutoModel.from_pretrained({load_base}), folder)",
              "```", "", END, ""]
    return "\n".join(lines)


def _header(model, handle) -> str:
    base = base_model_name(model)
    tags = sorted({"red" if isinstance(c, REDConfig) else "reft" for c in handle.configs})
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: reft_kernels", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def card_text(model, handle, version: str, existing: str | None) -> str:
    """The whole ``README.md``: ``existing`` (None when there is none) with the section put in."""
    section = render(model, handle, version)
    if existing is None:
        return _header(model, handle) + section
    start, end = existing.find(BEGIN), existing.find(END)
    if start != -1 and end > start:
        return existing[:start] + section.rstrip("\n") + existing[end + len(END):]
    return existing.rstrip("\n") + "\n\n" + section


def write_card(model, handle, directory, version: str, atomic_write) -> None:
    path = os.path.join(os.fspath(directory), NAME)
    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
    atomic_write(path, card_text(model, handle, version, existing).encode("utf-8"))
