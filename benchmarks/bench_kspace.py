"""Speed of the k-space reconstruction methods on one fastMRI-sized slice.

A simulated 15-coil slice of 640 x 368 (2x oversampled readout, 320 x 320 centre crop) is
undersampled 4x with fastMRI's random column mask (8 % centre) and reconstructed by:
zero-filled RSS, ESPIRiT maps, CG-SENSE (30 iterations) and L1-wavelet CS (30 iterations,
FISTA and POGM). Each step is timed as the median of ``--repeats`` runs after one warm-up, on
the torch thread count in use (``--threads``, default 2 to match the goals). If BART
(``bart`` on PATH, e.g. ``apt-get install bart``) is installed, the same steps run with BART
(``fft``+``rss``, ``ecalib``, ``pics -l2 -r 0``, ``pics -l1``) on the same data for a
side-by-side column. SSIM against the fully sampled RSS is printed for each reconstruction.

    python benchmarks/bench_kspace.py [--repeats 3] [--threads 2] [--no-bart] [--device auto|cpu]

When torch sees CUDA (``--device auto``, the default) the same qsmkit steps run on the GPU too
(issue 20): the data moved to the device first, one warm-up, then the median of ``--repeats`` runs
each ended by ``torch.cuda.synchronize()``; columns ``GPU (s)``, ``GPU CPU s`` (host CPU time) and
``GPU MiB`` (``torch.cuda.max_memory_allocated`` over the timed runs).

Timings on a shared machine are inflated by other processes; compare columns of one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOALS = {"zero-filled": 0.060, "ESPIRiT": 2.0, "CG-SENSE 30 it": 1.5, "CS FISTA 30 it": 5.0, "CS POGM 30 it": 5.0}


#: median CPU seconds (user + system, all threads) of the last :func:`_median_time` call
LAST_CPU: list = [float("nan")]


def _median_time(fn, repeats: int):
    fn()  # warm-up
    ts, cs, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    LAST_CPU[0] = float(np.median(cs))
    return float(np.median(ts)), out


def _gpu_times(ku: np.ndarray, col: np.ndarray, maps: np.ndarray, scale: float, crop, repeats: int) -> dict:
    """``{step: (median wall s, median host CPU s, peak GPU MiB)}`` of the qsmkit steps on CUDA."""
    import torch

    from qsmkit_kspace.cs import cs_wavelet
    from qsmkit_kspace.espirit import espirit_maps
    from qsmkit_kspace.sense import cg_sense, mask_tensor
    from qsmkit_kspace.transforms import zero_filled_coils

    dev = torch.device("cuda")
    kt = torch.from_numpy(ku).to(dev)
    y = torch.from_numpy(ku / scale).to(dev)
    mp = torch.from_numpy(maps).to(dev)
    mt = mask_tensor(col, 1, ku.shape[-2:], dev)
    steps = {"zero-filled": lambda: torch.sqrt((zero_filled_coils(kt, crop, mt).abs() ** 2).sum(1)),
             "ESPIRiT": lambda: espirit_maps(ku, col[None], device=dev),
             "CG-SENSE 30 it": lambda: cg_sense(y, mp, mt, 30, 0.0),
             "CS FISTA 30 it": lambda: cs_wavelet(y, mp, mt, 0.002, 30, "fista"),
             "CS POGM 30 it": lambda: cs_wavelet(y, mp, mt, 0.002, 30, "pogm")}
    out = {}
    for name, fn in steps.items():
        fn()  # warm-up: cuFFT plans, kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ts, cs = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        out[name] = (float(np.median(ts)), float(np.median(cs)), torch.cuda.max_memory_allocated() / 2 ** 20)
    return out


def _write_cfl(base: Path, arr: np.ndarray) -> None:
    """BART .cfl/.hdr: complex64, column-major, dims padded to 16."""
    dims = list(arr.shape) + [1] * (16 - arr.ndim)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asfortranarray(arr.astype(np.complex64)).ravel(order="F").tofile(base.with_suffix(".cfl"))


def _read_cfl(base: Path) -> np.ndarray:
    dims = [int(v) for v in base.with_suffix(".hdr").read_text().splitlines()[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64).reshape(dims, order="F")


def _bart(workdir: Path, repeats: int, threads: int, ku: np.ndarray):
    """Time BART on the same undersampled slice ku (C, H, W); returns {step: (seconds, image)}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    _write_cfl(workdir / "k", np.transpose(ku, (1, 2, 0))[:, :, None, :])  # (H, W, 1, C)

    def run(*cmds):
        def f():
            for c in cmds:
                subprocess.run(["bart", *c], cwd=workdir, env=env, check=True, capture_output=True)
        return f

    res = {}
    t, _ = _median_time(run(["fft", "-i", "-u", "3", "k", "ci"], ["rss", "8", "ci", "zf"]), repeats)
    res["zero-filled"] = (t, np.abs(_read_cfl(workdir / "zf")).reshape(ku.shape[1:]))
    t, _ = _median_time(run(["ecalib", "-m1", "k", "maps"]), repeats)
    res["ESPIRiT"] = (t, None)
    t, _ = _median_time(run(["pics", "-S", "-l2", "-r", "0", "-i", "30", "k", "maps", "sense"]), repeats)
    res["CG-SENSE 30 it"] = (t, np.abs(_read_cfl(workdir / "sense")).reshape(ku.shape[1:]))
    t, _ = _median_time(run(["pics", "-S", "-l1", "-r", "0.002", "-i", "30", "k", "maps", "cs"]), repeats)
    res["CS FISTA 30 it"] = (t, np.abs(_read_cfl(workdir / "cs")).reshape(ku.shape[1:]))
    return res


