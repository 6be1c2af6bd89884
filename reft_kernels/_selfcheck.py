"""The self-test behind ``reft-kernels check``: every public op on one device and backend, forward
and every gradient, against the float64 eager reference on fresh random inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import interventions as iv
from . import reference as ref
from .functional import lowrank_edit, lowrank_edit_, red
from .methods import METHODS

# (N rows as (B, S), d, r): ragged on purpose (d not a power of two, r not a multiple of 16).
SHAPE, D, R = (3, 37), 100, 5
INDEX = [0, 5, -1, 40, 77, 110, -1, 3]


@dataclass
class Case:
    name: str
    run: callable      # (backend, *tensors) -> y
    reference: callable  # (*float64 tensors) -> y
    shapes: list       # shapes of the tensors, h first


def _index(device):
    return torch.tensor(INDEX, device=device)


def cases(device) -> list[Case]:
    h, v, m = SHAPE + (D,), (D,), (R, D)
    idx = _index(device)
    return [
        Case("red", lambda be, h, s, t: red(h, s, t, backend=be), ref.red_reference, [h, v, v]),
        Case("red (scale only)", lambda be, h, s: red(h, s, backend=be), ref.red_reference, [h, v]),
        Case("red (bias only)", lambda be, h, t: red(h, None, t, backend=be),
             lambda h, t: ref.red_reference(h, None, t), [h, v]),
        Case("lowrank_edit", lambda be, *t: lowrank_edit(*t, backend=be), ref.lowrank_edit_reference,
             [h, m, m, (R,), m, (R,)]),
        Case("lowrank_edit (act=gelu)", lambda be, *t: lowrank_edit(*t, act="gelu", backend=be),
             lambda *t: ref.lowrank_edit_reference(*t, act="gelu"), [h, m, m, (R,), m, (R,)]),
        Case("lowrank_edit (index)", lambda be, *t: lowrank_edit(*t, index=idx, backend=be),
             lambda *t: ref.lowrank_edit_reference(*t, index=idx), [h, m, m, (R,), m, (R,)]),
        Case("lowrank_edit_ (in place, index)",
             lambda be, h, *t: lowrank_edit_(h * 1, *t, index=idx, backend=be),
             lambda *t: ref.lowrank_edit_reference(*t, index=idx), [h, m, m, (R,), m, (R,)]),
    ] + [_method_case(m) for m in METHODS.values()]


def _method_case(method) -> Case:
    """pyreft's intervention ``method`` (every parameter given) against its own eager formula."""
    op, reference = getattr(iv, method.name), getattr(ref, f"{method.name}_reference")
    return Case(method.name, lambda be, *t: op(*t, backend=be), reference,
                [SHAPE + (D,)] + method.shapes(R, D))


def _rel_err(x, ref_):
    if ref_.numel() == 0:
        return 0.0
    return ((x.double() - ref_).abs().max() / ref_.abs().max().clamp_min(1e-30)).item()


def run_case(case: Case, backend: str, device, dtype=torch.float32, seed=0):
    """Return (forward relative error, max gradient relative error) against float64."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in case.shapes]
    base = [t / t.shape[-1] ** 0.5 if i and t.dim() == 2 else t for i, t in enumerate(base)]
    xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in base]
    x64 = [t.to(device).requires_grad_() for t in base]
    y = case.run(backend, *xs)
    y64 = case.reference(*x64)
    g = torch.randn(y64.shape, generator=gen, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(y, xs, g.to(dtype))
    grads64 = torch.autograd.grad(y64, x64, g)
    return _rel_err(y, y64), max(_rel_err(a, b) for a, b in zip(grads, grads64))


def run_all(device, backends, tol=1e-5):
    """Yield (op name, backend, forward error, gradient error, passed) for every case."""
    for backend in backends:
        for case in cases(device):
            try:
                fe, ge = run_case(case, backend, device)
                yield case.name, backend, fe, ge, fe <= tol and ge <= tol
            except Exception as exc:  # reported as a failure row, not a crash
                yield case.name, backend, float("nan"), float("nan"), f"error: {exc}"
