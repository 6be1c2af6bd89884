"""Cost of keeping R's rows orthonormal: ours (``orthonormal_rows``, one QR per step, O(r d) state)
against pyreft's ``torch.nn.utils.parametrizations.orthogonal`` on a (d, r) weight, plus one whole
LoReFT intervention step (forward + backward) each way.

    python bench/bench_orthogonal.py [--d 4096] [--r 8] [--rows 448] [--device cpu] [--repeat 5]

Prints one table; times are medians over ``--repeat`` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import reft_kernels as rk


class _PyreftRotate(nn.Module):
    """pyreft's LowRankRotateLayer: a (d, r) weight with orthonormal columns."""

    def __init__(self, d, r):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, r))
        nn.init.orthogonal_(self.weight)


def _median_ms(fn, repeat, sync):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rows", type=int, default=448, help="edited rows (f7+l7 x batch 32 = 448)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    d, r = args.d, args.r

    theirs = nn.utils.parametrizations.orthogonal(_PyreftRotate(d, r).to(dev))
    ours = rk.LoReFT(d, r, device=dev)
    W = nn.Parameter(torch.randn(r, d, device=dev) / d ** 0.5)
    b = nn.Parameter(torch.zeros(r, device=dev))
    h = torch.randn(args.rows, d, device=dev, requires_grad=True)

    def theirs_R():
        R = theirs.weight.t()
        R.sum().backward()

    def ours_R():
        ours.R.sum().backward()

    def theirs_step():  # pyreft's LoreftIntervention.forward: R materialised twice
        rotated = h @ theirs.weight
        y = h + ((h @ W.t() + b) - rotated) @ theirs.weight.t()
        y.sum().backward()

    def ours_step():
        y = ours(h)
        y.sum().backward()

    state_theirs = sum(t.numel() * t.element_size() for t in theirs.state_dict().values())
    state_ours = ours.rotation.numel() * ours.rotation.element_size()
    rows = [
        ("R materialise + backward", _median_ms(theirs_R, args.repeat, sync), _median_ms(ours_R, args.repeat, sync)),
        (f"LoReFT step, {args.rows} rows", _median_ms(theirs_step, args.repeat, sync),
         _median_ms(ours_step, args.repeat, sync)),
    ]
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, d={d}, r={r}, threads={torch.get_num_threads()}")
    print(f"{'what':32s} {'pyreft orthogonal ms':>22s} {'reft_kernels ms':>16s} {'speed-up':>9s}")
    for name, t_theirs, t_ours in rows:
        print(f"{name:32s} {t_theirs:22.2f} {t_ours:16.2f} {t_theirs / t_ours:8.0f}x")
    print(f"{'R state (bytes)':32s} {state_theirs:22d} {state_ours:16d} {state_theirs / state_ours:8.0f}x")


if __name__ == "__main__":
    main()
