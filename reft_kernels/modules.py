"""``nn.Module``s holding the parameters of RED and the ReFT family.

Every ReFT module has ``forward(h, index=None, *, inplace=False)``: ``h`` is (..., d), ``index``
an optional 1-D int64 tensor of rows of ``h.reshape(-1, d)`` to edit (-1 = padding), and
``inplace=True`` edits those rows of ``h`` itself (see ``lowrank_edit_``). ``backend`` (constructor
argument or attribute) is passed to the ops.

Orthonormal-row modules (LoReFT, DiReFT, ConsReFT, LoBiReFT) store an unconstrained (r, d)
parameter ``rotation`` and build ``R = orthonormal_rows(rotation)`` once per forward (property
``R``), so memory stays O(r * d). Initialisation follows pyreft: R random orthonormal, ``W``/``b``
as ``nn.Linear``'s default, ConsReFT/LoBiReFT's ``b`` uniform in [0, 1). Which attribute is which
term of ``lowrank_edit`` is read from ``methods.METHODS`` (each class's ``method``).
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from ._rows import as_2d_plus, put_rows, row_selector
from ._validate import check_hidden, check_index
from .functional import _lowrank_edit_fresh_, lowrank_edit, lowrank_edit_, red
from .methods import METHODS
from .orthogonal import orthonormal_rows, random_orthonormal_rows


def _check_dims(d, rank=None):
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int, got {rank!r}")


def _linear_init(r, d, dtype, device):
    """(weight (r, d), bias (r,)) initialised like ``nn.Linear(d, r)``."""
    bound = 1.0 / math.sqrt(d)
    w = torch.empty(r, d, dtype=dtype, device=device).uniform_(-bound, bound)
    b = torch.empty(r, dtype=dtype, device=device).uniform_(-bound, bound)
    return nn.Parameter(w), nn.Parameter(b)


def _has_module_hooks(module) -> bool:
    """Whether calling ``module`` runs a hook: one of its own (FSDP2's ``fully_shard`` registers
    some) or a global one (``torch.nn.modules.module.register_module_forward_hook`` and its kin).
    Where none would run, ``_LowRankEdit._edit_fresh_rows_`` calls the op without
    ``nn.Module.__call__``."""
    m = _nn_module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


class RED(nn.Module):
    """RED: ``y = h * scale + bias`` with ``scale``, ``bias`` of shape (d,); identity at init.

    ``forward(h, index=None)``: RED's paper edits every row; with ``index`` (rows of
    ``h.reshape(-1, d)``, -1 = padding) only those rows are edited and the rest copied, through a
    gather, the fused ``red`` on the gathered rows, and ``put_rows`` (exact gradients for any
    index, padding included).
    """

    def __init__(self, d: int, *, dtype=None, device=None, backend=None):
        super().__init__()
        _check_dims(d)
        self.d = d
        self.backend = backend
        self.scale = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def forward(self, h, index=None):
        if index is None:
            return red(h, self.scale, self.bias, backend=self.backend)
        d = check_hidden(h)
        index = check_index(index, h.numel() // d, h)
        if h.numel() == 0:
            return h.clone()
        # one row per entry, padding included (padding entries read row 0 and are dropped by the
        # put, gradient included): no host sync, no data-dependent shape
        sel, _ = row_selector(h, index)
        edited = red(as_2d_plus(h)[sel], self.scale, self.bias, backend=self.backend)
        return put_rows(h, index, edited)

    def extra_repr(self):
        return f"d={self.d}"


_PICKERS: dict = {}  # method name -> its Method.term_picker()


class _LowRankEdit(nn.Module):
    """Base class: subclasses set ``method`` (a ``methods.Method``), whose ``attrs`` name the
    attributes holding its parameters; ``edit_terms()`` -> (B, A, a, C, c) for ``lowrank_edit``."""

    method = None  # set by each subclass

    def __init__(self, d, rank, act, backend):
        super().__init__()
        _check_dims(d, rank)
        if rank > d:
            raise ValueError(f"rank must be <= d, got rank={rank}, d={d}")
        self.d, self.rank, self.act, self.backend = d, rank, act, backend

    def edit_terms(self):
        """(B, A, a, C, c) for ``lowrank_edit``: each attribute of ``method.attrs`` read once (R:
        one QR, the same tensor as B and C when tied)."""
        pick = _PICKERS.get(self.method.name)
        if pick is None:
            pick = _PICKERS[self.method.name] = self.method.term_picker()
        # (a list, not a generator, and the table read once: 2.7 us less per forward on the
        # 2-core CPU, beside the 33 us of R's QR)
        return pick(tuple([getattr(self, attr) for attr in self.method.attrs]) + (None,))

    def forward(self, h, index=None, *, inplace=False):
        B, A, a, C, c = self.edit_terms()
        op = lowrank_edit_ if inplace else lowrank_edit
        return op(h, B, A, a, C, c, act=self.act, index=index, backend=self.backend)

    def _edit_fresh_rows_(self, h, index):
        """``self(h, index, inplace=True)`` for a model's hook (``hf.attach._edit_rows``), under
        ``functional._lowrank_edit_fresh_``'s preconditions (``h`` fresh from its layer, not a
        view, not a leaf that requires grad; ``index`` checked with the batch's rows). Skips
        ``nn.Module.__call__`` unless some hook (this module's, or a global one) must run."""
        if _has_module_hooks(self):
            return self(h, index, inplace=True)
        B, A, a, C, c = self.edit_terms()
        return _lowrank_edit_fresh_(h, B, A, a, C, c, self.act, index, self.backend)

    def extra_repr(self):
        act = f", act={self.act!r}" if self.act is not None else ""
        return f"d={self.d}, rank={self.rank}{act}"


# share_R's state, by module: {module: (R, rotation version, usable)} and {module: whether the
# last forward took the shared R}; weak, so a dropped module drops its entry
_SHARED_R = weakref.WeakKeyDictionary()
_R_WAS_SHARED = weakref.WeakKeyDictionary()


class _Orthonormal(_LowRankEdit):
    """Holds ``rotation`` (r, d) and exposes ``R``, its orthonormal-row form: float64 in a float64
    module, float32 otherwise (pyreft keeps R in fp32 beside bf16 weights; QR has no half-precision
    kernels)."""

    def __init__(self, d, rank, act, backend, device, dtype):
        super().__init__(d, rank, act, backend)
        r_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.rotation = nn.Parameter(random_orthonormal_rows(rank, d, dtype=r_dtype, device=device))

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` / ``.half()`` (e.g. a whole model cast to bf16) moves
        # ``rotation`` (and its grad) to the new device but keeps it in fp32: R is built by a QR
        # with no half-precision kernels, and a bf16 round trip would lose its orthonormality
        # (pyreft keeps R in fp32 for the same reason). Casts to fp32/fp64 apply as usual.
        rot = self.rotation

        def keep_fp32(t):
            if t is rot or (rot.grad is not None and t is rot.grad):
                probe = fn(t.detach()[:0])
                if probe.dtype in (torch.float16, torch.bfloat16):
                    return t.to(device=probe.device, dtype=torch.float32)
            return fn(t)

        return super()._apply(keep_fp32, recurse)

    @property
    def R(self) -> torch.Tensor:
        """(rank, d) with orthonormal rows: one QR on every access, unless a model-level owner
        has shared this step's R (``share_R``)."""
        shared = None if torch.compiler.is_compiling() else _SHARED_R.get(self)
        if shared is not None:
            R, version, usable = shared
            if version == self.rotation._version:  # no in-place update (optimizer step) since
                if torch._C._current_graph_task_id() != -1:
                    # inside a backward: an activation checkpoint recomputing this layer takes the
                    # R its forward took, so that the recomputed ops are the forward's
                    use = _R_WAS_SHARED.get(self, False)
                else:
                    use = usable()
                    _R_WAS_SHARED[self] = use
                if use:
                    return R
        return orthonormal_rows(self.rotation)

    def share_R(self, R: torch.Tensor | None, usable=None) -> None:
        """Use ``R`` (rank, d), computed by the caller from ``self.rotation`` (e.g. one row of a
        batched ``orthonormal_rows`` over every layer's rotation), as ``self.R`` while
        ``usable()`` is true and ``rotation`` is not written in place; None stops it. Held
        outside the module (a weak dictionary), so ``copy.deepcopy`` and ``state_dict`` never
        see it."""
        if R is None:
            _SHARED_R.pop(self, None)
            _R_WAS_SHARED.pop(self, None)
        else:
            _SHARED_R[self] = (R, self.rotation._version, usable)

    @torch.no_grad()
    def load_R_(self, R: torch.Tensor):
        """Set R to a matrix with orthonormal rows (e.g. pyreft's ``rotate_layer.weight.T``)."""
        if tuple(R.shape) != (self.rank, self.d):
            raise ValueError(f"R must have shape {(self.rank, self.d)}, got {tuple(R.shape)}")
        self.rotation.copy_(R)
        return self


class LoReFT(_Orthonormal):
    """LoReFT: ``h + (act(h W^T + b) - h R^T) R`` (pyreft ``LoreftIntervention``)."""

    method = METHODS["loreft"]

    def __init__(self, d, rank, *, act=None, dtype=None, device=None, backend=None):
        super().__init__(d, rank, act, backend, device, dtype)
        self.weight, self.bias = _linear_init(rank, d, dtype, device)


class DiReFT(_Orthonormal):
    """DiReFT: ``h + act(h W^T + b) R`` (pyreft ``DireftIntervention``)."""

    method = METHODS["direft"]

    def __init__(self, d, rank, *, act=None, dtype=None, device=None, backend=None):
        super().__init__(d, rank, act, backend, device, dtype)
        self.weight, self.bias = _linear_init(rank, d, dtype, device)


class ConsReFT(_Orthonormal):
    """ConsReFT: ``h + (b - h R^T) R`` (pyreft ``ConsreftIntervention``)."""

    method = METHODS["consreft"]

    def __init__(self, d, rank, *, dtype=None, device=None, backend=None):
        super().__init__(d, rank, None, backend, device, dtype)
        self.bias = nn.Parameter(torch.rand(rank, dtype=dtype, device=device))


class LoBiReFT(_Orthonormal):
    """LoBiReFT: ``h + b R`` (pyreft ``LobireftIntervention``)."""

    method = METHODS["lobireft"]

    def __init__(self, d, rank, *, dtype=None, device=None, backend=None):
        super().__init__(d, rank, None, backend, device, dtype)
        self.bias = nn.Parameter(torch.rand(rank, dtype=dtype, device=device))


class NoReFT(_LowRankEdit):
    """NoReFT: ``h + (act(h W1^T + b1) - (h W2^T + b2)) W2`` (pyreft ``NoreftIntervention``);
    ``add_bias=False`` drops ``b2``."""

    method = METHODS["noreft"]

    def __init__(self, d, rank, *, act=None, add_bias=True, dtype=None, device=None, backend=None):
        super().__init__(d, rank, act, backend)
        self.weight, self.bias = _linear_init(rank, d, dtype, device)
        self.proj_weight, proj_bias = _linear_init(rank, d, dtype, device)
        self.proj_bias = proj_bias if add_bias else None


class NodiReFT(_LowRankEdit):
    """NodiReFT: ``h + act(h W1^T + b) W2`` (pyreft ``NodireftIntervention``)."""

    method = METHODS["nodireft"]

    def __init__(self, d, rank, *, act=None, dtype=None, device=None, backend=None):
        super().__init__(d, rank, act, backend)
        self.weight, self.bias = _linear_init(rank, d, dtype, device)
        self.proj_weight, _ = _linear_init(rank, d, dtype, device)
