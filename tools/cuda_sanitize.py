"""A short run of every CUDA C++ kernel of reft_kernels._C, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/cuda_sanitize.py

Covers both RED kernels and the partial sums, and the low-rank forward, backward dh and
parameter-gradient kernels: with and without an index (-1 padding, in place), every optional
term, tied and untied, an activation, ranks across the chunk boundaries (1, 8, 9, 33, 64), ragged
d (tails and unaligned rows take the scalar paths), fp32 / bf16 / bf16 with fp32 parameters.
Small shapes: the sanitizer slows kernels down 10-100x. Prints one line per case; the values
are also compared with the PyTorch path so that a silently wrong result fails the run too.
The opt-in kernels (``reft_kernels.kernels(cuda_params="vector", cuda_finish="split")``) run the
RED and low-rank cases again, with more rows (several row blocks, a split finish).
The one-pass cluster backward (``kernels(cuda_lowrank_bwd="cluster")``, sm_90 and newer) runs on
its own cases: cluster sizes 1, 2, 4 and 8, several row blocks per cluster, an index with -1
rows, ragged d, fp32 / bf16 / fp16 with fp32 parameters (its distributed shared-memory reads and
double-buffered async copies are what racecheck looks at there).
"""
from __future__ import annotations

import sys

import torch

from reft_kernels import kernels, lowrank_edit, lowrank_edit_, red


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def run_red(d, dtype, pdtype, n=37):
    h = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    s = torch.randn(d, device="cuda", dtype=pdtype, requires_grad=True)
    t = torch.randn(d, device="cuda", dtype=pdtype, requires_grad=True)
    g = torch.randn(n, d, device="cuda", dtype=dtype)
    outs = {}
    for be in ("cuda", "torch"):
        y = red(h, s, t, backend=be)
        outs[be] = (y, *torch.autograd.grad(y, (h, s, t), g))
    return all(_close(a, b, dtype) for a, b in zip(outs["cuda"], outs["torch"]))


def run_lowrank(d, r, dtype, pdtype, terms, tied, act, index, inplace, n=21, bwd="split"):
    dev = "cuda"
    h0 = torch.randn(n, d, device=dev, dtype=dtype)
    mk = lambda *s: (torch.randn(*s, device=dev) / d ** 0.5).to(pdtype).requires_grad_()  # noqa: E731
    p = {"B": mk(r, d), "A": mk(r, d) if "A" in terms else None, "a": mk(r) if "a" in terms else None,
         "C": mk(r, d) if "C" in terms else None, "c": mk(r) if "c" in terms else None}
    if tied:
        p["C"] = p["B"]
    idx = torch.tensor(index, device=dev) if index is not None else None
    g = torch.randn(n, d, device=dev, dtype=dtype)
    leaves = [v for k, v in p.items() if v is not None and not (tied and k == "C")]
    outs = {}
    with kernels(cuda_lowrank_bwd=bwd):
        for be in ("cuda", "torch"):
            h = h0.clone().requires_grad_()
            x = h * 1 if inplace else h
            fn = lowrank_edit_ if inplace else lowrank_edit
            y = fn(x, p["B"], p["A"], p["a"], p["C"], p["c"], act=act, index=idx, backend=be)
            outs[be] = (y, *torch.autograd.grad(y, [h, *leaves], g))
    return all(_close(a, b, dtype) for a, b in zip(outs["cuda"], outs["torch"]))


def _plans_cluster(d, r) -> bool:
    """The low-rank backward with kernels(cuda_lowrank_bwd="cluster") runs the cluster kernel for
    (d, r) on this device and build: its own decision (cuda_impl.bwd_plan)."""
    from reft_kernels.ops.lowrank_edit import cuda_impl

    with kernels(cuda_lowrank_bwd="cluster"):
        try:
            return cuda_impl.bwd_plan(torch.empty(0, device="cuda"), d, r) == "cluster"
        except ValueError:  # the cluster backward cannot take (d, r) here
            return False


