"""One R for all layers per step: the orthonormal-row interventions of a model (LoReFT, DiReFT,
ConsReFT, LoBiReFT) build their R's in one batched ``orthonormal_rows`` per forward, shared by
the layers' hooks, instead of one QR (and one QR backward) per layer.

At each patched forward the rotations of the active adapter's interventions (every adapter's, in
a mixed-adapter batch) are grouped by
(rank, d, dtype, device), each group of two or more stacked and orthonormalised in one batched
call, and each intervention is handed its row (``_Orthonormal.share_R``). Its gradient reaches
every rotation through the one batched backward. An intervention takes the shared R only inside
the patched forward and in the grad mode it was built in; a layer run under a reentrant
activation checkpoint (whose forward runs without grad) therefore builds its own R, in the
forward and again in the recompute, while a non-reentrant checkpoint's recompute takes the R its
forward took. Not shared: inside ``torch.compile`` (each layer's QR is traced as before), and for
sharded (FSDP2) rotations, which are whole only while their own layer runs.

Cost, counted with ``reft_kernels.benchmark.launches`` on a tiny LLaMA (LoReFT at f7+l7, one
training step): the QR's forward and backward leave the per-layer count and become a per-step
cost of about the same size, paid once.
"""
from __future__ import annotations

import weakref

import torch

from ..modules import _Orthonormal
from ..orthogonal import orthonormal_rows
from .sharding import is_sharded


def share_rotations(handle) -> None:
    """Build and hand out this forward's shared R's."""
    if torch.compiler.is_compiling():
        return
    groups = {}
    sets = list(handle.interventions)
    if handle._mixed is not None:  # a mixed-adapter batch reads every adapter's R (mixed_batch.py)
        sets += [ivs for ad in handle._mixed.adapters if ad is not handle._active for ivs in ad.groups]
    for ivs in sets:
        for iv in ivs.values():
            if isinstance(iv, _Orthonormal) and not is_sharded(iv.rotation):
                rot = iv.rotation
                groups.setdefault((tuple(rot.shape), rot.dtype, rot.device), []).append(iv)
    grad_mode = torch.is_grad_enabled()
    owner = weakref.ref(handle)  # the shares are held by the modules' weak table: no cycle to them

    def usable():
        h = owner()
        return h is not None and h._in_forward and torch.is_grad_enabled() == grad_mode

    for ivs in groups.values():
        if len(ivs) < 2:
            continue
        # unbind, not R[i]: its backward stacks the layers' gradients once, where each R[i]'s
        # would write a zero (L, r, d) tensor per layer
        for iv, R in zip(ivs, orthonormal_rows(torch.stack([iv.rotation for iv in ivs])).unbind(0)):
            iv.share_R(R, usable)
