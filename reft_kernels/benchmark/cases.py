"""What the benchmark measures: cases (op, method, dtype, sizes) and, for each provider, the
callable to time.

Ops and their providers:
- ``red``: ``eager`` (``reference.red_reference``), ``compile`` (torch.compile of it), and ours
  on each backend (``torch``, ``triton``, ``cuda``).
- ``lowrank_edit`` in the shape of each ReFT method (``loreft`` tied, ``noreft``, ``direft``,
  ``nodireft``, ``consreft``, ``lobireft``): the same providers, eager being pyreft's formulas
  (``reference.<method>_reference``).
- ``lowrank_edit_index``: the sparse regime as pyreft trains (``f7+l7``: 7 first and 7 last
  positions of each sequence). ``eager`` is what pyvene does: clone the hidden state, gather
  the positions, edit them with the eager formula, scatter them back; ours is the out-of-place
  indexed op (a clone, then the in-place kernel on the listed rows). Method ``f7+l7+R``
  includes R's orthonormalisation: pyreft's ``parametrizations.orthogonal`` against
  ``orthonormal_rows``.
- ``orthonormal_rows``: building R (r, d) with orthonormal rows from its parameter, ``eager``
  being ``torch.nn.utils.parametrizations.orthogonal`` as pyreft uses it, ``torch`` ours.

Each provider is a function ``fn(**tensors) -> y``; ``runner.py`` builds the forward, backward
and forward+backward timings from it, and checks its output and gradients against the float64
eager formula first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import interventions as iv
from .. import reference as ref
from ..functional import red
from ..methods import METHODS as _METHODS
from ..ops.lowrank_edit.plan import cluster_shape_ok
from ..orthogonal import orthonormal_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = tuple(_METHODS)
_LOREFT = _METHODS["loreft"]  # the indexed op's methods (f7+l7, f7+l7+R) are LoReFT
# Opt-in kernels measured beside the defaults they may replace: provider -> (backend, the kernel
# variants it runs under, as ``reft_kernels.kernels(**variants)`` takes them; ops.variants.AXES).
# Each keeps the rule's kernel as the default until a GPU sweep has measured both (README, "What
# runs"). Third item: the ops whose kernels the variants change (the provider is not run on others).
LOWRANK_OPS = ("lowrank_edit", "lowrank_edit_index")
VARIANT_PROVIDERS = {
    # the one-pass backward with thread-block clusters (sm_90; r <= 16, d <= 4096)
    "cuda-cluster": ("cuda", {"cuda_lowrank_bwd": "cluster"}, LOWRANK_OPS),
    # the 16-byte parameter-gradient kernel and the parallel fixed-order finish (RED's sums too)
    "cuda-vector": ("cuda", {"cuda_params": "vector", "cuda_finish": "split"}, ("red",) + LOWRANK_OPS),
    # the persistent L2-resident low-rank forward
    "triton-resident": ("triton", {"lowrank_fwd": "resident"}, LOWRANK_OPS),
    # d split across programs in the forward and the backward's latent, whatever the row count
    "triton-split-d": ("triton", {"lowrank_fwd": "split-d", "lowrank_bwd": "split-d"}, LOWRANK_OPS),
    # RED's backward with a 2-D fp32 accumulator tile
    "triton-tile2d": ("triton", {"red_bwd": "tile2d"}, ("red",)),
}
OUR_PROVIDERS = ("torch", "triton", "cuda") + tuple(VARIANT_PROVIDERS)
ALL_PROVIDERS = ("eager", "compile") + OUR_PROVIDERS


def provider_backend(provider: str) -> str:
    """The backend a provider of ours runs on (a variant's base backend)."""
    return VARIANT_PROVIDERS[provider][0] if provider in VARIANT_PROVIDERS else provider


@dataclass(frozen=True)
class Case:
    """One problem: ``n_rows`` x ``d`` activations in ``dtype`` (a DTYPES key), rank ``rank``;
    ``index_rows``: rows edited per call (the indexed op), else None."""
    op: str
    method: str
    dtype: str
    n_rows: int
    d: int
    rank: int | None = None
    index_rows: int | None = None
    seq_len: int | None = field(default=None, compare=False)  # the indexed op: sequence length

    def label(self) -> str:
        parts = [self.op, self.method, self.dtype, f"N={self.n_rows}", f"d={self.d}"]
        parts += [f"r={self.rank}"] if self.rank else []
        parts += [f"rows={self.index_rows}"] if self.index_rows else []
        return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- inputs

def _param(shape, scale, device, gen):
    return (torch.randn(shape, generator=gen, device=device) * scale).requires_grad_()


def f7_l7_index(batch: int, seq_len: int, k: int = 7, device="cpu") -> torch.Tensor:
    """Rows of the (batch * seq_len, d) hidden state that pyreft's ``f{k}+l{k}`` edits: the first
    and last k positions of every sequence (all of them real tokens here)."""
    pos = torch.cat([torch.arange(k), torch.arange(seq_len - k, seq_len)])
    return (torch.arange(batch)[:, None] * seq_len + pos[None, :]).reshape(-1).to(device)


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """Tensors of ``case`` on ``device``: ``h`` in the case's dtype, parameters in fp32 (R always
    fp32, as pyreft keeps it; pyreft's W/b are bf16 by default, fp32 here keeps one parameter
    dtype across providers). Every floating tensor requires grad."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where used: no 2 GiB host copies
    dt = DTYPES[case.dtype]
    d = case.d
    h = torch.randn(case.n_rows, d, generator=gen, device=device).to(dt).requires_grad_()
    if case.op == "red":
        return {"h": h, "scale": _param((d,), 1.0, device, gen), "bias": _param((d,), 1.0, device, gen)}
    r = case.rank
    # X already has orthonormal rows: both orthonormal_rows and pyreft's parametrization then
    # give R = X exactly, so every provider can be checked against one float64 formula.
    X = orthonormal_rows(torch.randn(r, d, generator=gen, device=device))
    if case.op == "orthonormal_rows":
        return {"X": X.requires_grad_()}
    out = {"h": h, **_method_params(_METHODS.get(case.method, _LOREFT), X, device, gen)}
    if case.method == "f7+l7+R":
        out = {"h": h, "X": X.requires_grad_(), "W": out["W"], "b": out["b"]}
    if case.op == "lowrank_edit_index":
        out["index"] = f7_l7_index(case.n_rows // case.seq_len, case.seq_len, device=device)
    return out


def _method_params(method, X, device, gen) -> dict:
    """``method``'s parameters by name, in its op's order: R = X (r, d) when orthonormal; the
    others drawn, A (r, d) and a (r,) first (drawn for every method, so that each gets the same
    values), then B and c where they are not R."""
    r, d = X.shape
    W, b = _param((r, d), d ** -0.5, device, gen), _param((r,), 1.0, device, gen)
    values = {method.a: b}
    if method.A is not None:
        values[method.A] = W
    if method.orthonormal:
        values[method.B] = X.clone().requires_grad_()
    else:
        values[method.B] = _param((r, d), d ** -0.5, device, gen)
    if method.c is not None:
        values[method.c] = _param((r,), 1.0, device, gen)
    return {p: values[p] for p in method.params}


# ----------------------------------------------------------------------------- providers

def _method_ref(method):
    return getattr(ref, f"{method}_reference")


def _ours_method(method):
    return getattr(iv, method)


def _pyvene_edit(h, index, edit):
    """What pyvene does per hook: clone the whole hidden state, gather the positions, edit them
    with the eager formula, scatter them back."""
    out = h.clone()
    rows = index[index >= 0]
    out[rows] = edit(h[rows])
    return out


class _PyreftRotation(nn.Module):
    """pyreft's rotate layer: a (d, r) weight behind torch's orthogonal parametrization."""

    def __init__(self, X: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(X.detach().t().contiguous())

    @staticmethod
    def build(X):
        return nn.utils.parametrizations.orthogonal(_PyreftRotation(X))


def eager_fn(case: Case):
    """The naive eager baseline of ``case`` (also what the ``compile`` provider compiles)."""
    if case.op == "red":
        return lambda h, scale, bias: ref.red_reference(h, scale, bias)
    if case.op == "lowrank_edit":
        f = _method_ref(case.method)
        return lambda h, **p: f(h, *p.values())
    if case.op == "orthonormal_rows":
        return None  # needs its own state: see stateful_eager_fn
    if case.method == "f7+l7":
        return lambda h, R, W, b, index: _pyvene_edit(h, index, lambda x: ref.loreft_reference(x, R, W, b))
    return None  # f7+l7+R: the pyreft rotation keeps state, see stateful_eager_fn


def ours_fn(case: Case, provider: str):
    """Our op on ``provider``'s backend for ``case`` (a variant's kernels are chosen by
    ``runner.provider_context``); None for a variant that does not change this op's kernels."""
    if provider in VARIANT_PROVIDERS and case.op not in VARIANT_PROVIDERS[provider][2]:
        return None
    if provider == "cuda-cluster" and not cluster_shape_ok(case.d, case.rank):
        return None  # the cluster backward refuses this shape (ops/lowrank_edit/plan.py)
    backend = provider_backend(provider)
    if case.op == "red":
        return lambda h, scale, bias: red(h, scale, bias, backend=backend)
    if case.op == "lowrank_edit":
        f = _ours_method(case.method)
        return lambda h, **p: f(h, *p.values(), backend=backend)
    if case.op == "orthonormal_rows":  # PyTorch ops only (QR): runs as the "torch" provider
        return lambda X: orthonormal_rows(X)
    if case.method == "f7+l7":
        return lambda h, R, W, b, index: iv.loreft(h, R, W, b, index=index, backend=backend)
    return lambda h, X, W, b, index: iv.loreft(h, orthonormal_rows(X), W, b, index=index, backend=backend)


