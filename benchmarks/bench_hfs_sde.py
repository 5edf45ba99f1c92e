"""HFS-SDE against the other ``recon`` methods on held-out simulated anatomies (issue 15).

    nice -n 10 .venv/bin/python benchmarks/bench_hfs_sde.py [--slices 6] [--slices-1000 2]
        [--checkpoint PATH] [--threads 1] [--size 128] [--skip-1000] [--json out.json]

Data: ``--slices`` random multi-coil slices (:func:`qsmkit_kspace.anatomies.random_multicoil_slice`,
8 coils, noise 0.2-2 %) drawn from a seed no training run uses (the shipped model was trained on
:func:`random_anatomy` images drawn from ``epoch_rng(0, epoch)``), one 1D random column mask at 4x
with 24 fully sampled centre lines (fastMRI ``RandomMaskFunc``), ESPIRiT maps (24 x 24
calibration) shared by every map-based method. Metrics: fastMRI NMSE / PSNR / SSIM against the
RSS of the fully sampled coil images (:mod:`qsmkit_kspace.metrics`).

Methods: zero-filled (RSS), CG-SENSE, L1-wavelet CS, calibrationless and U-Net (when their
stages are registered), HFS-SDE with the accelerated sampler (100 steps, snr 0.32) on all slices
and with the authors' 1000 steps (snr 0.16) on the first ``--slices-1000`` slices, with the
zero-filled result on that subset beside it. Times are wall and CPU seconds per slice (and per
step per slice for HFS-SDE) with the load average, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

HELD_OUT_SEED = 20_240_515  # never a training seed: training draws from epoch_rng(seed, epoch)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_data(n: int, size: int):
    from qsmkit_kspace.anatomies import random_multicoil_slice
    from qsmkit_kspace.masks import random_mask

    rng = np.random.default_rng(HELD_OUT_SEED)
    m, num_low, _ = random_mask(size, [24 / size], [4], seed=HELD_OUT_SEED)  # one mask per volume, as fastMRI
    assert num_low == 24
    ks, targets = [], []
    for _ in range(n):
        d = random_multicoil_slice(rng, (size, size), n_coils=8, noise=(0.002, 0.02))
        ks.append(d["kspace"] * m[None, :])
        targets.append(d["target"])
    return np.stack(ks).astype(np.complex64), np.stack(targets), m[None, :]


def run_stage(cls, art, params):
    from qsmkit.stage import StageContext

    p = cls.validate_params(params or {}, where="bench")
    ctx = StageContext(dict(art), stage_label=f"{cls.kind}/{cls.name}", log=lambda m: None)
    return {**art, **cls().run(ctx, p)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--slices-1000", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-1000", action="store_true")
    ap.add_argument("--only-1000", action="store_true", help="only zero-filled and HFS-SDE with 1000 steps")
    ap.add_argument("--espirit-crop", type=float, default=0.8, help="ESPIRiT eigenvalue crop (BART -c; 0: no crop)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from qsmkit.kspace import KSpaceData, from_volume

    import qsmkit_kspace as K
    from qsmkit_kspace.metrics import evaluate_volume
    from qsmkit_kspace.stages_hfs_sde import HfsSde

    k, target, masks = make_data(args.slices, args.size)
    S = k.shape[0]
    base = {"kspace": KSpaceData(data=k, layout="fastmri"), "sampling_mask": masks}
    t0, c0 = time.perf_counter(), _cpu()
    base = run_stage(K.EspiritMaps, base, {"calib": [24, 24], "crop": args.espirit_crop})
    maps_s, maps_c = time.perf_counter() - t0, _cpu() - c0
    kd = base["kspace"]
    print(f"{S} held-out slices {args.size}x{args.size}, 8 coils, 4x random columns with 24 ACS lines; "
          f"ESPIRiT (crop {args.espirit_crop}) {maps_s / S:.2f} s/slice (CPU {maps_c / S:.2f}); torch threads {args.threads}; "
          f"load {open('/proc/loadavg').read().split()[0]}", flush=True)

    methods = [("zero_filled", K.ZeroFilled, {}), ("sense", K.Sense, {}), ("cs_wavelet", K.CSWavelet, {})]
    for name, extra in (("Calibrationless", {}), ("UNetRecon", {})):
        if hasattr(K, name):
            methods.append((getattr(K, name).name, getattr(K, name), extra))
    ck = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    methods.append(("hfs_sde N=100 (accelerated)", HfsSde, {"accelerated": True, **ck}))
    if args.only_1000:
        methods = methods[:1]
    rows = []
    images = {}
    for label, cls, params in methods:
        load = open("/proc/loadavg").read().split()[0]
        t0, c0 = time.perf_counter(), _cpu()
        try:
            out = run_stage(cls, base, dict(params, crop=False))
        except Exception as exc:  # report and go on (e.g. a method without weights)
            print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
            continue
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        img = from_volume(out["image"], kd).astype(np.float32)
        images[label] = img
        m = evaluate_volume(target, img, square_crop=False)
        row = {"method": label, "slices": S, **m, "wall_s_per_slice": wall / S, "cpu_s_per_slice": cpu / S,
               "load": load}
        if cls is HfsSde:
            row["s_per_step_per_slice"] = wall / S / 100
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.skip_1000 and args.slices_1000 > 0:
        n1 = min(args.slices_1000, S)
        sub = {"kspace": KSpaceData(data=k[:n1], layout="fastmri"), "sampling_mask": masks,
               "maps": np.asarray(base["maps"])[:n1]}
        for label in list(images):
            m = evaluate_volume(target[:n1], images[label][:n1], square_crop=False)
            rows.append({"method": f"{label} (first {n1})", "slices": n1, **m})
        load = open("/proc/loadavg").read().split()[0]
        t0, c0 = time.perf_counter(), _cpu()
        out = run_stage(HfsSde, sub, dict(ck, crop=False, n_steps=1000))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        img = from_volume(out["image"], sub["kspace"]).astype(np.float32)
        m = evaluate_volume(target[:n1], img, square_crop=False)
        row = {"method": "hfs_sde N=1000", "slices": n1, **m, "wall_s_per_slice": wall / n1,
               "cpu_s_per_slice": cpu / n1, "s_per_step_per_slice": wall / n1 / 1000, "load": load}
        rows.append(row)
        print(json.dumps(row), flush=True)
    from _measure import table

    print(table(rows, ["method", "slices", "nmse", "psnr", "ssim", "wall_s_per_slice", "cpu_s_per_slice",
                       "s_per_step_per_slice", "load"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; load average now {open('/proc/loadavg').read().strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_rss_mib": peak, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
