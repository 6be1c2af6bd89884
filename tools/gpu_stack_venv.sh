#!/usr/bin/env bash
# A venv with the GPU machine's stack (reft_kernels/_versions.py GPU_STACK: torch 2.11.0,
# triton 3.6.0, transformers 5.17.0, numpy 2.3.5; Python 3.12 as there, where this machine has
# one), the test extra's other packages, and this checkout installed editable. It lives outside
# the repo (REFT_KERNELS_STACK_VENV, default ~/.cache/reft_kernels/gpu-stack-venv) and is reused
# while its stamp (the pins, the Python version and the project's declared requirements) matches;
# otherwise it is removed and built from scratch. Prints the venv's path on stdout, the rest on
# stderr:
#
#     VENV=$(bash tools/gpu_stack_venv.sh) && "$VENV/bin/python" -m pytest -q tests/hf
#
# torch 2.11.0 from PyPI is a CUDA build (it runs on the CPU) and pulls the nvidia-* wheels: a
# fresh build downloads about 3 GB. Measured on the 2-core CI machine: fresh build 4.6 min
# (download-bound), reuse 3 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${REFT_KERNELS_STACK_VENV:-${HOME:-$(cd ~ && pwd)}/.cache/reft_kernels/gpu-stack-venv}"
t0=$SECONDS
log() { echo "gpu_stack_venv: $*" >&2; }

# The interpreter: REFT_KERNELS_STACK_PYTHON, else a Python 3.12 (the GPU machine's), else python3.
pick_python() {
    if [ -n "${REFT_KERNELS_STACK_PYTHON:-}" ]; then echo "$REFT_KERNELS_STACK_PYTHON"; return; fi
    local c
    local pyenv_root
    pyenv_root=$(pyenv root 2>/dev/null || echo /nonexistent)
    for c in python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12; do
        if "$c" -c "import venv, ensurepip" > /dev/null 2>&1; then echo "$c"; return; fi
    done
    log "no Python 3.12 found (the GPU machine's): using python3"
    echo python3
}
PY=$(pick_python)

PINS=$("$PY" reft_kernels/_versions.py --pins)  # "torch==2.11.0 triton==3.6.0 ..."
# The stamp: pins, Python version, and the project's requirements (a change there rebuilds).
stamp=$("$PY" - "$PINS" <<'EOF'
import hashlib, platform, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = repr((project["dependencies"], project["optional-dependencies"]["test"]))
print(f"python={platform.python_version()} {sys.argv[1]} requirements={hashlib.sha256(reqs.encode()).hexdigest()[:16]}")
EOF
)

mkdir -p "$(dirname "$VENV")"
exec 9> "$VENV.lock"
flock 9  # one build at a time; a second caller waits, then reuses

matches() {
    [ -x "$VENV/bin/python" ] && [ -f "$VENV/stamp" ] && [ "$(cat "$VENV/stamp")" = "$stamp" ] || return 1
    # the stamp is written last, but check the installed versions too (a hand-made change)
    # shellcheck disable=SC2086
    "$VENV/bin/python" - $PINS <<'EOF' >&2
import sys
from importlib import metadata
bad = [p for p in sys.argv[1:] if metadata.version(p.split("==")[0]).split("+")[0] != p.split("==")[1]]
sys.exit(f"gpu_stack_venv: installed versions differ from {bad}" if bad else 0)
EOF
}

if matches; then
    # a venv made for another checkout (CI clones afresh) points its editable install elsewhere
    origin=$(cd / && "$VENV/bin/python" -c "import os, reft_kernels as m
print(os.path.dirname(os.path.dirname(os.path.realpath(m.__file__))))" 2>/dev/null || true)
    if [ "$origin" != "$(realpath "$ROOT")" ]; then
        log "editable install points at ${origin:-nothing}: reinstalling this checkout (no dependencies)"
        REFT_KERNELS_SKIP_CUDA_BUILD=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$ROOT" >&2
    fi
    log "reusing $VENV ($stamp) in $((SECONDS - t0)) s"
    echo "$VENV"
    exit 0
fi

log "building $VENV from scratch with $PY ($stamp)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check)
# shellcheck disable=SC2086
printf '%s\n' $PINS > "$VENV/constraints.txt"
"${PIP[@]}" install -q setuptools wheel >&2  # --no-build-isolation below builds with these
# torch first (the big download), with Triton and numpy at the pins, then the project and its
# test extra under the same constraints (transformers too). The CUDA extension is not built here:
# the venv runs on the CPU.
# shellcheck disable=SC2086
"${PIP[@]}" install -q -c "$VENV/constraints.txt" $PINS >&2
REFT_KERNELS_SKIP_CUDA_BUILD=1 "${PIP[@]}" install -q -c "$VENV/constraints.txt" --no-build-isolation -e "$ROOT[test]" >&2
"$VENV/bin/python" reft_kernels/_versions.py --interpreter >&2 || {
    log "the built venv is outside the tested range, or its Triton interpreter cannot take its numpy"; exit 1; }
echo "$stamp" > "$VENV/stamp"
matches || { rm -f "$VENV/stamp"; log "the built venv does not hold the pins $PINS"; exit 1; }
log "built $VENV in $((SECONDS - t0)) s"
echo "$VENV"
