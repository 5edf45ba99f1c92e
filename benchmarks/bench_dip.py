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

    python benchmarks/bench_dip.py --fit [--voxel 2] [--presets legacy default] [--threads 2]
                                   [--cache FILE] [--max-iterations N]

``--fit`` (issue 20) times whole fits to the stopping rule on the simulator's whole head
(:func:`qsmkit.simulate.simulate_phantom`, 180 x 216 x 180 mm FOV at ``--voxel`` mm, seed 0,
SNR 100, ``oversample=1``, as ``bench_inversion.py``'s dip row), from the true local field with
the multi-echo noise weights. Presets: ``default`` (the stage's defaults) and ``legacy`` (the
settings before issue 20: plain DIP from a random network, 16 channels, min_iterations 100,
patience 150). Each fit runs in a fresh process; the table gives wall s, CPU s (user + system
of all threads), iterations, s/iteration and CPU s/iteration (set-up included), peak RSS, the
NRMSE (%) against the true chi over the mask (both demeaned) and TKD's on the same data, and the
load average. ``--max-iterations`` caps a preset's budget (for a legacy baseline that is too
slow to run to its stopping rule on a loaded machine: then its s/iteration is what to
extrapolate with, and the NRMSE is that of a truncated fit).
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


#: the settings of each --fit preset (on top of the dip() defaults)
PRESETS = {
    "default": {},
    "legacy": dict(warm_start="none", channels=16, skip_channels=8, min_iterations=100, patience=150,
                   min_delta=0.0, lr=5e-3, ema=0.98, stop_tol=5e-3),
}

FIT_CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[3]))
from qsmkit.metrics import nrmse
from qsmkit_dip import dip
from qsmkit_tkd import tkd

d = dict(np.load(sys.argv[1]))
kw = json.loads(sys.argv[2])
m, vs, b0 = d["mask"], tuple(float(v) for v in d["voxel_size"]), d["b0"]

def err(chi):
    return float(nrmse(d["chi"] - d["chi"][m].mean(), chi - chi[m].mean(), m))

t0, c0 = time.perf_counter(), time.process_time()
chi, h = dip(d["local"], m, vs, b0, noise_weight=d["noise_weight"], device=kw.pop("device", "cpu"), **kw)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall": wall, "cpu": cpu, "iterations": h["iterations"], "best": h["best_iteration"],
                  "reason": h["reason"], "nrmse": err(chi), "tkd": err(tkd(d["local"], m, vs, b0)),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(h["working_shape"]), "device": h["device"],
                  "warm": h.get("warm_start", {}).get("lambda"), "load": os.getloadavg()[0]}))
"""


def _head(voxel: float, cache: str | None) -> str:
    """Simulate (or reuse) the whole head at ``voxel`` mm; return the npz path."""
    import os
    import tempfile

    import numpy as np

    if cache and os.path.exists(cache):
        return cache
    from qsmkit.physics import GAMMA_BAR
    from qsmkit.simulate import simulate_phantom

    shape = tuple(int(round(n / voxel)) for n in (180, 216, 180))
    ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, oversample=1)
    mag, te = ph.magnitude.data, np.asarray(ph.echo_times)
    nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                     / ph.meta["noise_sigma"])
    path = cache or os.path.join(tempfile.mkdtemp(), "head.npz")
    np.savez(path, local=ph.truth["local_field"].data.astype(np.float32), mask=ph.truth["mask"].data.astype(bool),
             chi=ph.truth["chi"].data.astype(np.float32), noise_weight=nw.astype(np.float32),
             voxel_size=np.asarray(ph.magnitude.voxel_size), b0=np.asarray(ph.magnitude.b0_direction))
    return path


def fit_main(args) -> None:
    """Whole fits to the stopping rule, one fresh process per preset and device."""
    path = _head(args.voxel, args.cache)
    devices = args.devices or ["cpu"]
    print(f"whole head at {args.voxel:g} mm ({path}), {args.threads} torch threads, load average "
          f"{open('/proc/loadavg').read().split()[0] if sys.platform.startswith('linux') else '?'} at start")
    print(f"{'preset':>8} {'device':>6} {'grid':>10} {'wall s':>8} {'cpu s':>8} {'iters':>6} {'best':>5} "
          f"{'s/it':>6} {'cpu s/it':>8} {'peak MiB':>8} {'NRMSE %':>8} {'TKD %':>6} {'load':>5}  stop")
    for dev in devices:
        for name in args.presets:
            kw = {**PRESETS[name], "device": dev}
            if args.max_iterations:
                kw["iterations"] = args.max_iterations
            r = subprocess.run([sys.executable, "-c", FIT_CHILD, path, json.dumps(kw), str(args.threads)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:>8} {dev:>6}  failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            n = max(d["iterations"], 1)
            print(f"{name:>8} {dev:>6} {'x'.join(map(str, d['shape'])):>10} {d['wall']:8.1f} {d['cpu']:8.1f} "
                  f"{d['iterations']:6d} {d['best']:5d} {d['wall'] / n:6.2f} {d['cpu'] / n:8.2f} {d['peak_mib']:8.0f} "
                  f"{d['nrmse']:8.2f} {d['tkd']:6.2f} {d['load']:5.1f}  {d['reason']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="time whole fits on the simulated head (issue 20)")
    ap.add_argument("--voxel", type=float, default=2.0, help="--fit: voxel size in mm (2: 90x108x90 grid)")
    ap.add_argument("--presets", nargs="+", default=["legacy", "default"], choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2, help="--fit: torch threads")
    ap.add_argument("--cache", default=None, help="--fit: npz file of the simulated head (made if absent)")
    ap.add_argument("--max-iterations", type=int, default=0, help="--fit: cap the iteration budget (0: none)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 160])
    ap.add_argument("--iterations", type=int, default=6, help="Adam steps per case (first is warm-up)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    args = ap.parse_args()
    if args.fit:
        if args.devices is None:
            import torch

            args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        fit_main(args)
        return
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
