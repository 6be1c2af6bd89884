"""How ``reft-kernels bench`` keeps freed memory: glibc's ``malloc`` tuned with ``mallopt`` so that a
freed activation is reused, not handed back to the system and faulted in again.

PyTorch's CPU allocator is the C library's ``malloc``. By default glibc serves blocks above a
moving threshold (128 KiB, raised up to 32 MiB as such blocks are freed) with ``mmap`` and gives
free memory at the top of its heap back with ``brk`` once it exceeds twice that threshold. A
training step frees and allocates activations of a few MiB many times, so each new one pays a
page fault per 4 KiB page: on the 2-core CPU (AMD EPYC, 2 threads), ``red_multi``'s forward +
backward over (16, 64, 576) fp32 took 1.50 ms with two fresh (1024, 576) buffers in its backward
and 0.57 ms with one (``ops/multi/torch_impl.red_bwd``), the arithmetic the same.

Measured there (medians of 15 interleaved rounds per process, three processes each way,
alternating; a machine busier than a quiet one, so the ranges are wide): the one-adapter LoReFT
f7+l7 op (224 of 1024 rows, d = 576, r = 4) forward + backward with gradients accumulated took
0.94-1.34 ms with the settings below against 1.15-2.62 ms without. A whole training step of the
d = 256 LLaMA (``bench --e2e``) showed no difference this machine's noise resolves (the frozen
step 208-243 ms with, 231-247 ms without, two runs each): its large products dominate.

The cost: the process keeps its peak heap (freed memory below 1 GiB at the top of the heap stays
mapped), and blocks up to 32 MiB come from the heap, not from their own mappings. So
``reft-kernels bench`` sets it (its sub-millisecond calls are what it helps, and they are timed
against each other); ``train`` and library users keep the C library's defaults. A user who set
any ``MALLOC_*_`` variable, or who runs another allocator (``LD_PRELOAD``: jemalloc, tcmalloc),
keeps their choice. Scripts get the same with ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# (parameter, value): blocks up to 32 MiB (glibc's largest mmap threshold) from the heap; keep up
# to 1 GiB free at its top; grow it 16 MiB at a time
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 16 << 20))
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
             "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` through glibc's ``mallopt``; True when applied. Nothing (False) off
    Linux, without glibc's ``mallopt``, or when the user set one of ``USER_VARS``."""
    if not sys.platform.startswith("linux") or any(os.environ.get(v) for v in USER_VARS):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
