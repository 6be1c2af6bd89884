"""The activations ``act`` that ``lowrank_edit`` accepts, in three forms: names (Hugging Face
``ACT2FN`` spellings), PyTorch functions with their derivatives, and Triton device functions.

Codes (``reft_kernels._constants``) are compile-time constants of the Triton kernels
(``ACT: tl.constexpr``) and of the CUDA kernels' ``ActCode`` enum.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._constants import GELU, GELU_TANH, IDENTITY, RELU, SIGMOID, SILU, TANH
from ._triton import tl, triton

_NAMES = {
    None: IDENTITY, "identity": IDENTITY, "linear": IDENTITY,
    "relu": RELU,
    "gelu": GELU,
    "gelu_tanh": GELU_TANH, "gelu_new": GELU_TANH, "gelu_pytorch_tanh": GELU_TANH,
    "silu": SILU, "swish": SILU,
    "tanh": TANH,
    "sigmoid": SIGMOID,
}
ACTIVATION_NAMES = tuple(k for k in _NAMES if k is not None)

# The codes as Triton compile-time globals, so the device functions below name them.
_RELU = tl.constexpr(RELU)
_GELU = tl.constexpr(GELU)
_GELU_TANH = tl.constexpr(GELU_TANH)
_SILU = tl.constexpr(SILU)
_TANH = tl.constexpr(TANH)
_SIGMOID = tl.constexpr(SIGMOID)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def act_code(act) -> int:
    """Map an activation name (or None for the identity) to its kernel code."""
    if act is not None and not isinstance(act, str):
        raise TypeError(f"act must be None or one of {ACTIVATION_NAMES}, got {type(act).__name__}")
    key = act.lower() if isinstance(act, str) else None
    if key not in _NAMES:
        raise ValueError(f"act must be None or one of {ACTIVATION_NAMES}, got {act!r}")
    return _NAMES[key]


def act_torch(u: torch.Tensor, code: int) -> torch.Tensor:
    if code == IDENTITY:
        return u
    if code == RELU:
        return F.relu(u)
    if code == GELU:
        return F.gelu(u)
    if code == GELU_TANH:
        return F.gelu(u, approximate="tanh")
    if code == SILU:
        return F.silu(u)
    if code == TANH:
        return torch.tanh(u)
    if code == SIGMOID:
        return torch.sigmoid(u)
    raise ValueError(f"unknown activation code {code}")


def act_grad_torch(u: torch.Tensor, code: int) -> torch.Tensor:
    """d act(u) / du, elementwise."""
    if code == IDENTITY:
        return torch.ones_like(u)
    if code == RELU:
        return (u > 0).to(u.dtype)
    if code == GELU:
        cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2))
        return cdf + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
    if code == GELU_TANH:
        t = torch.tanh(_SQRT_2_OVER_PI * (u + 0.044715 * u * u * u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
    if code == SILU:
        s = torch.sigmoid(u)
        return s * (1.0 + u * (1.0 - s))
    if code == TANH:
        t = torch.tanh(u)
        return 1.0 - t * t
    if code == SIGMOID:
        s = torch.sigmoid(u)
        return s * (1.0 - s)
    raise ValueError(f"unknown activation code {code}")


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: tl has sigmoid everywhere, including the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_fwd_tl(u, ACT: tl.constexpr):
    """act(u) on an fp32 tile."""
    if ACT == _RELU:
        u = tl.maximum(u, 0.0)
    elif ACT == _GELU:
        u = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACT == _GELU_TANH:
        u = 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
    elif ACT == _SILU:
        u = u * tl.sigmoid(u)
    elif ACT == _TANH:
        u = _tanh(u)
    elif ACT == _SIGMOID:
        u = tl.sigmoid(u)
    return u


@triton.jit
def act_grad_tl(u, ACT: tl.constexpr):
    """d act(u) / du on an fp32 tile (only called for ACT != identity)."""
    if ACT == _RELU:
        g = tl.where(u > 0.0, 1.0, 0.0)
    elif ACT == _GELU:
        g = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    elif ACT == _GELU_TANH:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        g = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    elif ACT == _SILU:
        s = tl.sigmoid(u)
        g = s * (1.0 + u * (1.0 - s))
    elif ACT == _TANH:
        t = _tanh(u)
        g = 1.0 - t * t
    else:
        s = tl.sigmoid(u)
        g = s * (1.0 - s)
    return g
