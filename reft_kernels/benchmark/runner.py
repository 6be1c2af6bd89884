"""The sweep behind ``reft-kernels bench``: for every case and provider, check the provider's
output and gradients against the float64 formula once, then time it in each mode and measure
its peak memory; append the rows to ``<out>/<device>/results.csv`` (one schema, ``COLUMNS``)
and write the run's markdown table beside it (``results.md``).

A provider that raises or disagrees with the reference is reported in the ``status`` column and
not timed. On a CPU the providers of a case are timed in interleaved rounds (``CPU_ROUNDS``).
Speed-ups are against ``eager`` and ``compile`` of the same case and mode, measured in the same
run; ``gbps`` is the op's minimal traffic over the time and ``frac_of_copy`` that
against the copy bandwidth measured at the start of the run.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .. import _backend, _triton
from .._measured import card_slug
from ..ops import variants
from ..reference import LOWP_FACTOR
from . import cases as C
from .measure import block_times_ms, copy_gbps, min_traffic_bytes, peak_mem_mb, summary_ms, time_ms

COLUMNS = ("date", "commit", "device", "torch", "triton", "op", "method", "provider", "mode", "dtype", "n_rows",
           "d", "rank", "index_rows", "time_ms", "time_p20_ms", "time_p80_ms", "gbps", "copy_gbps", "frac_of_copy",
           "peak_mem_mb", "speedup_vs_eager", "speedup_vs_compile", "status")
MODES = ("fwd", "bwd", "fwd_bwd")


# ----------------------------------------------------------------------------- sweeps

def _method_cases(dtype, sizes, ranks):
    out = []
    for n, d in sizes:
        for r in ranks:
            out += [C.Case("lowrank_edit", m, dtype, n, d, r) for m in C.METHODS]
    return out


def _f7_l7(method, dtype, batch, d=256, rank=8, seq_len=128):
    """The indexed op at pyreft's f7+l7: 14 edited rows of each of ``batch`` sequences."""
    return C.Case("lowrank_edit_index", method, dtype, batch * seq_len, d, rank, index_rows=batch * 14,
                  seq_len=seq_len)


def _quick_cases() -> list:
    """The quick sweep, fp32. First the README's headline cases (RED and LoReFT at N = 4096,
    d = 256; f7+l7 with and without R at 8 sequences of 128; ``orthonormal_rows`` at d = 4096,
    r = 8), then a line for each plot: RED and LoReFT at d = 256 over N from 1k rows (their
    traffic fits in a 32 MiB L3) to 32k rows (32 MiB per tensor: DRAM-bound), the other methods
    at one size, f7+l7 over the batch, ``orthonormal_rows`` over d."""
    dt, d = "fp32", 256
    cases = [C.Case("red", "red", dt, 4096, d), C.Case("lowrank_edit", "loreft", dt, 4096, d, 8),
             _f7_l7("f7+l7", dt, 8), _f7_l7("f7+l7+R", dt, 8), C.Case("orthonormal_rows", "", dt, 0, 4096, 8)]
    for n in (1024, 4096, 16384, 32768):
        cases += [C.Case("red", "red", dt, n, d), C.Case("lowrank_edit", "loreft", dt, n, d, 8)]
    cases += [C.Case("lowrank_edit", m, dt, 2048, d, 8) for m in C.METHODS if m != "loreft"]
    cases += [_f7_l7(m, dt, b) for m in ("f7+l7", "f7+l7+R") for b in (2, 8, 32)]
    cases += [C.Case("orthonormal_rows", "", dt, 0, dd, 8) for dd in (512, 1024, 2048, 4096)]
    return list(dict.fromkeys(cases))  # the headline cases are not repeated


