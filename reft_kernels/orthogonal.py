"""Orthonormal-row matrices for LoReFT, DiReFT, ConsReFT and LoBiReFT, at O(r * d) memory.

``orthonormal_rows(X)`` maps any full-rank (r, d) matrix X (r <= d) to the (r, d) matrix R with
orthonormal rows spanning the same row space: the Q factor of the reduced QR decomposition of
X^T, with column signs chosen so that the triangular factor has a positive diagonal. That choice
makes the map unique and smooth, and the identity on matrices whose rows are already orthonormal,
so loading a trained R is a plain copy. Autograd differentiates through ``torch.linalg.qr``.

Cost: one (d, r) QR, O(d r^2) flops, and no buffer beyond X itself. pyreft instead keeps
``torch.nn.utils.parametrizations.orthogonal`` on a (d, r) weight, which stores a (d, d) base
(64 MiB in fp32 at d = 4096) and builds R from it on every access (twice per LoReFT forward).
``bench/bench_orthogonal.py`` times both.

The QR runs in fp32 (float64 stays float64) whatever X's dtype, since LAPACK/cuSOLVER have no
half-precision QR; R comes back in that dtype and the kernels accept it beside bf16 activations.
"""
from __future__ import annotations

import torch


def orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """(..., r, d) -> (..., r, d) with ``R @ R.mT == I_r`` for each matrix; see the module
    docstring. A batch of L matrices is one batched QR (and one batched backward): what a model
    with LoReFT on L layers runs once per step instead of L times."""
    if X.dim() < 2 or X.shape[-2] > X.shape[-1]:
        raise ValueError(f"orthonormal_rows needs (r, d) matrices with r <= d, got {tuple(X.shape)}")
    work = X if X.dtype in (torch.float32, torch.float64) else X.float()
    q, tri = torch.linalg.qr(work.mT, mode="reduced")
    sign = torch.sign(torch.diagonal(tri, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).mT


def random_orthonormal_rows(r: int, d: int, *, dtype=None, device=None, generator=None) -> torch.Tensor:
    """A random (r, d) matrix with orthonormal rows (Haar-distributed row space)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(r, d, dtype=work, device=device, generator=generator)
    return orthonormal_rows(g).to(dtype or torch.float32)
