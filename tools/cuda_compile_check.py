"""Compile every CUDA source of ``reft_kernels._C`` without a GPU and read what ptxas reports.

For each ``csrc/*.cu`` this runs the machine's ``nvcc`` with the flags ``setup.py`` uses (from
``csrc/build_config.py``, plus the ones torch's BuildExtension adds) for sm_80 and sm_90, against
the torch wheel's headers, with ``-Xptxas -v``, and fails on:
- a compile error;
- any kernel with register spills or a stack frame (every kernel here is a hot kernel: a stack
  frame means local memory, usually a register array indexed at run time).
It also compiles ``csrc/bindings.cpp`` with the host compiler (syntax and templates only).

A CPU-only torch wheel ships the c10/cuda headers but not one generated header,
``c10/cuda/impl/cuda_cmake_macros.h``; a two-line stand-in is written to a temporary include
directory when it is missing. Where ``nvcc`` is absent the check says so and exits 0.

    python tools/cuda_compile_check.py [--arch 80 90] [--jobs 2] [--verbose]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(CSRC))
import build_config  # noqa: E402

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc itself passes (read from its dry run)."""
    out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            dirs += re.findall(r'-I"?([^"\s]+)"?', line)
    return dirs


def torch_include_dirs(tmp: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = list(include_paths())
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in dirs):
        shim = tmp / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, str(tmp / "shim"))
    return dirs


def parse_ptxas(text: str) -> list[dict]:
    """One record per (kernel, arch): name, arch, registers, stack frame and spill bytes."""
    records, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"name": m.group(1), "arch": m.group(2), "regs": None, "stack": None, "spill": None}
            records.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"] = int(m.group(1))
            current["spill"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _REGS.search(line)):
            current["regs"] = int(m.group(1))
    return records


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_cu(nvcc, src, includes, archs, tmp):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cmd = [nvcc, "-c", str(src), "-o", str(tmp / (src.stem + ".o")), *build_config.NVCC_FLAGS,
           *COMMON_NVCC_FLAGS, *build_config.gencode_flags([(a, False) for a in archs]), "-Xptxas", "-v",
           *(f"-I{d}" for d in includes)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src.name, proc.returncode, proc.stdout + proc.stderr


def compile_bindings(includes, tmp):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return "bindings.cpp", None, "no host C++ compiler found"
    py_inc = sysconfig.get_paths()["include"]
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-I{py_inc}", *(f"-I{d}" for d in includes), str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return "bindings.cpp", proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="sm numbers to compile for (default 80 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--verbose", action="store_true", help="print every kernel's registers, not only failures")
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_compile_check: nvcc not found (set CUDA_HOME or put nvcc on PATH): skipped")
        return 0
    failures = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        includes = torch_include_dirs(tmp) + cuda_include_dirs(nvcc)
        sources = sorted(CSRC.glob("*.cu"))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(compile_cu, nvcc, s, includes, args.arch, tmp) for s in sources]
            jobs.append(pool.submit(compile_bindings, includes, tmp))
            results = [j.result() for j in jobs]

    records = []
    for name, rc, log in results:
        if rc is None:
            print(f"{name}: skipped ({log})")
            continue
        if rc != 0:
            failures.append(f"{name}: compile error")
            print(f"---- {name} failed (exit {rc}) ----\n{log.strip()[-6000:]}")
            continue
        for rec in parse_ptxas(log):
            rec["file"] = name
            records.append(rec)
    pretty = demangle(sorted({r["name"] for r in records}))
    for rec in sorted(records, key=lambda r: (r["file"], pretty[r["name"]], r["arch"])):
        bad = rec["stack"] is None or rec["stack"] > 0 or rec["spill"] > 0
        line = (f"{rec['file']:24} {rec['arch']:6} regs {rec['regs']!s:>3}  stack {rec['stack']!s:>3} B  "
                f"spill {rec['spill']!s:>3} B  {pretty[rec['name']]}")
        if bad:
            failures.append(f"{pretty[rec['name']]} ({rec['arch']}): stack {rec['stack']} B, spills {rec['spill']} B")
        if bad or args.verbose:
            print(("FAIL " if bad else "ok   ") + line)
    n_src = len(results) - 1
    if not records and not failures:
        failures.append("ptxas reported no kernels: was -Xptxas -v dropped?")
    print(f"cuda_compile_check: {n_src} CUDA sources + bindings.cpp, {len(records)} kernel builds "
          f"for sm_{', sm_'.join(args.arch)}: {'FAILED' if failures else 'ok'}")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
