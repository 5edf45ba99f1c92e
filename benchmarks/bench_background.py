"""Background field removal on the simulator's whole-head phantom at 1 mm (180 x 216 x 180), against
the truth and the harmonic limit, with the chi that MEDI makes from each local field.

    python benchmarks/bench_background.py [--shape 180,216,180] [--voxel 1.0] [--oversample 2]
                                          [--threads 2] [--cache FILE] [--no-medi]
                                          [--methods vsharp,sharp,resharp,ismv,lbv,lbv-peel1,pdf,pdf-uniform]
                                          [--default-phantom] [--default-cache FILE]

Input: :func:`qsmkit.simulate.simulate_phantom` on the 1 mm grid of ``bench_medi.py``, seed 0,
``--oversample 2`` by default (the simulator's own default: sub-voxel tissue boundaries, as real data
have; ``1`` is faster to set up but samples the head on the methods' own grid, an inverse crime, as
in ``bench_inversion.py``). ``--default-phantom`` adds a
second table on the simulator's default phantom (112 x 128 x 96 at 1.5 mm, its default
``oversample=2``; issue 17 acceptance 2). Each method runs with its default parameters from the
TRUE total field and the true brain mask, in a fresh process (wall time, CPU time of all threads,
peak RSS); ``pdf`` gets the B0 direction and the multi-echo noise weights
(``2 pi GAMMA_BAR B0 sqrt(sum (|S_j| TE_j)^2) / sigma``, as ``bench_medi.py``), as its stage would;
``pdf-uniform`` is PDF without them (uniform weights); ``lbv-peel1`` is LBV with ``peel=1`` (the
outermost mask layer, next to the skull, dropped).

Rows: each method, and ``harmonic-limit``: the true local field minus its harmonic part in the
mask (:func:`qsmkit_bgremove.harmonic_limit`), the floor of every method that removes all harmonic
fields in the mask (SHARP, V-SHARP, RESHARP, iSMV, LBV); PDF and total field inversion can go
below it. Columns (NRMSE in %, ``qsmkit.metrics.nrmse(reference, estimate, mask)``):

* ``nrmse_own`` / ``nrmse_given``: local field against the true local field over the method's own
  (eroded) mask / over the whole given mask (eroded voxels count as zero, as QSM-CI scores);
* ``kept``: fraction of the given mask kept;
* ``vs_hl_own`` / ``vs_hl_given``: local field against the harmonic limit of the method's own mask /
  of the given mask (how far the method is from the best any harmonic-removing method can do);
* ``hl_own``: the harmonic limit of the method's own mask against the truth (its floor there);
* ``chi_given`` / ``chi_own``: chi NRMSE after MEDI (``qsmkit_medi.medi``, default parameters, the
  method's local field and own mask, the magnitude, the noise weights, 3 T and the echo times),
  both maps demeaned over the mask and zeroed outside it as ``qsmkit evaluate`` does, over the given
  mask (eroded voxels count as zero) / over the method's own mask. ``--no-medi`` skips MEDI.
* ``seconds``, ``cpu_seconds`` (all threads; divided by ``--threads`` it approximates the time on
  idle cores when the machine is shared), ``peak_rss_mib`` (of the fresh process, inputs included).

``--threads`` limits the FFT/BLAS/torch threads (issue 17: 2 cores).

GPU rows (issue 20): PDF is the one torch method; when torch sees CUDA (``--device auto``, the
default) ``pdf`` and ``pdf-uniform`` get a ``... (cuda)`` row each, timed in the same fresh-process
way (CUDA start-up included in ``seconds``, not in ``solve_s``, the call itself), with ``gpu_peak_mib``
from ``torch.cuda.max_memory_allocated``; their MEDI columns are left out (the CPU row has them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

KEYS = ("total", "local", "mask", "voxel_size", "chi", "magnitude", "noise_weight", "echo_times",
        "field_strength", "b0")


def _inputs(shape, voxel: float, oversample: int, cache: str | None) -> dict:
    import numpy as np

    if cache and os.path.exists(cache):
        d = dict(np.load(cache))
        if all(k in d for k in KEYS):
            return d
        print(f"{cache} lacks some inputs (an older cache); simulating again", flush=True)
    from qsmkit.physics import GAMMA_BAR
    from qsmkit.simulate import simulate_phantom

    t0 = time.perf_counter()
    ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, oversample=oversample)
    mag = ph.magnitude.data.astype(np.float32)
    te = np.asarray(ph.echo_times)
    nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                     / ph.meta["noise_sigma"])
    d = dict(total=ph.truth["total_field"].data.astype(np.float32),
             local=ph.truth["local_field"].data.astype(np.float32),
             mask=ph.truth["mask"].data > 0, voxel_size=np.asarray(ph.magnitude.voxel_size),
             chi=ph.truth["chi"].data.astype(np.float32), magnitude=mag, noise_weight=nw.astype(np.float32),
             echo_times=te, field_strength=np.float64(ph.field_strength),
             b0=np.asarray(ph.magnitude.b0_direction))
    print(f"simulated {d['mask'].shape} at {tuple(d['voxel_size'])} mm in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if cache:
        np.savez(cache, **d)
    return d


def _demeaned_nrmse(truth, estimate, mask) -> float:
    """chi NRMSE (%) as ``qsmkit evaluate``: both maps demeaned over ``mask``, zero outside it."""
    import numpy as np

    from qsmkit.metrics import nrmse

    t = np.where(mask, truth - truth[mask].mean(), 0.0)
    e = np.where(mask, estimate - estimate[mask].mean(), 0.0)
    return nrmse(t, e, mask)


def _methods(d, threads: int) -> dict:
    from qsmkit_bgremove import ismv, lbv, pdf, resharp, sharp
    from qsmkit_vsharp import vsharp

    b0, nw = tuple(float(v) for v in d["b0"]), d["noise_weight"]
    return {"vsharp": vsharp, "sharp": sharp, "resharp": resharp, "ismv": ismv, "lbv": lbv,
            "pdf": lambda f, m, vs: pdf(f, m, vs, b0, nw), "pdf-uniform": lambda f, m, vs: pdf(f, m, vs, b0),
            "lbv-peel1": lambda f, m, vs: lbv(f, m, vs, peel=1),
            "pdf (cuda)": lambda f, m, vs: pdf(f, m, vs, b0, nw, device="cuda"),
            "pdf-uniform (cuda)": lambda f, m, vs: pdf(f, m, vs, b0, device="cuda")}


#: methods that run torch and get a GPU row when CUDA is available
TORCH_METHODS = ("pdf", "pdf-uniform")


def _table(d, methods: list[str], threads: int, run_medi: bool, title: str, devices=("cpu",)) -> None:
    import numpy as np
    import scipy.fft as sfft
    import torch

    from _gpu import gpu_peak_mib
    from _measure import measure, table
    from qsmkit.metrics import nrmse
    from qsmkit_bgremove import harmonic_limit

    tot, loc, m = d["total"], d["local"], d["mask"]
    vs = tuple(float(v) for v in d["voxel_size"])
    fns = _methods(d, threads)
    torch.set_num_threads(threads)  # imported and set before the forks (not timed)

    def run_limit():
        return {"_local": harmonic_limit(loc, m, vs), "_kept": m}

    rows, fields = [], {}
    gpu = [f"{n} (cuda)" for n in methods if n in TORCH_METHODS] if "cuda" in devices else []
    for name in ["harmonic-limit"] + methods + gpu:
        fn = fns.get(name)

        def run(fn=fn, dev="cuda" if name.endswith("(cuda)") else "cpu"):
            if dev == "cuda":  # CUDA context and cuFFT start-up: in seconds, not in solve_s
                torch.fft.fftn(torch.zeros((8, 8, 8), device=dev)).sum().item()
            t0 = time.perf_counter()
            with sfft.set_workers(threads):
                lo, e = fn(tot, m, vs)
            return {"_local": lo, "_kept": e, "solve_s": time.perf_counter() - t0,
                    **{k.replace(" ", "_").lower(): v for k, v in gpu_peak_mib(dev).items()}}

        r = measure(run_limit if name == "harmonic-limit" else run)
        fields[name] = (r.pop("_local"), r.pop("_kept"))
        rows.append({"method": name, **r})
        print(f"{name}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU s)", flush=True)

    hl = fields["harmonic-limit"][0]
    for row in rows:
        lo, e = fields[row["method"]]
        hl_e = hl if np.array_equal(e, m) else harmonic_limit(loc, e, vs)
        row.update(nrmse_own=nrmse(loc, lo, e), nrmse_given=nrmse(loc, lo, m), kept=float(e.sum() / m.sum()),
                   vs_hl_own=nrmse(hl_e, lo, e), vs_hl_given=nrmse(hl, lo, m), hl_own=nrmse(loc, hl_e, e))
        if run_medi and not row["method"].endswith("(cuda)"):
            row.update(_medi_scores(d, lo, e, threads))
            print(f"{row['method']}: chi NRMSE {row['chi_given']:.1f} % (given mask) after MEDI "
                  f"({row['medi_seconds']:.0f} s)", flush=True)
    cols = ["method", "nrmse_own", "nrmse_given", "kept", "vs_hl_own", "vs_hl_given", "hl_own"]
    cols += ["chi_given", "chi_own"] if run_medi else []
    cols += ["seconds", "solve_s", "cpu_seconds", "peak_rss_mib"] + (["gpu_peak_mib"] if gpu else [])
    print(f"\n{title}: shape {m.shape}, voxel {vs} mm, {int(m.sum())} mask voxels, {threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(table(rows, cols))


def _medi_scores(d, lo, e, threads: int) -> dict:
    import numpy as np
    import torch

    from qsmkit_medi import medi

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = medi(lo, e, tuple(float(v) for v in d["voxel_size"]), tuple(float(v) for v in d["b0"]), d["magnitude"],
             d["noise_weight"], field_strength=float(d["field_strength"]), echo_times=d["echo_times"])
    chi = np.where(e, r.chi, 0.0)
    return {"chi_given": _demeaned_nrmse(d["chi"], chi, d["mask"]), "chi_own": _demeaned_nrmse(d["chi"], chi, e),
            "medi_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--voxel", type=float, default=1.0, help="isotropic voxel edge, mm")
    ap.add_argument("--oversample", type=int, default=2,
                    help="simulator oversampling (its default, 2; 1 samples the head on the methods' own grid)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="npz file to reuse the simulated inputs")
    ap.add_argument("--methods", default="vsharp,sharp,resharp,ismv,lbv,lbv-peel1,pdf,pdf-uniform")
    ap.add_argument("--no-medi", action="store_true", help="skip the chi-after-MEDI columns")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "both"),
                    help="auto / both: GPU rows for PDF when torch sees CUDA; cpu: none")
    ap.add_argument("--no-head", action="store_true", help="skip the whole-head table")
    ap.add_argument("--default-phantom", action="store_true",
                    help="also the simulator's default phantom (112 x 128 x 96 at 1.5 mm; acceptance 2)")
    ap.add_argument("--default-cache", default=None, help="npz file for the default phantom's inputs")
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    methods = [s for s in a.methods.split(",") if s]
    from _gpu import devices as _devices

    devices = _devices(a.device)
    if a.default_phantom:
        from qsmkit.simulate import DEFAULT_SHAPE, DEFAULT_VOXEL_SIZE

        d = _inputs(DEFAULT_SHAPE, float(DEFAULT_VOXEL_SIZE[0]), 2, a.default_cache)
        _table(d, methods, a.threads, not a.no_medi, "default phantom (oversample 2)", devices)
    if not a.no_head:
        d = _inputs(tuple(int(v) for v in a.shape.split(",")), a.voxel, a.oversample, a.cache)
        _table(d, methods, a.threads, not a.no_medi, f"whole head (oversample {a.oversample})", devices)


if __name__ == "__main__":
    main()
