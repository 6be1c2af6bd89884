"""The end-to-end benchmark's plumbing on a tiny LLaMA (d=32, 2 layers, seq 16, batch 2): every
provider runs a training step, the naive baseline computes what ours computes (same loss, same
intervention gradients), the rows have the schema, the CLI writes its files. Correctness only: no
wall-clock number is asserted."""
from __future__ import annotations

import csv

import pytest
import torch
from torch.nn.utils import parametrize

pytest.importorskip("transformers")

from reft_kernels.benchmark import e2e  # noqa: E402
from reft_kernels.benchmark import e2e_models as M  # noqa: E402
from reft_kernels.benchmark.runner import COLUMNS  # noqa: E402
from reft_kernels.cli import main  # noqa: E402
from reft_kernels.orthogonal import orthonormal_rows  # noqa: E402

CPU = torch.device("cpu")
SPEC = e2e.SPECS["tiny"]
SEQ, BSZ = 16, 2
HAS_PEFT = True
try:
    import peft  # noqa: F401
except ImportError:
    HAS_PEFT = False


@pytest.fixture(scope="module")
def base():
    with _one_thread():
        return M.build_base(SPEC, CPU)


class _one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@pytest.fixture(autouse=True)
def _threads():
    with _one_thread():
        yield


def _inputs():
    return M.batch(SPEC.vocab, BSZ, SEQ, CPU)


@pytest.mark.parametrize("provider,case", [("frozen", None), ("lora", None)] +
                         [(p, c) for c in M.CASES for p in ("naive", "ours")])
def test_every_provider_takes_a_step(base, provider, case):
    if provider == "lora" and not HAS_PEFT:
        pytest.skip("peft not installed")
    base_before = [p.detach().clone() for p in base.parameters()]
    s = M.make_setup(provider, M.CASES.get(case), base, _inputs())
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    s.step()
    s.step()
    assert torch.isfinite(s.last_loss)
    assert all(p.grad is None for p in s.model.parameters())  # zero_grad(set_to_none) or nothing trained
    d, r, L = SPEC.d, M.RANK, SPEC.layers
    want = {"frozen": 0, "red": L * 2 * d, "loreft_f7l7": L * (2 * r * d + r), "loreft_all": L * (2 * r * d + r)}
    if provider == "lora":
        kv = d // SPEC.heads * SPEC.kv_heads
        assert s.trainable_params() == L * r * ((d + d) * 2 + (d + kv) * 2)
    else:
        assert s.trainable_params() == want[case or provider]
    if provider != "frozen":  # the optimizer moved the adapter's parameters
        assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), base_before))  # each setup trains a copy
    assert all(p.requires_grad for p in base.parameters())


def _ours_init(ours, case):
    """Per-layer starting values of ours' interventions, for the naive provider (RED's are drawn
    at random first, so that the check is not made at the identity)."""
    ivs = ours.model.reft_interventions[0]
    init = []
    for i in range(SPEC.layers):
        iv = ivs[f"layer{i}"]
        if case.method == "red":
            with torch.no_grad():
                iv.scale.copy_(1 + 0.3 * torch.randn_like(iv.scale))
                iv.bias.copy_(0.3 * torch.randn_like(iv.bias))
            init.append({"scale": iv.scale.detach(), "bias": iv.bias.detach()})
        else:
            init.append({"R": iv.R.detach(), "W": iv.weight.detach(), "b": iv.bias.detach()})
    return init


