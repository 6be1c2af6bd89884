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
# The suite compiles about 580 distinct kernel specialisations (counted on the CPU run), roughly
# a second each: one process would need about 10 minutes, so 8 processes each take a contiguous
# slice (--shard, see tests/conftest.py). The ahead-of-time compile check is for GPU-less
# machines; here the kernels really run.
t0=$SECONDS
for i in 0 1 2 3 4 5 6 7; do
    timeout 420 python -m pytest -q -p no:cacheprovider --shard "$i/8" \
        --deselect tests/test_triton_compile.py > "$OUT/tests.$i.log" 2>&1 &
done
wait
printf '%-10s %4ss  8 shards of python -m pytest\n' tests "$((SECONDS - t0))" | tee -a "$summary"
for i in 0 1 2 3 4 5 6 7; do
    printf 'shard %s: %s\n' "$i" "$(tail -n 1 "$OUT/tests.$i.log")" | tee -a "$summary"
done
grep -h "^FAILED\|^ERROR" "$OUT"/tests.*.log >> "$summary" || true
grep -E "FAIL|Error" "$OUT/check.log" >> "$summary" || true
cat "$summary"
