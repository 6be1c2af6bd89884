#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200 with a CUDA build of torch, Triton, nvcc; no
# network): install the package in place, print the environment, run the self-check and the
# whole test suite on CUDA tensors with Triton compiled for the GPU, and write logs plus a short
# summary under $OUT (default: bench/results/device-run). Budget: a few minutes on an H100.
#
#     OUT=/some/dir bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device-run}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$summary"
}
step install 120 pip install --no-build-isolation --no-deps -e .
step info 60 reft-kernels info
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
step check 180 reft-kernels check --device cuda --backend all
# the ahead-of-time compile check is for GPU-less machines; here the kernels really run
step tests 420 python -m pytest -q --durations=20 -p no:cacheprovider --deselect tests/test_triton_compile.py
tail -n 3 "$OUT/tests.log" >> "$summary"
grep -E "FAIL|Error" "$OUT/check.log" >> "$summary" || true
cat "$summary"
