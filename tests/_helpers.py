"""Shared helpers for the correctness tests: input builders, an op + backward runner, and the
comparison against the float64 reference of ``reft_kernels.reference``.

Every comparison is against ``reft_kernels.reference`` (plain eager PyTorch with autograd), never
against another call of the code path under test:

- fp32 (and fp64) tensors: the kernel's max error against the float64 reference of each tensor
  (output, gradient of ``h``, gradient of each parameter) must be within ``rtol`` (1e-5) relative
  to the tensor's scale, plus a tiny absolute floor. The scale is the larger of the reference
  tensor's max abs value and the max abs value of the same reference evaluated on the absolute
  values of every input (identity activation): that is the size of the terms summed into each
  element, so a column sum whose terms happen to cancel (e.g. the gradient of ``a`` with r = 1)
  is judged against the size of its terms, as any floating-point sum must be.
- fp16 / bf16 tensors (``h`` in low precision, or a parameter whose gradient comes back in low
  precision): the kernel's max error against the float64 reference must be at most
  ``LOWP_FACTOR`` times the max error of the same eager computation done in that low precision
  (the reference functions called on the low-precision tensors), plus one unit in the last place
  of the reference tensor's max abs value.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reft_kernels.reference import LOWP_FACTOR, lowrank_edit_reference, red_reference

LOW_PRECISION = (torch.float16, torch.bfloat16)
FP32_RTOL = 1e-5
FP64_RTOL = 1e-12
ABS_FLOOR = 1e-7

LOWRANK_PARAMS = ("B", "A", "a", "C", "c")
RED_PARAMS = ("scale", "bias")

# (id, h dtype, parameter dtype): low-precision and mixed-dtype cases shared by the op tests
MIXED_DTYPE_CASES = [
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("fp16", torch.float16, torch.float16),
    ("bf16_h_fp32_params", torch.bfloat16, torch.float32),
    ("fp16_h_fp32_params", torch.float16, torch.float32),
    ("fp32_h_bf16_params", torch.float32, torch.bfloat16),
]

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


# ----------------------------------------------------------------------------- inputs

# Layouts of h. Each builder returns (base, view): ``view(base)`` is h, of shape (*lead, d).
LAYOUTS = (
    "contiguous",     # h = base
    "transposed",     # h = base.transpose(0, 1), base (S, B, d): leading dims not mergeable
    "strided_rows",   # h = base[:, ::2], base (B, 2S, d)
    "sliced_cols",    # h = base[..., :d], base (..., d + 3): row stride > d
    "strided_cols",   # h = base[..., ::2], base (..., 2d): column stride 2
    "col_major",      # h = base.t(), base (d, N): rows of stride 1, columns of stride N
    "transposed_strided_cols",  # h = base.transpose(0, 1)[..., ::2], base (S, B, 2d)
)


def make_base(layout: str, lead: tuple[int, ...], d: int, dtype=torch.float32, device="cpu"):
    """(base, view) such that ``view(base)`` has shape (*lead, d) with the given layout.

    Values are drawn in fp32 and rounded to ``dtype`` so float64 copies hold exactly the same
    numbers as the low-precision tensor.
    """
    if layout == "contiguous":
        shape, view = (*lead, d), (lambda t: t)
    elif layout == "transposed":
        assert len(lead) == 2
        shape, view = (lead[1], lead[0], d), (lambda t: t.transpose(0, 1))
    elif layout == "strided_rows":
        assert len(lead) == 2
        shape, view = (lead[0], 2 * lead[1], d), (lambda t: t[:, ::2])
    elif layout == "sliced_cols":
        shape, view = (*lead, d + 3), (lambda t: t[..., :d])
    elif layout == "strided_cols":
        shape, view = (*lead, 2 * d), (lambda t: t[..., ::2])
    elif layout == "col_major":
        assert len(lead) == 1
        shape, view = (d, lead[0]), (lambda t: t.t())
    elif layout == "transposed_strided_cols":
        assert len(lead) == 2
        shape, view = (lead[1], lead[0], 2 * d), (lambda t: t.transpose(0, 1)[..., ::2])
    else:
        raise AssertionError(f"unknown layout {layout}")
    base = torch.randn(shape, device=device).to(dtype)
    h = view(base)
    assert h.shape == (*lead, d), (layout, h.shape)
    if layout != "contiguous" and min(lead) > 1 and d > 1:
        assert not h.is_contiguous(), layout
    return base, view


def make_lowrank_params(d: int, r: int, dtype=torch.float32, *, terms="BAaCc", tied=False,
                        device="cpu", requires_grad=True):
    """Parameters of ``lowrank_edit`` as a dict B, A, a, C, c (absent terms are None).

    Matrices are scaled by 1/sqrt(d) so that the latent stays O(1) for every d. With ``tied``,
    ``C`` is the very same tensor object as ``B``.
    """
    s = d ** -0.5

    def mk(shape, scale):
        t = (torch.randn(shape, device=device) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    p = {
        "B": mk((r, d), s),
        "A": mk((r, d), s) if "A" in terms else None,
        "a": mk((r,), 1.0) if "a" in terms else None,
        "C": mk((r, d), s) if "C" in terms else None,
        "c": mk((r,), 1.0) if "c" in terms else None,
    }
    if tied:
        p["C"] = p["B"]
    return p


def make_red_params(d: int, dtype=torch.float32, *, terms="st", device="cpu", requires_grad=True):
    def mk():
        return torch.randn(d, device=device).to(dtype).requires_grad_(requires_grad)

    return {"scale": mk() if "s" in terms else None, "bias": mk() if "t" in terms else None}


def padded_index(n_rows: int, n_listed: int, n_pad: int = 2, dtype=torch.int64, device="cpu"):
    """A shuffled index of ``n_listed`` distinct rows in [0, n_rows) and ``n_pad`` -1 entries."""
    rows = torch.randperm(n_rows, device=device)[:n_listed]
    idx = torch.cat([rows, torch.full((n_pad,), -1, dtype=rows.dtype, device=device)])
    return idx[torch.randperm(idx.numel(), device=device)].to(dtype)


def seeded_index(n_rows: int, n: int, seed: int, n_pad: int = 0):
    """``n`` distinct rows of ``n_rows`` and ``n_pad`` -1 entries, shuffled together, from a
    generator of its own seeded with ``seed`` (the global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randperm(n_rows, generator=gen)[:n], torch.full((n_pad,), -1)])
    return idx[torch.randperm(idx.numel(), generator=gen)]


