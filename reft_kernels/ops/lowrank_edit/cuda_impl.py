"""The low-rank edit's CUDA C++ backend (``backend="cuda"``, opt-in; ranks up to 64): the kernels of
``csrc/lowrank_edit_fwd.cu`` and ``csrc/lowrank_edit_bwd.cu`` (fp32 FMA products, not TF32; the
same deterministic partial sums), reached through the torch.library ops
``reft_kernels::lowrank_edit_fwd``, ``reft_kernels::lowrank_edit_fwd_`` (in place) and
``reft_kernels::lowrank_edit_bwd``, following the contract of ``contract.py``.

The ops run ``reft_kernels._C`` on CUDA tensors and the PyTorch path (``torch_impl``) on other
devices, so their registration, schemas and fake implementations are testable anywhere; the
PyTorch path keeps the same saved layout, so the fallback converts nothing. Latents (n, r) and
parameter gradients are in the accumulation dtype (float32; float64 for float64 h); an output
that was not asked for is an empty tensor.

Kernel variants, chosen with ``reft_kernels.kernels(...)`` (``ops/variants.py``) and read when the
CUDA kernels below are called (with torch.compile, at run time: the ops are opaque to the trace),
then passed to the extension with the call; nothing here or in ``csrc/`` reads the environment.
None on an axis (outside every ``kernels`` block) is the rule, the first variant:

- ``cuda_lowrank_bwd``: ``"split"`` (the rule): ``csrc/lowrank_edit_bwd.cu``, a kernel for gz and
  dh and a kernel for the parameter-gradient partials; g is read from HBM twice (about 8 bytes
  per element in bf16). ``"cluster"``: ``csrc/lowrank_edit_bwd_cluster.cu``, one pass with
  thread-block clusters (sm_90 and newer): the CTAs of a cluster split d, sum the latent gradient
  through distributed shared memory in a fixed order and keep the parameter-gradient partials in
  registers across the row blocks of a persistent grid (g, h read once and dh written once: about
  6 bytes per element in bf16, plus (clusters, r, d) fp32 partials). It takes r <= 16 and
  d <= 4096, an sm_90 GPU and a build with sm_90 code; asked for where it cannot run, it raises
  ValueError naming ``"split"`` (``bwd_plan``, which also says which runs). Deterministic for a given GPU (the cluster count follows the SM
  count); its sums run in another order than the split kernels', so the two differ in the last
  bits.
- ``cuda_params`` (split backward): ``"scalar"`` (the rule; one column per thread) or
  ``"vector"`` (16-byte loads, several rows' loads in flight).
- ``cuda_finish``: ``"serial"`` (the rule; one thread per column) or ``"split"`` (several threads
  per column and a fixed tree) for the fixed-order sums of the partials (RED's too;
  ``_cuda.finish_kernel``).

The variants that are not the rule stay opt-in until a GPU run has measured them; the
benchmark's ``cuda-cluster`` and ``cuda-vector`` providers do. An unknown axis or variant raises
ValueError from ``kernels(...)`` itself.

Parameter gradients: every one, the biases da and dc included, is finished inside the extension
from fp32 partials per row block (fixed row ranges) by its fixed-order sum kernel: no torch
reduction, no atomics.

The extension's low-rank entry points take records that mirror ``csrc/reft_params.h`` (see
``csrc/bindings.cpp``): ``weights`` [A, a, B, P, c] (forward) or [A, B, P] (backward), P being C
or B itself when tied; ``rows`` [n, d, row stride in, column stride in, row stride out, column
stride out]; ``flags`` [act, save_h, save_u] (forward) or [act, tied, need_dA, need_da, need_dB,
need_dC, need_dc, params_vector, finish_split] (backward); ``_fwd_record``/``_bwd_record`` build
them.
"""
from __future__ import annotations

import torch

from ... import _cuda
from ..._constants import IDENTITY
from ..._rows import acc_dtype, as_rows, rows_addressing
from .. import variants
from . import torch_impl
from .contract import Spec

