"""The default backend chosen from a GPU sweep's numbers: tools/pick_defaults.py turns a device
run (summary + results.csv) into the table of reft_kernels/_measured_table.py, and
reft_kernels._measured picks the nearest measured case for a call. The runs here are written by
the tests (no GPU has recorded one yet)."""
from __future__ import annotations

import csv
import importlib.util
import pathlib

import pytest
import torch

from reft_kernels import _backend, _measured
from reft_kernels.benchmark.runner import COLUMNS as CSV_FIELDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARD = "nvidia-h100-80gb-hbm3"
PASSING = """build      rc=0    60s  python setup.py build_ext --inplace
check      rc=0    20s  reft-kernels check --device cuda --backend all
shard 0: 300 passed, 2 skipped in 50.1s
shard 1: 301 passed in 48.0s
========= ERROR SUMMARY: 0 errors
========= ERROR SUMMARY: 0 errors
"""


def _tool():
    spec = importlib.util.spec_from_file_location("pick_defaults", ROOT / "tools" / "pick_defaults.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(op, method, provider, dtype, n, d, rank, t, *, index_rows="", mode="fwd_bwd", status="ok",
         date="2026-11-27T00:00:00+00:00"):
    row = {k: "" for k in CSV_FIELDS}
    row.update(date=date, commit="abc1234", device=CARD, torch="2.11.0", triton="3.5.0", op=op, method=method,
               provider=provider, mode=mode, dtype=dtype, n_rows=n, d=d, rank=rank, index_rows=index_rows,
               time_ms=t, status=status)
    return row