def one_gradient_inputs(grad_of: str, tied: bool = False):
    """(base, view, params, index) of the "each gradient alone" tests: a (2, 8, 12) float32 ``h``
    and BAaCc parameters of rank 3 (``tied``: BAa with C = B), of which only ``grad_of`` requires
    grad ("h", a parameter's name, or "params" for every parameter but not h), and 7 listed rows
    among 2 padding entries."""
    torch.manual_seed(3)
    base, view = make_base("contiguous", (2, 8), 12, torch.float32)
    params = make_lowrank_params(12, 3, torch.float32, terms="BAa" if tied else "BAaCc", tied=tied,
                                 requires_grad=False)
    if grad_of == "h":
        base.requires_grad_(True)
    elif grad_of == "params":
        for v in params.values():
            if v is not None:
                v.requires_grad_(True)
    else:
        params[grad_of].requires_grad_(True)
    return base, view, params, seeded_index(16, 7, 2, n_pad=2)


def copy_params(params: dict, dtype=None, requires_grad=True) -> dict:
    """Detached copies (optionally cast), keeping ``C is B`` tying."""
    out, seen = {}, {}
    for k, v in params.items():
        if v is None:
            out[k] = None
        elif id(v) in seen:
            out[k] = seen[id(v)]
        else:
            t = v.detach().to(dtype if dtype is not None else v.dtype).clone()
            t.requires_grad_(requires_grad and v.requires_grad)
            seen[id(v)] = out[k] = t
    return out


# ----------------------------------------------------------------------------- runner

