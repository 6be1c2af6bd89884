"""Policies shared by the ops' autograd Functions.

- Autocast: the ops run outside autocast. Inside ``torch.autocast`` they compute exactly as
  outside it: inputs are used in the dtypes they have (parameters in another dtype than ``h``
  are cast as each op defines) and the output comes back in ``h``'s dtype, forward and backward,
  on every backend. (Autocast would otherwise change the PyTorch path's matmuls alone.)
- Double backward is not supported: a gradient computed with ``create_graph=True`` through an
  op can be used, but differentiating it again raises a RuntimeError that says so, instead of
  silently dropping the second-order terms.
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:  # the node torch's own once_differentiable uses
    from torch._C import _functions

    DelayedError = _functions.DelayedError
except (ImportError, AttributeError):  # pragma: no cover - every torch this package supports has it
    DelayedError = None


def autocast_off(device_type: str):
    """A context that disables autocast for ``device_type`` when it is on, else a no-op."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def once_differentiable(op_name: str):
    """Like ``torch.autograd.function.once_differentiable`` for a backward, with an error naming
    ``op_name``: the gradients it returns carry a node that raises if they are differentiated."""
    message = (f"{op_name} does not support double backward: its gradient was computed with "
               "create_graph=True and is being differentiated again")

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads) and \
                    not any(t is not None and t.requires_grad for t in ctx.saved_tensors):
                return outputs
            if DelayedError is None:  # pragma: no cover
                raise RuntimeError(message)
            present = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
            fakes = [outputs[i].detach().requires_grad_() for i in present]
            # The error node also takes a zero-size tensor that depends on every input of this
            # backward that requires grad, so a later differentiation towards those inputs
            # (torch.autograd.grad(..., inputs=...)) reaches the node and raises, instead of
            # reporting the inputs as unused.
            linked = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            anchor = torch.cat([t.reshape(1) if t.dim() == 0 else t.narrow(0, 0, 0).sum().reshape(1)
                                for t in linked])[:0]
            err = DelayedError(message.encode(), len(fakes) + 1)
            wrapped = err(*fakes, anchor)[:-1]
            out = list(outputs)
            for i, t in zip(present, wrapped):
                out[i] = t
            return tuple(out)

        return wrapper

    return wrap
