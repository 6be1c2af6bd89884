"""End-to-end training steps behind ``reft-kernels bench --e2e``: a LLaMA-architecture model with a
frozen base, trained with no adapter (``frozen``), naive eager interventions (``naive``, as
pyvene/pyreft run them), ours (``get_reft_model``) and PEFT LoRA (``lora``); see ``e2e_models.py``
for the models, the providers and the exact definition of the frozen step.

What is measured, per (model, sequence length, batch, case, provider), in one run:
- ``time_ms``: one training step (forward with labels, backward, AdamW step, zero_grad), median
  over the timed steps, with their 20th/80th percentiles. Each step is timed alone with
  ``time.perf_counter`` (``torch.cuda.synchronize`` before and after on a GPU): a step takes tens
  of ms to seconds, so the microbenchmarks' ``do_bench``/``blocked_autorange`` (which batch many
  sub-ms calls) do not fit. Providers are timed in interleaved rounds (each round times every
  provider for a few steps, in a rotated order), so a change of machine load hits all of them.
- ``tokens_per_s``: batch x sequence length over the median step.
- ``peak_mem_mb``: the peak memory one step allocates above what is resident before it
  (``measure.peak_mem_mb``: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the bytes of
  tensors allocated during the step, tracked op by op), measured in a separate untimed step after
  warm-up. ``resident_mb``: that setup's parameters, buffers and optimizer state.
- ``trainable_params``; ``overhead_pct``: the step's cost over the frozen step of the same run,
  ``median over rounds of (t_provider / t_frozen - 1) * 100`` with the rounds paired (p20/p80 of
  the per-round values beside it); ``speedup_vs_eager``: the naive step over this one (same case);
  ``loss``: the loss of the memory-measured step (a sanity value, not a quality measure).
- ``launches``: the kernel-launching calls of one whole step (ATen calls that reach a kernel and
  Triton kernel calls, counted exactly by ``launches.counting``; the optimizer included), and
  ``launches_per_layer``: that count over the frozen step's, per layer. On a GPU each is a launch
  of a few microseconds whatever the rows edited: the fixed cost a CPU run can already show.

Rows go to ``<out>/<device>/e2e.csv`` (appended; ``E2E_COLUMNS``: the microbenchmarks' ``COLUMNS``
first, with ``op = "e2e_train_step"``, ``mode = "train_step"``, ``n_rows`` the tokens per step and
``index_rows`` the rows each layer edits per step, then the e2e columns) and the run's table to
``e2e.md`` beside it. A provider that raises (out of memory included) gets a row with the reason in
``status`` and is not timed.
"""
from __future__ import annotations

import csv
import gc
import math
import sys
import time
from pathlib import Path

import torch

from . import e2e_models as M
from .launches import counting
from .measure import _quantiles, peak_mem_mb
from .runner import COLUMNS, _fmt, run_meta

EXTRA = ("model", "layers", "seq_len", "batch", "case", "tokens_per_s", "trainable_params", "resident_mb",
         "overhead_pct", "overhead_p20_pct", "overhead_p80_pct", "loss", "threads", "timed_steps",
         "launches", "launches_per_layer")
E2E_COLUMNS = COLUMNS + EXTRA

SPECS = {
    "tiny": M.ModelSpec("llama-d32-l2", 32, 2, 64, 4, 2, 128, "fp32"),
    "cpu": M.ModelSpec("llama-d256-l6", 256, 6, 688, 4, 2, 4096, "fp32"),
    "gpu": M.ModelSpec("llama-1b", 2048, 16, 8192, 32, 8, 32000, "bf16"),
}
SMOLLM2 = M.ModelSpec("smollm2-135m", source="smollm2")
# (seq_len, batch) per sweep; the GPU shapes are 16k tokens per step.
SHAPES = {"tiny": [(16, 2)], "cpu": [(256, 4)], "gpu": [(512, 32), (2048, 8)], "smollm2": [(128, 4)]}
# (warm-up steps, rounds, steps per round)
SCHEDULE = {"tiny": (1, 1, 1), "cpu": (2, 10, 2), "gpu": (3, 5, 2), "smollm2": (1, 6, 1)}


