"""Hooks of ReFT's components other than a layer's output (``ReftConfig.component``):

- "block_input": ``ReftInputHook``, a forward pre-hook on the layer that edits its input hidden
  states (on a copy);
- "mlp_output" / "attention_output": the site's module is inside the layer. Its forward hook
  (``attach._ReftHook``) reads the rows from its own keyword arguments when the layer passes them
  on (transformers' attention modules take the layer's ``**kwargs``), else through a
  ``RowsRelay`` on the layer (the MLP is called with the hidden states alone).
"""
from __future__ import annotations

import sys

import torch

from .._validate import remember_index_checked
from .batch import KWARG, ReftBatch


class RowsRelay:
    """Forward pre-hook (with kwargs) on the layer around a sub-layer site ("mlp_output"): keeps
    the rows of the layer's latest call with interventions enabled, for the site's hook (the
    layer calls its MLP without keyword arguments). Calls while disabled leave them, so that a
    reference forward under ``disabled()`` does not change what a later gradient-checkpointing
    recompute of the edited forward reads; a call without rows clears them."""

    def __init__(self, handle, parent):
        self.handle, self.batch, self.parent = handle, None, parent

    def __call__(self, module, args, kwargs):
        if self.handle._enabled:
            self.batch = kwargs.get(KWARG)
        return None

    def rows(self, module):
        """The rows for a call of the site's module. Inside a backward pass (a gradient
        checkpointing recompute, which transformers >= 5.24 runs through the layer's ``forward``
        without its hooks, possibly after later forwards) they are read from the recomputed
        layer call's own keyword arguments; otherwise from the latest call."""
        if torch._C._current_graph_task_id() != -1:
            found = rows_of_caller(self.parent)
            if found is not None:
                return found
        return self.batch


def rows_of_caller(parent, depth: int = 24):
    """The ``reft_batch`` keyword of the innermost running ``parent.forward`` call on the stack
    (its ``**kwargs`` or a parameter of that name), else None."""
    frame = sys._getframe(2)
    while frame is not None and depth > 0:
        loc = frame.f_locals
        if loc.get("self") is parent:
            if isinstance(loc.get(KWARG), (ReftBatch, dict)):
                return loc[KWARG]
            for value in loc.values():
                if isinstance(value, dict) and isinstance(value.get(KWARG), (ReftBatch, dict)):
                    return value[KWARG]
        frame, depth = frame.f_back, depth - 1
    return None


class ReftInputHook:
    """Forward pre-hook (with kwargs) of a "block_input" site: edits the rows of the layer's
    input hidden states (its first positional argument or ``hidden_states``), on a copy."""

    def __init__(self, handle, group: int, ivs, cfg, edit_rows, site, sides):
        self.handle, self.group, self.ivs, self.cfg = handle, group, list(ivs), cfg
        self.edit_rows = edit_rows  # attach._edit_rows
        self.site = site  # (config number, one key per side), for a mixed-adapter batch
        self.sides = sides  # attach.mixed_sides

    def __call__(self, module, args, kwargs):
        batch = kwargs.get(KWARG)
        if batch is None:
            if self.handle._enabled and self.handle._in_forward:
                raise RuntimeError(f"{type(module).__name__} was called without the '{KWARG}' keyword: this "
                                   "model's forward does not pass its keyword arguments down to its layers")
            return None
        if batch.decode:
            return None
        positional = bool(args) and isinstance(args[0], torch.Tensor)
        h = args[0] if positional else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError("a block_input site must take (batch, seq, d) hidden states as its first argument "
                             "or as hidden_states")
        for iv, index in zip(self.sides(self, batch, h), batch.rows[self.group]):
            if index.device != h.device:
                index = index.to(h.device)
                remember_index_checked(index, h.numel() // h.shape[-1])
            h = self.edit_rows(iv, h, index, self.cfg.dropout, iv.training, copy=True)
        if positional:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