def cluster_cases():
    """Cases of the cluster backward, or none where it does not run (below sm_90, no sm_90 code)."""
    if not _plans_cluster(64, 8):
        print("cluster backward: not available on this device or build: skipped", flush=True)
        return []
    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    index = [3, -1, 0, 60, 7, -1, 12] + list(range(20, 50))
    # d -> cluster size: 100 -> 1, 600 -> 2, 1500 -> 4, 4096 -> 8 (at most 512 columns per CTA)
    return [
        (100, 4, f32, f32, "BAaCc", False, "gelu", None, False, 70),
        (600, 8, bf, bf, "BAac", True, None, index, True, 70),
        (1500, 16, f16, f32, "BAaCc", False, "silu", None, False, 50),
        (4096, 8, bf, f32, "BAac", True, None, None, False, 40),
        # 600 rows = 38 row blocks: several per cluster (about 16 clusters of 8 fit an H100, estimated)
        (4096, 9, bf, bf, "Bac", False, "tanh", index, True, 600),
    ]


def main() -> int:
    ok = True
    bf, f32 = torch.bfloat16, torch.float32
    for d, dtype, pdtype in [(100, f32, f32), (257, bf, bf), (4096, bf, f32), (7, torch.float16, torch.float16)]:
        res = run_red(d, dtype, pdtype)
        ok &= res
        print(f"red d={d} {dtype} params {pdtype}: {'ok' if res else 'MISMATCH'}", flush=True)
    index = [3, -1, 0, 20, 7, -1, 12]
    cases = [
        (100, 1, f32, f32, "BAaCc", False, None, None, False),
        (256, 8, bf, bf, "BAac", True, "gelu", None, False),
        (257, 9, bf, f32, "BAa", False, "silu", index, True),
        (64, 33, f32, f32, "BC", True, None, index, False),
        (1000, 64, bf, bf, "Bac", False, "tanh", index, True),
        (4096, 4, bf, f32, "BAac", True, None, None, False),
    ]
    for case in cases:
        res = run_lowrank(*case)
        ok &= res
        d, r, dtype, pdtype, terms, tied, act, index_, inplace = case
        print(f"lowrank_edit d={d} r={r} {dtype} params {pdtype} terms={terms} tied={tied} act={act} "
              f"index={'yes' if index_ else 'no'} inplace={inplace}: {'ok' if res else 'MISMATCH'}", flush=True)
    # The selected kernels on the same cases, with enough rows for several row blocks and a split
    # finish: the 16-byte parameter-gradient kernel and the parallel partial sums.
    with kernels(cuda_params="vector", cuda_finish="split"):
        for d, dtype, pdtype in [(100, f32, f32), (4096, bf, f32)]:
            res = run_red(d, dtype, pdtype, n=600)
            ok &= res
            print(f"red (split finish) n=600 d={d} {dtype}: {'ok' if res else 'MISMATCH'}", flush=True)
        for case in cases:
            res = run_lowrank(*case, n=300 if case[7] is None else 21)
            ok &= res
            print(f"lowrank_edit (vector params, split finish) d={case[0]} r={case[1]} {case[2]} tied={case[5]} "
                  f"index={'yes' if case[7] else 'no'}: {'ok' if res else 'MISMATCH'}", flush=True)
    for case in cluster_cases():
        d, r, dtype, pdtype, terms, tied, act, index_, inplace, n = case
        taken = _plans_cluster(d, r)  # a case the cluster kernel does not take would test the split one
        res = taken and run_lowrank(*case[:-1], n=n, bwd="cluster")
        ok &= res
        verdict = "NOT TAKEN (bwd_plan: split)" if not taken else ("ok" if res else "MISMATCH")
        print(f"lowrank_edit cluster bwd n={n} d={d} r={r} {dtype} params {pdtype} terms={terms} tied={tied} "
              f"act={act} index={'yes' if index_ else 'no'} inplace={inplace}: {verdict}", flush=True)
    torch.cuda.synchronize()
    print("all ok" if ok else "MISMATCH against the PyTorch path")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
