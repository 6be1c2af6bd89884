"""Plot the benchmark runner's results CSV as PNG figures.

    python bench/plot_results.py bench/results/<device>/results.csv [--out DIR] [--all-runs] [--llc-mib MIB]

Reads the CSV the runner appends to (columns ``date, commit, device, ..., status``), keeps the
rows whose ``status`` is ``ok`` and, unless ``--all-runs`` is given, only the newest run (the rows
sharing the latest ``date``). Writes PNGs to ``--out`` (default: the CSV's folder) and prints each
path. Every figure's title names the device and the run (commit and date):

* ``time_<op>_<mode>_<dtype>.png`` (``red``, ``lowrank_edit``): time per call (ms, log scale)
  against ``n_rows`` (log scale), one subplot per (method, d, rank) that has at least two distinct
  ``n_rows``, one line per provider, error bars from the 20th to the 80th percentile
  (``time_p20_ms`` .. ``time_p80_ms``).
* ``bandwidth_<op>_<mode>_<dtype>.png``: ``frac_of_copy`` (achieved bandwidth over the measured
  copy bandwidth) against the activation's element count (``n_rows * d``), one subplot per
  (method, d, rank), one line per provider that reports it, and a dashed line at 1.0 for the
  copy the runner measures: 64 MiB on a CPU, past its caches (a DRAM copy), 1 GiB on a GPU.
* ``f7l7_<dtype>.png``: the indexed op (``lowrank_edit_index``, pyreft's f7+l7 positions): time
  per call against the rows edited per call (``index_rows``: 14 per sequence, so 14 x the batch
  size), one subplot per (method, d, rank) and mode, one line per provider. ``eager`` is what
  pyvene does (clone, gather, edit, scatter); method ``f7+l7+R`` includes R's
  orthonormalisation (eager: pyreft's torch orthogonal parametrization).
* ``orthonormal_rows_<dtype>.png``: building R from its parameter, ours (provider ``torch``:
  ``orthonormal_rows``, a QR in O(r d) memory) against pyreft's torch orthogonal parametrization
  (``eager``): time per call (top row, with eager's time over ours at each point) and peak
  memory (bottom row) per mode, against d (against r when only r varies), log scales.

In the time and bandwidth figures a hollow marker is a cache-resident call: its working set (the
op's minimal traffic, ``gbps`` x ``time_ms``: n_rows x d x element bytes x 2, 3 or 5 streams)
fits in the last-level cache, so it can run faster than the DRAM copy ceiling. The cache size is
``--llc-mib``; its default comes from the CSV's device: a GPU's L2 (50 MiB for an H100 or H200,
40 for an A100), else 32 MiB (the L3 of an AMD EPYC core complex, where the committed CPU results
ran; pass the size of another machine's L3).

With ``--all-runs`` each line is one (provider, run), labelled with the run's commit and date.
When nothing qualifies for a figure kind the script says so and still exits 0. Exit status: 0 on
success, 1 when the CSV is missing or lacks needed columns, 2 when matplotlib is not installed.
Needs only the standard library and matplotlib. The end-to-end CSV (``reft-kernels bench
--e2e``'s ``e2e.csv``) has its own script, ``bench/plot_e2e.py``.
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
          "frac_of_copy", "peak_mem_mb", "status")
# Fixed provider order, so each provider keeps one colour in every figure: the providers the runner
# writes (reft_kernels.benchmark.cases.ALL_PROVIDERS: the baselines, our backends and the opt-in
# kernel variants), one tab10 colour each. A provider not listed gets a colour from its name.
PROVIDERS = ("eager", "compile", "torch", "triton", "cuda",
             "cuda-cluster", "cuda-vector", "triton-resident", "triton-split-d", "triton-tile2d")
MODES = ("fwd", "bwd", "fwd_bwd")
# Ops drawn in figures of their own rather than in time_<op>_*.png.
OWN_FIGURE = ("lowrank_edit_index", "orthonormal_rows")
# Last-level cache (MiB) by a substring of the device name, for --llc-mib's default: a GPU's L2.
LLC_MIB = (("h100", 50), ("h200", 50), ("a100", 40))
DEFAULT_LLC_MIB = 32  # an AMD EPYC core complex's L3 (the committed CPU results)


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
        for col in ("time_ms", "time_p20_ms", "time_p80_ms", "gbps", "copy_gbps", "frac_of_copy",
                    "peak_mem_mb"):
            r[col] = _num(r[col])
        if r["frac_of_copy"] is None and r["gbps"] and r["copy_gbps"]:
            r["frac_of_copy"] = r["gbps"] / r["copy_gbps"]
        r["method"] = (r["method"] or "").strip()
        r["run"] = f"{(r['commit'] or '').strip()[:9]} {r['date'].strip()}".strip()
    return rows


# ----------------------------------------------------------------------------- the device

def default_llc_mib(device: str) -> float:
    """The last-level cache (MiB) assumed for ``device`` (a CSV device name) without --llc-mib."""
    name = (device or "").lower()
    return next((mib for key, mib in LLC_MIB if key in name), DEFAULT_LLC_MIB)


def copy_label(device: str) -> str:
    """What the runner's copy-bandwidth measurement (``measure.copy_gbps``) copies on ``device``."""
    if (device or "").startswith("cpu"):
        return "64 MiB copy (DRAM)"
    return "1 GiB copy (HBM)" if re.search("h100|h200|a100|b200|hbm", device or "") else "1 GiB copy"


