"""Plot the benchmark runner's results CSV as PNG figures.

    python bench/plot_results.py bench/results/<device>/results.csv [--out DIR] [--all-runs]

Reads the CSV the runner appends to (columns ``date, commit, device, ..., status``), keeps the
rows whose ``status`` is ``ok`` and, unless ``--all-runs`` is given, only the newest run (the rows
sharing the latest ``date``). Writes PNGs to ``--out`` (default: the CSV's folder) and prints each
path:

* ``time_<op>_<mode>_<dtype>.png``: time per call (ms, log scale) against ``n_rows`` (log scale),
  one subplot per (method, d, rank) that has at least two distinct ``n_rows``, one line per
  provider, error bars from the 20th to the 80th percentile (``time_p20_ms`` .. ``time_p80_ms``).
* ``bandwidth_<op>_<mode>_<dtype>.png``: ``frac_of_copy`` (achieved bandwidth over the measured
  device-copy bandwidth) against the activation's element count (``n_rows * d``), one subplot per
  (method, d, rank), one line per provider that reports it, and a dashed line at 1.0 for the
  measured copy-bandwidth ceiling.

With ``--all-runs`` each line is one (provider, run), labelled with the run's commit and date.
When nothing qualifies for a figure kind the script says so and still exits 0. Exit status: 0 on
success, 1 when the CSV is missing or lacks needed columns, 2 when matplotlib is not installed.
Needs only the standard library and matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

# Columns this script reads; the runner writes more (all are kept in the row dicts).
NEEDED = ("date", "commit", "device", "op", "method", "provider", "mode", "dtype", "n_rows", "d",
          "rank", "index_rows", "time_ms", "time_p20_ms", "time_p80_ms", "gbps", "copy_gbps",
          "frac_of_copy", "status")
# Fixed provider order, so each provider keeps one colour in every figure.
PROVIDERS = ("eager", "compile", "torch", "triton", "cuda", "pyvene", "pyreft_orthogonal", "ours")


def _num(text, kind=float):
    """Parse a CSV cell as ``kind``; empty, unparsable and non-finite cells give None."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if kind is int else value