@pytest.mark.parametrize("case", list(M.CASES))
def test_naive_computes_what_ours_computes(base, case):
    """Same loss and same gradients of every intervention parameter: W and b (and RED's scale and
    bias) directly; for R, the naive gradient with respect to the materialised R (pyreft's
    parametrization, computed once under ``parametrize.cached``) carried back through ours'
    ``orthonormal_rows`` must equal ours' gradient of its ``rotation`` parameter."""
    c = M.CASES[case]
    inputs = _inputs()
    ours = M.make_setup("ours", c, base, inputs)
    init = _ours_init(ours, c)
    naive = M.make_setup("naive", c, base, inputs, init=init)
    loss_ours = ours.model(**inputs).loss
    loss_ours.backward()
    nivs = naive.model.naive_interventions
    with parametrize.cached():
        mats = []
        if c.method == "loreft":
            for iv in nivs:
                w = iv.rotate.weight  # cached: both of pyreft's uses in the forward see this tensor
                w.retain_grad()
                mats.append(w)
        loss_naive = naive.model(**inputs).loss
        loss_naive.backward()
    torch.testing.assert_close(loss_naive, loss_ours, rtol=1e-5, atol=1e-6)
    ours_ivs = ours.model.reft_interventions[0]
    for i, niv in enumerate(nivs):
        oiv = ours_ivs[f"layer{i}"]
        if c.method == "red":
            pairs = [(niv.scale.grad, oiv.scale.grad), (niv.bias.grad, oiv.bias.grad)]
        else:
            X = oiv.rotation.detach().clone().requires_grad_()
            (want_rot,) = torch.autograd.grad(orthonormal_rows(X), X, mats[i].grad.t())
            pairs = [(niv.learned_source.weight.grad, oiv.weight.grad), (niv.learned_source.bias.grad, oiv.bias.grad),
                     (want_rot, oiv.rotation.grad)]
        for got, want in pairs:
            assert want is not None and want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_naive_rotation_stays_orthonormal_while_training(base):
    """torch's Householder orthogonal map zeroes R once weight decay nudges its +-1 diagonal: the
    benchmark's AdamW must leave it alone (weight_decay=0), or the naive edit becomes a no-op."""
    s = M.make_setup("naive", M.CASES["loreft_all"], base, _inputs())
    for _ in range(3):
        s.step()
    for iv in s.model.naive_interventions:
        w = iv.rotate.weight
        torch.testing.assert_close(w.t() @ w, torch.eye(M.RANK), atol=1e-5, rtol=0)


def test_naive_positions_are_ours():
    loc = M.naive_locations(M.CASES["loreft_f7l7"], 2, 20, CPU)
    assert loc.tolist() == [[*range(7), *range(13, 20)]] * 2
    assert M.naive_locations(M.CASES["loreft_all"], 1, 5, CPU).tolist() == [[0, 1, 2, 3, 4]]


def _read(path):
    with open(path) as f:
        header = next(csv.reader(f))
    with open(path) as f:
        return header, list(csv.DictReader(f))


def test_rows_schema_and_files(tmp_path):
    providers = list(M.PROVIDERS) if HAS_PEFT else ["frozen", "naive", "ours"]
    rows, path = e2e.run_e2e(e2e.plan("tiny"), providers, ["loreft_f7l7", "red"], CPU, tmp_path,
                             log=lambda *a: None)
    header, written = _read(path)
    assert tuple(header) == e2e.E2E_COLUMNS and e2e.E2E_COLUMNS[:len(COLUMNS)] == COLUMNS
    n_rows = sum(p in providers for p in ("frozen", "lora")) + 2 * sum(p in providers for p in ("naive", "ours"))
    assert len(written) == len(rows) == n_rows
    assert {r["status"] for r in written} == {"ok"}, [r["status"] for r in written]
    got = {(r["case"], r["provider"]) for r in written}
    assert {("frozen", "frozen"), ("loreft_f7l7", "naive"), ("loreft_f7l7", "ours"), ("red", "ours")} <= got
    for r in written:
        assert r["op"] == "e2e_train_step" and r["mode"] == "train_step" and r["device"] == path.parent.name
        assert int(r["n_rows"]) == SEQ * BSZ and r["model"] == SPEC.name
        assert float(r["time_p20_ms"]) <= float(r["time_ms"]) <= float(r["time_p80_ms"])
        assert float(r["tokens_per_s"]) == pytest.approx(SEQ * BSZ / (float(r["time_ms"]) * 1e-3), rel=1e-3)
        assert float(r["peak_mem_mb"]) >= 0 and float(r["resident_mb"]) > 0
        assert r["overhead_pct"] != ""
    frozen = next(r for r in written if r["provider"] == "frozen")
    assert float(frozen["overhead_pct"]) == 0.0 and int(frozen["trainable_params"]) == 0
    # launches: the frozen step has its own, an adapter adds some per layer
    assert int(frozen["launches"]) > 0 and float(frozen["launches_per_layer"]) == 0.0
    for r in written:
        if r["provider"] != "frozen":
            assert float(r["launches_per_layer"]) > 0, r
            assert int(r["launches"]) == int(frozen["launches"]) + round(float(r["launches_per_layer"]) * SPEC.layers)
    assert float(next(r for r in written if r["provider"] == "naive")["speedup_vs_eager"]) == 1.0
    assert next(r for r in written if r["case"] == "loreft_f7l7")["index_rows"] == str(BSZ * 14)
    table = (path.parent / "e2e.md").read_text()
    assert "| llama-d32-l2 | 16 x 2 | loreft f7+l7 | ours |" in table


