"""Measurements: time (median and 20/80 quantiles), peak memory of one call, the device's copy
bandwidth, and each op's minimal memory traffic (DESIGN.md section 2).

Timing: on a GPU ``triton.testing.do_bench`` (warm-up, L2 flushed between runs, CUDA events);
on a CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (``block_times_ms``: its blocks, which
``runner`` gathers over interleaved rounds). Peak memory: on a GPU
``torch.cuda.max_memory_allocated`` above what was allocated before the call; on a CPU the peak
of the bytes held by tensors allocated during the call, tracked op by op with a
``TorchDispatchMode`` (the CPU allocator keeps no statistics).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _quantiles(values, qs):
    t = torch.tensor(values, dtype=torch.float64)
    return [torch.quantile(t, q).item() for q in qs]


def time_ms(fn, device: torch.device, *, min_run_time: float = 0.2):
    """(median, p20, p80) of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        # 10 ms of warm-up and 40 ms of timed runs (L2 flushed before each): enough runs for
        # stable medians of these sub-millisecond kernels, and the GPU sweep fits one device call.
        med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    return summary_ms(block_times_ms(fn, min_run_time=min_run_time))


def block_times_ms(fn, *, min_run_time: float = 0.2, warmup: bool = True) -> list:
    """On a CPU: the time of one ``fn()`` in milliseconds for each block of a blocked autorange
    (``torch.utils.benchmark``), after one warm-up call (``warmup``)."""
    from torch.utils.benchmark import Timer

    if warmup:
        fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return [t * 1e3 for t in m.times]


def summary_ms(times: list):
    """(median, p20, p80) of ``times`` (ms)."""
    if len(times) == 1:
        return (times[0],) * 3
    med, p20, p80 = _quantiles(times, [0.5, 0.2, 0.8])
    return med, p20, p80


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages allocated by the ops it sees, and their peak while alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in inputs or key in self._seen or st.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, st.nbytes())
        return out


def peak_mem_mb(fn, device: torch.device) -> float:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _LiveBytes() as rec:
        fn()
    return rec.peak / 2**20


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """The device's copy bandwidth in GB/s: a large same-device ``copy_``, counting read + write."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (med * 1e-3) / 1e9


def min_traffic_bytes(op: str, mode: str, n_rows: int, d: int, elem_bytes: int) -> int | None:
    """Minimal bytes an op must move (DESIGN.md section 2), or None where no model applies.

    RED and the low-rank edit, over all N rows: forward reads h and writes y (2 N d e); backward
    reads g and h and writes dh (3 N d e); forward+backward the sum. Parameters and latents are
    O(r d) and O(N r) and are left out. The indexed op and orthonormal_rows have no such model.
    """
    if op not in ("red", "lowrank_edit"):
        return None
    per = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}[mode]
    return per * n_rows * d * elem_bytes