_FWD_SCHEMA = "int act, bool tied, bool save_u) -> (Tensor, Tensor, Tensor)"
_PARAMS_SCHEMA = "Tensor? A, Tensor? a, Tensor B, Tensor? C, Tensor? c, "


def _latents_fake(n, r, like, save_u):
    acc = acc_dtype(like.dtype)
    return like.new_empty((n, r), dtype=acc), like.new_empty((n, r) if save_u else (0,), dtype=acc)


# ----------------------------------------------------------------------------- out of place

@torch.library.custom_op("reft_kernels::lowrank_edit_fwd", mutates_args=(),
                         schema="(Tensor h2, " + _PARAMS_SCHEMA + _FWD_SCHEMA)
def lowrank_edit_fwd_op(h2, A, a, B, C, c, act, tied, save_u):
    """Out of place on the rows of ``h2`` (n, d): returns (y, z, u)."""
    acc = acc_dtype(h2.dtype)
    y, z, u, _ = torch_impl.fwd(h2, None, A, a, B, C, c, Spec("torch", act, tied), save_u)
    return y, z.to(acc, copy=True), (u.to(acc, copy=True) if save_u else _cuda.empty(h2, acc))


def _fwd_record(A, a, B, C, c, tied, rows, act, save_h, save_u) -> dict:
    """The forward entry point's records (``csrc/bindings.cpp``): weights [A, a, B, P, c], rows
    [n, d, h row stride, h column stride, y row stride, y column stride], flags [act, save_h,
    save_u]."""
    return dict(weights=[A, a, B, (B if tied else C), c], rows=[int(v) for v in rows],
                flags=[int(act), int(save_h), int(save_u)])


@lowrank_edit_fwd_op.register_kernel("cuda")
def lowrank_edit_fwd_kernel(h2, A, a, B, C, c, act, tied, save_u):
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    record = _fwd_record(A, a, B, C, c, tied, (n, d, h2.stride(0), h2.stride(1), d, 1), act, save_h=False,
                         save_u=save_u)
    z, u, _ = _cuda.extension().lowrank_edit_fwd(h2, y, None, **record)
    return y, z, u


@lowrank_edit_fwd_op.register_fake
def _lowrank_edit_fwd_fake(h2, A, a, B, C, c, act, tied, save_u):
    return (h2.new_empty(h2.shape), *_latents_fake(h2.shape[0], B.shape[0], h2, save_u))


# ----------------------------------------------------------------------------- in place, indexed

@torch.library.custom_op("reft_kernels::lowrank_edit_fwd_", mutates_args=("h",),
                         schema="(Tensor(a!) h, Tensor index, " + _PARAMS_SCHEMA + _FWD_SCHEMA)
def lowrank_edit_fwd_inplace_op(h, index, A, a, B, C, c, act, tied, save_u):
    """Edits rows ``index`` of ``h.reshape(-1, d)`` in place: returns (z, u, hsave)."""
    acc = acc_dtype(h.dtype)
    _, z, u, hsave = torch_impl.fwd(h, index, A, a, B, C, c, Spec("torch", act, tied), save_u)
    return z.to(acc, copy=True), (u.to(acc, copy=True) if save_u else _cuda.empty(h, acc)), hsave


@lowrank_edit_fwd_inplace_op.register_kernel("cuda")
def lowrank_edit_fwd_inplace_kernel(h, index, A, a, B, C, c, act, tied, save_u):
    d = h.shape[-1]
    idx, s_row, s_col = rows_addressing(h, index)
    record = _fwd_record(A, a, B, C, c, tied, (index.shape[0], d, s_row, s_col, s_row, s_col), act, save_h=True,
                         save_u=save_u)
    z, u, hsave = _cuda.extension().lowrank_edit_fwd(h, h, idx, **record)
    return z, u, hsave


