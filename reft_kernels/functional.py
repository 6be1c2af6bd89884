"""The public ops: ``red``, ``lowrank_edit`` and its in-place twin ``lowrank_edit_``.

Each checks its inputs (every bad input becomes a ValueError/TypeError naming the argument and
the shapes, or, for an in-place edit that cannot be done, a RuntimeError like PyTorch's own
in-place ops raise, always before anything is written), picks the backend
(``reft_kernels._backend``) and applies the autograd Function of ``reft_kernels/ops/<op>/``.
Under ``torch.func`` transforms and forward-mode AD the PyTorch backend computes with plain
differentiable ops instead and the kernel backends refuse (``reft_kernels._transforms``).
"""
from __future__ import annotations


import torch
from torch.autograd import forward_ad

from . import _cuda, cpu_ext
from ._activations import IDENTITY, act_code
from ._backend import env_backend, resolve_backend
from ._constants import CUDA_MAX_RANK
from ._measured import measured_backend
from ._rows import as_rows
from ._transforms import transform_in_use, transform_reason, wrapped
from ._validate import (
    TRITON_DTYPES, check_backend_dtype, check_hidden, check_index, check_inplace_target, check_param,
)
from .ops._autograd import plain_call
from .ops.lowrank_edit.contract import Spec
from .ops.lowrank_edit import function as lowrank_function
from .ops.lowrank_edit import torch_impl as lowrank_torch
from .ops.lowrank_edit.plan import triton_max_rank
from .ops.red import torch_impl as red_torch
from .ops.red import function as red_function


def _kernel_dtype_reason(h, backend):
    """For the default dispatch only: why the Triton/CUDA kernels cannot take ``h``'s dtype (None
    when they can), so that float64 CUDA tensors take the PyTorch path. An explicit request
    (argument or environment variable) still gets ``check_backend_dtype``'s TypeError."""
    if h.dtype in TRITON_DTYPES or backend is not None or env_backend() is not None:
        return None
    return f"the kernels support h in float16, bfloat16 or float32, got {h.dtype}"


def _quick(name, h, backend, params):
    """The CPU extension's op ``name`` where the call goes there before the public op's checks
    (``cpu_ext.quick_op``), or None. Those checks, the transform tests and the backend pick cost
    2-3 us a call in Python on the 2-core CPU; the op makes its own checks in C++, and a call it
    refuses falls back to the checked path, which raises the ValueError/TypeError that names the
    problem (or runs the call elsewhere). Measured there, warm, two threads, d = 256, r = 8, with
    grad: LoBiReFT's call at N = 8, 6.8 -> 4.5 us (eager ``h + b @ R`` 4.2-4.4 us)."""
    if not _plain_torch(backend, h) or not plain_call() or getattr(forward_ad, "_current_level", -1) >= 0:
        return None
    return cpu_ext.quick_op(name, h, params)


