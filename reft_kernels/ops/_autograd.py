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


# One flag read for "is autocast on for any device": the common case (no autocast) then skips
# the per-device query and a new context manager (one shared no-op context instead). Measured on
# the 2-core CPU: 0.2 us against 0.5 us (query + a new nullcontext) per call, twice per op call.
# Inside torch.compile the per-device query, which Dynamo traces, is kept.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_NO_CONTEXT = contextlib.nullcontext()  # stateless and reentrant: one instance serves every call


def _no_autocast_anywhere() -> bool:
    return _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast()


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (False for device types without autocast)."""
    if _no_autocast_anywhere():
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        return False


def autocast_off(device_type: str):
    """A context that disables autocast for ``device_type`` when it is on, else a no-op."""
    if _no_autocast_anywhere():
        return _NO_CONTEXT
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _own_memory(outputs):
    """``outputs`` with each gradient that is a view (e.g. ``dh`` in ``g``'s shape over an (N, d)
    buffer) replaced by a plain alias of its memory. A view keeps its base alive, so its storage
    has two owners, and the engine cannot sum a later gradient into it in place: in a model, the
    residual stream's sum at the layer below an edit then made a new (B, S, d) tensor per edited
    layer (the d = 256 LLaMA step at f7+l7, profiler: 27 out-of-place and 21 in-place adds of
    (4, 256, 256) tensors, the frozen step's 22 and 26; ``tests/ops/test_gradient_sums_in_place.py``).
    Once the backward returns, the alias is its storage's one owner."""
    if not any(isinstance(t, torch.Tensor) and t._base is not None for t in outputs):
        return outputs
    return tuple(t.detach() if isinstance(t, torch.Tensor) and t._base is not None else t for t in outputs)


def once_differentiable(op_name: str):
    """Like ``torch.autograd.function.once_differentiable`` for a backward, with an error naming
    ``op_name``: the gradients it returns carry a node that raises if they are differentiated.
    Gradients that are views are handed on as plain aliases (``_own_memory``)."""
    message = (f"{op_name} does not support double backward: its gradient was computed with "
               "create_graph=True and is being differentiated again")

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual backward (no create_graph): no context
                return _own_memory(backward(ctx, *grads))
            with torch.no_grad():
                outputs = backward(ctx, *grads)
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


def direct_apply(fn_cls):
    """``fn_cls.apply`` without its Python wrapper, for callers outside ``torch.func`` transforms
    and ``torch.compile``: the C-level apply that ``torch.autograd.Function.apply`` itself ends
    in there. The wrapper's other work (the ``setup_context`` check, the transform check, and
    unwrapping dead ``torch.func`` wrappers over every argument) is the caller's: it unwraps its
    tensors with ``unwrap_if_dead`` and takes ``fn_cls.apply`` under a transform or Dynamo (which
    only recognises the public ``apply``). Measured on the 2-core CPU with 8 arguments: 9.8 us
    against 12.3 us per call, the unwrapping included. Falls back to ``fn_cls.apply`` where the
    base class has no such method."""
    return getattr(super(torch.autograd.Function, fn_cls), "apply", fn_cls.apply)


try:  # a no-op for every tensor but a torch.func wrapper that outlived its transform
    from torch._C._functorch import unwrap_if_dead
except ImportError:  # pragma: no cover - every torch this package supports has it
    def unwrap_if_dead(t):
        return t


def plain_call() -> bool:
    """Whether an op's call runs outside ``torch.compile`` and ``torch.func`` transforms, where
    ``direct_apply`` may be used."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def autocast_off_for(t: torch.Tensor):
    """``autocast_off(t.device.type)``, without reading ``t``'s device when no autocast is on."""
    if _no_autocast_anywhere():
        return _NO_CONTEXT
    return autocast_off(t.device.type)