@lowrank_edit_fwd_inplace_op.register_fake
def _lowrank_edit_fwd_inplace_fake(h, index, A, a, B, C, c, act, tied, save_u):
    n = index.shape[0]
    return (*_latents_fake(n, B.shape[0], h, save_u), h.new_empty((n, h.shape[-1])))


# ----------------------------------------------------------------------------- backward

def bwd_kernel() -> str:
    """The low-rank backward requested by ``reft_kernels.kernels(cuda_lowrank_bwd=...)``:
    ``"split"`` (the rule, also outside every ``kernels`` block) or ``"cluster"``. What a call
    runs is ``bwd_plan``'s answer."""
    return variants.active().choice("cuda_lowrank_bwd")


def params_kernel() -> str:
    """The split backward's parameter-gradient kernel requested by
    ``reft_kernels.kernels(cuda_params=...)``: ``"scalar"`` (the rule) or ``"vector"``."""
    return variants.active().choice("cuda_params")


# (extension, device, d, r, cluster size) -> the cluster kernel takes it: the plan asks the device
# for its compute capability and the kernel for its compiled architecture, a few microseconds that
# the small-n regime (a few hundred rows, launch-bound) should not pay on every backward.
_CLUSTER_TAKES: dict = {}


def bwd_plan(like: torch.Tensor, d: int, r: int) -> str:
    """The backward kernel that a call of width ``d`` and rank ``r`` on ``like``'s device runs
    now: ``"cluster"`` where ``bwd_kernel()`` requests it, ``"split"`` otherwise. A requested
    cluster backward that cannot take the call (it needs r <= 16, d <= 4096 and a cluster size
    that fits d, an sm_90 or newer GPU and a build with sm_90 code) raises ValueError naming
    ``"split"``: a variant asked for never quietly turns into another. The CUDA kernel of
    ``reft_kernels::lowrank_edit_bwd`` decides with this function, so it is also how tests and
    tools learn what ran."""
    if bwd_kernel() != "cluster":
        return "split"
    ext = _cuda.extension()
    size = _cuda.cluster_shape()[0]
    key = (id(ext), like.device, d, r, size)
    if key not in _CLUSTER_TAKES:
        _CLUSTER_TAKES[key] = ext.lowrank_edit_bwd_cluster_plan(like, d, r, size)[0] > 0
    if not _CLUSTER_TAKES[key]:
        raise ValueError(
            f"kernels(cuda_lowrank_bwd='cluster') cannot take d={d}, r={r} here: the cluster backward needs "
            f"r <= 16, d <= 4096 (and a cluster size that fits d), a GPU of compute capability 9.0 or newer "
            f"and an extension built with sm_90 code; use cuda_lowrank_bwd='split'")
    return "cluster"


def _bwd_record(A, B, C, z, u, tied, rows, act, need) -> dict:
    """The backward entry points' records (``csrc/bindings.cpp``) for the variants active now:
    weights [A, B, P], rows [n, d, g row stride, g column stride, dh row stride, dh column
    stride], flags [act, tied, need_dA, need_da, need_dB, need_dC, need_dc, params_vector,
    finish_split]; ``need`` = (need_dA, need_da, need_dB, need_dC, need_dc)."""
    choices = (params_kernel() == "vector", _cuda.finish_kernel() == "split")
    return dict(weights=[A, B, (B if tied else C)], z=z, u=(u if act != IDENTITY else None),
                rows=[int(v) for v in rows], flags=[int(v) for v in (act, tied, *need, *choices)])