def stateful_eager_fn(case: Case, inputs: dict):
    """The eager baselines that keep state (pyreft's parametrized rotation), built per input set:
    returns (fn, extra leaves requiring grad)."""
    rot = _PyreftRotation.build(inputs["X"])
    leaves = [rot.parametrizations.weight.original]
    if case.op == "orthonormal_rows":
        return (lambda X: rot.weight.t()), leaves

    def step(h, X, W, b, index):  # pyreft's LoreftIntervention: R materialised twice
        def edit(x):
            rotated = x @ rot.weight
            return x + ((x @ W.t() + b) - rotated) @ rot.weight.t()
        return _pyvene_edit(h, index, edit)

    return step, leaves


def reference64(case: Case):
    """The float64 formula every provider is checked against (``X`` has orthonormal rows, so
    R = X for ours and pyreft's rotation alike)."""
    if case.op == "orthonormal_rows":
        return lambda X: orthonormal_rows(X)
    if case.method == "f7+l7+R":
        return lambda h, X, W, b, index: ref.lowrank_edit_reference(
            h, *_LOREFT.terms(orthonormal_rows(X), W, b), index=index)
    if case.op == "lowrank_edit_index":
        return lambda h, R, W, b, index: ref.lowrank_edit_reference(h, *_LOREFT.terms(R, W, b), index=index)
    return eager_fn(case)
