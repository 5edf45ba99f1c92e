"""HFS-SDE against the other ``recon`` methods on held-out simulated anatomies (issue 15).

    nice -n 10 .venv/bin/python benchmarks/bench_hfs_sde.py [--slices 6] [--slices-1000 2]
        [--checkpoint PATH] [--threads 1] [--size 128] [--skip-1000] [--json out.json]
        [--seed N] [--methods zero_filled,hfs_sde] [--snr X] [--mse X] [--corrector-mse X]
        [--t-eps X] [--[no-]support] [--samples 4]

Data: ``--slices`` random multi-coil slices (:func:`qsmkit_kspace.anatomies.random_multicoil_slice`,
8 coils, noise 0.2-2 %) drawn from a seed no training run uses (the shipped model was trained on
:func:`random_anatomy` images drawn from ``epoch_rng(0, epoch)``), one 1D random column mask at 4x
with 24 fully sampled centre lines (fastMRI ``RandomMaskFunc``), ESPIRiT maps (24 x 24
calibration) shared by every map-based method. Every method sees the same slices, mask and maps.

Two references, both from the fully sampled noisy k-space, both evaluated on the full 128 x 128
grid (no crop) with fastMRI's NMSE / PSNR / SSIM on magnitudes (:mod:`qsmkit_kspace.metrics`):

- ``rss``: the RSS of the fully sampled coil images (fastMRI's ``reconstruction_rss``, the
  leaderboard's target);
- ``sense``: the SENSE combination of the fully sampled coil images with the same ESPIRiT maps,
  ``|sum_c conj(S_c) x_c|`` (zero outside the ESPIRiT support), the coil-combined image that the
  HFS-SDE paper (and fastMRI's multicoil evaluation of SENSE-type methods) compares against.

Zero-filled appears twice: ``zero_filled (RSS)`` is the RSS of the zero-filled coil images and
``zero_filled (SENSE |A^H y|)`` their SENSE combination with the same maps; each is scored
against both references (the fair baseline on the ``sense`` reference is ``|A^H y|``).

Methods: zero-filled (RSS), CG-SENSE, L1-wavelet CS, calibrationless and U-Net (when their
stages are registered), HFS-SDE with the stage's defaults: the accelerated sampler (100 steps,
snr 0.32, t_eps 0.03) on all slices, the same with ``--samples`` posterior samples averaged (the
stage's ``samples``), and the authors' 1000 steps (snr 0.16, t_eps 1e-3) on the
first ``--slices-1000`` slices (both with ``support`` on, the stage default), with the
zero-filled result on that subset beside it. Times are wall and CPU seconds per slice (and per
step per slice for HFS-SDE) with the load average, as the machine may be shared.

``--seed`` draws other slices and another mask (for tuning sampling parameters on a validation
set; the defaults of the ``hfs_sde`` stage must not be tuned on ``HELD_OUT_SEED``); ``--methods``
runs a subset; ``--snr``, ``--mse``, ``--corrector-mse``, ``--t-eps``,
``--[no-]support`` override the stage's
sampling parameters for both HFS-SDE runs.
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


def make_data(n: int, size: int, seed: int = HELD_OUT_SEED):
    """``(undersampled k-space, fully sampled k-space, RSS targets, mask)`` of ``n`` random slices."""
    from qsmkit_kspace.anatomies import random_multicoil_slice
    from qsmkit_kspace.masks import random_mask

    rng = np.random.default_rng(seed)
    m, num_low, _ = random_mask(size, [24 / size], [4], seed=seed)  # one mask per volume, as fastMRI
    assert num_low == 24
    ks, full, targets = [], [], []
    for _ in range(n):
        d = random_multicoil_slice(rng, (size, size), n_coils=8, noise=(0.002, 0.02))
        full.append(d["kspace"])
        ks.append(d["kspace"] * m[None, :])
        targets.append(d["target"])
    return (np.stack(ks).astype(np.complex64), np.stack(full).astype(np.complex64), np.stack(targets),
            m[None, :])


def run_stage(cls, art, params):
    from qsmkit.stage import StageContext

    p = cls.validate_params(params or {}, where="bench")
    ctx = StageContext(dict(art), stage_label=f"{cls.kind}/{cls.name}", log=lambda m: None)
    return {**art, **cls().run(ctx, p)}


def scores(refs: dict, img: np.ndarray, n: int | None = None) -> dict:
    """fastMRI metrics of ``img`` against every reference (keys ``nmse_rss``, ``psnr_sense`` ...)."""
    from qsmkit_kspace.metrics import evaluate_volume

    out = {}
    for name, ref in refs.items():
        m = evaluate_volume(ref[:n], img[:n], square_crop=False)
        out.update({f"{k}_{name}": v for k, v in m.items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--slices-1000", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="data seed (default: the held-out seed)")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-1000", action="store_true")
    ap.add_argument("--only-1000", action="store_true", help="only zero-filled and HFS-SDE with 1000 steps")
    ap.add_argument("--methods", default="", help="comma-separated subset of zero_filled, sense, cs_wavelet, "
                    "calibrationless, unet, hfs_sde (default: all)")
    ap.add_argument("--snr", type=float, default=None, help="HFS-SDE snr (default: the stage's)")
    ap.add_argument("--mse", type=float, default=None, help="HFS-SDE mse (default: the stage's)")
    ap.add_argument("--corrector-mse", type=float, default=None, help="HFS-SDE corrector_mse (default: the stage's)")
    ap.add_argument("--t-eps", type=float, default=None, help="HFS-SDE t_eps (default: the stage's)")
    ap.add_argument("--support", action=argparse.BooleanOptionalAction, default=None,
                    help="HFS-SDE support (restrict to the maps' support; default: the stage's)")
    ap.add_argument("--espirit-crop", type=float, default=0.8, help="ESPIRiT eigenvalue crop (BART -c; 0: no crop)")
    ap.add_argument("--samples", type=int, default=4,
                    help="also HFS-SDE N=100 with this many posterior samples averaged (1: no such row)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from qsmkit.kspace import KSpaceData, from_volume

    import qsmkit_kspace as K
    from qsmkit_kspace.stages_hfs_sde import HfsSde

    k, k_full, target, masks = make_data(args.slices, args.size, args.seed)
    S = k.shape[0]
    base = {"kspace": KSpaceData(data=k, layout="fastmri"), "sampling_mask": masks}
    t0, c0 = time.perf_counter(), _cpu()
    base = run_stage(K.EspiritMaps, base, {"calib": [24, 24], "crop": args.espirit_crop})
    maps_s, maps_c = time.perf_counter() - t0, _cpu() - c0
    kd = base["kspace"]
    # the SENSE reference: |sum_c conj(S_c) x_c| of the fully sampled coils with the same maps
    full = {"kspace": KSpaceData(data=k_full, layout="fastmri"), "sampling_mask": np.ones_like(masks),
            "maps": base["maps"]}
    sense_ref = from_volume(run_stage(K.ZeroFilled, full, {"combine": "maps", "crop": False})["image"],
                            full["kspace"]).astype(np.float32)
    refs = {"rss": target.astype(np.float32), "sense": sense_ref}
    print(f"{S} slices {args.size}x{args.size} (seed {args.seed}{' = held out' if args.seed == HELD_OUT_SEED else ''}), "
          f"8 coils, 4x random columns with 24 ACS lines; "
          f"ESPIRiT (crop {args.espirit_crop}) {maps_s / S:.2f} s/slice (CPU {maps_c / S:.2f}); torch threads {args.threads}; "
          f"load {open('/proc/loadavg').read().split()[0]}", flush=True)

    ck = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    for key in ("snr", "mse", "corrector_mse", "t_eps", "support"):
        if getattr(args, key) is not None:
            ck[key] = getattr(args, key)
    methods = [("zero_filled (RSS)", "zero_filled", K.ZeroFilled, {}),
               ("zero_filled (SENSE |A^H y|)", "zero_filled", K.ZeroFilled, {"combine": "maps"}),
               ("sense", "sense", K.Sense, {}), ("cs_wavelet", "cs_wavelet", K.CSWavelet, {})]
    for name, key in (("Calibrationless", "calibrationless"), ("UNetRecon", "unet")):
        if hasattr(K, name):
            methods.append((getattr(K, name).name, key, getattr(K, name), {}))
    methods.append(("hfs_sde N=100 (accelerated)", "hfs_sde", HfsSde, {"accelerated": True, **ck}))
    if args.samples > 1:
        methods.append((f"hfs_sde N=100, mean of {args.samples} samples", "hfs_sde", HfsSde,
                        {"accelerated": True, "samples": args.samples, **ck}))
    if args.only_1000:
        methods = methods[:2]
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        methods = [m for m in methods if m[1] in keep]
    rows = []
    images = {}
    for label, _, cls, params in methods:
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
        row = {"method": label, "slices": S, **scores(refs, img), "wall_s_per_slice": wall / S,
               "cpu_s_per_slice": cpu / S, "load": load}
        if cls is HfsSde:
            steps = 100 * params.get("samples", 1)
            row["wall_s_per_step_per_slice"] = wall / S / steps
            row["cpu_s_per_step_per_slice"] = cpu / S / steps
        rows.append(row)
        print(json.dumps(row), flush=True)
    run_1000 = not args.skip_1000 and args.slices_1000 > 0 and (not args.methods or "hfs_sde" in args.methods)
    if run_1000:
        n1 = min(args.slices_1000, S)
        sub = {"kspace": KSpaceData(data=k[:n1], layout="fastmri"), "sampling_mask": masks,
               "maps": np.asarray(base["maps"])[:n1]}
        for label in list(images):
            rows.append({"method": f"{label} (first {n1})", "slices": n1, **scores(refs, images[label], n1)})
        load = open("/proc/loadavg").read().split()[0]
        t0, c0 = time.perf_counter(), _cpu()
        out = run_stage(HfsSde, sub, dict(ck, crop=False, n_steps=1000))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        img = from_volume(out["image"], sub["kspace"]).astype(np.float32)
        row = {"method": "hfs_sde N=1000", "slices": n1, **scores(refs, img, n1), "wall_s_per_slice": wall / n1,
               "cpu_s_per_slice": cpu / n1, "wall_s_per_step_per_slice": wall / n1 / 1000,
               "cpu_s_per_step_per_slice": cpu / n1 / 1000, "load": load}
        rows.append(row)
        print(json.dumps(row), flush=True)
    from _measure import table

    print("reference rss: RSS of the fully sampled coil images; reference sense: |sum_c conj(S_c) x_c| of the "
          "fully sampled coil images with the same ESPIRiT maps")
    print(table(rows, ["method", "slices", "nmse_rss", "psnr_rss", "ssim_rss", "nmse_sense", "psnr_sense",
                       "ssim_sense", "wall_s_per_slice", "cpu_s_per_slice", "wall_s_per_step_per_slice",
                       "cpu_s_per_step_per_slice", "load"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; load average now {open('/proc/loadavg').read().strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_rss_mib": peak, "threads": args.threads,
                                               "seed": args.seed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
