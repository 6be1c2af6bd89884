#!/usr/bin/env bash
# Download, on a machine with network, the pure-Python wheels that the GPU device run installs
# offline (the device machine reaches no registry): peft (the e2e benchmark's LoRA rows and
# tests/scale/test_peft.py) and Liger-Kernel (tests/scale/test_liger.py, GPU only). Both without
# dependencies: the device machine already has torch, triton and transformers.
#
#     bash tools/fetch_device_wheels.sh          # -> wheels/ (git-ignored)
#
# Then carry `wheels` to the device machine with the working tree; tools/device_check.sh installs
# from it (WHEEL_DIR, default wheels/) whatever is not importable there yet.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${WHEEL_DIR:-wheels}"
mkdir -p "$DIR"
# peft 0.21.2 and liger-kernel 0.8.5: the versions the CPU suite and the README were checked with
pip download --no-deps --dest "$DIR" peft==0.21.2 liger-kernel==0.8.5
ls -l "$DIR"