def cache_resident(row, llc_mib) -> bool:
    """Whether the call's working set (the op's minimal traffic: bandwidth x time) fits in the
    last-level cache; False where the op has no traffic model."""
    if not (row["gbps"] and row["time_ms"]):
        return False
    return row["gbps"] * 1e9 * row["time_ms"] * 1e-3 <= llc_mib * 2**20


# ----------------------------------------------------------------------------- lines and styles

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


def _draw(ax, x, y, pts, style, label, llc_mib, yerr=None):
    """One line with error bars; the points of cache-resident calls get hollow markers (drawn
    over the filled ones, so the legend keeps the filled marker)."""
    ax.errorbar(x, y, yerr=yerr, capsize=3 if yerr else 0, label=label, **style)
    held = [(xi, yi) for xi, yi, r in zip(x, y, pts) if cache_resident(r, llc_mib)]
    if held:
        ax.plot(*zip(*held), linestyle="none", marker=style["marker"], ms=style["ms"],
                markerfacecolor="white", markeredgecolor=style["color"], zorder=3)


def _cache_note(plt, rows, llc_mib):
    """The legend entry that explains hollow markers, if any of ``rows`` gets one."""
    if not any(cache_resident(r, llc_mib) for r in rows):
        return []
    handle = plt.Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                        markeredgecolor="black")
    return [(handle, f"hollow: working set <= {llc_mib:g} MiB last-level cache (cache-resident)")]


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


def _subplot_title(method, d, rank, mode=None):
    """Title of one subplot: its method and shape (and mode, where the figure spans modes)."""
    parts = [f"method={method or '-'}", f"d={d}"]
    if rank is not None:
        parts.append(f"rank={rank}")
    if mode:
        parts.append(f"mode={mode}")
    return ", ".join(parts)


def _figure(plt, n, title, per_row=3):
    """Create a figure with ``n`` subplots, ``per_row`` per row; returns (fig, axes list)."""
    ncols = min(per_row, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 5.2 * ncols), 1.2 + 3.8 * nrows),
                             squeeze=False, constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(fig, axes, extra=()):
    """One legend for the whole figure, below the subplots (colours are shared across them);
    ``extra`` (handle, label) pairs come last."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = sorted(entries, key=lambda k: [int(t) if t.isdigit() else t
                                            for t in re.split(r"(\d+)", k)])
    if not labels:
        return
    per_row = 4 if max(map(len, labels)) <= 30 else 2
    handles = [entries[k] for k in labels] + [h for h, _ in extra]
    labels += [label for _, label in extra]
    kwargs = {"ncols": min(per_row, len(labels)), "fontsize": 9}
    try:
        fig.legend(handles, labels, loc="outside lower center", **kwargs)
    except ValueError:  # matplotlib < 3.7 has no "outside" placement
        fig.legend(handles, labels, loc="lower center", **kwargs)


def _save(fig, plt, out_dir, stem):
    """Save ``fig`` as ``out_dir/stem.png``, close it and return the path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) + ".png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _rows_of(subs):
    """Every row drawn in a figure's subplots ``{key: {label: [row, ...]}}``."""
    return [r for lines in subs.values() for pts in lines.values() for r in pts]


