"""Many adapters in one batch: ``red_multi``, ``lowrank_edit_multi`` and its in-place twin
``lowrank_edit_multi_``. K adapters' parameters are stacked along a leading dimension and every
row (or index entry) names its adapter in ``adapter_ids``; -1 means "no edit".

Each function checks its inputs (ValueError/TypeError naming the argument and the shapes, before
anything runs), picks the backend and applies the autograd Function of ``ops/multi/``. Backends:
``"torch"`` (any device and dtype; the default off CUDA) and ``"triton"`` (forward kernels; the
default on CUDA tensors, and on CPU tensors through Triton's interpreter when asked for); the
backward runs PyTorch ops on both. There is no CUDA C++ kernel for these ops: ``backend="cuda"``
raises ValueError. ``torch.func`` transforms and forward-mode AD are not supported yet
(RuntimeError).
"""
from __future__ import annotations

import torch

from ._activations import act_code
from ._backend import ENV_VAR, env_backend, resolve_backend
from ._transforms import transform_in_use
from .functional import _kernel_dtype_reason
from ._validate import check_backend_dtype, check_hidden, check_index, check_inplace_target, check_param
from .ops.lowrank_edit.contract import Spec
from .ops.lowrank_edit.plan import triton_max_rank
from .ops.multi import function
from .ops.multi.checks import check_adapter_ids, stack_shape


def _backend(op, h, backend, triton_reason, tensors):
    """The backend of a multi-adapter call: ``backend="cuda"`` (argument or environment variable)
    raises ValueError, transforms raise RuntimeError, the rest is ``resolve_backend``'s."""
    requested = backend if backend is not None else env_backend()
    if isinstance(requested, str) and requested.lower() == "cuda":
        source = "backend" if backend is not None else f"the {ENV_VAR} environment variable"
        raise ValueError(
            f"reft_kernels.{op}: backend='cuda' (from {source}) is not available for the multi-adapter "
            "ops: there is no CUDA C++ kernel for them yet; use backend='triton' or 'torch' (or None)"
        )
    transform = transform_in_use(tensors)
    if transform is not None:
        raise RuntimeError(f"reft_kernels.{op} does not support {transform} yet: call it outside the "
                           "transform (its autograd Function has no vmap or jvp rule)")
    if requested is None and not h.is_cuda:  # the default off CUDA: no kernel reasons to weigh
        return "torch"
    triton_reason = triton_reason or _kernel_dtype_reason(h, backend)
    be = resolve_backend(backend, h.device, triton_unsupported=triton_reason)
    check_backend_dtype(be, h)
    return be


def red_multi(h, scale, bias, adapter_ids, *, backend=None):
    """RED with one adapter per row: ``y_i = h_i * scale[k] + bias[k]`` for ``k = adapter_ids[i]``,
    ``y_i = h_i`` where ``k`` is -1.

    Args:
        h: (..., d) activations; row i is row i of ``h.reshape(-1, d)``.
        scale, bias: (K, d) stacks of the K adapters' parameters; either may be None, not both.
        adapter_ids: int64, values in [-1, K): (N,), N = h.numel() // d, one per row; or, for an
            h of three or more dimensions, (h.shape[0],), one per sequence ``h[b]`` (then the
            PyTorch path gathers B rows of the stacks instead of N).
        backend: None, "torch" or "triton" ("cuda" raises ValueError).

    Out of place; ``y`` in ``h``'s dtype, gradients for ``h``, ``scale`` and ``bias`` in their own
    dtypes, each adapter's in its own slice (rows with id -1 add nothing). Numerics as ``red``: the
    Triton kernel computes ``fma(h, s, t)`` in fp32 and rounds once; the PyTorch path (and every
    backward) computes in ``h``'s dtype with one rounding and sums columns in fp32 (float64 for
    float64) through a (K, N) one-hot matmul: deterministic, no atomics.
    """
    d = check_hidden(h)
    stack = scale if scale is not None else bias
    if stack is None:
        raise TypeError("red_multi needs scale or bias (or both) of shape (K, d), got neither")
    k = stack_shape(stack, "scale" if scale is not None else "bias", 2, h, "(K, d)")[0]
    check_param(scale, "scale", (k, d), h, optional=True)
    check_param(bias, "bias", (k, d), h, optional=True)
    n = h.numel() // d
    be = _backend("red_multi", h, backend, None, (h, scale, bias, adapter_ids))
    what = "one per row of h.reshape(-1, d)"
    if h.dim() >= 3:
        what += f", or ({h.shape[0]},), one per sequence h[b]"
        if isinstance(adapter_ids, torch.Tensor) and adapter_ids.dim() == 1 and adapter_ids.shape[0] == h.shape[0]:
            n = h.shape[0]
    ids = check_adapter_ids(adapter_ids, n, k, h, what)
    if be == "triton":
        scale = scale.contiguous() if scale is not None else None
        bias = bias.contiguous() if bias is not None else None
    return function.red_run(h, scale, bias, ids, be)


