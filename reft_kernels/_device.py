"""The GPU limits every launch plan reads, in one place: SM count, L2 size, registers, threads,
blocks and shared memory per SM, and whether thread-block clusters exist (sm_90 and newer); and
the integer helpers the planners share.

``H100`` and ``A100`` are fixed profiles (the planners' tests and ``reft-kernels plan --device``
use them without a GPU); ``device_limits`` reads the card in use once per device. Importing this
module imports neither Triton nor the extension.
"""
from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of a GPU that decide how many blocks of a compiled kernel stay resident, its
    SM count, L2 size and cluster support. The defaults are the H100 SXM's figures (the reference
    card of tools/design_table.py)."""
    sms: int = 132
    regs: int = 65536
    threads: int = 2048
    blocks: int = 32
    smem: int = 233472  # bytes of shared memory per SM (228 KiB)
    smem_reserved: int = 1024  # bytes the runtime reserves per resident block
    l2_bytes: int = 50 * 1024 * 1024
    clusters: bool = True  # thread-block clusters (compute capability 9.0 and newer)
    name: str = "H100 SXM"


H100 = SmLimits()
# A100 SXM 80 GB: 108 SMs, 164 KiB of shared memory per SM, 40 MB of L2, no clusters (sm_80)
A100 = SmLimits(sms=108, smem=167936, l2_bytes=40 * 1024 * 1024, clusters=False, name="A100 SXM")
PROFILES = {"h100": H100, "a100": A100}


# Programs per SM of a row-split grid when the compiled kernel's occupancy is not known (off a GPU,
# in a plan printed without one, under torch.compile).
PROGRAMS_PER_SM = 4


def next_pow2(x: int) -> int:
    """Smallest power of two >= max(x, 1)."""
    return 1 << max(int(x) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _read(index: int) -> SmLimits:
    p = torch.cuda.get_device_properties(index)
    get = lambda name, default: int(getattr(p, name, 0) or default)  # noqa: E731  (older torch lacks some)
    return SmLimits(sms=p.multi_processor_count, regs=get("regs_per_multiprocessor", H100.regs),
                    threads=get("max_threads_per_multi_processor", H100.threads),
                    smem=get("shared_memory_per_multiprocessor", H100.smem),
                    l2_bytes=get("L2_cache_size", H100.l2_bytes), clusters=p.major >= 9, name=p.name)


def device_limits(device: torch.device) -> SmLimits:
    """``SmLimits`` of the CUDA ``device``, read once per device."""
    return _read(_device_index(device))


def plan_limits(device: torch.device):
    """What the launch planners take for tensors on ``device``: the CUDA device's ``SmLimits``,
    None for any other (Triton's CPU interpreter)."""
    return device_limits(device) if device.type == "cuda" else None


def blocks_per_sm(regs: int, smem: int, warps: int, limits: SmLimits = H100) -> int:
    """Resident blocks per SM of a kernel compiled to ``regs`` registers per thread, ``smem``
    bytes of shared memory and ``warps`` warps: the smallest of the register, thread, shared
    memory and block limits (registers are allocated per warp in units of 256)."""
    regs_per_warp = -(-max(int(regs), 1) * 32 // 256) * 256
    by_regs = limits.regs // (regs_per_warp * warps)
    by_threads = limits.threads // (32 * warps)
    by_smem = limits.smem // (smem + limits.smem_reserved) if smem else limits.blocks
    return max(0, min(by_regs, by_threads, by_smem, limits.blocks))