def _errors(pts):
    """Error bars (below, above) from each point's p20 and p80 (none where they are missing)."""
    y = [r["time_ms"] for r in pts]
    p20 = [t if r["time_p20_ms"] is None else r["time_p20_ms"] for t, r in zip(y, pts)]
    p80 = [t if r["time_p80_ms"] is None else r["time_p80_ms"] for t, r in zip(y, pts)]
    return [[max(0.0, t - q) for t, q in zip(y, p20)], [max(0.0, q - t) for t, q in zip(y, p80)]]


# ----------------------------------------------------------------------------- figures

def plot_times(plt, rows, out_dir, context, all_runs=False, llc_mib=DEFAULT_LLC_MIB):
    """Write the ``time_<op>_<mode>_<dtype>.png`` figures; returns the paths written."""
    rows = [r for r in rows if r["op"] not in OWN_FIGURE]
    written, keys = [], _style_keys(rows)
    for fkey, subs in _panels(rows, "time_ms", 2, all_runs).items():
        op, mode, dtype = fkey
        fig, axes = _figure(plt, len(subs), f"time per call: op={op}, mode={mode}, dtype={dtype}\n{context}")
        for ax, (skey, lines) in zip(axes, subs.items()):
            for label, pts in sorted(lines.items()):
                _draw(ax, [r["n_rows"] for r in pts], [r["time_ms"] for r in pts], pts,
                      _style(label, pts, keys, plt), label, llc_mib, yerr=_errors(pts))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(_subplot_title(*skey), fontsize=10)
            ax.set_xlabel("n_rows (rows, log scale)")
            ax.set_ylabel("time per call (ms, log scale; bars: p20-p80)")
            ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes, _cache_note(plt, _rows_of(subs), llc_mib))
        written.append(_save(fig, plt, out_dir, "time_" + "_".join(fkey)))
    return written


def plot_bandwidth(plt, rows, out_dir, context, all_runs=False, llc_mib=DEFAULT_LLC_MIB):
    """Write the ``bandwidth_<op>_<mode>_<dtype>.png`` figures; returns the paths written.

    The dashed line at 1.0 is the copy bandwidth measured at the start of the run, labelled with
    what was copied: on a CPU 64 MiB, past the caches, so DRAM bandwidth; calls whose working set
    fits in the last-level cache (hollow markers) can run above it."""
    written, keys = [], _style_keys(rows)
    for fkey, subs in _panels(rows, "frac_of_copy", 1, all_runs).items():
        op, mode, dtype = fkey
        note = (f"hollow markers: the op's minimal traffic fits in the {llc_mib:g} MiB last-level cache, "
                "so the call can run above the copy ceiling")
        fig, axes = _figure(plt, len(subs), f"fraction of copy bandwidth: op={op}, mode={mode}, "
                            f"dtype={dtype}\n{context}\n{note}")
        for ax, (skey, lines) in zip(axes, subs.items()):
            copies, devices, top = [], set(), 1.0
            for label, pts in sorted(lines.items()):
                _draw(ax, [r["n_rows"] * r["d"] for r in pts], [r["frac_of_copy"] for r in pts], pts,
                      _style(label, pts, keys, plt), label, llc_mib)
                copies += [r["copy_gbps"] for r in pts if r["copy_gbps"]]
                devices |= {r["device"] for r in pts}
                top = max(top, *(r["frac_of_copy"] for r in pts))
            ceiling = "copy bandwidth, " + " / ".join(sorted(copy_label(dv) for dv in devices))
            if copies:
                copies.sort()
                ceiling += f": ~{copies[len(copies) // 2]:.0f} GB/s"
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            ax.annotate(ceiling, (0.01, 1.0), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.2 * top)
            ax.set_title(_subplot_title(*skey), fontsize=10)
            ax.set_xlabel("n_rows x d (elements, log2 scale)")
            ax.set_ylabel("achieved / copy bandwidth (fraction)")
            ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes, _cache_note(plt, _rows_of(subs), llc_mib))
        written.append(_save(fig, plt, out_dir, "bandwidth_" + "_".join(fkey)))
    return written