def run_with_grads(fn, base, view, params: dict, g, *, inplace=False, **kwargs):
    """Run ``fn(view(base'), **params, **kwargs)`` and its backward with upstream gradient ``g``.

    ``base`` is a leaf requiring grad. Out of place, ``base' = base``; in place, ``base'`` is a
    clone of it (a non-leaf, which in-place ops may edit). Returns (out, grads) where ``grads``
    maps "h" to the gradient of ``base`` and each present parameter name to its gradient (a tied
    parameter's gradient appears under each of its names).
    """
    h = view(base.clone() if inplace else base)
    out = fn(h, **params, **kwargs)
    if inplace:
        assert out is h, "in-place op must return h itself"
    uniq, names = ([base] if base.requires_grad else []), {}
    for k, v in params.items():
        if v is None or not v.requires_grad:
            continue
        if id(v) not in names:
            names[id(v)] = len(uniq)
            uniq.append(v)
    gs = torch.autograd.grad(out, uniq, g, allow_unused=False)
    grads = {"h": gs[0]} if base.requires_grad else {}
    for k, v in params.items():
        if v is not None and v.requires_grad:
            grads[k] = gs[names[id(v)]]
    return out.detach(), grads


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def check_against_reference(kernel_fn, ref_fn, base, view, params, *, inplace=False,
                            kernel_kwargs=None, ref_kwargs=None, rtol=None, g=None):
    """Compare ``kernel_fn`` (forward and every gradient) with ``ref_fn`` in float64.

    ``base`` (leaf, requires grad) has the activations' dtype; ``params`` may hold other dtypes.
    Also checks dtypes and shapes of the output and of every gradient, and that the kernel left
    its inputs untouched (out of place). Returns a dict name -> (err, tol) for the record.
    """
    kernel_kwargs = kernel_kwargs or {}
    ref_kwargs = ref_kwargs or {}
    dtype = base.dtype
    h_shape = view(base).shape
    if g is None:
        g = torch.randn(h_shape, device=base.device).to(dtype)

    base_before = base.detach().clone()
    params_before = {k: (v.detach().clone() if v is not None else None) for k, v in params.items()}
    out, grads = run_with_grads(kernel_fn, base, view, params, g, inplace=inplace, **kernel_kwargs)

    # dtypes and shapes
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected h's dtype {dtype}"
    assert out.shape == h_shape, f"output shape {tuple(out.shape)}, expected {tuple(h_shape)}"
    assert ("h" in grads) == base.requires_grad
    if base.requires_grad:
        assert grads["h"].dtype == dtype and grads["h"].shape == base.shape, \
            f"grad h: {grads['h'].dtype} {tuple(grads['h'].shape)}"
    for k, v in params.items():
        if v is not None and v.requires_grad:
            assert grads[k].dtype == v.dtype, f"grad {k} dtype {grads[k].dtype}, expected {v.dtype}"
            assert grads[k].shape == v.shape, f"grad {k} shape {tuple(grads[k].shape)}"
    # inputs untouched
    assert torch.equal(base.detach(), base_before), "kernel modified its input h"
    for k, v in params.items():
        if v is not None:
            assert torch.equal(v.detach(), params_before[k]), f"kernel modified parameter {k}"

    # float64 reference
    base64 = base.detach().double().requires_grad_(base.requires_grad)
    params64 = copy_params(params, torch.float64)
    ref_out, ref_grads = run_with_grads(ref_fn, base64, view, params64, g.double(), **ref_kwargs)

    results = {}
    names = ["out"] + list(grads)
    kernel_vals = {"out": out, **grads}
    ref_vals = {"out": ref_out, **ref_grads}

    # size of the summed terms: the float64 reference on |inputs| with the identity activation
    abs_kwargs = {k: (None if k == "act" else v) for k, v in ref_kwargs.items()}
    base_abs = base.detach().double().abs().requires_grad_(base.requires_grad)
    params_abs, seen = {}, {}
    for k, v in params64.items():  # keep C is B tying and the requires_grad flags
        if v is None:
            params_abs[k] = None
        elif id(v) in seen:
            params_abs[k] = seen[id(v)]
        else:
            params_abs[k] = seen[id(v)] = v.detach().abs().requires_grad_(v.requires_grad)
    mag_out, mag_grads = run_with_grads(ref_fn, base_abs, view, params_abs, g.double().abs(), **abs_kwargs)
    mag_vals = {"out": mag_out, **mag_grads}

    lowp = [k for k in names if dtype in LOW_PRECISION or kernel_vals[k].dtype in LOW_PRECISION]
    if lowp:
        base_lp = base.detach().clone().requires_grad_(base.requires_grad)
        params_lp = copy_params(params)
        eager_out, eager_grads = run_with_grads(ref_fn, base_lp, view, params_lp, g, **ref_kwargs)
        eager_vals = {"out": eager_out, **eager_grads}
    if rtol is None:
        rtol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    for k in names:
        err = max_err(kernel_vals[k], ref_vals[k])
        if k in lowp:
            eps = torch.finfo(kernel_vals[k].dtype if kernel_vals[k].dtype in LOW_PRECISION else dtype).eps
            eager = max_err(eager_vals[k], ref_vals[k])
            tol = LOWP_FACTOR * eager + eps * max_abs(ref_vals[k]) + ABS_FLOOR
        else:
            scale = max(max_abs(ref_vals[k]), max_abs(mag_vals[k]))
            tol = rtol * scale + (ABS_FLOOR if dtype != torch.float64 else 1e-14)
        results[k] = (err, tol)
    for k in names:
        assert torch.isfinite(kernel_vals[k].double()).all(), f"{k}: non-finite values"
    bad = {k: v for k, v in results.items() if not v[0] <= v[1]}
    assert not bad, "errors above tolerance (name: (err, tol)): " + ", ".join(
        f"{k}: ({e:.3g}, {t:.3g})" for k, (e, t) in bad.items())
    return results


