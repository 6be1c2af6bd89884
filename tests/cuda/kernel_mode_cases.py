"""Cases for the CUDA kernels that ``reft_kernels.kernels(...)`` selects, shared by the emulated
tests (``test_cuda_emulated.py``, CPU tensors) and the GPU tests (``test_cuda_kernel_modes.py``,
CUDA tensors): the 16-byte parameter-gradient kernel (``cuda_params="vector"``) and the split
finish of the row-block partial sums (``cuda_finish="split"``), against the float64 reference,
every gradient included.

Each case function takes the device; the caller selects the kernels (``modes``) and, on the CPU,
opens the emulated backend.
"""
from __future__ import annotations

import contextlib

import torch

import reft_kernels
from reft_kernels import lowrank_edit, lowrank_edit_, red

from .._helpers import (
    bits, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, make_red_params, padded_index,
    red_ref_fn, run_with_grads,
)

# id: (parameter-gradient kernel, finish)
MODES = {
    "previous": ("scalar", "serial"),
    "vector": ("vector", "serial"),
    "split": ("scalar", "split"),
    "vector_split": ("vector", "split"),
}


@contextlib.contextmanager
def modes(mode: str):
    """The kernels of ``MODES[mode]`` for the block: ``reft_kernels.kernels(cuda_params=...,
    cuda_finish=...)``."""
    params, finish = MODES[mode]
    with reft_kernels.kernels(cuda_params=params, cuda_finish=finish) as chosen:
        yield chosen


# Rank chunks of the vector kernel: fp16/bf16 (V = 8) untied 1, 2, 4 and tied 2, 4, 8; fp32
# (V = 4) untied 2, 4, 8 and tied 4, 8, 16. These ranks sit on and beside every boundary, and
# r = 64 takes several chunks of the largest.
RANKS = (1, 3, 4, 5, 8, 9, 16, 17, 64)

# name: (terms, tied, act), as FAMILY in test_cuda_emulated.py
LOREFT = ("BAac", True, None)
NOREFT_GELU = ("BAaCc", False, "gelu")


def _padded(d: int) -> int:
    return -(-d // 8) * 8


def check_lowrank(device, d, r, family=LOREFT, *, dtype=torch.float32, p_dtype=None, layout="contiguous",
                  lead=(3, 7), mode="out", wanted=None, g_layout=None):
    """lowrank_edit (mode "out") or lowrank_edit_ with a padded index ("inplace_index") on h of the
    given layout (a layout of _helpers.make_base, or "padded": rows of a multiple of 8 elements
    apart, so that a d that is not a multiple of the vector width still has 16-byte aligned rows);
    ``wanted``: only that tensor requires grad (None: all); ``g_layout``: the upstream gradient as a
    "strided" (column stride 2), "unaligned" (one element off 16 bytes) or "padded" view."""
    terms, tied, act = family
    if layout == "padded":
        base = torch.randn(*lead, _padded(d), device=device).to(dtype)
        view = lambda t: t[..., :d]  # noqa: E731
    else:
        base, view = make_base(layout, lead, d, dtype=dtype, device=device)
    base.requires_grad_(wanted in (None, "h"))
    p = make_lowrank_params(d, r, p_dtype or dtype, terms=terms, tied=tied, device=device,
                            requires_grad=wanted is None)
    if wanted not in (None, "h"):
        p[wanted].requires_grad_()
    shape = view(base).shape
    g = None
    if g_layout == "strided":
        g = torch.randn(*shape[:-1], 2 * d, device=device).to(dtype)[..., ::2]
    elif g_layout == "unaligned":
        g = torch.randn(shape.numel() + 1, device=device).to(dtype)[1:].view(shape)
    elif g_layout == "padded":
        g = torch.randn(*shape[:-1], _padded(d), device=device).to(dtype)[..., :d]
    index = None
    inplace = mode == "inplace_index"
    if inplace:
        n_rows = shape.numel() // d
        index = padded_index(n_rows, max(1, n_rows - 3), 3, device=device)
    fn = lowrank_edit_ if inplace else lowrank_edit
    vw = (lambda t: view(t) * 1.0) if inplace else view
    return check_against_reference(fn, lowrank_ref_fn, base, vw, p, inplace=inplace, g=g,
                                   kernel_kwargs=dict(act=act, index=index, backend="cuda"),
                                   ref_kwargs=dict(act=act, index=index))


def check_lowrank_deterministic(device, n=260, d=24, r=12, inplace=False):
    """Many row blocks (and, split, a finish of several ranges per column, some ragged or empty):
    two runs give the same bits, and the result matches the reference."""
    h0 = torch.randn(n, d, device=device)
    p = make_lowrank_params(d, r, tied=True, device=device)
    g = torch.randn(n, d, device=device)
    index = padded_index(n, n - 60, 6, device=device) if inplace else None
    fn = lowrank_edit_ if inplace else lowrank_edit
    res = [run_with_grads(fn, h0.clone().requires_grad_(), lambda t: t, p, g, inplace=inplace, act="silu",
                          index=index, backend="cuda") for _ in range(2)]
    (y1, g1), (y2, g2) = res
    assert torch.equal(bits(y1), bits(y2)) and all(torch.equal(bits(g1[k]), bits(g2[k])) for k in g1)
    vw = (lambda t: t * 1.0) if inplace else (lambda t: t)
    check_against_reference(fn, lowrank_ref_fn, h0.clone().requires_grad_(), vw, p, inplace=inplace, g=g,
                            kernel_kwargs=dict(act="silu", index=index, backend="cuda"),
                            ref_kwargs=dict(act="silu", index=index))


def check_red_deterministic(device, n=600, d=48, dtype=torch.float32):
    """RED's ds and dt over many row blocks: bitwise equal across two runs, and right."""
    h0 = torch.randn(n, d, device=device).to(dtype)
    p = make_red_params(d, device=device)
    g = torch.randn(n, d, device=device).to(dtype)
    (y1, g1), (y2, g2) = (run_with_grads(red, h0.clone().requires_grad_(), lambda t: t, p, g, backend="cuda")
                          for _ in range(2))
    assert torch.equal(bits(y1), bits(y2)) and all(torch.equal(bits(g1[k]), bits(g2[k])) for k in g1)
    check_against_reference(red, red_ref_fn, h0.clone().requires_grad_(), lambda t: t, p, g=g,
                            kernel_kwargs={"backend": "cuda"})
