"""The benchmark runner's plumbing on tiny shapes: the CSV schema, the correctness check that
comes before any timing, failing providers reported and not timed, the table, the CLI. No
wall-clock number is asserted."""
from __future__ import annotations

import csv

import pytest
import torch

from reft_kernels.benchmark import cases as C
from reft_kernels.benchmark import measure, runner
from reft_kernels.cli import main

CPU = torch.device("cpu")
TINY = [
    C.Case("red", "red", "fp32", 16, 24),
    C.Case("lowrank_edit", "loreft", "fp32", 16, 24, 3),
    C.Case("lowrank_edit", "noreft", "bf16", 16, 24, 3),
    C.Case("lowrank_edit_index", "f7+l7", "fp32", 2 * 16, 24, 2, index_rows=2 * 14, seq_len=16),
    C.Case("lowrank_edit_index", "f7+l7+R", "fp32", 2 * 16, 24, 2, index_rows=2 * 14, seq_len=16),
    C.Case("orthonormal_rows", "", "fp32", 0, 24, 3),
]


def _run(tmp_path, cases, providers):
    rows, path = runner.run(cases, providers, CPU, tmp_path, min_run_time=0.001, progress=False, log=lambda *a: None)
    with open(path) as f:
        return rows, list(csv.DictReader(f)), path


def test_schema_and_every_case_checks_ok(tmp_path):
    rows, written, path = _run(tmp_path, TINY, ["eager", "torch"])
    with open(path) as f:
        assert tuple(next(csv.reader(f))) == runner.COLUMNS
    assert len(written) == len(rows) > 0
    assert {r["status"] for r in written} == {"ok"}, [r["status"] for r in written if r["status"] != "ok"]
    for r in written:
        assert r["device"] == path.parent.name and r["torch"] == torch.__version__
        assert float(r["time_p20_ms"]) <= float(r["time_ms"]) <= float(r["time_p80_ms"])
        assert float(r["peak_mem_mb"]) >= 0
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == 1.0
    seen = {(r["op"], r["method"], r["provider"], r["mode"]) for r in written}
    assert ("lowrank_edit_index", "f7+l7", "torch", "fwd_bwd") in seen
    assert ("orthonormal_rows", "", "eager", "bwd") in seen
    # bandwidth where the op has a traffic model, and only there
    for r in written:
        assert bool(r["gbps"]) == (r["op"] in ("red", "lowrank_edit"))
    # a second run appends under the same header
    _run(tmp_path, TINY[:1], ["eager"])
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines.count(",".join(runner.COLUMNS)) == 1 and len(lines) == 1 + len(written) + 3


def test_wrong_provider_is_reported_and_not_timed(tmp_path, monkeypatch):
    real = C.ours_fn
    timed = []
    real_time = runner.block_times_ms
    monkeypatch.setattr(runner, "block_times_ms", lambda fn, *a, **k: (timed.append(fn), real_time(fn, *a, **k))[1])

    def wrong(case, backend):
        f = real(case, backend)
        return lambda **kw: f(**kw) * 1.01  # a 1% error: far above the fp32 tolerance

    monkeypatch.setattr(C, "ours_fn", wrong)
    rows, written, _ = _run(tmp_path, TINY[1:2], ["eager", "torch"])
    torch_rows = [r for r in written if r["provider"] == "torch"]
    assert len(torch_rows) == 3 and all(r["status"].startswith("mismatch: out") for r in torch_rows)
    assert all(r["time_ms"] == "" for r in torch_rows)
    assert len(set(timed)) == 3 and len(timed) == 3 * runner.CPU_ROUNDS  # eager's three modes only


