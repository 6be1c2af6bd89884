"""Microbenchmark of the multi-adapter ops (``reft-kernels bench --multi``): K adapters in one
batch against the same batch with one adapter and against one call per adapter.

Cases: a batch of ``batch`` sequences of ``seq`` rows of width d; each sequence takes one adapter
(drawn once with a fixed seed from K), for K in 1, 4, 16, 64. Ops and regimes:

- ``lowrank_edit_multi`` LoReFT-shaped (``C is B``, A, a), rank r: ``f7+l7`` (14 listed rows per
  sequence through ``index``, ids one per entry) and ``all`` (every row, ids one per row);
- ``red_multi``, every row: ids one per row (``all``) and one per sequence (``seq``: (batch,) ids
  for the (batch, seq, d) view of the rows).

Providers, all on the default backend of the device (``backend=None``):
- ``multi``: the multi-adapter op on the mixed batch;
- ``single``: the same batch through the one-adapter op (``lowrank_edit`` / ``red``) with adapter
  0's parameters: the cost to match;
- ``split``: one call of the one-adapter op per adapter present, each on its own rows (found
  before timing): a clone of ``h``, then ``lowrank_edit_`` on each adapter's listed rows; for RED
  the rows gathered, edited and scattered back per adapter.

And, for the low-rank edit over every row when PEFT is installed, PEFT's LoRA on the same batch
(the cost to compare with, at the op level, of what ``bench --mixed-generate`` compares end to
end): one ``nn.Linear(d, d)`` (frozen) with K LoRA adapters of rank r, each sequence its own
adapter through PEFT's ``adapter_names`` (``lora_mixed``: PEFT's mixed-batch forward, one
gather, two products and one indexed add per adapter present) and with adapter ``a0`` alone
(``lora_single``). Their ratio, ``lora_mixed_vs_single``, is what a mixed batch costs PEFT over
one adapter, beside ours (``multi_vs_single``); the LoRA times include the base layer's d x d
product, which the ReFT edit has no counterpart of.

Each is timed forward (``fwd``) and forward + backward (``fwd_bwd``, gradients of h and every
parameter) in interleaved rounds: one round times every provider once (``measure.time_ms``: a
blocked autorange on a CPU, ``do_bench`` on a GPU), in a rotated order, so a change of machine
load hits all of them alike; reported are the medians over rounds, and the ratios multi/single and
multi/split as medians of the per-round ratios. Before timing, the multi op's output and gradients
are checked against the float64 reference (``status``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference as ref
from ..functional import lowrank_edit, lowrank_edit_, red
from ..multi import lowrank_edit_multi, red_multi
from .cases import DTYPES, f7_l7_index
from .measure import _quantiles, time_ms

PROVIDERS = ("multi", "single", "split")
LORA_PROVIDERS = ("lora_mixed", "lora_single")
MODES = ("fwd", "fwd_bwd")
KS = (1, 4, 16, 64)


@dataclass(frozen=True)
class MultiCase:
    op: str       # "lowrank_edit_multi" or "red_multi"
    regime: str   # "f7+l7" (index) or "all" (every row)
    k: int
    batch: int
    seq: int
    d: int
    r: int | None
    dtype: str

    def label(self) -> str:
        rank = f" r={self.r}" if self.r else ""
        return f"{self.op} {self.regime} K={self.k} {self.batch}x{self.seq} d={self.d}{rank} {self.dtype}"


def cases(device: torch.device) -> list:
    """The sweep: on a CPU d = 576 (SmolLM2-135M), r = 4, 16 sequences of 64 rows, fp32; on a
    GPU d = 4096, r = 8, 32 sequences of 512 rows, bf16."""
    if device.type == "cuda":
        batch, seq, d, r, dt = 32, 512, 4096, 8, "bf16"
    else:
        batch, seq, d, r, dt = 16, 64, 576, 4, "fp32"
    out = []
    for k in KS:
        out += [MultiCase("lowrank_edit_multi", "f7+l7", k, batch, seq, d, r, dt),
                MultiCase("lowrank_edit_multi", "all", k, batch, seq, d, r, dt),
                MultiCase("red_multi", "all", k, batch, seq, d, None, dt),
                MultiCase("red_multi", "seq", k, batch, seq, d, None, dt)]
    return out


def tiny_cases() -> list:
    """Tiny shapes for the tests: every op and regime, K = 1 and 3."""
    return [MultiCase(op, regime, k, 3, 16, 24, (2 if op != "red_multi" else None), "fp32")
            for k in (1, 3) for op, regime in (("lowrank_edit_multi", "f7+l7"), ("lowrank_edit_multi", "all"),
                                               ("red_multi", "all"), ("red_multi", "seq"))]


def make_inputs(case: MultiCase, device, seed: int = 0) -> dict:
    """h, the stacks (requiring grad), the ids, the index (f7+l7) and each present adapter's
    rows (or index entries) for the split provider."""
    gen = torch.Generator().manual_seed(seed)
    n = case.batch * case.seq
    dt = DTYPES[case.dtype]
    d, k = case.d, case.k

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    h = draw(n, d).detach().to(dt).requires_grad_()
    per_seq = torch.randint(0, k, (case.batch,), generator=gen)
    out = {"h": h}
    if case.op == "red_multi":
        out.update(scale=draw(k, d), bias=draw(k, d))
        ids = per_seq.repeat_interleave(case.seq)
    else:
        r = case.r
        out.update(R=draw(k, r, d, scale=d ** -0.5), W=draw(k, r, d, scale=d ** -0.5), b=draw(k, r))
        if case.regime == "f7+l7":
            index = f7_l7_index(case.batch, case.seq)
            ids = per_seq.repeat_interleave(14)
            out["index"] = index.to(device)
        else:
            ids = per_seq.repeat_interleave(case.seq)
    out["ids"] = ids.to(device)
    out["per_seq"] = per_seq
    rows = torch.arange(ids.numel())
    out["groups"] = {int(a): rows[ids == a].to(device) for a in ids.unique()}
    return out


def providers(case: MultiCase, x: dict) -> dict:
    """name -> (fn() -> y, the leaves requiring grad)."""
    h, ids = x["h"], x["ids"]
    if case.op == "red_multi":
        s, t = x["scale"], x["bias"]
        leaves = [h, s, t]

        def split():
            y = h.clone()
            for a, rows in x["groups"].items():
                y = y.index_put((rows,), red(h[rows], s[a], t[a]))
            return y

        if case.regime == "seq":  # (batch,) ids for the (batch, seq, d) view
            per_seq, h3 = x["per_seq"].to(h.device), h.view(case.batch, case.seq, h.shape[-1])
            multi = lambda: red_multi(h3, s, t, per_seq).view(h.shape)  # noqa: E731
        else:
            multi = lambda: red_multi(h, s, t, ids)  # noqa: E731
        return {"multi": (multi, leaves),
                "single": (lambda: red(h, s[0], t[0]), leaves),
                "split": (split, leaves)}
    R, W, b = x["R"], x["W"], x["b"]
    leaves = [h, R, W, b]
    index = x.get("index")

    def split():
        y = h.clone()
        for a, entries in x["groups"].items():
            rows = entries if index is None else index[entries]
            Ra = R[a]  # one tensor as B and C: the tied edit
            lowrank_edit_(y, Ra, W[a], b[a], Ra, index=rows)
        return y

    def single():
        R0 = R[0]
        return lowrank_edit(h, R0, W[0], b[0], R0, index=index)

    out = {"multi": (lambda: lowrank_edit_multi(h, R, W, b, R, adapter_ids=ids, index=index), leaves),
           "single": (single, leaves),
           "split": (split, leaves)}
    if index is None:
        out.update(_lora_providers(case, x))
    return out


def _lora_providers(case: MultiCase, x: dict) -> dict:
    """``lora_mixed`` and ``lora_single`` (module docstring) on the rows of ``x["h"]`` seen as
    (batch, seq, d), or {} when PEFT is not installed."""
    try:
        import peft
    except ImportError:
        return {}
    h, per_seq = x["h"], x["per_seq"]
    d, r, k = case.d, case.r, case.k
    gen = torch.Generator().manual_seed(2)

    class _Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d, bias=False)

        def forward(self, t):
            return self.proj(t)

    base = _Proj().to(device=h.device, dtype=h.dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg, adapter_name="a0")
    for a in range(1, k):
        model.add_adapter(f"a{a}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # LoRA's B starts at zero: draw it, so that every product is computed
        for a in range(k):
            w = layer.lora_B[f"a{a}"].weight
            w.copy_(torch.randn(w.shape, generator=gen).to(w) * r ** -0.5)
    layer.set_adapter("a0")
    model.train()
    x3 = h.detach().reshape(case.batch, case.seq, d).requires_grad_()
    names = [f"a{int(a)}" for a in per_seq]
    lora = [p.requires_grad_() for n, p in layer.named_parameters() if "lora_" in n]  # every adapter trains
    leaves = [x3, *lora]  # (unused ones allowed: as the multi op's stacks)
    return {"lora_mixed": (lambda: layer(x3, adapter_names=names), leaves),
            "lora_single": (lambda: layer(x3), leaves)}


def check(case: MultiCase, x: dict, fn, leaves) -> str:
    """'ok' when the multi op's output and gradients match the float64 reference (fp32: 1e-4 of
    each tensor's scale; bf16/fp16: 2e-2), else what differs."""
    g = torch.randn(x["h"].shape, generator=torch.Generator().manual_seed(1)).to(x["h"])
    y = fn()
    got = [y, *torch.autograd.grad(y, leaves, g)]
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    if case.op == "red_multi":
        y64 = ref.red_multi_reference(x64[0], x64[1], x64[2], x["ids"])
    else:
        h64, R64, W64, b64 = x64
        y64 = ref.lowrank_edit_multi_reference(h64, R64, W64, b64, R64, adapter_ids=x["ids"], index=x.get("index"))
    want = [y64, *torch.autograd.grad(y64, x64, g.double())]
    rtol = 1e-4 if case.dtype == "fp32" else 2e-2
    for name, a, w in zip(["out", "h", *("params",) * (len(leaves) - 1)], got, want):
        err = (a.double() - w).abs().max().item()
        if not err <= rtol * max(w.abs().max().item(), 1.0):
            return f"mismatch: {name} error {err:.3g}"
    return "ok"


