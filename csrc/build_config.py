"""Build settings of the CUDA extension ``reft_kernels._C``, shared by ``setup.py`` and
``tools/cuda_compile_check.py`` so that CI compiles exactly what an install builds.

Environment variables (read by setup.py):
- ``REFT_KERNELS_SKIP_CUDA_BUILD=1``: never build the extension (pure-Python install).
- ``REFT_KERNELS_FORCE_BUILD=1``: build it even where CUDA does not look buildable.
- ``REFT_KERNELS_CUDA_ARCHS``: compute capabilities, e.g. ``"8.0;9.0"`` (``;``, ``,`` or spaces
  between them; ``+PTX`` on one also embeds its PTX for newer GPUs). Default ``8.0;9.0+PTX``.
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent
SOURCES = sorted(p.name for p in CSRC.glob("*.cu")) + ["bindings.cpp"]
DEFAULT_ARCHS = "8.0;9.0+PTX"

# Plain IEEE fp32 math (no --use_fast_math): erff/expf/tanhf in the activations must match the
# PyTorch reference to fp32 rounding. -lineinfo keeps compute-sanitizer reports readable.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]


def parse_archs(spec: str | None = None) -> list[tuple[str, bool]]:
    """``"8.0;9.0+PTX"`` -> [("80", False), ("90", True)]: (sm number, embed PTX)."""
    spec = DEFAULT_ARCHS if spec is None else spec
    out = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        num = item[: -len("+PTX")] if ptx else item
        try:
            major, minor = num.split(".") if "." in num else (num[:-1], num[-1])
            int(major), int(minor)
        except ValueError:
            raise ValueError(f"REFT_KERNELS_CUDA_ARCHS: cannot read {item!r} as a compute capability like 9.0") from None
        if int(major) < 8:
            raise ValueError(f"REFT_KERNELS_CUDA_ARCHS: {item} is below 8.0; the kernels need sm_80 or newer (bf16)")
        out.append((f"{major}{minor}", ptx))
    if not out:
        raise ValueError(f"REFT_KERNELS_CUDA_ARCHS is empty: {spec!r}")
    return out


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for sm, ptx in archs:
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
