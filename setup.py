"""Build script: the package metadata lives in pyproject.toml; this file adds the optional CUDA
C++ extension ``reft_kernels._C`` (sources in ``csrc/``, settings in ``csrc/build_config.py``).

The extension is built when CUDA can be built here, i.e. torch is importable in the build
environment, was built with CUDA, and nvcc is found (CUDA_HOME), or when
``REFT_KERNELS_FORCE_BUILD=1``; never when ``REFT_KERNELS_SKIP_CUDA_BUILD=1``. Otherwise the
install is pure Python and the ``cuda`` backend reports that the extension is missing.

pip builds in an isolated environment without torch unless told otherwise, so build the
extension with ``pip install --no-build-isolation -e .`` next to a CUDA build of torch.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
import build_config  # noqa: E402


def _cuda_extension():
    skip = build_config.env_flag("REFT_KERNELS_SKIP_CUDA_BUILD")
    force = build_config.env_flag("REFT_KERNELS_FORCE_BUILD")
    if skip:
        print("reft_kernels: REFT_KERNELS_SKIP_CUDA_BUILD is set: not building the CUDA extension")
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            raise RuntimeError(
                "REFT_KERNELS_FORCE_BUILD=1 but torch cannot be imported in the build environment; "
                "install torch first and build with `pip install --no-build-isolation`"
            ) from exc
        print("reft_kernels: torch is not importable in the build environment: pure-Python install")
        return None
    buildable = torch.version.cuda is not None and CUDA_HOME is not None
    if not buildable and not force:
        why = "torch was built without CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"reft_kernels: {why}: not building the CUDA extension (REFT_KERNELS_FORCE_BUILD=1 forces it)")
        return None
    archs = build_config.parse_archs(os.environ.get("REFT_KERNELS_CUDA_ARCHS"))
    ext = CUDAExtension(
        name="reft_kernels._C",
        sources=[f"csrc/{s}" for s in build_config.SOURCES],
        include_dirs=[str(build_config.CSRC)],
        extra_compile_args={
            "cxx": build_config.CXX_FLAGS,
            "nvcc": build_config.NVCC_FLAGS + build_config.gencode_flags(archs),
        },
    )
    return ext, BuildExtension


_built = _cuda_extension()
if _built is None:
    setup()
else:
    setup(ext_modules=[_built[0]], cmdclass={"build_ext": _built[1]})
