"""The shipped U-Net against zero-filled, CG-SENSE and L1-wavelet CS on held-out simulated anatomies.

``--slices`` random anatomies (:mod:`qsmkit_kspace.anatomies`, seeds ``(777, i)``: never used in
training, which draws from ``(0, j, g)`` and validates on ``(1000003, j, 0)``) of the shipped
model's training size (96 x 96, 4-12 coils, noise 0.2-3 %) are undersampled

- 4x with fastMRI's random column mask, centre fraction 0.08;
- 8x with fastMRI's equispaced (fraction) mask, centre fraction 0.04;

(mask seed = slice index) and reconstructed by the ``recon`` stages exactly as a pipeline runs
them: ``zero_filled`` (RSS), ``sense`` (CG-SENSE, 30 iterations), ``cs_wavelet`` (FISTA, 30
iterations, lambda 0.002, db4, 4 levels) -- both with the true coil maps (an oracle: the best
case for them) -- and ``unet`` (the shipped weights). The fastMRI NMSE, PSNR and SSIM
(:mod:`qsmkit_kspace.metrics`) are the means over the slices, each slice a volume of its own.
Seconds per slice are the wall and CPU time of each stage over all slices divided by their
number, on ``--threads`` torch threads (default 2). A last row times the U-Net stage on one
fastMRI-sized slice (15 coils, 640 x 368 k-space, 320 x 320 crop) against the 0.2 s goal.

    python benchmarks/bench_unet.py [--slices 16] [--threads 2] [--checkpoint shipped] [--timing-only]
                                    [--device auto|cpu]

When torch sees CUDA (``--device auto``, the default) the fastMRI-sized timing runs on the GPU too
(issue 20): one warm-up run, then the median of 3, each stage run ending with the image copied
to the host (which waits for the GPU), with the peak GPU memory (``torch.cuda.max_memory_allocated``).

The machine may be shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

GOAL_UNET_S = 0.2  # s per fastMRI-sized slice on the CPU


def _artifacts(data: dict, col: np.ndarray):
    from qsmkit.kspace import KSpaceData
    from qsmkit.volume import Volume

    S, C, H, W = data["kspace"].shape
    kd = KSpaceData(data=(data["kspace"] * col).astype(np.complex64), layout="fastmri",
                    slice_indices=tuple(range(S)), crop_size=data["target"].shape[-2:])
    tgt = Volume(np.ascontiguousarray(np.transpose(data["target"], (1, 2, 0))), np.eye(4))
    return {"kspace": kd, "sampling_mask": col[None, :].astype(bool), "maps": data["maps"][:, None],
            "target": tgt}


def _run(cls, art: dict, params: dict):
    """Run one recon stage; returns (images (S, h, w), wall s, CPU s)."""
    from qsmkit.stage import StageContext

    p = cls.validate_params(params, where="bench")
    ctx = StageContext(dict(art), stage_label=f"recon/{cls.name}", log=lambda m: None)
    t0, c0 = time.perf_counter(), time.process_time()
    out = cls().run(ctx, p)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    img = np.transpose(np.asarray(out["image"].data), (2, 0, 1))
    return img, wall, cpu


def _per_slice_metrics(targets: np.ndarray, images: np.ndarray) -> dict:
    from qsmkit_kspace.metrics import evaluate_volume

    rows = [evaluate_volume(t[None], i[None], square_crop=False) for t, i in zip(targets, images)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("nmse", "psnr", "ssim")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default="shipped")
    ap.add_argument("--shape", type=int, nargs=2, default=(96, 96))
    ap.add_argument("--timing-only", action="store_true", help="only the fastMRI-sized U-Net timing row")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu"), help="auto: a GPU timing row too when "
                    "torch sees CUDA")
    args = ap.parse_args()
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _gpu import devices as _devices, synchronize

    devices = _devices(args.device)

    from qsmkit.threads import prepare_environment

    prepare_environment()  # as the qsmkit entry point: idle OpenMP workers sleep instead of spinning
    import torch

    torch.set_num_threads(args.threads)
    from qsmkit_kspace.anatomies import random_multicoil_slice
    from qsmkit_kspace.masks import equispaced_mask, random_mask
    from qsmkit_kspace.stages_recon import CSWavelet, Sense, ZeroFilled
    from qsmkit_kspace.stages_unet import UNetRecon

    t0 = time.perf_counter()
    slices = [] if args.timing_only else [random_multicoil_slice(np.random.default_rng([777, i]), tuple(args.shape), (4, 12), (0.002, 0.03))
              for i in range(0 if args.timing_only else args.slices)]
    print(f"{len(slices)} held-out anatomies {tuple(args.shape)} simulated in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    cases = [("4x random, cf 0.08", random_mask, 4.0, 0.08), ("8x equispaced, cf 0.04", equispaced_mask, 8.0, 0.04)]
    methods = [("zero-filled", ZeroFilled, {}),
               ("CG-SENSE 30 it (true maps)", Sense, {"max_iter": 30}),
               ("CS L1-wavelet 30 it (true maps)", CSWavelet, {"max_iter": 30, "lambda": 0.002}),
               ("U-Net (shipped)" if args.checkpoint == "shipped" else "U-Net", UNetRecon,
                {"checkpoint": args.checkpoint})]
    rows = []
    for label, fn, acc, cf in ([] if args.timing_only else cases):
        results = {m[0]: {"img": [], "tgt": [], "wall": 0.0, "cpu": 0.0} for m in methods}
        for i, d in enumerate(slices):
            col, _, _ = fn(args.shape[1], [cf], [acc], seed=i)
            data = {"kspace": d["kspace"][None], "maps": d["maps"][None], "target": d["target"][None]}
            art = _artifacts(data, col)
            for name, cls, params in methods:
                img, wall, cpu = _run(cls, art, {**params, "device": "cpu"})
                r = results[name]
                r["img"].append(img[0])
                r["tgt"].append(d["target"])
                r["wall"] += wall
                r["cpu"] += cpu
        for name, _, _ in methods:
            r = results[name]
            m = _per_slice_metrics(np.stack(r["tgt"]), np.stack(r["img"]))
            rows.append((label, name, m["nmse"], m["psnr"], m["ssim"], r["wall"] / len(slices), r["cpu"] / len(slices)))

    # the goal: U-Net on one fastMRI-sized slice (15 coils, 640 x 368, 320 x 320 crop)
    big = random_multicoil_slice(np.random.default_rng([778, 0]), (320, 368), 15, 0.005, readout_oversampling=2)
    col, _, _ = random_mask(368, [0.08], [4.0], seed=0)
    data = {"kspace": big["kspace"][None], "maps": big["maps"][None], "target": big["target"][None]}
    art = _artifacts(data, col)
    art["kspace"].crop_size = (320, 320)
    art.pop("target")
    timing = {}
    for dev in devices:
        _run(UNetRecon, art, {"checkpoint": args.checkpoint, "device": dev})  # warm-up (loads the weights)
        if dev == "cuda":
            synchronize(dev)
            torch.cuda.reset_peak_memory_stats()
        times = [_run(UNetRecon, art, {"checkpoint": args.checkpoint, "device": dev}) for _ in range(3)]
        timing[dev] = (float(np.median([t[1] for t in times])), float(np.median([t[2] for t in times])),
                       torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda" else None)
    wall, cpu, _ = timing["cpu"] if "cpu" in timing else next(iter(timing.values()))

    hdr = f"{'case':24s} {'method':34s} {'NMSE':>8s} {'PSNR dB':>8s} {'SSIM':>7s} {'wall s/sl':>10s} {'CPU s/sl':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for case, name, nmse, psnr, ssim, w, c in rows:
        print(f"{case:24s} {name:34s} {nmse:8.4f} {psnr:8.2f} {ssim:7.4f} {w:10.3f} {c:9.3f}")
    print(f"U-Net on one 15-coil 640 x 368 slice (320 x 320 crop): {wall:.3f} s wall, {cpu:.3f} s CPU per slice "
          f"(goal {GOAL_UNET_S} s: {'met' if wall <= GOAL_UNET_S else 'missed'})")
    for dev, (w, c, g) in timing.items():
        if dev != "cpu":
            print(f"U-Net on the same slice on {dev}: {w:.4f} s wall, {c:.3f} s host CPU per slice, "
                  f"peak GPU memory {g:.0f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"peak RSS {peak:.0f} MiB; load average {' '.join(load)} on {__import__('os').cpu_count()} cores")


if __name__ == "__main__":
    main()
