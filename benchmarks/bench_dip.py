"""Deep Image Prior inversion: time per iteration and peak memory for 64^3 and 160^3 grids.

    python benchmarks/bench_dip.py [--sizes 64 160] [--iterations 6] [--devices cpu cuda]

Each case runs in a fresh subprocess (so the peak resident memory is that case's own) with the
default network (``qsmkit_dip`` defaults) on the whole grid (``crop_to_mask: false``, so the
working grid is exactly N^3), a few Adam steps, early stopping off. The time per iteration is
the median over the steps after the first (warm-up). Peak memory: the process's maximum
resident set size on CPU (includes Python, torch and the data), ``torch.cuda.max_memory_allocated``
on GPU. A GPU row is printed only where torch sees CUDA. On a shared machine the CPU timings are
inflated by other processes; the CPU time column (process user + system time per iteration)
is the less contention-sensitive number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
from qsmkit.physics import dipole_convolve
from qsmkit_dip import dip

n, device, iters = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
g = (np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2) / (n / 2)
mask = (g[0] / 0.8) ** 2 + (g[1] / 0.9) ** 2 + (g[2] / 0.75) ** 2 <= 1
rng = np.random.default_rng(0)
chi = np.where(mask, rng.normal(0, 0.05, mask.shape), 0).astype(np.float32)
field = dipole_convolve(chi, (1, 1, 1), (0, 0, 1)) * mask
marks = []
def cb(it, x, avg):
    marks.append((time.perf_counter(), time.process_time()))
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
_, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=iters, early_stop=False, crop_to_mask=False,
           device=device, callback=cb, callback_every=1)
wall = np.diff([m[0] for m in marks])[1:]   # callback costs a device->host copy per step (small)
cpu = np.diff([m[1] for m in marks])[1:]
peak = (torch.cuda.max_memory_allocated() if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"n": n, "device": h["device"], "working_shape": h["working_shape"],
                  "s_per_it": float(np.median(wall)), "cpu_s_per_it": float(np.median(cpu)),
                  "peak_gib": peak / 2 ** 30, "params": h["params"], "threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 160])
    ap.add_argument("--iterations", type=int, default=6, help="Adam steps per case (first is warm-up)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    args = ap.parse_args()
    devices = args.devices
    if devices is None:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{'grid':>10} {'device':>7} {'s/iter':>8} {'cpu s/iter':>10} {'peak GiB':>9} {'params':>8} threads")
    for dev in devices:
        for n in args.sizes:
            r = subprocess.run([sys.executable, "-c", CHILD, str(n), dev, str(args.iterations)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{n:>7}^3 {dev:>7}  failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{n:>7}^3 {dev:>7} {d['s_per_it']:8.3f} {d['cpu_s_per_it']:10.3f} {d['peak_gib']:9.2f} "
                  f"{d['params']:>8} {d['threads']}", flush=True)


if __name__ == "__main__":
    main()
