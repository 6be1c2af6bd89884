#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200 with a CUDA build of torch, Triton, nvcc and
# ninja; no network). Writes logs plus a short summary under $OUT (default
# bench/results/device-run):
#   versions   torch, Triton, transformers, numpy against the tested range (reft_kernels/_versions.py,
#              the range CI tests); outside it the run goes on and the summary says which is where
#   build      the CUDA extension reft_kernels._C in place, for this GPU's architecture only
#   install    the package in place (pip --no-build-isolation --no-deps; nothing downloaded)
#   info       versions, device, backends
#   check      every op and backend (torch, triton, cuda) against float64
#   memcheck   compute-sanitizer memcheck on a short run of every CUDA kernel (tools/cuda_sanitize.py)
#   racecheck  compute-sanitizer racecheck on the same run
#   tests      the whole suite on CUDA tensors in 8 processes (every op, backend and dtype)
#   bench      reft-kernels bench --sweep gpu: every op against eager and torch.compile; rows go
#              to $OUT/bench/<card>/results.csv case by case, so a timeout keeps what was measured
#   multi      reft-kernels bench --multi --quick: the multi-adapter ops (K = 1 and 16 adapters in
#              one batch) against one adapter and one call per adapter; $OUT/bench/<card>/multi.md
#   e2e        (its own call, see below) reft-kernels bench --e2e --e2e-sweep gpu: whole training
#              steps of a ~1.1B LLaMA config (d 2048, 16 layers, bf16) at 512 x 32 and 2048 x 8
#              tokens: frozen, naive, ours, PEFT LoRA; rows to $OUT/bench/<card>/e2e.csv shape by
#              shape, table in e2e.md and the summary; then reft-kernels bench --mixed-generate:
#              generation with 1, 4, 16 adapters in one batch (d = 256 model) against one adapter,
#              switching per example and PEFT's mixed LoRA; $OUT/bench/<card>/mixed_generate.md
# Budget: about 6 minutes on an H100 for build + tests (the sanitizer runs overlap the test shards)
# and up to 4 more for the sweep (not yet timed on a GPU). The e2e stage is not part of "all" (that
# already fills one 10-minute device call): run it as a call of its own, about 2-4 minutes
# (estimated, not yet timed; E2E_TIMEOUT, default 360 s).
# Companion packages: the machine has no network. The LoRA rows of e2e and tests/scale/test_peft.py
# need peft, tests/scale/test_liger.py needs liger_kernel (it skips without). Whatever of the two
# is not importable is installed from WHEEL_DIR (default wheels/, filled on a machine with network by
# tools/fetch_device_wheels.sh and carried with the tree); missing, the tests skip and the lora rows
# report the import error while the other providers still run. PEFT_WHEEL_DIR is the old name.
#
#     OUT=/some/dir bash tools/device_check.sh            # everything but e2e, in that order
#     OUT=/some/dir bash tools/device_check.sh bench      # the sweep only (a rerun after a fix;
#                                                         # builds nothing: the Triton path and eager)
#     OUT=/some/dir bash tools/device_check.sh e2e        # the end-to-end training steps only
#     OUT=/some/dir bash tools/device_check.sh versions   # the version stage only (a rehearsal)
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
    return $rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
