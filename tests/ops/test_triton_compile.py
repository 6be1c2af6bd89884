"""The Triton kernels compile for a real GPU target (sm_90a) without spilling registers or
exceeding shared memory, checked ahead of time on this CPU-only machine
(tools/triton_compile_check.py; the CPU interpreter used by the other tests cannot see this),
including with their integer arguments at 1 and at multiples of 16, the values Triton's launcher
specialises on (a one-row launch of the split-d forward once failed to compile on a GPU only:
``n_rows.to(...)`` on the constant 1)."""
import collections
import os
import pathlib
import subprocess
import sys

import pytest

from reft_kernels import _triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "triton_compile_check.py"
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _needs_nvidia_tools():
    if not _triton.HAS_TRITON:
        pytest.skip("triton is not installed")
    cuobjdump = pathlib.Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton build ships no NVIDIA tools")


def _package_kernels() -> set:
    """The names of the package's Triton kernels (``@triton.jit`` functions named ``*_kernel``;
    jitted helpers called from kernels are compiled with them), found by importing every module
    of ``reft_kernels.ops``."""
    import importlib
    import pkgutil

    import reft_kernels.ops

    names = set()
    for info in pkgutil.walk_packages(reft_kernels.ops.__path__, "reft_kernels.ops."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            fn = getattr(value, "fn", None)  # a JITFunction, or the interpreter's stand-in
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__ and fn.__name__.endswith("_kernel"):
                names.add(fn.__name__)
    return names


def test_kernels_compile_for_sm90_without_spills():
    _needs_nvidia_tools()
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--arch", "90"],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "all compiled within limits" in proc.stdout
    assert f"Triton {_triton.triton.__version__}" in proc.stdout


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
def test_the_sweep_sets_every_integer_argument_of_every_kernel_to_1_and_16():
    """What the check would do (``--dry-run``, nothing compiled): for every kernel, every integer
    argument alone at 1 (traced), all at 1 and all at multiples of 16 (compiled), on both archs."""
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--dry-run"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants, ints, launched_at_1 = (collections.defaultdict(set) for _ in range(3))
    for line in proc.stdout.splitlines():
        name, arch, stage, variant, _dt, *args = line.split("\t")
        variants[name].add((int(arch), stage, variant))
        values = dict(a.split("=") for a in args)
        ints[name].update(values)
        if variant == "as launched":
            launched_at_1[name].update(k for k, v in values.items() if v == "1")
    kernels = _package_kernels()
    assert len(kernels) >= 12 and set(variants) == kernels, (sorted(variants), sorted(kernels))
    for name, seen in variants.items():
        for arch in (80, 90):
            assert {(arch, "compile", "as launched"), (arch, "compile", "ints=1"), (arch, "compile", "ints%16")} <= seen
            never_one = ("rows_per_prog", "cols_per_prog", "part_width", "stride", "n_parts")
            can_be_one = set(ints[name]) - set(never_one)
            for arg in ints[name]:  # alone at 1: traced, unless launched at 1 already or never 1, or
                # the only argument that can be 1 (then "ints=1", compiled, is that very variant)
                assert ((arch, "trace", f"{arg}=1") in seen or arg in launched_at_1[name] or arg in never_one
                        or can_be_one == {arg}), (name, arch, arg)
    assert (80, "trace", "n_rows=1") in variants["_lowrank_apply_kernel"]