def sweep(name: str, device: torch.device) -> list:
    """The cases of a named sweep: ``quick`` (a quiet 2-core CPU in under a minute), ``gpu`` (the
    default GPU sweep, sized for one short device call), ``full`` (the whole grid)."""
    if name == "quick":
        return _quick_cases()
    if name == "gpu":
        # The headline cases first (N * d >= 32M elements, the sparse regime, R), then the grid:
        # a run cut short by its time limit keeps the most telling rows.
        cases = [C.Case("red", "red", "bf16", 16384, 4096), C.Case("lowrank_edit", "loreft", "bf16", 16384, 4096, 8)]
        cases += [C.Case("lowrank_edit_index", m, "bf16", 32 * 512, 4096, 8, index_rows=32 * 14, seq_len=512)
                  for m in ("f7+l7", "f7+l7+R")]
        cases += [C.Case("orthonormal_rows", "", "fp32", 0, 4096, r) for r in (4, 8, 32)]
        for n in (4096, 16384, 65536):
            for d in (768, 4096, 8192):
                cases.append(C.Case("red", "red", "bf16", n, d))
                cases += [C.Case("lowrank_edit", "loreft", "bf16", n, d, r) for r in (1, 8, 16, 64)]
        cases += [C.Case("lowrank_edit", m, "bf16", 16384, 4096, 8) for m in C.METHODS if m != "loreft"]
        cases += [C.Case("red", "red", "fp32", 16384, 4096), C.Case("lowrank_edit", "loreft", "fp32", 16384, 4096, 8)]
        return list(dict.fromkeys(cases))  # the headline cases are not repeated
    if name == "full":
        cases = []
        for dt in ("bf16", "fp32"):
            for n in (1024, 4096, 16384, 65536):
                for d in (768, 2048, 4096, 8192):
                    cases.append(C.Case("red", "red", dt, n, d))
                    cases += _method_cases(dt, [(n, d)], (1, 4, 8, 16, 32, 64))
        cases += [c for c in sweep("gpu", device) if c.op in ("lowrank_edit_index", "orthonormal_rows")]
        return cases
    raise ValueError(f"unknown sweep {name!r}: use quick, gpu or full")


# ----------------------------------------------------------------------------- one case

def leaves_of(inputs):
    """The inputs that gradients are taken for (every floating tensor requiring grad), by name."""
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def upstream_grad(case, inputs):
    """The gradient fed to every provider's backward: shaped like the output (``h``, or R)."""
    out = inputs["X"] if case.op == "orthonormal_rows" else inputs["h"]
    gen = torch.Generator(device=out.device).manual_seed(1)
    return torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)


def _forward_backward(fn, inputs, names, g):
    y = fn(**inputs)
    grads = torch.autograd.grad(y, [inputs[k] for k in names], g.to(y.dtype), allow_unused=True)
    return {"out": y, **dict(zip(names, grads))}