def load_rows(path, all_runs=False):
    """Read the results CSV and return its plottable rows as dicts with parsed numeric fields.

    Unless ``all_runs``, keeps only the newest run: the rows whose ``date`` equals the latest
    ``date`` in the file (ISO timestamps in one format compare as strings), so a newest run that
    failed throughout plots nothing rather than an older run. Then keeps the ``status == "ok"``
    rows.
    Raises ValueError when a needed column is missing.
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if rows and not all_runs:
        newest = max(r["date"] or "" for r in rows)
        rows = [r for r in rows if (r["date"] or "") == newest]
    rows = [r for r in rows if (r["status"] or "").strip() == "ok"]
    for r in rows:
        for col in ("n_rows", "d", "rank", "index_rows"):
            r[col] = _num(r[col], int)
        for col in ("time_ms", "time_p20_ms", "time_p80_ms", "gbps", "copy_gbps", "frac_of_copy"):
            r[col] = _num(r[col])
        if r["frac_of_copy"] is None and r["gbps"] and r["copy_gbps"]:
            r["frac_of_copy"] = r["gbps"] / r["copy_gbps"]
        r["method"] = (r["method"] or "").strip()
        r["run"] = f"{(r['commit'] or '').strip()[:9]} {r['date'].strip()}".strip()
    return rows


def _line_label(row, all_runs, split_index):
    """Legend label of the line a row belongs to: provider, plus index_rows / run when needed."""
    label = row["provider"]
    if split_index and row["index_rows"] is not None:
        label += f", index_rows={row['index_rows']}"
    if all_runs:
        label += f" @ {row['run']}"
    return label


def _lines(rows, ykey, all_runs):
    """Group one subplot's rows into lines ``{label: [row, ...]}`` sorted by n_rows.

    Rows without a positive ``ykey``, ``n_rows`` or ``d`` are dropped. If one provider/run has
    several ``index_rows`` at one ``n_rows``, index_rows becomes part of the line; any remaining
    duplicate point keeps the row that comes last in the CSV (the most recently appended).
    """
    rows = [r for r in rows if r[ykey] is not None and r[ykey] > 0 and r["n_rows"] and r["d"]]
    seen = defaultdict(set)
    for r in rows:
        seen[(r["provider"], r["run"] if all_runs else "", r["n_rows"])].add(r["index_rows"])
    split_index = any(len(v) > 1 for v in seen.values())
    points = {}
    for r in rows:
        points[(_line_label(r, all_runs, split_index), r["n_rows"])] = r
    lines = defaultdict(list)
    for (label, _), r in points.items():
        lines[label].append(r)
    return {k: sorted(v, key=lambda r: r["n_rows"]) for k, v in lines.items()}


def _style_keys(rows):
    """Orderings that styles index into: run labels ("<commit> <date>") by date; index_rows."""
    dates = {r["run"]: r["date"] for r in rows}
    runs = sorted(dates, key=dates.get)
    index_values = sorted({r["index_rows"] for r in rows if r["index_rows"] is not None})
    return runs, index_values


def _style(label, pts, keys, plt):
    """Style of one line: colour by provider, dashes by run (--all-runs), marker by index_rows
    (only when index_rows splits lines)."""
    runs, index_values = keys
    provider = pts[0]["provider"]
    idx = PROVIDERS.index(provider) if provider in PROVIDERS else sum(map(ord, provider))
    dash = ("-", "--", ":", "-.")[runs.index(pts[0]["run"]) % 4]
    marker = "o"
    if "index_rows=" in label:
        marker = "os^DvP"[index_values.index(pts[0]["index_rows"]) % 6]
    return {"color": plt.get_cmap("tab10")(idx % 10), "linestyle": dash, "marker": marker, "ms": 5}


def _panels(rows, ykey, min_points, all_runs):
    """Split rows into figures and subplots.

    Returns ``{(op, mode, dtype): {(method, d, rank): lines}}`` keeping only subplots with at
    least ``min_points`` distinct n_rows carrying ``ykey``.
    """
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["op"], r["mode"], r["dtype"])][(r["method"], r["d"], r["rank"])].append(r)
    figures = {}
    for fkey, subs in sorted(groups.items()):
        kept = {}
        for skey in sorted(subs, key=lambda k: (k[0], k[1] or 0, k[2] if k[2] is not None else -1)):
            lines = _lines(subs[skey], ykey, all_runs)
            n_values = {r["n_rows"] for line in lines.values() for r in line}
            if len(n_values) >= min_points:
                kept[skey] = lines
        if kept:
            figures[fkey] = kept
    return figures


def _subplot_title(method, d, rank):
    """Title of one subplot: its method and shape."""
    parts = [f"method={method or '-'}", f"d={d}"]
    if rank is not None:
        parts.append(f"rank={rank}")
    return ", ".join(parts)


def _figure(plt, fkey, subs, kind, context):
    """Create a figure with one subplot per entry of ``subs``; returns (fig, axes list)."""
    n = len(subs)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 5.2 * ncols), 1.2 + 3.8 * nrows),
                             squeeze=False, constrained_layout=True)
    op, mode, dtype = fkey
    fig.suptitle(f"{kind}: op={op}, mode={mode}, dtype={dtype}\n{context}", fontsize=13)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(fig, axes):
    """One legend for the whole figure, below the subplots (colours are shared across them)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = sorted(entries, key=lambda k: [int(t) if t.isdigit() else t
                                            for t in re.split(r"(\d+)", k)])
    if not labels:
        return
    per_row = 4 if max(map(len, labels)) <= 30 else 2
    kwargs = {"ncols": min(per_row, len(labels)), "fontsize": 9}
    try:
        fig.legend([entries[k] for k in labels], labels, loc="outside lower center", **kwargs)
    except ValueError:  # matplotlib < 3.7 has no "outside" placement
        fig.legend([entries[k] for k in labels], labels, loc="lower center", **kwargs)