def _ssim_fitted(ref: np.ndarray, img: np.ndarray, evaluate) -> float:
    """SSIM after a least-squares intensity scale (BART's pics scales its output differently)."""
    img = np.asarray(img, dtype=np.float64)
    a = float((ref * img).sum() / max((img * img).sum(), 1e-30))
    return evaluate(ref, (a * img).astype(np.float32))["ssim"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bart", action="store_true")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu"),
                    help="auto: GPU columns too when torch sees CUDA")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from _gpu import cuda_available

    use_gpu = args.device == "auto" and cuda_available()

    import torch

    torch.set_num_threads(args.threads)
    from qsmkit_kspace.cs import cs_wavelet
    from qsmkit_kspace.espirit import espirit_maps
    from qsmkit_kspace.masks import random_mask
    from qsmkit_kspace.metrics import evaluate_volume
    from qsmkit_kspace.sense import cg_sense, mask_tensor
    from qsmkit_kspace.simulate import simulate_multicoil
    from qsmkit_kspace.transforms import center_crop, ifft2c_np, normalization_scale, zero_filled_coils

    H, W, C, crop = 640, 368, 15, (320, 320)
    t0 = time.perf_counter()
    sim = simulate_multicoil((1, H, W), C, extent=(2.0, W / 320, 0.6), noise=0.002, seed=0)
    k = sim["kspace"]
    print(f"simulated {C} coils x {H} x {W} in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    ref = center_crop(np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=1)), crop)
    col, nlow, _ = random_mask(W, [0.08], [4], seed=0)
    ku = (k * col).astype(np.complex64)
    print(f"4x random mask: {int(col.sum())} of {W} columns ({nlow} centre)")
    scale = normalization_scale(ku)
    y = torch.from_numpy(ku / scale)
    mt = mask_tensor(col, 1, (H, W), "cpu")

    rows = []
    cpu_s: dict = {}  # CPU s per step (qsmkit), filled after each timing

    kt = torch.from_numpy(ku)

    def zero_filled():  # what recon/zero_filled runs: crop-aware inverse FFT + RSS
        img = zero_filled_coils(kt, crop, mt)
        return torch.sqrt((img.abs() ** 2).sum(1)).numpy()

    t, zf = _median_time(zero_filled, args.repeats)
    rows.append(("zero-filled", t, evaluate_volume(ref, zf)["ssim"]))
    cpu_s["zero-filled"] = LAST_CPU[0]
    t, (maps, _) = _median_time(lambda: espirit_maps(ku, col[None]), args.repeats)
    rows.append(("ESPIRiT", t, None))
    cpu_s["ESPIRiT"] = LAST_CPU[0]
    mp = torch.from_numpy(maps)
    t, (x, _) = _median_time(lambda: cg_sense(y, mp, mt, 30, 0.0), args.repeats)
    rows.append(("CG-SENSE 30 it", t, evaluate_volume(ref, center_crop(np.abs(x[:, 0].numpy()), crop) * scale)["ssim"]))
    cpu_s["CG-SENSE 30 it"] = LAST_CPU[0]
    for solver in ("fista", "pogm"):
        t, x = _median_time(lambda: cs_wavelet(y, mp, mt, 0.002, 30, solver), args.repeats)
        rows.append((f"CS {solver.upper()} 30 it", t,
                     evaluate_volume(ref, center_crop(np.abs(x[:, 0].numpy()), crop) * scale)["ssim"]))
        cpu_s[f"CS {solver.upper()} 30 it"] = LAST_CPU[0]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = _gpu_times(ku, col, maps, scale, crop, args.repeats) if use_gpu else {}
    for name, t, ssim in rows:
        print(f"  qsmkit {name:18s} {t:8.3f} s" + ("" if ssim is None else f"  SSIM {ssim:.4f}"), flush=True)

    bart = {}
    if not args.no_bart and shutil.which("bart"):
        with tempfile.TemporaryDirectory() as d:
            try:
                bart = _bart(Path(d), args.repeats, args.threads, ku[0])
            except (subprocess.CalledProcessError, OSError) as e:
                print(f"BART failed ({e}); no BART column")
                bart = {}
    elif not args.no_bart:
        print("BART not found on PATH (apt-get install bart); no BART column")

    print()
    hdr = f"{'step':18s} {'qsmkit (s)':>10s} {'CPU s':>7s} {'goal (s)':>9s} {'SSIM':>7s}"
    if gpu:
        hdr += f" {'GPU (s)':>8s} {'GPU CPU s':>9s} {'GPU MiB':>8s}"
    if bart:
        hdr += f" {'BART (s)':>9s} {'BART SSIM':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for name, t, ssim in rows:
        line = (f"{name:18s} {t:10.3f} {cpu_s.get(name, float('nan')):7.2f} {GOALS[name]:9.3f} "
                f"{'' if ssim is None else f'{ssim:.4f}':>7s}")
        if gpu:
            g = gpu[name]
            line += f" {g[0]:8.4f} {g[1]:9.3f} {g[2]:8.0f}"
        if bart:
            bt = bart.get(name)
            if bt is None:
                line += f" {'':>9s} {'':>9s}"
            else:
                bs = "" if bt[1] is None else f"{_ssim_fitted(ref, center_crop(bt[1][None], crop), evaluate_volume):.4f}"
                line += f" {bt[0]:9.3f} {bs:>9s}"
        print(line)
    print(f"\npeak memory {peak_mb:.0f} MB; CPU s = user + system of all threads (qsmkit); load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}; timings on a shared machine are inflated by "
          f"other processes")


if __name__ == "__main__":
    main()
