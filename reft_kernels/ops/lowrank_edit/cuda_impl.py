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

Backward kernel, chosen by the environment variable ``REFT_KERNELS_CUDA_LOWRANK_BWD`` (read at
every backward call):

- ``"split"`` (default): ``csrc/lowrank_edit_bwd.cu``, a kernel for gz and dh and a kernel for the
  parameter-gradient partials; g is read from HBM twice (about 8 bytes per element in bf16).
- ``"cluster"``: ``csrc/lowrank_edit_bwd_cluster.cu``, one pass with thread-block clusters (sm_90
  and newer): the CTAs of a cluster split d, sum the latent gradient through distributed shared
  memory in a fixed order and keep the parameter-gradient partials in registers across the row
  blocks of a persistent grid (g, h read once and dh written once: about 6 bytes per element in
  bf16, plus (clusters, r, d) fp32 partials). It takes r <= 16 and d <= 4096; other shapes, GPUs
  below sm_90 and builds without sm_90 code run the split kernels. Deterministic for a given GPU
  (the cluster count follows the SM count); its sums run in another order than the split
  kernels', so the two differ in the last bits. Opt-in until a GPU run has measured both.

Any other value raises ValueError.

Two more switches, read by the extension at every launch (``csrc/launch.h``), choose inside the
split backward: ``REFT_KERNELS_CUDA_PARAMS`` = ``"scalar"`` (default, one column per thread) or
``"vector"`` (16-byte loads, several rows' loads in flight), and ``REFT_KERNELS_CUDA_FINISH`` =
``"serial"`` (default, one thread per column) or ``"split"`` (several threads per column and a
fixed tree) for the fixed-order sums of the partials (RED's too). Both stay opt-in until a GPU
run has measured them; the benchmark's ``cuda-cluster`` and ``cuda-vector`` providers do.
"""
from __future__ import annotations

import os

import torch

from ... import _cuda
from ..._constants import IDENTITY
from ..._rows import acc_dtype, as_rows, rows_addressing
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


@lowrank_edit_fwd_op.register_kernel("cuda")
def lowrank_edit_fwd_kernel(h2, A, a, B, C, c, act, tied, save_u):
    n, d = h2.shape
    y = torch.empty((n, d), dtype=h2.dtype, device=h2.device)
    z, u, _ = _cuda.extension().lowrank_edit_fwd(
        h2, y, None, n, d, h2.stride(0), h2.stride(1), d, 1,
        A, a, B, (B if tied else C), c, act, False, save_u)
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
    z, u, hsave = _cuda.extension().lowrank_edit_fwd(
        h, h, idx, index.shape[0], d, s_row, s_col, s_row, s_col,
        A, a, B, (B if tied else C), c, act, True, save_u)
    return z, u, hsave


@lowrank_edit_fwd_inplace_op.register_fake
def _lowrank_edit_fwd_inplace_fake(h, index, A, a, B, C, c, act, tied, save_u):
    n = index.shape[0]
    return (*_latents_fake(n, B.shape[0], h, save_u), h.new_empty((n, h.shape[-1])))


# ----------------------------------------------------------------------------- backward

LOWRANK_BWD_ENV = "REFT_KERNELS_CUDA_LOWRANK_BWD"
LOWRANK_BWD_KERNELS = ("split", "cluster")

# (cluster size, clusters) for the cluster backward; 0 = chosen by the extension (from d, and from
# the GPU's co-resident clusters). Set by the emulated tests to reach several cluster sizes and
# several clusters with small inputs; not a user setting.
_CLUSTER_SHAPE = (0, 0)


def lowrank_bwd_kernel() -> str:
    """The backward kernel selected by ``REFT_KERNELS_CUDA_LOWRANK_BWD`` ("split" when unset)."""
    value = os.environ.get(LOWRANK_BWD_ENV, "").strip().lower() or LOWRANK_BWD_KERNELS[0]
    if value not in LOWRANK_BWD_KERNELS:
        raise ValueError(f"{LOWRANK_BWD_ENV}={os.environ[LOWRANK_BWD_ENV]!r}: expected one of "
                         f"{', '.join(repr(k) for k in LOWRANK_BWD_KERNELS)}")
    return value


# (extension, device, d, r, cluster size) -> the cluster kernel takes it: the plan asks the device
# for its compute capability and the kernel for its compiled architecture, a few microseconds that
# the small-n regime (a few hundred rows, launch-bound) should not pay on every backward.
_CLUSTER_TAKES: dict = {}


def _use_cluster_bwd(ext, like, d, r) -> bool:
    """The cluster backward is selected and takes this shape on this device and build."""
    if lowrank_bwd_kernel() != "cluster":
        return False
    key = (id(ext), like.device, d, r, _CLUSTER_SHAPE[0])
    if key not in _CLUSTER_TAKES:
        _CLUSTER_TAKES[key] = ext.lowrank_edit_bwd_cluster_plan(like, d, r, _CLUSTER_SHAPE[0])[0] > 0
    return _CLUSTER_TAKES[key]


@torch.library.custom_op(
    "reft_kernels::lowrank_edit_bwd", mutates_args=(),
    schema="(Tensor g, Tensor x, Tensor? index, Tensor? A, Tensor B, Tensor? C, Tensor z, Tensor? u, int act, "
           "bool tied, bool need_dh, bool need_dA, bool need_da, bool need_dB, bool need_dC, bool need_dc) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lowrank_edit_bwd_op(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB, need_dC,
                        need_dc):
    """Backward: (dh shaped like g, dA, da, dB, dC, dc). ``x`` (n, d): the input rows (with an
    index, the forward's hsave); z, u (n, r) from the forward."""
    acc = acc_dtype(x.dtype)
    need = (need_dh, need_dA, need_da, need_dB, need_dC, need_dc)
    u = u if u is not None and u.numel() else None
    dh, grads = torch_impl.bwd(g, x, index, A, B, C, z, u, Spec("torch", act, tied), need)
    dh = dh.contiguous().clone() if need_dh else _cuda.empty(g)
    return (dh, *(gr.to(acc, copy=True) if gr is not None else _cuda.empty(g, acc) for gr in grads))


@lowrank_edit_bwd_op.register_kernel("cuda")
def lowrank_edit_bwd_kernel(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB, need_dC,
                            need_dc):
    n, d = x.shape
    g2 = as_rows(g)  # one index serves g and dh: g needs a single row stride (a copy otherwise)
    dh = None
    if need_dh:
        dh = g2.clone(memory_format=torch.contiguous_format) if index is not None else torch.empty_like(
            g2, memory_format=torch.contiguous_format)
    need_dc_w = need_dC and C is not None
    ext = _cuda.extension()
    args = (g2, dh, index, n, d, g2.stride(0), g2.stride(1), d, 1, x, A, B, (B if tied else C), z,
            (u if act != IDENTITY else None), act, tied, need_dA, need_dB, need_dc_w)
    if _use_cluster_bwd(ext, g2, d, B.shape[0]):
        gz, ga, dA, dB, dC = ext.lowrank_edit_bwd_cluster(*args, *_CLUSTER_SHAPE)
    else:
        gz, ga, dA, dB, dC = ext.lowrank_edit_bwd(*args)
    lat = ga if act != IDENTITY else gz
    empty = _cuda.empty(g, torch.float32)
    return (dh.view(g.shape) if need_dh else _cuda.empty(g), dA, lat.sum(0) if need_da else empty,
            dB, dC if need_dc_w else empty.clone(), gz.sum(0).neg_() if need_dc else empty.clone())


@lowrank_edit_bwd_op.register_fake
def _lowrank_edit_bwd_fake(g, x, index, A, B, C, z, u, act, tied, need_dh, need_dA, need_da, need_dB,
                           need_dC, need_dc):
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
                       spec.tied, *need)
    need_grads = (need[1], need[2], need[3], need[4] and C is not None, need[5])
    return (dh if need[0] else None), tuple(_cuda.if_needed(gr, nd) for gr, nd in zip(grads, need_grads))