def plot_f7l7(plt, rows, out_dir, context, all_runs=False):
    """Write ``f7l7_<dtype>.png`` (the indexed op against the rows it edits); returns the paths.

    One subplot per (method, d, rank) and mode, x the rows edited per call (``index_rows``, 14
    per sequence at f7+l7, so proportional to the batch), one line per provider."""
    rows = [r for r in rows if r["op"] == "lowrank_edit_index" and r["index_rows"]]
    written, keys = [], _style_keys(rows)
    by_dtype = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_dtype[r["dtype"]][(r["method"], r["d"], r["rank"], r["mode"])].append(r)
    for dtype, subs in sorted(by_dtype.items()):
        order = sorted(subs, key=lambda k: (k[0], k[1] or 0, k[2] or 0, MODES.index(k[3]) if k[3] in MODES else 3))
        title = (f"f7+l7 (lowrank_edit_index): time per call, dtype={dtype}\n{context}\n"
                 "eager: pyvene's clone, gather, edit, scatter; f7+l7+R: with R's orthonormalisation "
                 "(eager: pyreft's parametrization)")
        fig, axes = _figure(plt, len(order), title)
        for ax, skey in zip(axes, order):
            xs = set()
            for label, pts in sorted(_lines(subs[skey], "time_ms", all_runs).items()):
                xs |= {r["index_rows"] for r in pts}
                ax.errorbar([r["index_rows"] for r in pts], [r["time_ms"] for r in pts], yerr=_errors(pts),
                            capsize=3, label=label, **_style(label, pts, keys, plt))
            ax.set_xscale("log")
            ax.set_xticks(sorted(xs), [f"{x}\n(B={x / 14:g})" for x in sorted(xs)])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_yscale("log")
            ax.set_title(_subplot_title(*skey), fontsize=10)
            ax.set_xlabel("rows edited per call (index_rows = 14 x batch B, log scale)")
            ax.set_ylabel("time per call (ms, log scale; bars: p20-p80)")
            ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes)
        written.append(_save(fig, plt, out_dir, f"f7l7_{dtype}"))
    return written


