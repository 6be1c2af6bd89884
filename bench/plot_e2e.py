"""Plot the end-to-end training-step CSV (``reft-kernels bench --e2e``'s ``e2e.csv``) as PNG figures.

    python bench/plot_e2e.py bench/results/<device>/e2e.csv [--out DIR] [--all-runs]

One figure per setup (model, sequence length x batch), from the newest run that measured it
(``--all-runs``: one per run, the run's date in the file name), ``e2e_<model>_<seq>x<batch>.png``:

* left: each provider's overhead over the frozen step of the same run (``overhead_pct``: the
  median over paired rounds of step / frozen step - 1, bars from its 20th to 80th percentile),
  grouped by case (LoReFT at f7+l7, LoReFT at every position, RED: ``naive`` as pyvene/pyreft run
  them against ``ours``; PEFT LoRA beside them);
* right: tokens per second of the same steps, the frozen step's as a dashed line.

The title names the model, the shape, the device, the threads, and the run's commit and date.
Reads only rows with ``status`` ``ok``. Writes to ``--out`` (default: the CSV's folder) and prints
each path. Exit status: 0 on success (also when nothing is plotted, which it says), 1 when the CSV
is missing or lacks needed columns, 2 when matplotlib is not installed. Needs only the standard
library and matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

NEEDED = ("date", "commit", "device", "method", "provider", "status", "model", "seq_len", "batch", "case",
          "tokens_per_s", "overhead_pct", "overhead_p20_pct", "overhead_p80_pct", "threads", "timed_steps")
COLOURS = {"frozen": "tab:gray", "naive": "tab:orange", "ours": "tab:blue", "lora": "tab:green"}


def _num(text):
    """A CSV cell as a float; None when empty or not a number."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load_runs(path, all_runs=False):
    """``{(model, seq_len, batch, date): [row, ...]}`` of the ok rows; unless ``all_runs``, only
    the newest date of each (model, seq_len, batch). Raises ValueError when a column is missing."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = [r for r in reader if (r["status"] or "").strip() == "ok"]
    runs = defaultdict(list)
    for r in rows:
        for col in ("tokens_per_s", "overhead_pct", "overhead_p20_pct", "overhead_p80_pct"):
            r[col] = _num(r[col])
        runs[(r["model"], r["seq_len"], r["batch"], r["date"])].append(r)
    if not all_runs:
        newest = {}
        for key in runs:
            newest[key[:3]] = max(newest.get(key[:3], ""), key[3])
        runs = {k: v for k, v in runs.items() if k[3] == newest[k[:3]]}
    return dict(sorted(runs.items()))


def _groups(rows):
    """The bars: ``[(case label, [row, ...])]`` in the CSV's order, LoRA last, frozen left out."""
    groups = {}
    for r in sorted(rows, key=lambda r: r["provider"] == "lora"):
        if r["provider"] != "frozen":
            groups.setdefault(r["method"] or r["case"], []).append(r)
    return list(groups.items())


def _bars(ax, groups, value, errors=None):
    """Grouped bars, one group per case, one bar per provider in it (coloured by provider)."""
    ticks = []
    for g, (_, rows) in enumerate(groups):
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            x = g - 0.4 + width * (i + 0.5)
            y = value(r) or 0.0
            lo, hi = errors(r) if errors else (None, None)
            err = None if lo is None or hi is None else [[max(0.0, y - lo)], [max(0.0, hi - y)]]
            ax.bar(x, y, width * 0.9, yerr=err, capsize=3, color=COLOURS.get(r["provider"], "tab:purple"),
                   label=r["provider"])
            ax.annotate(f"{y:+.1f}" if errors else f"{y:.0f}", (x, max(y, hi or y)), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ticks.append(g)
    ax.set_xticks(ticks, [label for label, _ in groups])


def plot_run(plt, key, rows, out_dir, all_runs=False):
    """Write the figure of one run of one setup; returns its path."""
    model, seq, batch, date = key
    head = rows[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8), constrained_layout=True)
    fig.suptitle(f"end-to-end training step: {model}, {seq} x {batch} tokens, {head['device']}, "
                 f"{head['threads']} threads\nrun {head['commit']} {date}, {head['timed_steps']} timed steps; "
                 "forward with labels, backward, AdamW, zero_grad of a frozen base", fontsize=11)
    groups = _groups(rows)
    _bars(left, groups, lambda r: r["overhead_pct"], lambda r: (r["overhead_p20_pct"], r["overhead_p80_pct"]))
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_ylabel("overhead over the frozen step (%; bars p20-p80)")
    left.set_title("step time / frozen step time - 1", fontsize=10)
    _bars(right, groups, lambda r: r["tokens_per_s"])
    frozen = [r["tokens_per_s"] for r in rows if r["provider"] == "frozen" and r["tokens_per_s"]]
    if frozen:
        right.axhline(frozen[0], color=COLOURS["frozen"], linestyle="--", label=f"frozen ({frozen[0]:.0f})")
    right.set_ylabel("tokens per second")
    right.set_title("throughput", fontsize=10)
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    entries = {}
    for ax in (left, right):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    try:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=len(entries), fontsize=9)
    except ValueError:  # matplotlib < 3.7 has no "outside" placement
        fig.legend(entries.values(), entries.keys(), loc="lower center", ncols=len(entries), fontsize=9)
    stem = f"e2e_{model}_{seq}x{batch}" + (f"_{date}" if all_runs else "")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) + ".png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="bench/results/<device>/e2e.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's)")
    parser.add_argument("--all-runs", action="store_true",
                        help="one figure per run, not only the newest run of each setup")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_e2e.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    if not args.csv.is_file():
        print(f"no such file: {args.csv}", file=sys.stderr)
        return 1
    try:
        runs = load_runs(args.csv, args.all_runs)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    for key, rows in runs.items():
        print(plot_run(plt, key, rows, args.out or args.csv.parent, args.all_runs))
    if not runs:
        print(f"{args.csv}: no rows with status 'ok': nothing plotted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