def _timed(fn, leaves, mode):
    if mode == "fwd":
        return fn
    return lambda: torch.autograd.grad(fn(), leaves, torch.ones_like(leaves[0]), allow_unused=True)


def _median(xs):
    return _quantiles(xs, [0.5])[0]


def run_case(case: MultiCase, device, *, rounds: int = 5, min_run_time: float = 0.05) -> list:
    """Rows (one per mode) of one case, every provider timed in ``rounds`` interleaved rounds."""
    x = make_inputs(case, device)
    fns = providers(case, x)
    base = {"op": case.op, "regime": case.regime, "k": case.k, "rows": x["h"].shape[0],
            "edited": x["ids"].numel(), "d": case.d, "r": case.r or "", "dtype": case.dtype}
    try:
        status = check(case, x, *fns["multi"])
    except Exception as exc:  # noqa: BLE001 - reported, not timed
        status = f"error: {type(exc).__name__}: {exc}"
    rows = []
    for mode in MODES:
        row = dict(base, mode=mode, status=status)
        if status == "ok":
            timed = {p: _timed(fn, leaves, mode) for p, (fn, leaves) in fns.items()}
            names = tuple(fns)
            per = {p: [] for p in names}
            for i in range(rounds):
                shift = i % len(names)
                order = names[shift:] + names[:shift]
                for p in order:
                    per[p].append(time_ms(timed[p], device, min_run_time=min_run_time)[0])
            for p in names:
                row[f"{p}_ms"] = _median(per[p])
            row["multi_vs_single"] = _median([m / s for m, s in zip(per["multi"], per["single"])])
            row["multi_vs_split"] = _median([m / s for m, s in zip(per["multi"], per["split"])])
            if "lora_mixed" in per:
                row["lora_mixed_vs_single"] = _median([m / s for m, s in zip(per["lora_mixed"], per["lora_single"])])
        rows.append(row)
    return rows