def test_cpu_timing_interleaves_the_providers(monkeypatch):
    """On a CPU each round times every provider once, the order rotated round by round, and a
    provider's times are the blocks of all its rounds."""
    calls = []

    def fake_blocks(fn, *, min_run_time, warmup):
        calls.append(fn.__name__)
        return [{"a": 1.0, "b": 2.0, "c": 3.0}[fn.__name__] + len(calls) / 1000]

    monkeypatch.setattr(runner, "block_times_ms", fake_blocks)
    fns = {}
    for name in "abc":
        def f():
            pass
        f.__name__ = name
        fns[name] = f
    stats = runner._interleaved(fns, CPU, 0.05)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == runner.CPU_ROUNDS
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    for name, base in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        mine = sorted(base + (i + 1) / 1000 for i, n in enumerate(calls) if n == name)
        assert stats[name][0] == pytest.approx(mine[len(mine) // 2])
        assert stats[name][1] <= stats[name][0] <= stats[name][2]


def test_raising_provider_is_reported_and_not_timed(tmp_path, monkeypatch):
    def boom(case, backend):
        def f(**kw):
            raise RuntimeError("kernel exploded")
        return f

    monkeypatch.setattr(C, "ours_fn", boom)
    rows, written, path = _run(tmp_path, TINY[:1], ["eager", "torch"])
    bad = [r for r in written if r["provider"] == "torch"]
    assert len(bad) == 3 and all(r["status"] == "error: RuntimeError: kernel exploded" for r in bad)
    assert all(r["time_ms"] == "" for r in bad)
    table = (path.parent / "results.md").read_text()
    assert "error: RuntimeError: kernel exploded" in table and "eager PyTorch baseline" in table


def test_compile_provider_checked_and_timed(tmp_path):
    torch._dynamo.reset()
    rows, written, _ = _run(tmp_path, TINY[:1], ["eager", "compile"])
    comp = [r for r in written if r["provider"] == "compile"]
    assert len(comp) == 3 and {r["status"] for r in comp} == {"ok"}
    assert all(float(r["speedup_vs_compile"]) == 1.0 for r in comp)


def test_quick_sweep_covers_every_op_and_method():
    cases = runner.sweep("quick", CPU)
    assert {c.op for c in cases} == {"red", "lowrank_edit", "lowrank_edit_index", "orthonormal_rows"}
    assert {c.method for c in cases if c.op == "lowrank_edit"} == set(C.METHODS)
    gpu = runner.sweep("gpu", CPU)
    assert {c.n_rows for c in gpu if c.op == "red"} == {4096, 16384, 65536}
    assert {c.rank for c in gpu if c.op == "orthonormal_rows"} == {4, 8, 32}
    with pytest.raises(ValueError, match="unknown sweep"):
        runner.sweep("huge", CPU)


def test_f7_l7_index_rows():
    idx = C.f7_l7_index(2, 20)
    assert idx.tolist() == [*range(7), *range(13, 20), *range(20, 27), *range(33, 40)]


def test_peak_memory_counts_live_tensors():
    def f():
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2**21, dtype=torch.uint8)
        del a
        c = torch.empty(2**20, dtype=torch.uint8)
        return b, c

    assert measure.peak_mem_mb(f, CPU) == pytest.approx(3.0)


def test_min_traffic_model():
    assert measure.min_traffic_bytes("red", "fwd", 10, 8, 2) == 2 * 10 * 8 * 2
    assert measure.min_traffic_bytes("lowrank_edit", "fwd_bwd", 10, 8, 4) == 5 * 10 * 8 * 4
    assert measure.min_traffic_bytes("orthonormal_rows", "fwd", 0, 8, 4) is None


def test_cli_bench_writes_csv_and_table(tmp_path, capsys):
    assert main(["bench", "--quick", "--ops", "red", "--providers", "eager,torch", "--out", str(tmp_path),
                 "--min-run-time", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "| red | red | fp32 | 1024 |" in out
    (folder,) = tmp_path.iterdir()
    assert (folder / "results.csv").exists() and (folder / "results.md").exists()
    assert main(["bench", "--quick", "--providers", "eager,numpy", "--out", str(tmp_path)]) == 2


def test_plots_from_the_runner_csv(tmp_path):
    """bench/plot_results.py reads what the runner writes and draws the time and bandwidth figures."""
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "plot_results.py"
    spec = importlib.util.spec_from_file_location("plot_results", script)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    cases = [C.Case("red", "red", "fp32", n, 24) for n in (16, 64)]
    _, _, path = _run(tmp_path, cases, ["eager", "torch"])
    assert plot.main([str(path), "--out", str(tmp_path / "plots")]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"time_red_fwd_fp32.png", "bandwidth_red_fwd_bwd_fp32.png"} <= names


def test_variant_providers_run_under_their_switches(tmp_path, monkeypatch):
    """Each variant provider: its backend with its kernel variants chosen (``reft_kernels.kernels``)
    while it runs, and none after, on the ops whose kernels they change only, checked against
    float64 like every provider. On a CPU machine the CUDA kernels run through the host emulation
    and the Triton kernels through the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("the GPU sweep measures them on the real kernels")
    from reft_kernels import _cuda
    from reft_kernels.ops import variants
    from tests.cuda.emulation.build import build

    seen = {}
    real = C.ours_fn

    def spy(case, provider):
        fn = real(case, provider)
        if fn is None:
            return None

        def run(**kw):
            seen.setdefault((case.op, provider), variants.active().chosen())
            return fn(**kw)
        return run

    monkeypatch.setattr(C, "ours_fn", spy)
    monkeypatch.setattr(runner, "CPU_ROUNDS", 1)  # interpreted kernels: one round of timing is enough here
    cases = [C.Case("lowrank_edit", "loreft", "fp32", 40, 24, 3), C.Case("red", "red", "bf16", 40, 24)]
    providers = ["cuda", "triton", *C.VARIANT_PROVIDERS]
    with _cuda.on_host(build()):
        rows, written, _ = _run(tmp_path, cases, providers)
    assert {r["status"] for r in written} == {"ok"}, [r["status"] for r in written if r["status"] != "ok"]
    want = {(c.op, p) for c in cases for p in providers
            if p not in C.VARIANT_PROVIDERS or c.op in C.VARIANT_PROVIDERS[p][2]}
    assert {(r["op"], r["provider"]) for r in written} == want == set(seen)
    assert ("red", "cuda-cluster") not in want and ("lowrank_edit", "triton-tile2d") not in want
    for (op, provider), chosen in seen.items():
        assert chosen == C.VARIANT_PROVIDERS.get(provider, (None, {}))[1], (op, provider)
    assert variants.active() == variants.Variants()  # restored
    assert runner.default_providers(CPU) == ["eager", "compile", "torch"]  # variants: GPU sweeps only


def test_cli_bench_default_is_a_new_folder_per_run(tmp_path, monkeypatch):
    """Without --out, a run writes to reft-bench/<device>/<UTC date-time>/ under the current
    directory, never into the committed bench/results; --update-results appends to those."""
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--quick", "--ops", "red", "--providers", "eager", "--min-run-time", "0.001"]
    assert main(args) == 0
    (device_dir,) = (tmp_path / "reft-bench").iterdir()
    (run_dir,) = device_dir.iterdir()
    assert len(run_dir.name) == len("20260101-000000") and (run_dir / "results.csv").exists()
    assert not (tmp_path / "bench").exists()
    assert main(args + ["--update-results"]) == 0
    (committed,) = (tmp_path / "bench" / "results").iterdir()
    assert committed.name == device_dir.name and (committed / "results.csv").exists()
    with pytest.raises(SystemExit, match="exclusive"):
        main(args + ["--update-results", "--out", str(tmp_path / "x")])


def test_noise_warning_on_a_spread_copy_bandwidth():
    assert runner.noise_warning([10.0, 10.5, 9.8]) is None
    msg = runner.noise_warning([10.0, 6.0, 10.2])
    assert msg is not None and "too busy" in msg and "42%" in msg
    assert runner.noise_warning([10.0, 10.1, 9.9], load=0.4, cores=2) is None
    msg = runner.noise_warning([10.0, 10.1, 9.9], load=5.3, cores=2)  # busy throughout: steady but slow
    assert msg is not None and "load average is 5.3 on 2 cores" in msg


def _bench_script(name):
    """A script of bench/ loaded as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_sweep_draws_lines():
    """The quick sweep starts with the README's headline cases and has several sizes per line:
    N for RED and LoReFT at d = 256 (from cache-resident to past a 32 MiB L3), the batch for
    f7+l7, d for orthonormal_rows."""
    cases = runner.sweep("quick", CPU)
    assert len(cases) == len(set(cases))
    assert cases[:5] == [C.Case("red", "red", "fp32", 4096, 256),
                         C.Case("lowrank_edit", "loreft", "fp32", 4096, 256, 8),
                         C.Case("lowrank_edit_index", "f7+l7", "fp32", 1024, 256, 8, index_rows=112),
                         C.Case("lowrank_edit_index", "f7+l7+R", "fp32", 1024, 256, 8, index_rows=112),
                         C.Case("orthonormal_rows", "", "fp32", 0, 4096, 8)]
    for op, method in (("red", "red"), ("lowrank_edit", "loreft")):
        ns = {c.n_rows for c in cases if (c.op, c.method, c.dtype, c.d) == (op, method, "fp32", 256)}
        assert len(ns) >= 4 and min(ns) * 256 * 4 * 5 <= 32 * 2**20 < max(ns) * 256 * 4 * 2, ns
    for method in ("f7+l7", "f7+l7+R"):
        idx = [c for c in cases if c.op == "lowrank_edit_index" and c.method == method]
        assert len({c.index_rows for c in idx}) >= 3 and all(c.n_rows == c.index_rows // 14 * c.seq_len for c in idx)
    assert len({c.d for c in cases if c.op == "orthonormal_rows"}) >= 3


def test_plot_ceiling_label_and_cache_resident_points():
    """The bandwidth ceiling names the copy it is (DRAM on a CPU, HBM on a data-centre GPU); a
    point is cache-resident when its minimal traffic (bandwidth x time) fits the last-level
    cache, whose default follows the device."""
    plot = _bench_script("plot_results")
    assert plot.copy_label("cpu-amd-epyc") == "64 MiB copy (DRAM)"
    assert "HBM" in plot.copy_label("nvidia-h100-80gb-hbm3")
    assert plot.default_llc_mib("nvidia-h100-80gb-hbm3") == 50 and plot.default_llc_mib("cpu-amd-epyc") == 32
    row = {"gbps": 20.0, "time_ms": 1.0}  # 20 MB of traffic
    assert plot.cache_resident(row, 32) and not plot.cache_resident(row, 16)
    assert not plot.cache_resident({"gbps": None, "time_ms": 1.0}, 32)


def test_plot_colours_every_provider_the_runner_writes():
    """bench/plot_results.py gives each provider of the runner its own fixed colour (no colour
    picked from a provider's name, which could repeat another's) and lists no other provider."""
    plot = _bench_script("plot_results")
    assert sorted(plot.PROVIDERS) == sorted(C.ALL_PROVIDERS)
    assert len(plot.PROVIDERS) <= 10  # tab10: one colour each


def test_plots_of_f7l7_and_orthonormal_rows(tmp_path, capsys):
    """The f7+l7 and orthonormal_rows figures come from a tiny runner CSV; the generic time
    figures leave the indexed op to its own figure."""
    pytest.importorskip("matplotlib")
    plot = _bench_script("plot_results")
    cases = [C.Case("lowrank_edit_index", m, "fp32", b * 16, 24, 2, index_rows=b * 14, seq_len=16)
             for m in ("f7+l7", "f7+l7+R") for b in (1, 2)]
    cases += [C.Case("orthonormal_rows", "", "fp32", 0, d, 3) for d in (16, 32)]
    _, _, path = _run(tmp_path, cases, ["eager", "torch"])
    assert plot.main([str(path), "--out", str(tmp_path / "plots"), "--llc-mib", "1"]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {"f7l7_fp32.png", "orthonormal_rows_fp32.png"}
    assert "nothing plotted for time figures" in capsys.readouterr().out


def test_plot_e2e_from_a_csv_with_the_e2e_columns(tmp_path):
    """bench/plot_e2e.py draws one figure per setup from the newest run that measured it (one per
    run with --all-runs), from rows in e2e.csv's columns."""
    pytest.importorskip("matplotlib")
    from reft_kernels.benchmark.e2e import E2E_COLUMNS

    plot = _bench_script("plot_e2e")
    rows = []
    for date, ms in (("2026-01-01T00:00:00+00:00", 100.0), ("2026-01-02T00:00:00+00:00", 90.0)):
        for provider, case, method, slower in (("frozen", "frozen", "none", 0), ("lora", "lora", "lora", 20),
                                               ("naive", "loreft_f7l7", "loreft f7+l7", 10),
                                               ("ours", "loreft_f7l7", "loreft f7+l7", 5)):
            t = ms * (1 + slower / 100)
            rows.append({"date": date, "commit": "abc1234", "device": "cpu-test", "op": "e2e_train_step",
                         "method": method, "provider": provider, "mode": "train_step", "time_ms": t,
                         "status": "ok", "model": "llama-d32-l2", "seq_len": 16, "batch": 2, "case": case,
                         "tokens_per_s": 32 / (t * 1e-3), "overhead_pct": slower, "overhead_p20_pct": slower - 1,
                         "overhead_p80_pct": slower + 1, "threads": 2, "timed_steps": 4})
    rows.append(dict(rows[0], provider="naive", case="red", method="red", status="error: OOM", tokens_per_s=""))
    path = tmp_path / "e2e.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=E2E_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    runs = plot.load_runs(path)
    assert list(runs) == [("llama-d32-l2", "16", "2", "2026-01-02T00:00:00+00:00")]
    assert plot.main([str(path), "--out", str(tmp_path / "plots")]) == 0
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["e2e_llama-d32-l2_16x2.png"]
    assert plot.main([str(path), "--out", str(tmp_path / "all"), "--all-runs"]) == 0
    assert len(list((tmp_path / "all").iterdir())) == 2
