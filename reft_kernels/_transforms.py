"""Function transforms: ``torch.func`` (``vmap``, ``grad``, ``jvp``, ``jacrev``, ``jacfwd``,
``hessian``, ``functionalize``) and forward-mode AD (``torch.autograd.forward_ad``).

Inside a ``torch.func`` transform the op receives wrapper tensors (a batched tensor under ``vmap``,
a grad-tracking wrapper under ``grad``/``jvp``/``jacrev``, a functional wrapper) that have no
storage of their own; under forward-mode AD a tensor carries a tangent that no kernel sees. The
Triton and CUDA backends hand raw memory to their kernels, so they cannot take either: a call
that would send such tensors to them raises a RuntimeError that names the op, the backend and
the way out, before anything is launched, and the default dispatch takes the PyTorch path.

The PyTorch path runs under every transform: there each op is computed from plain
differentiable PyTorch ops (``torch_impl``'s ``fwd_differentiable`` functions, same numerics as
the backend's forward), whose derivatives and batching rules PyTorch supplies. The ops' autograd
Functions are not used there (their hand-written backwards have no ``setup_context``, ``vmap``
or ``jvp`` rule).
"""
from __future__ import annotations


import torch
from torch.autograd import forward_ad

from ._backend import ENV_VAR, env_backend

KERNEL_BACKENDS = ("triton", "cuda")


def transform_in_use(tensors) -> str | None:
    """The transform that an op called on ``tensors`` (None entries allowed) runs under:
    "torch.vmap", "a torch.func transform" (grad, jvp, jacrev, jacfwd, functionalize),
    "forward-mode AD", or None.

    Tensors captured from outside a transform are plain tensors: with no gradient to record the
    kernels take them (None). With one (grad mode on and an input that requires grad) the op's
    autograd Function would be needed, which PyTorch refuses to apply inside a ``torch.func``
    transform, so that case counts as the transform too. Free outside transforms (a flag read per
    check); not asked inside ``torch.compile``, which traces the plain tensors of the graph.
    """
    if torch.compiler.is_compiling():
        return None
    # Outside every transform (two flag reads), nothing below can find one: measured on the
    # 2-core CPU, 0.3 us per call against 0.7 us for the generic scan of the tensors.
    if not torch._C._are_functorch_transforms_active() and getattr(forward_ad, "_current_level", -1) < 0:
        return None
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch._C._are_functorch_transforms_active():
        functorch = torch._C._functorch
        if any(functorch.is_batchedtensor(t) for t in present):
            return "torch.vmap"
        if any(functorch.is_functorch_wrapped_tensor(t) for t in present):
            return "a torch.func transform"
        if torch.is_grad_enabled() and any(t.requires_grad for t in present):
            return "a torch.func transform"
    if getattr(forward_ad, "_current_level", -1) >= 0:
        if any(forward_ad.unpack_dual(t).tangent is not None for t in present):
            return "forward-mode AD"
    return None


def wrapped(t) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper tensor (no storage of its own)."""
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _requested(backend) -> str | None:
    """The backend asked for explicitly (argument, else the environment variable), lower case."""
    if backend is None:
        backend = env_backend()
    return backend.lower() if isinstance(backend, str) else None


def transform_reason(op: str, transform: str | None, backend) -> str | None:
    """Under ``transform``: why the kernels cannot take the call (for the default dispatch, which
    then picks the PyTorch path), or a RuntimeError when a kernel backend was asked for
    explicitly (``backend`` argument or ``REFT_KERNELS_BACKEND``). None outside transforms."""
    if transform is None:
        return None
    requested = _requested(backend)
    if requested in KERNEL_BACKENDS:
        source = "" if backend is not None else f" (from the {ENV_VAR} environment variable)"
        raise RuntimeError(
            f"reft_kernels.{op}: backend={requested!r}{source} cannot run under {transform}: its kernels "
            "read raw tensor memory, so they cannot see through the wrapper tensors of torch.func "
            "transforms (vmap, grad, jvp, jacrev, jacfwd, functionalize) nor carry a forward-mode "
            "tangent; use backend='torch' (plain PyTorch ops there, which every transform supports), "
            "or call the op outside the transform"
        )
    return f"the kernels cannot run under {transform}"