def _run_dir(tmp_path, rows, summary=PASSING):
    out = tmp_path / "run"
    (out / "bench" / CARD).mkdir(parents=True)
    (out / "summary.txt").write_text(summary)
    with open(out / "bench" / CARD / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    table = tmp_path / "table.py"
    table.write_text('MEASURED = {"other-card": {"date": "x", "commit": "y", "torch": "", "triton": "", '
                     '"cases": [["red", "bf16", 1, 1, 0, "torch"]]}}\n')
    return out, table


ROWS = [
    # RED at two shapes: cuda clearly faster at the big one, within the margin at the small one
    _row("red", "red", "triton", "bf16", 16384, 4096, "", 1.00),
    _row("red", "red", "cuda", "bf16", 16384, 4096, "", 0.80),
    _row("red", "red", "torch", "bf16", 16384, 4096, "", 2.00),
    _row("red", "red", "triton", "bf16", 4096, 768, "", 0.100),
    _row("red", "red", "cuda", "bf16", 4096, 768, "", 0.097),
    # the low-rank edit: two methods pooled by the geometric mean (cuda wins one, loses the other)
    _row("lowrank_edit", "loreft", "triton", "bf16", 16384, 4096, 8, 1.0),
    _row("lowrank_edit", "loreft", "cuda", "bf16", 16384, 4096, 8, 0.5),
    _row("lowrank_edit", "noreft", "triton", "bf16", 16384, 4096, 8, 1.0),
    _row("lowrank_edit", "noreft", "cuda", "bf16", 16384, 4096, 8, 4.0),
    # the sparse case keyed by its listed rows; "+R" times R too and is left out; fwd-only rows,
    # failed rows and eager/compile are not candidates
    _row("lowrank_edit_index", "f7+l7", "triton", "bf16", 16384, 4096, 8, 0.05, index_rows=448),
    _row("lowrank_edit_index", "f7+l7", "torch", "bf16", 16384, 4096, 8, 0.03, index_rows=448),
    _row("lowrank_edit_index", "f7+l7+R", "triton", "bf16", 16384, 4096, 8, 0.01, index_rows=448),
    _row("lowrank_edit_index", "f7+l7+R", "cuda", "bf16", 16384, 4096, 8, 0.001, index_rows=448),
    _row("lowrank_edit", "loreft", "cuda", "fp32", 16384, 4096, 8, 0.1, mode="fwd"),
    _row("lowrank_edit", "loreft", "triton", "fp32", 16384, 4096, 8, 1.0),
    _row("lowrank_edit", "loreft", "cuda", "fp32", 16384, 4096, 8, 0.1, status="error: RuntimeError: x"),
    _row("lowrank_edit", "loreft", "eager", "fp32", 16384, 4096, 8, 0.01),
]
EXPECTED = [
    ["red", "bf16", 16384, 4096, 0, "cuda"],
    ["red", "bf16", 4096, 768, 0, "triton"],
    ["lowrank_edit", "bf16", 16384, 4096, 8, "triton"],
    ["lowrank_edit_index", "bf16", 448, 4096, 8, "torch"],
    ["lowrank_edit", "fp32", 16384, 4096, 8, "triton"],
]


def test_pick_defaults_writes_the_fastest_backend_per_case(tmp_path, capsys):
    tool = _tool()
    out, table = _run_dir(tmp_path, ROWS)
    assert tool.main([str(out), "--table", str(table)]) == 0
    measured = tool.load_table(table)
    assert measured["other-card"]["cases"] == [["red", "bf16", 1, 1, 0, "torch"]]  # other cards kept
    entry = measured[CARD]
    assert entry["commit"] == "abc1234" and entry["date"] == "2026-11-27T00:00:00+00:00"
    assert entry["cases"] == EXPECTED
    assert "cuda competes" in capsys.readouterr().out


def test_only_the_latest_run_in_the_file_counts(tmp_path):
    tool = _tool()
    old = [dict(r, date="2026-11-01T00:00:00+00:00", time_ms=9.0) for r in ROWS if r["provider"] == "triton"]
    out, table = _run_dir(tmp_path, old + ROWS)
    tool.main([str(out), "--table", str(table)])
    assert tool.load_table(table)[CARD]["cases"] == EXPECTED


@pytest.mark.parametrize("summary,why", [
    (PASSING.replace("check      rc=0", "check      rc=1"), "check step"),
    (PASSING.replace("build      rc=0", "build      rc=124"), "build step"),
    (PASSING + "FAILED tests/ops/test_red.py::test_x - AssertionError\n", "failures"),
    (PASSING.replace("301 passed", "1 failed, 300 passed"), "shards"),
    (PASSING.replace("0 errors\n", "3 errors\n", 1), "0 errors"),
    ("\n".join(PASSING.splitlines()[:4]) + "\nmemcheck   skipped (no compute-sanitizer)\n", "0 errors"),
])
def test_cuda_competes_only_after_the_gpu_tests_and_sanitizers_passed(tmp_path, summary, why):
    tool = _tool()
    ok, reason = tool.cuda_qualified(summary)
    assert not ok and why in reason
    out, table = _run_dir(tmp_path, ROWS, summary=summary)
    tool.main([str(out), "--table", str(table)])
    cases = tool.load_table(table)[CARD]["cases"]
    assert cases[0] == ["red", "bf16", 16384, 4096, 0, "triton"]  # cuda was faster, but unqualified
    assert all(c[5] != "cuda" for c in cases)


def test_pick_defaults_refuses_what_is_not_a_device_run(tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit, match="summary.txt"):
        tool.main([str(tmp_path)])
    out, table = _run_dir(tmp_path, ROWS)
    with pytest.raises(SystemExit, match="--margin"):
        tool.main([str(out), "--table", str(table), "--margin", "1.5"])
    (out / "bench" / CARD / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="results.csv"):
        tool.main([str(out), "--table", str(table)])


def test_the_nearest_measured_case_decides():
    table = {CARD: {"cases": EXPECTED}}
    pick = _measured.pick
    assert pick(table, CARD, "red", "bf16", 16384, 4096) == "cuda"
    assert pick(table, CARD, "red", "bf16", 12000, 4096) == "cuda"
    assert pick(table, CARD, "red", "bf16", 2048, 1024) == "triton"
    assert pick(table, CARD, "lowrank_edit_index", "bf16", 14 * 8, 2048, 4) == "torch"
    assert pick(table, CARD, "red", "fp16", 16384, 4096) is None  # no fp16 case measured
    assert pick(table, "nvidia-a100-sxm4-80gb", "red", "bf16", 16384, 4096) is None  # another card
    # distance = |log2| ratios summed: (8192, 1536) is 1 + 1.415 from the big RED case, 1 + 1 from
    # the small one
    assert pick(table, CARD, "red", "bf16", 8192, 1536) == "triton"
    tie = {CARD: {"cases": [["red", "bf16", 1024, 1024, 0, "torch"], ["red", "bf16", 4096, 1024, 0, "cuda"]]}}
    assert pick(tie, CARD, "red", "bf16", 2048, 1024) == "torch"  # a tie goes to the earlier case


def test_card_names_follow_the_benchmark_folders():
    assert _measured.card_slug("NVIDIA H100 80GB HBM3") == CARD
    assert _measured.card_slug("NVIDIA H200") == "nvidia-h200"


def test_the_shipped_table_is_a_valid_table():
    """The package's table parses and each case names a known op, dtype and backend."""
    from reft_kernels._measured_table import MEASURED

    tool = _tool()
    assert tool.load_table(tool.TABLE) == MEASURED
    for card, entry in MEASURED.items():
        assert card == _measured.card_slug(card) and {"date", "commit", "cases"} <= set(entry)
        for op, dtype, n, d, rank, be in entry["cases"]:
            assert op in _measured.OPS and dtype in _measured.DTYPE_NAMES.values() and be in _measured.CHOICES
            assert n > 0 and d > 0 and rank >= 0


def test_measured_choice_in_the_default_dispatch(monkeypatch):
    """resolve_backend takes a measured torch/triton choice on CUDA and ignores it elsewhere and
    under explicit requests; a measured cuda needs the extension (the fixed rule otherwise)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "triton_usable_on", lambda dev: dev.type == "cuda")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend(None, cuda, measured=lambda: "torch") == "torch"
    assert _backend.resolve_backend(None, cuda, measured=lambda: None) == "triton"
    assert _backend.resolve_backend(None, cuda) == "triton"
    monkeypatch.setattr(_backend, "cuda_extension_available", lambda: False)
    assert _backend.resolve_backend(None, cuda, measured=lambda: "cuda") == "triton"
    monkeypatch.setattr(_backend, "cuda_extension_available", lambda: True)
    assert _backend.resolve_backend(None, cuda, measured=lambda: "cuda") == "cuda"
    assert _backend.resolve_backend(None, cuda, measured=lambda: "cuda", cuda_unsupported="rank") == "triton"
    asked = []
    assert _backend.resolve_backend(None, torch.device("cpu"), measured=lambda: asked.append(1)) == "torch"
    assert _backend.resolve_backend("torch", cuda, measured=lambda: asked.append(1)) == "torch"
    assert asked == []  # only the default dispatch on CUDA asks
