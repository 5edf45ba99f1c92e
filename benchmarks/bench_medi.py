"""MEDI time, iterations, peak memory and accuracy on a 1 mm whole-head phantom (180 x 216 x 180).

    python benchmarks/bench_medi.py [--shape 180,216,180] [--threads 2] [--device cpu] [--lambda 1000]
                                    [--max-iter 15] [--cg-max-iter 10] [--padding 1.0] [--cache FILE]

The input is the simulator's head at 1 mm (5 echoes, 3 T, SNR 100; ``oversample=1`` to keep the
set-up short) and MEDI runs from its true local field with the magnitude and the noise weights of a
multi-echo fit (``2 pi GAMMA_BAR B0 sqrt(sum (|S_j| TE_j)^2) / sigma``, 1/ppm), default settings.
Each MEDI run happens in a fresh process (wall time, CPU time of all threads, peak RSS). TKD on the
same field is the accuracy reference. Goal (issue 4): under 60 s on 2 CPU cores (aim 30 s). By
default (``--device auto``) a GPU row follows the CPU row when torch sees CUDA (issue 20): CUDA
warmed up outside the timing, ``torch.cuda.synchronize()`` before the clock stops, peak GPU memory
from ``torch.cuda.max_memory_allocated``. On a shared machine the wall time is inflated;
``cpu s / threads`` approximates the time on idle cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _gpu import devices as _devices  # noqa: E402
from _measure import measure, table  # noqa: E402


def _inputs(shape, cache: str | None) -> dict:
    if cache and os.path.exists(cache):
        return dict(np.load(cache))
    from qsmkit.physics import GAMMA_BAR
    from qsmkit.simulate import simulate_phantom

    t0 = time.perf_counter()
    ph = simulate_phantom(shape=shape, voxel_size=(1.0, 1.0, 1.0), seed=0, oversample=1)
    mag = ph.magnitude.data
    te = np.asarray(ph.echo_times)
    nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                     / ph.meta["noise_sigma"])
    d = dict(field=ph.truth["local_field"].data, mask=ph.truth["mask"].data.astype(bool),
             chi=ph.truth["chi"].data, labels=ph.truth["labels"].data, magnitude=mag,
             noise_weight=nw.astype(np.float32), echo_times=te, field_strength=np.float64(ph.field_strength),
             voxel_size=np.asarray(ph.magnitude.voxel_size), b0=np.asarray(ph.magnitude.b0_direction))
    print(f"simulated {shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    if cache:
        np.savez(cache, **d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "both"),
                    help="auto: cpu, plus cuda when torch sees a GPU")
    ap.add_argument("--lambda", dest="lam", type=float, default=1000.0)
    ap.add_argument("--max-iter", type=int, default=15)
    ap.add_argument("--cg-max-iter", type=int, default=10)
    ap.add_argument("--padding", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cache", default=None, help="npz file to reuse the simulated inputs")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    d = _inputs(shape, args.cache)
    m = d["mask"]

    from qsmkit import metrics as qm
    from qsmkit_tkd import tkd

    t0, c0 = time.perf_counter(), time.process_time()
    chi_tkd = tkd(d["field"], m, tuple(d["voxel_size"]), d["b0"])
    t_tkd, c_tkd = time.perf_counter() - t0, time.process_time() - c0
    e = qm.evaluate(d["chi"], chi_tkd, m)
    rows = [{"method": "TKD (0.15, pad 1.5)", "device": "cpu", "seconds": t_tkd, "cpu s": c_tkd, "nrmse %": e["nrmse"],
             "hfen %": e["hfen"], "xsim": e["xsim"]}]

    def run(device: str) -> dict:
        import torch

        torch.set_num_threads(args.threads)
        from qsmkit_medi import medi

        if device == "cuda":   # warm up CUDA context and cuFFT plans outside the timing
            medi(d["field"], m, tuple(d["voxel_size"]), d["b0"], d["magnitude"], d["noise_weight"],
                 max_iter=1, cg_max_iter=1, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = medi(d["field"], m, tuple(d["voxel_size"]), d["b0"], d["magnitude"], d["noise_weight"],
                 lam=args.lam, field_strength=float(d["field_strength"]), echo_times=d["echo_times"],
                 max_iter=args.max_iter, cg_max_iter=args.cg_max_iter, padding=args.padding, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        solve = time.perf_counter() - t
        out = {"gn": r.n_iter, "cg": sum(r.cg_iters), "grid": "x".join(map(str, r.work_shape)),
               "solve s": solve, "chi": r.chi}   # metrics in the parent: their memory is not MEDI's
        if device == "cuda":
            out["gpu peak MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out

    devices = _devices(args.device)
    for dev in devices:
        for k in range(args.repeats):
            res = measure(lambda: run(dev))
            ev = qm.evaluate(d["chi"], res.pop("chi"), m)
            res.update({"nrmse %": ev["nrmse"], "hfen %": ev["hfen"], "xsim": ev["xsim"]})
            rows.append({"method": f"MEDI (lambda {args.lam:g})", "device": dev, "threads": args.threads,
                         "run": k + 1, "seconds": res["seconds"], "cpu s": res["cpu_seconds"],
                         "peak RSS MiB": res["peak_rss_mib"], "RSS increase MiB": res["rss_increase_mib"],
                         **{c: res[c] for c in ("gn", "cg", "grid", "nrmse %", "hfen %", "xsim", "gpu peak MiB")
                            if c in res}})
    print(f"MEDI benchmark on {'x'.join(map(str, shape))} at 1 mm ({int(m.sum())} mask voxels), "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} "
          f"(other processes inflate the wall time; cpu s / threads ~ idle-machine time)")
    print(table(rows, ["method", "device", "threads", "run", "seconds", "cpu s", "peak RSS MiB", "RSS increase MiB",
                       "gn", "cg", "grid", "nrmse %", "hfen %", "xsim", "gpu peak MiB"]))


if __name__ == "__main__":
    main()