@torch.library.custom_op(
    "reft_kernels::lowrank_edit_bwd", mutates_args=(),
    schema="(Tensor g, Tensor x, Tensor? index, Tensor? A, Tensor B, Tensor? C, Tensor z, Tensor? u, int act, "
           "bool tied, bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lowrank_edit_bwd_op(g, x, index, A, B, C, z, u, act, tied, need):
    """Backward: (dh shaped like g, dA, da, dB, dC, dc). ``x`` (n, d): the input rows (with an
    index, the forward's hsave); z, u (n, r) from the forward; ``need``: six flags for (dh, dA,
    da, dB, dC, dc)."""
    acc = acc_dtype(x.dtype)
    need = tuple(need)
    need_dh = need[0]
    u = u if u is not None and u.numel() else None
    dh, grads = torch_impl.bwd(g, x, index, A, B, C, z, u, Spec("torch", act, tied), need)
    dh = dh.contiguous().clone() if need_dh else _cuda.empty(g)
    return (dh, *(gr.to(acc, copy=True) if gr is not None else _cuda.empty(g, acc) for gr in grads))


@lowrank_edit_bwd_op.register_kernel("cuda")
def lowrank_edit_bwd_kernel(g, x, index, A, B, C, z, u, act, tied, need):
    need_dh, need_dA, need_da, need_dB, need_dC, need_dc = need
    n, d = x.shape
    g2 = as_rows(g)  # one index serves g and dh: g needs a single row stride (a copy otherwise)
    dh = None
    if need_dh:
        dh = g2.clone(memory_format=torch.contiguous_format) if index is not None else torch.empty_like(
            g2, memory_format=torch.contiguous_format)
    need = (need_dA, need_da, need_dB, need_dC and C is not None, need_dc)
    record = _bwd_record(A, B, C, z, u, tied, (n, d, g2.stride(0), g2.stride(1), d, 1), act, need)
    ext = _cuda.extension()
    if bwd_plan(g2, d, B.shape[0]) == "cluster":
        grads = ext.lowrank_edit_bwd_cluster(g2, dh, index, x, **record, cluster=list(_cuda.cluster_shape()))
    else:
        grads = ext.lowrank_edit_bwd(g2, dh, index, x, **record)
    # (dA, da, dB, dC, dc): fp32, each finished by the extension's fixed-order sum, or empty
    return (dh.view(g.shape) if need_dh else _cuda.empty(g), *grads)


@lowrank_edit_bwd_op.register_fake
def _lowrank_edit_bwd_fake(g, x, index, A, B, C, z, u, act, tied, need):
    need_dh, need_dA, need_da, need_dB, need_dC, need_dc = need
    acc = acc_dtype(x.dtype)
    r, d = B.shape

    def out(need, shape):
        return g.new_empty(shape if need else (0,), dtype=acc)

    return (g.new_empty(g.shape) if need_dh else g.new_empty((0,)), out(need_dA, (r, d)), out(need_da, (r,)),
            out(need_dB, (r, d)), out(need_dC and C is not None, (r, d)), out(need_dc, (r,)))


# ----------------------------------------------------------------------------- contract functions

def fwd(h, index, A, a, B, C, c, spec, save_u):
    """Forward; see ``contract.py``."""
    if index is None:
        y, z, u = _cuda.call_op(lowrank_edit_fwd_op, lowrank_edit_fwd_kernel, as_rows(h), A, a, B, C, c,
                        spec.act, spec.tied, save_u)
        return y, z, (u if save_u else None), None
    z, u, hsave = _cuda.call_op(lowrank_edit_fwd_inplace_op, lowrank_edit_fwd_inplace_kernel, h, index, A, a, B, C, c,
                        spec.act, spec.tied, save_u)
    return h, z, (u if save_u else None), hsave


def bwd(g, x, index, A, B, C, z, u, spec, need):
    """Backward; see ``contract.py``."""
    x2 = as_rows(x) if index is None else x
    dh, *grads = _cuda.call_op(lowrank_edit_bwd_op, lowrank_edit_bwd_kernel, g, x2, index, A, B, C, z, u, spec.act,
                               spec.tied, list(need))
    need_grads = (need[1], need[2], need[3], need[4] and C is not None, need[5])
    return (dh if need[0] else None), tuple(_cuda.if_needed(gr, nd) for gr, nd in zip(grads, need_grads))