def red(h, scale=None, bias=None, *, backend=None):
    """RED edit ``y = h * scale + bias`` of ``h`` (..., d) with ``scale``, ``bias`` of shape (d,).

    Either parameter may be None. ``y`` has ``h``'s shape and dtype; gradients come back in each
    tensor's own dtype (parameters may be in another dtype than ``h``, e.g. fp32 with bf16 ``h``).
    ``backend``: None (default dispatch), "triton", "cuda" or "torch"; see ``reft_kernels._backend``.

    Numerics: the kernels compute ``fma(h, s, t)`` in fp32 and round once (RED's own code rounds
    ``h * s`` before adding ``t``); the column sums of the backward accumulate in fp32 in a fixed
    order. Runs outside autocast; one backward (no double backward). Under ``torch.func``
    transforms and forward-mode AD only ``backend="torch"`` runs (plain PyTorch ops, the same
    numerics); the kernel backends raise RuntimeError there (``reft_kernels._transforms``).
    """
    op = _quick("red", h, backend, (scale, bias)) if isinstance(h, torch.Tensor) else None
    if op is not None:
        try:
            return op(h, scale, bias)
        except (RuntimeError, TypeError):  # refused: the checks below name the problem
            pass
    d = check_hidden(h)
    check_param(scale, "scale", (d,), h, optional=True)
    check_param(bias, "bias", (d,), h, optional=True)
    transform = transform_in_use((h, scale, bias))
    if transform is None and _plain_torch(backend, h):
        if plain_call() and cpu_ext.red_applies(h, scale, bias):
            y = cpu_ext.red(h, scale, bias)  # None: the extension is not built
            if y is not None:
                return y
        return red_function.run(h, scale, bias, "torch")
    why = _kernel_dtype_reason(h, backend) or transform_reason("red", transform, backend)
    be = resolve_backend(backend, h.device, triton_unsupported=why, cuda_unsupported=why,
                         measured=lambda: measured_backend("red", h, h.numel() // d, d))
    check_backend_dtype(be, h)
    if transform is not None:
        return red_torch.fwd(as_rows(h), scale, bias).reshape(h.shape)
    if be in ("triton", "cuda"):
        scale = scale.contiguous() if scale is not None else None
        bias = bias.contiguous() if bias is not None else None
    return red_function.run(h, scale, bias, be)


def _plain_torch(backend, h) -> bool:
    """Whether a call outside transforms goes to the PyTorch backend whatever the kernels could
    take: ``backend="torch"``, or the default dispatch on a non-CUDA tensor with no
    ``REFT_KERNELS_BACKEND`` set (``resolve_backend`` returns "torch" there without asking why
    the kernels could not run, and no check of ``_kernel_dtype_reason``/``transform_reason``
    raises). The ops then skip the reasons and the dispatch: measured on the 2-core CPU (one
    thread, (8, 4) inputs), ``red``'s own checks and dispatch took 4.2 us with backend="torch"
    and 6.2 us by default before, 2.5 us and 3.9 us after."""
    if backend == "torch":
        return True
    return backend is None and not h.is_cuda and env_backend() is None


# (backend, act code, tied) -> Spec: one frozen instance per combination (a lookup is 0.15 us,
# building the frozen dataclass 0.45 us, on the 2-core CPU)
_SPECS: dict = {}


def _spec(be, code, tied):
    spec = _SPECS.get((be, code, tied))
    if spec is None:
        spec = _SPECS[(be, code, tied)] = Spec(be, code, tied)
    return spec


def _prepare(h, B, A, a, C, c, act, index, backend, inplace, target_checked=False):
    """The checked call: (spec, A, a, B, C, c, index, transformed). ``target_checked``: the caller
    has established what ``_check_inplace`` tests (``_lowrank_edit_fresh_``)."""
    d = check_hidden(h)
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"B must be a torch.Tensor of shape (r, d), got {type(B).__name__}")
    if B.dim() != 2 or B.shape[0] < 1 or B.shape[1] != d:
        raise ValueError(
            f"B must have shape (r, d) with r >= 1 and d = {d} (h has shape {tuple(h.shape)}), "
            f"got {tuple(B.shape)}"
        )
    r = B.shape[0]
    rd, r1 = (r, d), (r,)
    check_param(B, "B", rd, h, optional=False)
    check_param(A, "A", rd, h, optional=True)
    check_param(C, "C", rd, h, optional=True)
    check_param(a, "a", r1, h, optional=True)
    check_param(c, "c", r1, h, optional=True)
    code = act_code(act)
    tied = C is not None and C is B
    transform = transform_in_use((h, B, A, a, C, c, index))
    if transform is None and _plain_torch(backend, h):
        # the PyTorch backend outside transforms: no kernel reasons to weigh (see _plain_torch)
        if index is not None:
            index = check_index(index, h.numel() // d, h)
        if inplace:
            if not target_checked:
                _check_inplace(h, B, A, a, C, c, index)
            if index is None:
                index = torch.arange(h.numel() // d, device=h.device)
        return _spec("torch", code, tied), A, a, B, (None if tied else C), c, index, False
    op = "lowrank_edit_" if inplace else "lowrank_edit"
    reason = cuda_reason = _kernel_dtype_reason(h, backend) or transform_reason(op, transform, backend)
    if reason is None and r > triton_max_rank(h.dtype):
        reason = f"the Triton kernels take ranks up to {triton_max_rank(h.dtype)} for {h.dtype} h, got r = {r}"
    if cuda_reason is None and r > CUDA_MAX_RANK:
        cuda_reason = f"the CUDA kernels take ranks up to {CUDA_MAX_RANK}, got r = {r}"
    n_rows = h.numel() // d

    def measured():
        if index is None:
            return measured_backend("lowrank_edit", h, n_rows, d, r)
        if not isinstance(index, torch.Tensor):  # check_index below names the problem
            return None
        return measured_backend("lowrank_edit_index", h, index.numel(), d, r)

    be = resolve_backend(backend, h.device, triton_unsupported=reason, cuda_unsupported=cuda_reason,
                         measured=measured)
    check_backend_dtype(be, h)
    if transform is not None:
        _check_transformed(op, transform, h, (B, A, a, C, c), index, inplace)
    if index is not None:
        index = check_index(index, n_rows, h)
    if inplace:
        if not target_checked:
            _check_inplace(h, B, A, a, C, c, index)
        if index is None:
            index = torch.arange(n_rows, device=h.device)
    if be == "triton":
        A, a, B, C, c = (t.contiguous() if t is not None else None for t in (A, a, B, C, c))
    elif be == "cuda":
        A, a, B, C, c = _cuda.kernel_params(h.dtype, A, a, B, (None if tied else C), c)
    return _spec(be, code, tied), A, a, B, (None if tied else C), c, index, transform is not None


def _check_inplace(h, B, A, a, C, c, index):
    check_inplace_target(h, {"B": B, "A": A, "a": a, "C": C, "c": c, "index": index})


def _check_transformed(op, transform, h, params, index, inplace):
    """What the PyTorch path cannot do under a transform: batch or differentiate over ``index``,
    or edit in place under a ``torch.func`` transform (its wrapper tensors have no storage to
    check for aliasing; forward-mode AD's dual tensors do and are edited in place)."""
    if wrapped(index):
        raise ValueError(
            f"reft_kernels.{op}: index must be a plain tensor under {transform} (one index for every "
            "batch element): pass it from outside the transformed function, or with in_dims=None"
        )
    if inplace and any(wrapped(t) for t in (h, *params)):
        raise RuntimeError(
            f"reft_kernels.{op} cannot edit h in place under {transform}: use the out-of-place "
            "reft_kernels.lowrank_edit with the same index, which returns the same values"
        )


def lowrank_edit(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None, backend=None):
    """Low-rank edit ``y = h + (act(h A^T + a) - h C^T - c) B``, out of place.

    Args:
        h: (..., d) activations, float16 / bfloat16 / float32 (float64 with backend="torch").
        B: (r, d), required. A, C: (r, d) or None. a, c: (r,) or None. Any r >= 1 and any d;
            parameters may be in a different floating dtype than ``h``. Pass the same tensor as
            ``C`` and ``B`` (LoReFT, NoReFT, ConsReFT) to have it read once.
        act: None (identity) or an activation name (``reft_kernels.ACTIVATION_NAMES``).
        index: optional 1-D int64 tensor of row numbers into ``h.reshape(-1, d)``; only those rows
            are edited, -1 entries are skipped, a row may be listed once (duplicates raise
            ValueError). The result equals ``h.clone()`` followed by ``lowrank_edit_`` on it.
            Checked once per index tensor (see ``reft_kernels._validate.check_index``).
        backend: None (default dispatch), "triton", "cuda" or "torch" (see ``reft_kernels._backend``).

    Returns ``y`` with ``h``'s shape and dtype; gradients flow to ``h`` and every parameter, each
    in its own dtype. Runs outside autocast (``y`` in ``h``'s dtype inside ``torch.autocast``
    too); one backward (no double backward).

    Under ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) and forward-mode
    AD only ``backend="torch"`` runs, from plain PyTorch ops with the same numerics (the default
    dispatch picks it; ``"triton"``/``"cuda"`` raise RuntimeError before launching anything);
    ``index`` must then be a plain tensor, shared by every batch element.
    """
    if index is None and A is None and C is None and act is None and isinstance(h, torch.Tensor):
        # a latent that is one row (LoBiReFT): straight to the extension where it takes the call
        op = _quick("const_rows", h, backend, (a, B, c))
        if op is not None:
            try:
                return op(h, a, B, c, IDENTITY)
            except (RuntimeError, TypeError):  # refused: _prepare names the problem
                pass
    spec, A, a, B, C, c, index, transformed = _prepare(h, B, A, a, C, c, act, index, backend, inplace=False)
    if transformed:
        return lowrank_torch.fwd_differentiable(h, A, a, B, C, c, spec, index)
    if index is not None:  # the in-place edit of a contiguous copy
        if spec.backend == "torch" and plain_call() and cpu_ext.lowrank_rows_applies(h, index, A, a, B, C, c,
                                                                                    any_layout=True):
            # lowrank_edit_ on h.clone(), literally, so that the two agree bit for bit (as
            # documented) whichever path the clone's layout takes
            x = h.clone()
            out = cpu_ext.lowrank_rows_(x, index, A, a, B, C, c, spec) if x.is_contiguous() else None
            return lowrank_function.run(x, A, a, B, C, c, spec, index) if out is None else out
        return lowrank_function.run_copy(h, A, a, B, C, c, spec, index)
    if A is None and C is None and not spec.tied and spec.backend == "torch" and plain_call() \
            and cpu_ext.const_rows_applies(h, a, B, c):  # a latent that is one row (LoBiReFT)
        out = cpu_ext.const_rows(h, a, B, c, spec)  # None: the extension is not built
        if out is not None:
            return out
    elif spec.backend == "torch" and plain_call() and cpu_ext.lowrank_all_applies(h, A, a, B, C, c):
        out = cpu_ext.lowrank_all(h, A, a, B, C, c, spec)  # None: the extension is not built
        if out is not None:
            return out
    return lowrank_function.run(h, A, a, B, C, c, spec, index)


def lowrank_edit_(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None, backend=None):
    """In-place ``lowrank_edit``: edits the rows of ``h`` listed by ``index`` (all rows when None)
    and returns ``h``. Forward time and memory scale with ``len(index)``: it reads and writes only
    the listed rows and saves a copy of them (n, d) plus the (n, r) latent for the backward. The
    backward's gradient for ``h`` is the incoming gradient with the listed rows updated, one
    (N, d) copy.

    Raises RuntimeError, before writing anything, where PyTorch's in-place ops would refuse too:
    ``h`` a leaf that requires grad or a view of one (with grad mode on), an inference tensor
    outside inference mode, an ``h`` whose elements may share memory (expanded or overlapping
    views), or an ``h`` that shares memory with a parameter or the index. Under a ``torch.func``
    transform it raises RuntimeError (use ``lowrank_edit``); under forward-mode AD, with
    ``backend="torch"``, it writes the out-of-place result into ``h``.
    """
    return _edit_in_place(h, B, A, a, C, c, act, index, backend, False)


def _edit_in_place(h, B, A, a, C, c, act, index, backend, target_checked):
    spec, A, a, B, C, c, index, transformed = _prepare(h, B, A, a, C, c, act, index, backend, inplace=True,
                                                       target_checked=target_checked)
    if transformed:  # forward-mode AD: the edit of a copy, written back (tangent and graph follow)
        return h.copy_(lowrank_torch.fwd_differentiable(h.clone(), A, a, B, C, c, spec, index))
    if spec.backend == "torch" and plain_call() and cpu_ext.lowrank_rows_applies(h, index, A, a, B, C, c):
        out = cpu_ext.lowrank_rows_(h, index, A, a, B, C, c, spec)  # None: the extension is not built
        if out is not None:
            return out
    return lowrank_function.run(h, A, a, B, C, c, spec, index)


def _lowrank_edit_fresh_(h, B, A, a, C, c, act, index, backend):
    """``lowrank_edit_(h, B, A, a, C, c, act=act, index=index, backend=backend)`` for an ``h``
    that a model's hook took fresh from its layer: the call ``reft_kernels.hf`` makes once per
    layer and step. The caller guarantees what ``lowrank_edit_``'s in-place target checks
    (``_check_inplace``) establish: ``h`` is not a view and not a leaf that requires grad
    (``hf.attach._edit_rows`` tests both), so it owns its memory, which no parameter and no index
    shares. Those checks are skipped; every other check and the dispatch are ``lowrank_edit_``'s.

    Why: inside a training step each call runs between the model's large matrix products, where
    Python costs several times what a warm loop shows. Measured in the d = 256 LLaMA step of
    ``bench --e2e`` at f7+l7 on the 2-core CPU (6 layers; both entries in one process,
    alternating steps, 30 rounds), a ReFT hook's call took 577 us per layer through the module's
    ``__call__`` and ``lowrank_edit_``, 525 us through this entry
    (``modules._LowRankEdit._edit_fresh_rows_``); the op's own forward, 292 us of each."""
    return _edit_in_place(h, B, A, a, C, c, act, index, backend, True)