def plot_orthonormal(plt, rows, out_dir, context, all_runs=False):
    """Write ``orthonormal_rows_<dtype>.png``; returns the paths written.

    Top row: time per call of each mode, ours (``torch``) against pyreft's parametrization
    (``eager``), with eager's time over ours written at each of eager's points; bottom row: the
    peak memory of one call. x is d, or r when the CSV varies r only (the GPU sweep); log scales."""
    rows = [r for r in rows if r["op"] == "orthonormal_rows" and r["d"] and r["rank"]]
    written, keys = [], _style_keys(rows)
    by_dtype = defaultdict(list)
    for r in rows:
        by_dtype[r["dtype"]].append(r)
    for dtype, drows in sorted(by_dtype.items()):
        by_d = len({r["d"] for r in drows}) >= len({r["rank"] for r in drows})
        xkey, other = ("d", "rank") if by_d else ("rank", "d")
        split = len({r[other] for r in drows}) > 1
        modes = [m for m in MODES if any(r["mode"] == m for r in drows)]
        title = (f"orthonormal_rows: R (r x d) from its parameter, dtype={dtype}\n{context}\n"
                 "torch: ours (orthonormal_rows, QR in O(r d) memory); eager: pyreft's torch orthogonal "
                 "parametrization")
        fig, axes = _figure(plt, 2 * len(modes), title, per_row=len(modes))
        for col, mode in enumerate(modes):
            lines = _by_x([r for r in drows if r["mode"] == mode], xkey, other if split else None, all_runs)
            for row, (ykey, ylabel) in enumerate((("time_ms", "time per call (ms, log scale)"),
                                                  ("peak_mem_mb", "peak memory of one call (MiB, log scale)"))):
                ax = axes[row * len(modes) + col]
                for label, by_x in sorted(lines.items()):
                    pts = [by_x[x] for x in sorted(by_x) if by_x[x][ykey]]
                    if pts:
                        ax.plot([r[xkey] for r in pts], [r[ykey] for r in pts], label=label,
                                **_style(label, pts, keys, plt))
                if ykey == "time_ms":
                    _ratios(ax, lines)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.margins(x=0.15, y=0.15)
                ax.set_title(f"{ylabel.split(' (')[0]}, mode={mode}", fontsize=10)
                ax.set_xlabel(f"{'d (columns of R)' if xkey == 'd' else 'r (rows of R)'}, log scale")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        _legend(fig, axes)
        written.append(_save(fig, plt, out_dir, f"orthonormal_rows_{dtype}"))
    return written


def _by_x(rows, xkey, split, all_runs):
    """Lines ``{label: {x: row}}``: one per provider, plus the ``split`` column's value (rank or
    d) and the run where those vary; a repeated point keeps the CSV's last row."""
    lines = defaultdict(dict)
    for r in rows:
        label = r["provider"] + (f", {'r' if split == 'rank' else 'd'}={r[split]}" if split else "")
        label += f" @ {r['run']}" if all_runs else ""
        lines[label][r[xkey]] = r
    return lines


def _ratios(ax, lines):
    """Write eager's time over ours (``torch``) beside each eager point that has a partner in the
    line of the same rank/d and run."""
    for label, by_x in lines.items():
        if not label.startswith("eager"):
            continue
        ours = lines.get("torch" + label[len("eager"):], {})
        for x, r in by_x.items():
            if x in ours and r["time_ms"] and ours[x]["time_ms"]:
                ratio = r["time_ms"] / ours[x]["time_ms"]
                ax.annotate(f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x", (x, r["time_ms"]),
                            xytext=(0, 5), textcoords="offset points", ha="center", fontsize=8)


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="bench/results/<device>/results.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's)")
    parser.add_argument("--all-runs", action="store_true",
                        help="plot every run in the CSV, not only the newest (latest `date`)")
    parser.add_argument("--llc-mib", type=float, default=None,
                        help="last-level cache in MiB, for the cache-resident (hollow) markers (default: "
                             f"from the device name: H100/H200 50, A100 40, else {DEFAULT_LLC_MIB})")
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
    devices = sorted({r["device"] for r in rows if r["device"]})
    context = ", ".join(devices) or "unknown device"
    runs = {r["run"] for r in rows}
    context += f" | run {runs.pop()}" if len(runs) == 1 else f" | {len(runs)} runs"
    llc_mib = args.llc_mib or default_llc_mib(devices[0] if devices else "")

    cache = {"llc_mib": llc_mib}
    for name, fn, kwargs, why in (
        ("time", plot_times, cache, "no (op, method, mode, dtype, d, rank) group has two or more n_rows"),
        ("bandwidth", plot_bandwidth, cache, "no ok row has frac_of_copy (or gbps and copy_gbps)"),
        ("f7+l7", plot_f7l7, {}, "no lowrank_edit_index row"),
        ("orthonormal_rows", plot_orthonormal, {}, "no orthonormal_rows row"),
    ):
        paths = fn(plt, rows, out_dir, context, args.all_runs, **kwargs)
        for p in paths:
            print(p)
        if not paths:
            print(f"nothing plotted for {name} figures: {why if rows else 'no ok rows'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
