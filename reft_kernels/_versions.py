"""The tested range of the packages reft_kernels runs with: the one place it is written down.

``SUPPORTED`` maps each package to ``(lowest, cap)``: versions ``>= lowest`` and ``< cap`` are
supported, and both ends are tested in CI. The lowest is the GPU machine's stack (torch 2.11,
Triton 3.6, transformers 5.17), which ``.ci/run``'s second leg installs (``GPU_STACK``) and runs
the suite on; the first leg runs the newest release below each cap. torch's cap is the newest
release CI installs (the README pins 2.13.0, the CPU build): a higher cap would let pip replace
a torch the user pinned first with a multi-GB CUDA build of an untested one.

``INTERPRETER_NUMPY`` is the one rule pip cannot express (a marker cannot see Triton's version):
Triton older than 3.7 fails in its CPU interpreter on numpy 2.4 and newer (``only 0-dimensional
arrays can be converted to Python scalars``; Triton 3.7.0's interpreter has the fix). It only
matters with ``TRITON_INTERPRET=1``: compiled kernels on a GPU do not use numpy.

``pyproject.toml`` declares the same range (tests/test_versions.py checks that they agree); read
by ``reft-kernels info``, ``backend="triton"`` on CPU tensors, tools/gpu_stack_venv.sh and
tools/device_check.sh. Plain data and the standard library only: scripts run this file
(``python reft_kernels/_versions.py``) without importing torch.
"""
from __future__ import annotations

import re

SUPPORTED = {
    "torch": ("2.11", "2.14"),
    "triton": ("3.6", "4"),
    "transformers": ("5.17", "6"),
    "numpy": ("2.3", "3"),
}

# The GPU machine's versions (seen there 2026-11), pinned exactly in CI's second leg. numpy is not
# the machine's (2.5.2 there, where no interpreter runs) but the newest release that Triton 3.6's
# interpreter accepts (see INTERPRETER_NUMPY).
GPU_STACK = {
    "torch": "2.11.0",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "numpy": "2.3.5",
}

# (Triton below this, numpy from this): the interpreter fails on the pair.
INTERPRETER_NUMPY = ("3.7", "2.4")


def parse(version: str) -> tuple:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``: the leading numeric release, local and pre-release
    tags dropped (``"2.4.0rc1"`` -> ``(2, 4, 0)``)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if not m:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _pad(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def _lt(a: str, b: str) -> bool:
    x, y = _pad(parse(a), parse(b))
    return x < y


def specifier(name: str) -> str:
    """The requirement text for pyproject.toml, e.g. ``"torch>=2.11,<2.14"``."""
    lo, cap = SUPPORTED[name]
    return f"{name}>={lo},<{cap}"


def where(name: str, version: str | None) -> str:
    """``"inside"``, ``"below"``, ``"above"`` the tested range, or ``"missing"`` (None)."""
    if version is None:
        return "missing"
    lo, cap = SUPPORTED[name]
    if _lt(version, lo):
        return "below"
    if not _lt(version, cap):
        return "above"
    return "inside"


def interpreter_conflict(triton_version: str | None, numpy_version: str | None) -> str | None:
    """A sentence naming both versions when Triton's CPU interpreter cannot run with this numpy,
    else None."""
    if triton_version is None or numpy_version is None:
        return None
    below_triton, from_numpy = INTERPRETER_NUMPY
    if _lt(triton_version, below_triton) and not _lt(numpy_version, from_numpy):
        return (f"numpy {numpy_version} breaks the CPU interpreter of triton {triton_version} "
                f"(TypeError: only 0-dimensional arrays can be converted to Python scalars): "
                f"install numpy<{from_numpy} or triton>={below_triton}")
    return None


def report(installed: dict) -> list:
    """One line per package of ``SUPPORTED`` (``installed`` maps a name to its version or None),
    then the interpreter rule's line if it applies: the text that ``reft-kernels info`` and
    tools/device_check.sh print."""
    lines = []
    for name, (lo, cap) in SUPPORTED.items():
        version = installed.get(name)
        state = where(name, version)
        shown = version if version is not None else "not installed"
        verdict = {"inside": "inside the tested range", "missing": "not installed",
                   "below": "BELOW the tested range", "above": "ABOVE the tested range"}[state]
        lines.append(f"{name:12s} {shown:16s} {verdict} (>={lo},<{cap})")
    clash = interpreter_conflict(installed.get("triton"), installed.get("numpy"))
    if clash:
        lines.append(f"interpreter  {clash}")
    return lines


def installed_versions() -> dict:
    """The installed distributions' versions (None for any not installed), read from their
    metadata without importing them."""
    from importlib import metadata

    found = {}
    for name in SUPPORTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    # python reft_kernels/_versions.py [--interpreter]: the report; exit 1 when a package is
    # outside the range or missing (--interpreter: also when Triton's CPU interpreter would fail
    # on this numpy). --pins: the GPU machine's stack as pip requirements.
    import sys

    args = sys.argv[1:]
    if args == ["--pins"]:
        print(" ".join(f"{k}=={v}" for k, v in GPU_STACK.items()))
        sys.exit(0)
    if args not in ([], ["--interpreter"]):
        sys.exit(f"usage: python {sys.argv[0]} [--interpreter | --pins]")
    found = installed_versions()
    print("\n".join(report(found)))
    outside = [name for name, version in found.items() if where(name, version) != "inside"]
    clash = args == ["--interpreter"] and interpreter_conflict(found["triton"], found["numpy"])
    sys.exit(1 if outside or clash else 0)