def lowrank_ref_fn(h, B, A=None, a=None, C=None, c=None, *, act=None, index=None):
    return lowrank_edit_reference(h, B, A, a, C, c, act=act, index=index)


def red_ref_fn(h, scale=None, bias=None):
    return red_reference(h, scale, bias)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor's bits: compares NaNs and signed zeros exactly."""
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(it)


def count_calls(monkeypatch, owner, name: str) -> dict:
    """Wrap ``owner.name`` (a module's function) for the test's duration so that each call adds
    one to the returned dict's entry ``name``: which path a call took, asserted by the test."""
    calls = {name: 0}
    fn = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


class _OpNames(TorchDispatchMode):
    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.names = prefix, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).split(".")[-1]
        if str(func.namespace) == self.prefix:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def ops_called(namespace: str = "reft_kernels_cpu"):
    """Yields the list of the names of the ops of ``namespace`` that run inside the block
    (forward and backward), in order, as a dispatch mode sees them (below autograd)."""
    mode = _OpNames(namespace)
    with mode:
        yield mode.names


# How a gradient reaches an op's output in ``upstream_backward``. The first four hand the op's
# backward a gradient that nothing else holds, so the CPU extension's nodes write dh into it
# (``retain_grad`` keeps a copy of its own); the others one that something else still holds (a
# Python hook that keeps it, the caller's tensor), so they work on a copy.
UNSHARED = ("alone", "two_consumers_summed", "residual", "retained")
UPSTREAMS = UNSHARED + ("hooked", "given_by_the_caller")


def upstream_backward(y, upstream: str, w, w2, bwd_op: str) -> dict:
    """The backward of ``y`` (float64) with its gradient arriving as ``upstream`` says: the loss
    ``(y * w).sum()`` ("alone"; also under ``retain_grad`` or a Python hook that keeps the
    gradient), two such losses summed, a residual ``((y + y * w2) * w).sum()``, or
    ``y.backward(w)`` with the caller's tensor. Checks that a gradient something else holds is
    left as it was. Returns the gradient that reached ``y`` (``want_g``) and the bytes that the
    op ``reft_kernels_cpu::<bwd_op>`` allocated, children included (``bwd_bytes``)."""
    kept = []
    if upstream == "retained":
        y.retain_grad()
    if upstream == "hooked":
        y.register_hook(lambda g: kept.append(g))
    upstream_grad = w.clone()
    with torch.profiler.profile(profile_memory=True) as prof:
        if upstream == "given_by_the_caller":
            y.backward(upstream_grad)
        elif upstream == "two_consumers_summed":
            ((y * w).sum() + (y * w2).sum()).backward()
        elif upstream == "residual":  # the next layer's residual add: one gradient to both branches
            ((y + y * w2) * w).sum().backward()
        else:
            (y * w).sum().backward()
    if upstream == "retained":
        assert torch.equal(y.grad, w)
    if upstream == "hooked":
        assert torch.equal(kept[0], w)
    assert torch.equal(upstream_grad, w)
    events = [e for e in prof.key_averages() if e.key == f"reft_kernels_cpu::{bwd_op}"]
    assert len(events) == 1 and events[0].count == 1, [e.key for e in prof.key_averages()]
    return {"want_g": {"two_consumers_summed": w + w2, "residual": w + w2 * w}.get(upstream, w),
            "bwd_bytes": events[0].cpu_memory_usage}