def plan(sweep: str, smollm2: bool = False) -> list:
    """[(ModelSpec, [(seq_len, batch)], schedule)] of a named sweep (``tiny``, ``cpu``, ``gpu``, or
    ``smollm2`` alone), with SmolLM2-135M-Instruct added when ``smollm2`` (its download needs the
    network)."""
    if sweep not in SPECS and sweep != "smollm2":
        raise ValueError(f"unknown e2e sweep {sweep!r}: use tiny, cpu, gpu or smollm2")
    out = [(SPECS[sweep], SHAPES[sweep], SCHEDULE[sweep])] if sweep in SPECS else []
    if smollm2 or sweep == "smollm2":
        out.append((SMOLLM2, SHAPES["smollm2"], SCHEDULE["smollm2"]))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device) -> float:
    """One call of ``step`` in ms (synchronised on a GPU)."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _error(exc) -> str:
    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"error: {type(exc).__name__}: {msg}"


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _setups(spec, base, inputs, cases, providers, device, log):
    """[(provider, case, Setup or error string)], each setup past its first step."""
    wanted = [(p, None) for p in ("frozen", "lora") if p in providers]
    wanted += [(p, c) for c in cases for p in ("naive", "ours") if p in providers]
    out = []
    for provider, case in wanted:
        failed = None
        try:
            s = M.make_setup(provider, case, base, inputs)
            s.step()
            loss = s.last_loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss {loss}")
            out.append((provider, case, s))
        except Exception as exc:  # noqa: BLE001 - reported in the table, not timed
            failed = _error(exc)
        if failed:  # out of the except block: the traceback no longer holds the step's tensors
            s = None
            _free(device)
            out.append((provider, case, failed))
            log(f"  {provider} {case.label() if case else ''}: {failed}")
    return out


def measure_shape(spec, base, seq, bsz, cases, providers, device, schedule, log=print) -> list:
    """Rows (dicts without the run's metadata) for one model and (seq, batch)."""
    warmup, rounds, per_round = schedule
    inputs = M.batch(base.config.vocab_size, bsz, seq, device)
    entries = _setups(spec, base, inputs, cases, providers, device, log)
    live = [(p, c, s) for p, c, s in entries if not isinstance(s, str)]
    stats = {}
    for p, c, s in list(live):
        key = (p, c.name if c else "")
        failed = None
        try:
            for _ in range(max(warmup - 1, 0)):
                s.step()
            stats[key] = {"peak": peak_mem_mb(s.step, device), "loss": s.last_loss.item(), "rounds": []}
            with counting() as launches:
                s.step()
            stats[key]["launches"] = launches.total
        except Exception as exc:  # noqa: BLE001
            failed = _error(exc)
        if failed:
            entries[entries.index((p, c, s))] = (p, c, failed)
            live.remove((p, c, s))
            del s
            _free(device)
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for p, c, s in order:
            stats[(p, c.name if c else "")]["rounds"].append([time_step(s.step, device) for _ in range(per_round)])
    rows = [_row(spec, seq, bsz, p, c, s, stats, device) for p, c, s in entries]
    _relative(rows, stats)
    return rows


def _row(spec, seq, bsz, provider, case, s, stats, device):
    n_edit = {"red": bsz * seq, "loreft_all": bsz * seq, "loreft_f7l7": bsz * min(14, 2 * (seq // 2))}
    row = {"op": "e2e_train_step", "method": case.label() if case else ("lora" if provider == "lora" else "none"),
           "case": case.name if case else provider, "provider": provider, "mode": "train_step",
           "dtype": spec.dtype, "n_rows": bsz * seq, "d": spec.d,
           "rank": M.RANK if provider == "lora" or (case and case.method == "loreft") else "",
           "index_rows": n_edit[case.name] if case else "", "model": spec.name, "layers": spec.layers,
           "seq_len": seq, "batch": bsz, "threads": torch.get_num_threads() if device.type == "cpu" else ""}
    if isinstance(s, str):
        return dict(row, status=s)
    st = stats[(provider, case.name if case else "")]
    times = [t for rnd in st["rounds"] for t in rnd]
    med, p20, p80 = _quantiles_or_same(times)
    row.update(status="ok", time_ms=med, time_p20_ms=p20, time_p80_ms=p80, tokens_per_s=bsz * seq / (med * 1e-3),
               peak_mem_mb=st["peak"], resident_mb=s.resident_bytes() / 2**20, trainable_params=s.trainable_params(),
               loss=st["loss"], timed_steps=len(times), launches=st["launches"])
    return row


def _relative(rows, stats):
    """overhead_pct (paired by round against frozen) and speedup_vs_eager (naive over this)."""
    frozen = stats.get(("frozen", ""))
    naive = {r["case"]: r["time_ms"] for r in rows if r["provider"] == "naive" and r.get("time_ms")}
    for r in rows:
        if not r.get("time_ms"):
            continue
        if frozen and frozen["rounds"]:
            mine = stats[(r["provider"], r["case"] if r["provider"] in ("naive", "ours") else "")]["rounds"]
            per_round = [(_median(a) / _median(f) - 1) * 100 for a, f in zip(mine, frozen["rounds"])]
            r["overhead_pct"], r["overhead_p20_pct"], r["overhead_p80_pct"] = _quantiles_or_same(per_round)
        if r["provider"] in ("naive", "ours") and r["case"] in naive:
            r["speedup_vs_eager"] = naive[r["case"]] / r["time_ms"]
        if frozen and "launches" in frozen:
            r["launches_per_layer"] = (r["launches"] - frozen["launches"]) / r["layers"]


def _quantiles_or_same(xs):
    """(median, p20, p80) of ``xs``."""
    return tuple(_quantiles(xs, [0.5, 0.2, 0.8])) if len(xs) > 1 else (xs[0],) * 3


def _median(xs):
    return _quantiles_or_same(xs)[0]


def run_e2e(plan_, providers, cases, device, out_dir, *, run_name=None, log=print, threads=None):
    """Run the plan (see ``plan``); append rows to ``out_dir/<device>[/<run_name>]/e2e.csv``, write
    ``e2e.md``, print the table. Returns (rows, csv path)."""
    device = torch.device(device)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(plan_, providers, cases, device, out_dir, run_name, log)
    finally:
        torch.set_num_threads(before)


def _upgrade_header(path: Path) -> None:
    """Rewrite an ``e2e.csv`` written with fewer columns (an older version) under
    ``E2E_COLUMNS``, its rows kept and the new columns empty, so that appended rows line up."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) == E2E_COLUMNS:
            return
        old = list(reader)
    unknown = set(reader.fieldnames or ()) - set(E2E_COLUMNS)
    if unknown:
        raise ValueError(f"{path} has columns this version does not write: {sorted(unknown)}; use another --out")
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=E2E_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in E2E_COLUMNS} for r in old)
    tmp.replace(path)


def _run(plan_, providers, cases, device, out_dir, run_name, log):
    meta = run_meta(device)
    folder = Path(out_dir) / meta["device"] / (run_name or "")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "e2e.csv"
    case_objs = [M.CASES[c] for c in cases]
    log(f"reft-kernels bench --e2e on {meta['device']}: providers {', '.join(providers)}; cases "
        f"{', '.join(cases)}; {torch.get_num_threads()} threads")
    rows = []
    _upgrade_header(path)
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=E2E_COLUMNS, lineterminator="\n")
        if new_file:
            writer.writeheader()
        for spec, shapes, schedule in plan_:
            t0 = time.perf_counter()
            base = M.build_base(spec, device)
            if spec.source != "random":
                spec = M.spec_of_model(spec.name, base)
            log(f"{spec.name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, built in "
                f"{time.perf_counter() - t0:.1f} s")
            for seq, bsz in shapes:
                t0 = time.perf_counter()
                shape_rows = measure_shape(spec, base, seq, bsz, case_objs, providers, device, schedule, log)
                for r in shape_rows:
                    r.update(meta)
                    writer.writerow({k: _fmt(r.get(k, "")) for k in E2E_COLUMNS})
                f.flush()  # a run cut short keeps what it measured
                rows += shape_rows
                (folder / "e2e.md").write_text(markdown_table(rows, meta))
                log(f"  seq {seq} x batch {bsz}: {time.perf_counter() - t0:.1f} s")
                _free(device)
            del base
            _free(device)
    table = markdown_table(rows, meta)
    log(table)
    log(f"rows appended to {path}")
    return rows, path


def markdown_table(rows, meta) -> str:
    """The run's rows as a markdown table."""
    head = (f"Device {meta['device']}, torch {meta['torch']}, commit {meta['commit'] or '-'}, {meta['date']}. "
            "One training step (forward with labels, backward, AdamW, zero_grad) of a frozen-base model; "
            "median ms (20-80% range) over interleaved rounds; peak = memory one step allocates above "
            "what is resident (weights, optimizer state); overhead against the frozen step of this run "
            "(forward + backward down to layer 0's output, no optimizer).\n\n")
    cols = ["model", "seq x batch", "case", "provider", "step ms", "p20-p80", "tokens/s", "peak MiB",
            "resident MiB", "trainable", "overhead %", "vs naive", "launches/layer", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        t = r.get("time_ms")
        ov = r.get("overhead_pct")
        vals = [r["model"], f"{r['seq_len']} x {r['batch']}", r["method"], r["provider"],
                f"{t:.1f}" if t else "", f"{r['time_p20_ms']:.1f}-{r['time_p80_ms']:.1f}" if t else "",
                f"{r['tokens_per_s']:.0f}" if t else "", f"{r['peak_mem_mb']:.1f}" if t else "",
                f"{r['resident_mb']:.1f}" if t else "", f"{r['trainable_params']:,}" if t else "",
                (f"{ov:+.1f} ({r['overhead_p20_pct']:+.1f}..{r['overhead_p80_pct']:+.1f})"
                 if ov is not None else ""),
                f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "",
                f"{r['launches_per_layer']:.1f}" if r.get("launches_per_layer") is not None else "",
                r["status"] if r["status"] != "ok" else ""]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return head + "\n".join(lines) + "\n"


def main_cli(args) -> int:
    """``reft-kernels bench --e2e``: see ``cli.py`` for the options."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sweep = args.e2e_sweep or ("gpu" if device.type == "cuda" else "cpu")
    providers = args.providers.split(",") if args.providers else list(M.PROVIDERS)
    cases = args.cases.split(",") if args.cases else list(M.CASES)
    bad = [p for p in providers if p not in M.PROVIDERS] + [c for c in cases if c not in M.CASES]
    if bad:
        print(f"reft-kernels bench --e2e: unknown {bad}; providers are {M.PROVIDERS}, cases {tuple(M.CASES)}",
              file=sys.stderr)
        return 2
    plan_ = plan(sweep, smollm2=args.smollm2)
    if args.steps:
        plan_ = [(spec, shapes, (sched[0], args.steps, 1)) for spec, shapes, sched in plan_]
    threads = args.threads or (None if device.type == "cuda" else torch.get_num_threads())
    run_e2e(plan_, providers, cases, device, args.out, run_name=getattr(args, "run_name", None), threads=threads)
    return 0