def _save(fig, plt, out_dir, stem):
    """Save ``fig`` as ``out_dir/stem.png``, close it and return the path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) + ".png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_times(plt, rows, out_dir, context, all_runs=False):
    """Write the ``time_<op>_<mode>_<dtype>.png`` figures; returns the paths written."""
    written, keys = [], _style_keys(rows)
    for fkey, subs in _panels(rows, "time_ms", 2, all_runs).items():
        fig, axes = _figure(plt, fkey, subs, "time per call", context)
        for ax, (skey, lines) in zip(axes, subs.items()):
            for label, pts in sorted(lines.items()):
                x = [r["n_rows"] for r in pts]
                y = [r["time_ms"] for r in pts]
                p20 = [r["time_ms"] if r["time_p20_ms"] is None else r["time_p20_ms"] for r in pts]
                p80 = [r["time_ms"] if r["time_p80_ms"] is None else r["time_p80_ms"] for r in pts]
                lo = [max(0.0, t - q) for t, q in zip(y, p20)]
                hi = [max(0.0, q - t) for t, q in zip(y, p80)]
                ax.errorbar(x, y, yerr=[lo, hi], capsize=3, label=label,
                            **_style(label, pts, keys, plt))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(_subplot_title(*skey), fontsize=10)
            ax.set_xlabel("n_rows (rows, log scale)")
            ax.set_ylabel("time per call (ms, log scale; bars: p20-p80)")
            ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes)
        written.append(_save(fig, plt, out_dir, "time_" + "_".join(fkey)))
    return written


def plot_bandwidth(plt, rows, out_dir, context, all_runs=False):
    """Write the ``bandwidth_<op>_<mode>_<dtype>.png`` figures; returns the paths written."""
    written, keys = [], _style_keys(rows)
    for fkey, subs in _panels(rows, "frac_of_copy", 1, all_runs).items():
        fig, axes = _figure(plt, fkey, subs, "fraction of copy bandwidth", context)
        for ax, (skey, lines) in zip(axes, subs.items()):
            copies, top = [], 1.0
            for label, pts in sorted(lines.items()):
                ax.plot([r["n_rows"] * r["d"] for r in pts], [r["frac_of_copy"] for r in pts],
                        label=label, **_style(label, pts, keys, plt))
                copies += [r["copy_gbps"] for r in pts if r["copy_gbps"]]
                top = max(top, *(r["frac_of_copy"] for r in pts))
            ceiling = "measured copy-bandwidth ceiling"
            if copies:
                copies.sort()
                ceiling += f" (~{copies[len(copies) // 2]:.0f} GB/s)"
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            ax.annotate(ceiling, (0.01, 1.0), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
            ax.set_xscale("log")
            ax.set_ylim(0, 1.2 * top)
            ax.set_title(_subplot_title(*skey), fontsize=10)
            ax.set_xlabel("n_rows x d (elements, log scale)")
            ax.set_ylabel("achieved / copy bandwidth (fraction)")
            ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes)
        written.append(_save(fig, plt, out_dir, "bandwidth_" + "_".join(fkey)))
    return written


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="bench/results/<device>/results.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's)")
    parser.add_argument("--all-runs", action="store_true",
                        help="plot every run in the CSV, not only the newest (latest `date`)")
    args = parser.parse_args(argv)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2

    if not args.csv.is_file():
        print(f"no such file: {args.csv}", file=sys.stderr)
        return 1
    try:
        rows = load_rows(args.csv, args.all_runs)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not rows:
        print(f"{args.csv}: no rows with status 'ok'"
              + ("" if args.all_runs else " in the newest run"))
    out_dir = args.out or args.csv.parent
    context = ", ".join(sorted({r["device"] for r in rows if r["device"]})) or "unknown device"
    runs = {r["run"] for r in rows}
    context += f" | run {runs.pop()}" if len(runs) == 1 else f" | {len(runs)} runs"

    for name, fn, why in (
        ("time", plot_times, "no (op, method, mode, dtype, d, rank) group has two or more n_rows"),
        ("bandwidth", plot_bandwidth, "no ok row has frac_of_copy (or gbps and copy_gbps)"),
    ):
        paths = fn(plt, rows, out_dir, context, args.all_runs)
        for p in paths:
            print(p)
        if not paths:
            print(f"nothing plotted for {name} figures: {why if rows else 'no ok rows'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
