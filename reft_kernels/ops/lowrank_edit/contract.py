"""The contract that every backend of the low-rank edit follows (``triton_impl``, ``torch_impl``,
``cuda_impl``), so that ``LowrankEditFunction`` saves and passes the same things whatever the
backend:

    y = h + (act(h A^T + a) - h C^T - c) B        A, B, C: (r, d); a, c: (r,)

``fwd(h, index, A, a, B, C, c, spec, save_u) -> (y, z, u, hsave)``
    Parameters arrive checked, in any floating dtype (the CUDA backend's are one dtype, ``h``'s
    or float32), ``C`` None when ``spec.tied`` (``C is B``).
    - ``index`` None: out of place over all N rows of ``h.reshape(-1, d)``; ``y`` is a new (N, d)
      row matrix in ``h``'s dtype; ``hsave`` is None.
    - ``index`` (n,) int64, entries in [-1, N), the non-negative ones distinct: the listed rows
      of ``h`` are edited in place (``h`` itself, whatever its strides) and ``y`` is ``h``.
      ``hsave`` (n, d) in ``h``'s dtype holds the original row ``index[i]`` at row i; its rows
      at -1 entries are unspecified.
    - ``z`` (n, r), n = N without an index: the latent ``act(h A^T + a) - h C^T - c`` in the
      accumulation dtype (float32; float64 for float64 ``h``), zero at -1 entries. ``u`` (n, r),
      the pre-activation ``h A^T + a``, same dtype, when ``save_u`` (any non-identity ``act``),
      else None; unspecified at -1 entries.
    One row per index entry, padding included: no step depends on how many entries are real
    (no host synchronisation, no data-dependent shape).

``bwd(g, x, index, A, B, C, z, u, spec, need) -> (dh, (dA, da, dB, dC, dc))``
    ``g`` shaped like ``h``; ``x``: ``h`` (no index) or ``hsave``; ``z``, ``u`` from ``fwd``;
    ``need``: flags for (dh, dA, da, dB, dC, dc). Rows at -1 entries contribute nothing (every
    backend masks them, since ``hsave`` and ``u`` are unspecified there).
    - ``dh`` shaped like ``g`` (None when not needed): ``g + ga A - gz C`` (``gz = g B^T``,
      ``ga = gz * act'(u)``); with an index, a new tensor equal to ``g`` outside the listed rows.
    - parameter gradients in a floating dtype of the backend's choosing (the Function casts each
      to its parameter's dtype), None when not needed, ``dC`` None when ``C`` is None (tied: ``dB``
      carries both of ``B``'s terms, ``z^T g - gz^T h``).
    Parameter gradients are reduced over rows in a fixed order (no atomics).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """Non-tensor settings of one call: backend, activation code, ``C is B``."""
    backend: str
    act: int
    tied: bool


@dataclass(frozen=True)
class FwdParams:
    """One forward launch's tensors and addressing, as the Triton launchers take them (the fields
    of ``csrc/reft_params.h``'s ``LowrankFwdParams``): rows ``src`` (read) and ``dst`` (written;
    ``dst is src`` in place), ``hsave`` the (n, d) copy of the edited rows or None, ``idx`` the
    (n,) index (any tensor when ``indexed`` is False), ``n`` rows of width ``d`` and rank ``r``,
    row and column strides of ``src`` (``s_h``, ``s_hc``) and ``dst`` (``s_y``, ``s_yc``), the
    parameters (``C`` None when tied), ``spec``, and the fp32 (n, r) outputs ``z`` and ``u``
    (None unless saved)."""
    src: object
    dst: object
    hsave: object
    idx: object
    indexed: bool
    n: int
    d: int
    r: int
    strides: tuple  # (s_h, s_hc, s_y, s_yc)
    params: tuple   # (A, a, B, C, c)
    spec: Spec
    z: object
    u: object