def test_failing_provider_is_reported_not_timed(tmp_path, monkeypatch):
    real = M.make_setup

    def broken(provider, case, base, inputs, **kw):
        if provider == "ours":
            raise RuntimeError("adapter exploded")
        return real(provider, case, base, inputs, **kw)

    monkeypatch.setattr(M, "make_setup", broken)
    rows, path = e2e.run_e2e(e2e.plan("tiny"), ["frozen", "ours"], ["red"], CPU, tmp_path, log=lambda *a: None)
    _, written = _read(path)
    bad = next(r for r in written if r["provider"] == "ours")
    assert bad["status"] == "error: RuntimeError: adapter exploded" and bad["time_ms"] == ""


def test_cli_e2e_writes_files(tmp_path, capsys):
    assert main(["bench", "--e2e", "--e2e-sweep", "tiny", "--device", "cpu", "--providers", "frozen,ours",
                 "--cases", "red", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert "| llama-d32-l2 | 16 x 2 | red | ours |" in capsys.readouterr().out
    (folder,) = tmp_path.iterdir()
    assert (folder / "e2e.csv").exists() and (folder / "e2e.md").exists()
    assert not (folder / "results.csv").exists()  # the microbenchmarks' file is left alone
    assert main(["bench", "--e2e", "--providers", "frozen,adapterx", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--e2e", "--cases", "nope", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown e2e sweep"):
        e2e.plan("huge")


def test_plans():
    """The named sweeps (nothing built or downloaded): SmolLM2 only when asked for."""
    assert [spec.name for spec, _, _ in e2e.plan("cpu")] == ["llama-d256-l6"]
    assert [spec.source for spec, _, _ in e2e.plan("cpu", smollm2=True)] == ["random", "smollm2"]
    assert [spec.source for spec, _, _ in e2e.plan("smollm2")] == ["smollm2"]
    (gpu, shapes, _), = e2e.plan("gpu")
    assert (gpu.d, gpu.layers, gpu.dtype) == (2048, 16, "bf16") and shapes == [(512, 32), (2048, 8)]


def test_an_older_csv_is_upgraded_before_appending(tmp_path):
    """Rows of an e2e.csv written before a column was added keep their values under the new
    header, and the new run's rows line up with them."""
    folder = tmp_path / "cpu"
    folder.mkdir()
    path = folder / "e2e.csv"
    old_cols = [c for c in e2e.E2E_COLUMNS if c not in ("launches", "launches_per_layer")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols, lineterminator="\n")
        w.writeheader()
        w.writerow({c: ("old-run" if c == "commit" else "") for c in old_cols})
    e2e._upgrade_header(path)
    header, written = _read(path)
    assert tuple(header) == e2e.E2E_COLUMNS
    assert [r["commit"] for r in written] == ["old-run"] and written[0]["launches"] == ""
    bad = folder / "bad.csv"
    bad.write_text("date,whatever\n1,2\n")
    with pytest.raises(ValueError, match="whatever"):
        e2e._upgrade_header(bad)