def _prepare(h, B, A, a, C, c, adapter_ids, act, index, backend, inplace):
    d = check_hidden(h)
    k, r, _ = stack_shape(B, "B", 3, h, "(K, r, d)")
    check_param(A, "A", (k, r, d), h, optional=True)
    check_param(C, "C", (k, r, d), h, optional=True)
    check_param(a, "a", (k, r), h, optional=True)
    check_param(c, "c", (k, r), h, optional=True)
    code = act_code(act)
    tied = C is not None and C is B
    op = "lowrank_edit_multi_" if inplace else "lowrank_edit_multi"
    reason = None
    if r > triton_max_rank(h.dtype):
        reason = f"the Triton kernels take ranks up to {triton_max_rank(h.dtype)} for {h.dtype} h, got r = {r}"
    be = _backend(op, h, backend, reason, (h, B, A, a, C, c, index, adapter_ids))
    n_rows = h.numel() // d
    if index is not None:
        index = check_index(index, n_rows, h)
        what = f"one per entry of index (shape {tuple(index.shape)})"
        ids = check_adapter_ids(adapter_ids, index.shape[0], k, h, what)
    else:
        ids = check_adapter_ids(adapter_ids, n_rows, k, h, "one per row of h.reshape(-1, d)")
    if inplace:
        check_inplace_target(h, {"B": B, "A": A, "a": a, "C": C, "c": c, "index": index, "adapter_ids": ids})
        if index is None:
            index = torch.arange(n_rows, device=h.device)
    if be == "triton":
        A, a, B, C, c = (t.contiguous() if t is not None else None for t in (A, a, B, C, c))
    return Spec(be, code, tied), A, a, B, (None if tied else C), c, ids, index


def lowrank_edit_multi(h, B, A=None, a=None, C=None, c=None, *, adapter_ids, act=None, index=None, backend=None):
    """Low-rank edit with one adapter per row: ``y = h + (act(h A_k^T + a_k) - h C_k^T - c_k) B_k``
    for the row's adapter ``k``, out of place.

    Args:
        h: (..., d) activations, float16 / bfloat16 / float32 (float64 with backend="torch").
        B: (K, r, d), required. A, C: (K, r, d) or None. a, c: (K, r) or None. Pass the same tensor
            as ``C`` and ``B`` for the tied methods (LoReFT, NoReFT, ConsReFT).
        adapter_ids: int64; without ``index`` (N,), one per row of ``h.reshape(-1, d)``; with it
            (n,), one per index entry. Values in [-1, K); -1 edits nothing.
        act: None (identity) or an activation name (``reft_kernels.ACTIVATION_NAMES``).
        index: optional (n,) rows of ``h.reshape(-1, d)`` to edit, -1 padding, as ``lowrank_edit``
            takes it; an entry edits nothing when its index or its adapter id is -1.
        backend: None, "torch" or "triton" ("cuda" raises ValueError).

    Returns ``y`` shaped like ``h`` in its dtype; gradients for ``h`` and every stack, each
    adapter's in its own slice, deterministic (matmuls against a block mask: no atomics). The
    forward computes in fp32 (float64 for float64 ``h``) and rounds ``y`` once; see
    ``ops/multi/torch_impl.py`` and ``ops/multi/triton_impl.py``.
    """
    spec, A, a, B, C, c, ids, index = _prepare(h, B, A, a, C, c, adapter_ids, act, index, backend, inplace=False)
    if index is not None:
        return function.lowrank_run_copy(h, A, a, B, C, c, ids, spec, index)
    return function.lowrank_run(h, A, a, B, C, c, ids, spec, index)


def lowrank_edit_multi_(h, B, A=None, a=None, C=None, c=None, *, adapter_ids, act=None, index=None, backend=None):
    """In-place ``lowrank_edit_multi``: edits the rows of ``h`` listed by ``index`` (all rows when
    None, with ``adapter_ids`` then one per row) and returns ``h``; the same refusals as
    ``lowrank_edit_`` (RuntimeError before writing anything where PyTorch's in-place ops would
    refuse, or when ``h`` shares memory with a parameter, the index or the ids)."""
    spec, A, a, B, C, c, ids, index = _prepare(h, B, A, a, C, c, adapter_ids, act, index, backend, inplace=True)
    return function.lowrank_run(h, A, a, B, C, c, ids, spec, index)