bench() {  # the sweep; the plots are made from the CSV afterwards (bench/plot_results.py)
    step bench "${BENCH_TIMEOUT:-240}" reft-kernels bench --sweep gpu --out "$OUT/bench"
    for csv in "$OUT"/bench/*/results.csv; do
        [ -f "$csv" ] && python bench/plot_results.py "$csv" >> "$OUT/bench.log" 2>&1
    done
    cat "$OUT"/bench/*/results.md >> "$summary" 2>/dev/null || true
    step multi "${MULTI_TIMEOUT:-120}" reft-kernels bench --multi --quick --device cuda --out "$OUT/bench"
    cat "$OUT"/bench/*/multi.md >> "$summary" 2>/dev/null || true
}
companions() {  # peft and liger_kernel from the carried wheels, when not importable already
    local dir="${WHEEL_DIR:-${PEFT_WHEEL_DIR:-wheels}}" mod pkg
    for pair in peft:peft liger_kernel:liger-kernel; do
        mod=${pair%%:*} pkg=${pair#*:}
        python -c "import $mod" > /dev/null 2>&1 && continue
        if [ -d "$dir" ] && ls "$dir"/"${mod}"-*.whl > /dev/null 2>&1; then
            step "wheel-$mod" 120 pip install --no-deps --no-index --find-links "$dir" "$pkg"
        fi
        python -c "import $mod" > /dev/null 2>&1 || echo "companions: $mod not importable (no wheel in $dir): its tests skip" >> "$summary"
    done
}
e2e() {  # whole training steps; a timeout keeps the shapes already measured
    companions
    # E2E_ARGS: a rehearsal elsewhere, e.g. E2E_ARGS="--e2e-sweep tiny --device cpu" on a CPU
    # shellcheck disable=SC2086
    step e2e "${E2E_TIMEOUT:-360}" reft-kernels bench --e2e ${E2E_ARGS:---e2e-sweep gpu --device cuda} --out "$OUT/bench"
    cat "$OUT"/bench/*/e2e.md >> "$summary" 2>/dev/null || true
    # shellcheck disable=SC2086
    step mixed_generate "${MIXED_TIMEOUT:-150}" reft-kernels bench --mixed-generate ${MIXED_ARGS:---device cuda} --out "$OUT/bench"
    cat "$OUT"/bench/*/mixed_generate.md >> "$summary" 2>/dev/null || true
}
versions() {  # plain metadata reads: nothing is imported, so this runs before the build
    if step versions 60 python reft_kernels/_versions.py; then
        echo "versions: inside the tested range" >> "$summary"
    else
        echo "versions: OUTSIDE the tested range (CI tests only inside it):" >> "$summary"
    fi
    sed 's/^/  /' "$OUT/versions.log" >> "$summary"
}
versions
if [ "${1:-all}" = "versions" ]; then cat "$summary"; exit 0; fi
if [ "${1:-all}" = "bench" ] || [ "${1:-all}" = "e2e" ]; then
    step install 120 env REFT_KERNELS_SKIP_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e .
    "$1"
    cat "$summary"
    exit 0
fi
ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
export REFT_KERNELS_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}"
step build 300 python setup.py build_ext --inplace
# the extension is already in place: the editable install must not build it again
step install 120 env REFT_KERNELS_SKIP_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e .
step import 60 python -c "import reft_kernels._C as C; print(C.__file__)"
companions
step info 60 reft-kernels info
step plan 60 reft-kernels plan --reference --device this  # the plans on this card (plan.log)
step check 180 reft-kernels check --device cuda --backend all

SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
# Only our kernels are instrumented (their names contain "reft"); without torch's caching
# allocator every tensor is its own allocation, so an access past a tensor's end is reported
# instead of landing in a neighbour inside one cached segment.
sanitize() {  # sanitize TOOL
    if [ -z "$SAN" ]; then echo "compute-sanitizer not found" > "$OUT/$1.log"; printf '%-10s skipped (no compute-sanitizer)\n' "$1" >> "$summary"; return; fi
    step "$1" 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$1" --error-exitcode 1 --kernel-name kns=reft \
        python tools/cuda_sanitize.py
}
( sanitize memcheck; sanitize racecheck ) &
san_pid=$!

# The suite compiles about 580 distinct Triton kernel specialisations, roughly a second each: one
# process would need about 10 minutes, so 8 processes each take a contiguous slice (--shard, see
# tests/conftest.py). The ahead-of-time compile checks are for GPU-less machines: here the
# kernels really run.
t0=$SECONDS
for i in 0 1 2 3 4 5 6 7; do
    timeout 420 python -m pytest -q -p no:cacheprovider --shard "$i/8" \
        --deselect tests/ops/test_triton_compile.py \
        --deselect tests/cuda/test_cuda_backend.py::test_cuda_compile_check_script > "$OUT/tests.$i.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$san_pid$")
printf '%-10s %4ss  8 shards of python -m pytest\n' tests "$((SECONDS - t0))" | tee -a "$summary"
wait "$san_pid"
for i in 0 1 2 3 4 5 6 7; do
    printf 'shard %s: %s\n' "$i" "$(tail -n 1 "$OUT/tests.$i.log")" | tee -a "$summary"
done
grep -h "^FAILED\|^ERROR" "$OUT"/tests.*.log >> "$summary" || true
grep -E "FAIL|Error" "$OUT/check.log" >> "$summary" || true
grep -h "ERROR SUMMARY\|MISMATCH\|all ok" "$OUT"/memcheck.log "$OUT"/racecheck.log >> "$summary" 2>/dev/null || true
bench
# the default backend per shape this run would set (copy it to reft_kernels/_measured_table.py
# after reading it; cuda competes only when the tests and sanitizers above passed)
step defaults 60 python tools/pick_defaults.py "$OUT" --table "$OUT/measured_table.py"
cat "$summary"
