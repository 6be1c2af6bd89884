"""Backend selection shared by every op.

Backends:
- ``"triton"``: the fused Triton kernels. CUDA tensors, or CPU tensors when Triton's interpreter
  was enabled (``TRITON_INTERPRET=1`` before ``reft_kernels`` was imported).
- ``"torch"``: the same autograd Functions computed with PyTorch ops (hand-written, memory-lean
  backward). Runs on any device and dtype, float64 included.
- ``"cuda"``: the CUDA C++ kernels of the extension ``reft_kernels._C`` (CUDA tensors, when it
  was built; see ``reft_kernels._cuda``). Opt-in: never picked by default. Inside
  ``reft_kernels._cuda.on_host(...)`` (tests) it also takes CPU tensors.

``backend=None`` picks the default: the ``REFT_KERNELS_BACKEND`` environment variable when set;
otherwise, on CUDA tensors, the backend a GPU sweep measured fastest for the nearest shape on this
card (``reft_kernels._measured``; none is recorded yet) and Triton where no measurement applies;
the PyTorch path for everything else.
"""
from __future__ import annotations

import functools

import torch

from . import _cuda, _triton, _versions
from ._environ import EnvSwitch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "REFT_KERNELS_BACKEND"
_ENV_BACKEND = EnvSwitch(ENV_VAR, lambda v: v.strip().lower() or None)


def env_backend() -> str | None:
    """The backend named by ``REFT_KERNELS_BACKEND`` (lower case), or None when unset or empty: the
    one place that reads it."""
    return _ENV_BACKEND()


def cuda_extension_available() -> bool:
    """True when the compiled extension ``reft_kernels._C`` can be imported."""
    return _cuda.extension_available()


def triton_usable_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if not _triton.HAS_TRITON:
        return False
    if device.type == "cuda":
        return not _triton.INTERPRET
    return _triton.INTERPRET and device.type == "cpu"


@functools.lru_cache(maxsize=None)
def interpreter_conflict() -> str | None:
    """Why Triton's CPU interpreter cannot run with the installed numpy (a sentence naming both
    versions), or None: Triton 3.6's interpreter fails on numpy 2.4 and newer
    (``reft_kernels._versions.INTERPRETER_NUMPY``)."""
    if not _triton.HAS_TRITON:
        return None
    import numpy

    return _versions.interpreter_conflict(_triton.TRITON_VERSION, numpy.__version__)


def resolve_backend(backend: str | None, device: torch.device, *, triton_unsupported: str | None = None,
                    cuda_unsupported: str | None = None, measured=None) -> str:
    """Return the backend to run on ``device``; raise a clear error when it cannot run there.

    ``triton_unsupported`` / ``cuda_unsupported``: why those kernels cannot take this particular
    call (None when they can). The default dispatch then quietly picks the PyTorch path; an
    explicit request (argument or environment variable) raises ValueError with that reason.
    ``measured``: a callable returning the measured default for this call (or None), asked only
    by the default dispatch on CUDA tensors; a measured backend that cannot take the call (CUDA
    without the extension, or an unsupported call) gives way to the fixed rule.
    """
    if backend == "torch":  # runs everywhere, nothing to check: 0.11 us against 0.22 us
        # through the generic checks (2-core CPU)
        return backend
    source = "backend"
    if backend is None:
        env = env_backend()
        if env:
            backend, source = env, f"the {ENV_VAR} environment variable"
        elif device.type == "cuda" and triton_usable_on(device) and triton_unsupported is None:
            choice = measured() if measured is not None else None
            if choice == "torch" or (choice == "cuda" and cuda_unsupported is None and cuda_extension_available()):
                return choice
            return "triton"
        else:
            return "torch"
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    backend = backend.lower()
    if backend == "triton":
        if triton_unsupported is not None:
            raise ValueError(f"backend='triton' (from {source}): {triton_unsupported}; use backend='torch'")
        if not _triton.HAS_TRITON:
            raise RuntimeError(
                "backend='triton' needs the triton package, which failed to import: "
                f"{_triton.TRITON_IMPORT_ERROR}"
            )
        if not triton_usable_on(device):
            if device.type == "cuda":
                raise RuntimeError(
                    "backend='triton' on CUDA tensors cannot run while TRITON_INTERPRET is set: "
                    "unset it before importing reft_kernels"
                )
            if device.type == "cpu":
                raise RuntimeError(
                    "backend='triton' on cpu tensors needs Triton's CPU interpreter: set "
                    "TRITON_INTERPRET=1 before importing reft_kernels, or use backend='torch'"
                )
            raise RuntimeError(
                f"backend='triton' cannot run on {device.type} tensors: the Triton kernels take CUDA "
                "tensors (or cpu tensors through Triton's interpreter); use backend='torch'"
            )
        if device.type == "cpu" and interpreter_conflict() is not None:
            raise RuntimeError(f"backend='triton' on cpu tensors runs Triton's interpreter, but "
                               f"{interpreter_conflict()}")
    elif backend == "cuda":
        if device.type != "cuda" and not (device.type == "cpu" and _cuda.host_mode()):
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device.type}")
        if cuda_unsupported is not None:
            raise ValueError(f"backend='cuda' (from {source}): {cuda_unsupported}; use backend='torch'")
        if not _cuda.host_mode():
            _cuda.extension()  # raises RuntimeError with build instructions when it is not built
    return backend


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` in this process."""
    out = ["torch"]
    if triton_usable_on(device):
        out.append("triton")
    if (device.type == "cuda" and cuda_extension_available()) or (device.type == "cpu" and _cuda.host_kernels()):
        out.append("cuda")
    return out