def expected_values(case, inputs, g) -> dict:
    """What every provider of ``case`` is checked against, computed once per case: the float64
    formula's output and gradients (``"want"``) and, for fp16/bf16, the error of the eager
    formula run in that precision (``"eager_err"``), which sets the tolerance."""
    x64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
           for k, v in inputs.items()}
    names = [k for k, v in x64.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    want = _forward_backward(C.reference64(case), x64, names, g.double())
    del x64
    eager_err = {}
    if DTYPE_IS_LOWP[case.dtype] and C.eager_fn(case) is not None:
        eager = _forward_backward(C.eager_fn(case), inputs, names, g)
        eager_err = {k: _max_err(eager[k], w) for k, w in want.items() if w is not None and eager.get(k) is not None}
    return {"names": names, "want": want, "eager_err": eager_err}


def _max_err(a, w):
    return (a.double() - w).abs().max().item() if w.numel() else 0.0


def check_provider(case, fn, inputs, g, expected=None) -> str:
    """'ok', or why the provider's forward or a gradient disagrees with the float64 formula
    (fp32: 1e-4 relative to the tensor's scale; fp16/bf16: at most LOWP_FACTOR x the eager
    formula's error in that precision, plus one ulp of the tensor's scale). Gradients of inputs
    a provider does not use (pyreft's rotation has its own parameter) are not compared."""
    expected = expected or expected_values(case, inputs, g)
    got = _forward_backward(fn, inputs, expected["names"], g)
    for k, w in expected["want"].items():
        a = got.get(k)
        if w is None or a is None:
            continue
        err = _max_err(a, w)
        scale = w.abs().max().item() if w.numel() else 0.0
        if DTYPE_IS_LOWP[case.dtype]:
            tol = LOWP_FACTOR * expected["eager_err"].get(k, 0.0) + torch.finfo(C.DTYPES[case.dtype]).eps * scale + 1e-6
        else:
            tol = 1e-4 * max(scale, 1.0)
        if not err <= tol:
            return f"mismatch: {k} error {err:.3g} > {tol:.3g}"
    return "ok"


DTYPE_IS_LOWP = {"bf16": True, "fp16": True, "fp32": False}


def provider_fn(case, provider, inputs, compiled_cache):
    """(fn, extra leaves) for ``provider`` on ``case``; None where the provider does not apply."""
    if provider in ("eager", "compile"):
        fn = C.eager_fn(case)
        if fn is None:
            if provider == "compile":
                return None  # a module-holding baseline: compiled as pyreft would not be
            return C.stateful_eager_fn(case, inputs)
        if provider == "compile":
            key = (case.op, case.method)
            if key not in compiled_cache:
                compiled_cache[key] = torch.compile(fn)
            fn = compiled_cache[key]
        return fn, []
    if case.op == "orthonormal_rows" and provider != "torch":
        return None
    fn = C.ours_fn(case, provider)
    return None if fn is None else (fn, [])


def provider_context(provider):
    """Settings a provider is measured under. ``compile``: no donated buffers, which would let a
    compiled backward run only once per forward (the ``bwd`` mode times repeated backward passes
    of one retained forward); it costs the compiled backward some buffer reuse. A variant
    (``cases.VARIANT_PROVIDERS``): its kernels chosen with ``reft_kernels.kernels(...)``."""
    cfg = getattr(getattr(torch, "_functorch", None), "config", None)
    if provider == "compile" and cfg is not None and hasattr(cfg, "donated_buffer"):
        return cfg.patch(donated_buffer=False)
    if provider in C.VARIANT_PROVIDERS:
        return variants.kernels(**C.VARIANT_PROVIDERS[provider][1])
    return contextlib.nullcontext()


# Interleaved rounds per mode on a CPU: each round times every provider once, in a rotated order
# (``min_run_time / CPU_ROUNDS`` each), so a change of machine speed between providers hits them
# all alike. On the quiet 2-core CPU the same op timed a few minutes apart read up to 35% apart
# (245 against 160 us), enough to decide "ahead" or "behind" eager for ops at parity when each
# provider was timed in one stretch. A GPU times each provider once (``do_bench``; the GPU sweep
# is sized to one device call).
CPU_ROUNDS = 5


def run_case(case, providers, device, *, compiled_cache, min_run_time=0.2, copy_bw=None):
    """Rows (dicts over COLUMNS but the run's metadata) for one case: every provider that applies,
    every mode; a provider that fails its check or raises gets one row per mode with the reason."""
    inputs = C.make_inputs(case, device)
    g = upstream_grad(case, inputs)
    expected = {}  # filled once, by the first provider that applies
    checked = []
    for provider in providers:
        with provider_context(provider):
            got = _checked(case, provider, inputs, g, expected, compiled_cache)
        if got is not None:
            checked.append(got)
    rows = _timed_rows(case, checked, inputs, g, device, min_run_time, copy_bw)
    _speedups(rows)
    return rows


def _checked(case, provider, inputs, g, expected, compiled_cache):
    """(provider, status, fn, leaves) for ``provider`` on ``case``, its output and gradients
    checked (None when it does not apply)."""
    fn = leaves = None
    try:
        got = provider_fn(case, provider, inputs, compiled_cache)
        if got is None:
            return None
        fn, extra = got
        leaves = list(leaves_of(inputs).values()) + extra
        if not expected:
            expected.update(expected_values(case, inputs, g))
        status = check_provider(case, fn, inputs, g, expected)
    except Exception as exc:  # noqa: BLE001 - reported in the table, never timed
        status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return provider, status, fn, leaves


def _timed_rows(case, checked, inputs, g, device, min_run_time, copy_bw):
    """One row per checked provider and mode, provider by provider; the providers that passed
    their check timed mode by mode in interleaved rounds (``CPU_ROUNDS``)."""
    base = {"op": case.op, "method": case.method, "dtype": case.dtype, "n_rows": case.n_rows, "d": case.d,
            "rank": case.rank or "", "index_rows": case.index_rows or ""}
    rows = {(p, mode): dict(base, provider=p, mode=mode, status=status)
            for p, status, _, _ in checked for mode in MODES}
    ok = [(p, fn, leaves) for p, status, fn, leaves in checked if status == "ok"]
    for mode in MODES:
        fns = {}
        for p, fn, leaves in ok:
            with provider_context(p):
                fns[p] = mode_fn(mode, fn, inputs, leaves, g)
                rows[p, mode]["peak_mem_mb"] = peak_mem_mb(fns[p], device)
        stats = _interleaved(fns, device, min_run_time)
        traffic = min_traffic_bytes(case.op, mode, case.n_rows, case.d, C.DTYPES[case.dtype].itemsize)
        for p in fns:
            row = rows[p, mode]
            row["time_ms"], row["time_p20_ms"], row["time_p80_ms"] = stats[p]
            if traffic is not None:
                row["gbps"] = traffic / (row["time_ms"] * 1e-3) / 1e9
                if copy_bw:
                    row["copy_gbps"] = copy_bw
                    row["frac_of_copy"] = row["gbps"] / copy_bw
    return [rows[p, mode] for p, *_ in checked for mode in MODES]


def _interleaved(fns: dict, device, min_run_time):
    """{provider: (median, p20, p80) ms} of each ``fns[provider]()``, each under its provider's
    context: on a CPU over the blocks of ``CPU_ROUNDS`` rounds in a rotated order, on a GPU one
    ``do_bench`` each."""
    if device.type == "cuda":
        out = {}
        for p, fn in fns.items():
            with provider_context(p):
                out[p] = time_ms(fn, device, min_run_time=min_run_time)
        return out
    names = list(fns)
    times = {p: [] for p in names}
    for i in range(CPU_ROUNDS):
        shift = i % max(len(names), 1)
        for p in names[shift:] + names[:shift]:
            with provider_context(p):
                times[p] += block_times_ms(fns[p], min_run_time=min_run_time / CPU_ROUNDS, warmup=i == 0)
    return {p: summary_ms(t) for p, t in times.items()}


def mode_fn(mode, fn, inputs, leaves, g):
    """The callable timed for ``mode``: ``fwd`` the forward (inputs requiring grad, as training
    runs it); ``bwd`` the backward alone, from one retained forward; ``fwd_bwd`` both."""
    if mode == "fwd":
        return lambda: fn(**inputs)
    if mode == "bwd":
        y = fn(**inputs)
        return lambda: torch.autograd.grad(y, leaves, g, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(fn(**inputs), leaves, g, allow_unused=True)


def _speedups(rows):
    by = {(r["mode"], r["provider"]): r for r in rows if r.get("time_ms")}
    for r in rows:
        if not r.get("time_ms"):
            continue
        for base, col in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            b = by.get((r["mode"], base))
            if b is not None:
                r[col] = b["time_ms"] / r["time_ms"]


# ----------------------------------------------------------------------------- the run

def device_name(device: torch.device) -> str:
    """A folder name for the device: e.g. ``nvidia-h100-80gb-hbm3``, ``cpu-<model>``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (_cpu_model() or platform.machine())
    return card_slug(name)


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _commit():
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_meta(device: torch.device) -> dict:
    """The columns every row of a run shares: date (UTC), commit, device folder name, versions."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "device": device_name(device), "torch": torch.__version__,
            "triton": _triton.TRITON_VERSION or ""}


def default_providers(device: torch.device) -> list:
    """eager, compile and every backend of ours that runs on ``device`` (Triton through its CPU
    interpreter is not a speed: it is left out on CPU)."""
    ours = [b for b in _backend.available_backends(device) if not (b == "triton" and device.type != "cuda")]
    variants = [p for p, (b, *_) in C.VARIANT_PROVIDERS.items() if b in ours and device.type == "cuda"]
    return ["eager", "compile"] + ours + variants


# The copy bandwidth is measured this many times at the start of a run; a spread (max - min over
# the median) above NOISE_SPREAD says the machine is too busy for its timings to be trusted.
COPY_REPEATS = 3
NOISE_SPREAD = 0.2


def noise_warning(samples, load=None, cores=None) -> str | None:
    """A warning when the machine is too busy for its timings to be trusted, else None: repeated
    copy-bandwidth measurements ``samples`` (GB/s) spread by more than ``NOISE_SPREAD`` of their
    median, or (a machine busy the whole time passes that test) a 1-minute ``load`` average above
    half the ``cores`` before the run starts."""
    med = sorted(samples)[len(samples) // 2]
    spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
    why = []
    if spread > NOISE_SPREAD:
        why.append(f"the copy bandwidth varied by {spread:.0%} over {len(samples)} measurements "
                   f"({', '.join(f'{x:.1f}' for x in samples)} GB/s)")
    if load is not None and cores and load > cores / 2:
        why.append(f"the load average is {load:.1f} on {cores} cores")
    if not why:
        return None
    return f"warning: {' and '.join(why)}: this machine is too busy for its timings to be trusted; rerun on a quiet one"


def _load_and_cores():
    """(1-minute load average, CPU count), or (None, None) where the system does not tell."""
    try:
        return os.getloadavg()[0], os.cpu_count()
    except (AttributeError, OSError):
        return None, None


def run(cases, providers, device, out_dir, *, run_name=None, min_run_time=0.2, progress=True, log=print):
    """Run ``cases`` x ``providers``; append to ``out_dir/<device>[/<run_name>]/results.csv``, write
    the run's ``results.md`` beside it, print the table. Returns (rows, csv path)."""
    device = torch.device(device)
    meta = run_meta(device)
    folder = Path(out_dir) / meta["device"] / (run_name or "")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.csv"
    samples = [copy_gbps(device) for _ in range(COPY_REPEATS)]
    bw = sorted(samples)[len(samples) // 2]
    log(f"reft-kernels bench on {meta['device']}: {len(cases)} cases x providers {', '.join(providers)}; "
        f"copy bandwidth {bw:.1f} GB/s")
    noisy = noise_warning(samples, *(_load_and_cores() if device.type == "cpu" else (None, None)))
    if noisy:
        log(noisy)
    compiled_cache, rows = {}, []
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new_file:
            writer.writeheader()
        for i, case in enumerate(cases):
            if progress:
                print(f"\r[{i + 1}/{len(cases)}] {case.label():60s}", end="", file=sys.stderr, flush=True)
            case_rows = run_case(case, providers, device, compiled_cache=compiled_cache,
                                 min_run_time=min_run_time, copy_bw=bw)
            for r in case_rows:
                r.update(meta)
                writer.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})
            f.flush()  # a run cut short keeps what it measured, in the CSV and the table
            rows += case_rows
            (folder / "results.md").write_text(markdown_table(rows, meta))
    if progress:
        print(file=sys.stderr)
    table = markdown_table(rows, meta)
    log(table)
    log(f"rows appended to {path}")
    return rows, path


def _fmt(v):
    return f"{v:.5g}" if isinstance(v, float) else v


def markdown_table(rows, meta) -> str:
    """The run as a markdown table; eager is the baseline of the speed-up columns."""
    head = (f"Device {meta['device']}, torch {meta['torch']}, triton {meta['triton'] or '-'}, commit "
            f"{meta['commit'] or '-'}, {meta['date']}. Times are medians (20-80% range); speed-ups are "
            "against the eager PyTorch baseline and torch.compile of it, in this run.\n\n")
    cols = ["op", "method", "dtype", "N", "d", "r", "mode", "provider", "ms", "p20-p80", "GB/s", "of copy",
            "peak MiB", "vs eager", "vs compile", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        t = r.get("time_ms")
        vals = [r["op"], r["method"], r["dtype"], r["n_rows"], r["d"], r["rank"], r["mode"], r["provider"],
                f"{t:.4g}" if t else "", f"{r['time_p20_ms']:.3g}-{r['time_p80_ms']:.3g}" if t else "",
                f"{r['gbps']:.1f}" if r.get("gbps") else "", f"{r['frac_of_copy']:.0%}" if r.get("frac_of_copy") else "",
                f"{r['peak_mem_mb']:.2f}" if t else "",
                f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "",
                f"{r['speedup_vs_compile']:.2f}x" if r.get("speedup_vs_compile") else "",
                r["status"] if r["status"] != "ok" else ""]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return head + "\n".join(lines) + "\n"
