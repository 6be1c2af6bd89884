"""Route ``backend="cuda"`` to the emulated kernels on CPU tensors (see build.py and
cuda_runtime.h here). Used by tests/test_cuda_emulated.py and, with
``REFT_KERNELS_TEST_CUDA_EMULATION=1``, by tests/conftest.py for the whole suite.

The "cuda" backend's Python code runs unchanged except that its torch.library ops are bypassed
(on CPU tensors they would run their PyTorch implementation) in favour of their CUDA
implementations, which call the emulated extension.
"""
from __future__ import annotations

import importlib


def route_cuda_backend(ext, setattr_):
    """Apply the patches with ``setattr_(obj, name, value)`` (e.g. a pytest MonkeyPatch's)."""
    from reft_kernels import _backend, _cuda

    red_mod = importlib.import_module("reft_kernels.red")
    lowrank_mod = importlib.import_module("reft_kernels.lowrank_edit")
    setattr_(_cuda, "_EXT", ext)
    setattr_(_cuda, "_EXT_ERROR", None)
    for name in ("_red_fwd_op", "_red_bwd_op"):
        setattr_(red_mod, name, getattr(red_mod, name + "_cuda"))
    for name in ("_lowrank_edit_fwd_op", "_lowrank_edit_fwd_inplace_op", "_lowrank_edit_bwd_op"):
        setattr_(lowrank_mod, name, getattr(lowrank_mod, name + "_cuda"))
    for mod in (red_mod, lowrank_mod):
        original = mod.resolve_backend

        def resolve(backend, device, *, original=original, **reasons):
            if backend == "cuda" and device.type == "cpu":  # the GPU's rank check, then the emulation
                if reasons.get("cuda_unsupported"):
                    raise ValueError(f"backend='cuda': {reasons['cuda_unsupported']}")
                return "cuda"
            return original(backend, device, **reasons)

        setattr_(mod, "resolve_backend", resolve)
    original_available = _backend.available_backends
    setattr_(_backend, "available_backends",
             lambda device: original_available(device) + (["cuda"] if device.type == "cpu" else []))