COLUMNS = ("op", "regime", "k", "rows", "edited", "d", "r", "dtype", "mode", "multi_ms", "single_ms", "split_ms",
           "multi_vs_single", "multi_vs_split", "lora_mixed_ms", "lora_single_ms", "lora_mixed_vs_single", "status")


def table(rows) -> str:
    head = ["op", "regime", "K", "rows", "edited", "mode", "multi ms", "single ms", "split ms",
            "vs one adapter", "vs one call per adapter", "PEFT LoRA mixed ms", "PEFT LoRA one ms",
            "PEFT mixed vs one", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r["status"] == "ok"
        lora = ok and r.get("lora_mixed_ms") is not None
        vals = [r["op"], r["regime"], r["k"], r["rows"], r["edited"], r["mode"],
                *(f"{r[f'{p}_ms']:.4g}" if ok else "" for p in PROVIDERS),
                f"{r['multi_vs_single']:.2f}x" if ok else "", f"{r['multi_vs_split']:.2f}x" if ok else "",
                *(f"{r[f'{p}_ms']:.4g}" if lora else "" for p in LORA_PROVIDERS),
                f"{r['lora_mixed_vs_single']:.2f}x" if lora else "",
                "" if ok else r["status"]]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def run(case_list, device="cpu", *, rounds: int = 5, min_run_time: float = 0.05, out=None, log=print) -> list:
    """Every case; prints the table (ratios: multi over single, multi over split: below 1 means
    the multi op is faster), writes ``multi.csv`` and ``multi.md`` to ``out`` when given."""
    device = torch.device(device)
    rows = []
    for case in case_list:
        rows += run_case(case, device, rounds=rounds, min_run_time=min_run_time)
    text = table(rows)
    log(f"multi-adapter ops on {device}, {torch.get_num_threads()} thread(s), medians over {rounds} interleaved "
        "rounds; ratios below 1: the multi op is faster")
    log(text)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "multi.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        (folder / "multi.md").write_text(text)
        log(f"written to {folder / 'multi.csv'} and multi.md")
    return rows
