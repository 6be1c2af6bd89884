"""Build the CUDA kernels of ``csrc/`` for the host: every ``.cu`` and ``bindings.cpp`` compiled
by the C++ compiler with ``-DREFT_CPU_EMULATION`` against the stand-in headers of this folder,
as a torch extension whose entry points take CPU tensors. The kernels' source is the very text
nvcc compiles; only the launch macro and the headers differ. See ``cuda_runtime.h`` here.

    python tests/cuda/emulation/build.py      # builds (or reuses) and prints the module path
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CSRC = ROOT / "csrc"
BUILD_DIR = Path(os.environ.get("REFT_KERNELS_EMULATION_BUILD_DIR", ROOT / "build" / "cuda_emulation"))


def build(verbose: bool = False):
    """Compile (incrementally, with ninja) and import the emulated extension."""
    sys.path.insert(0, str(CSRC))
    import build_config
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in build_config.SOURCES:
        wrapper = BUILD_DIR / f"emu_{Path(name).stem}.cpp"
        text = f'#include "{CSRC / name}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    return load(
        name="reft_kernels_cuda_emulation",
        sources=sources,
        extra_include_paths=[str(HERE), str(CSRC)],
        extra_cflags=["-DREFT_CPU_EMULATION", "-O1", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=str(BUILD_DIR),
        verbose=verbose,
    )


if __name__ == "__main__":
    print(build(verbose=True).__file__)
