"""Phase unwrapping side by side: Laplacian, ROMEO-like region growing, scikit-image (3D).

    python benchmarks/bench_unwrap.py [--shape 180,216,180] [--voxel 1.0] [--oversample 1]
                                      [--snr 100] [--threads 2] [--cache PREFIX]
                                      [--phantoms 3T,7T] [--methods laplacian,...]

Inputs: :func:`qsmkit.simulate.simulate_phantom` (seed 0, ``oversample=1`` by default to keep
the set-up short, which also means no intravoxel dephasing), on a life-size 1 mm whole head:

* ``3T``: the simulator's default echoes (4, 8, 12, 16, 20 ms) at 3 T;
* ``7T``: 7 T with a long last echo (4, 8, 12, 16, 20, 30 ms): strong wrapping (the last echo
  spans tens of cycles across the brain, and near veins and the sinuses the phase steps exceed
  pi per voxel already in the first echoes).

Every method unwraps all echoes of the wrapped phase, with the true brain mask, in a fresh
process (wall time, CPU time, peak RSS):

* ``laplacian``: ``unwrap/laplacian`` with ``max_iter=30, snap=True`` (the variant whose output is
  the data + 2 pi k, so that it can be scored like the others);
* ``romeo_temporal`` / ``romeo_spatial`` / ``romeo_individual``: :func:`qsmkit_unwrap.romeo_unwrap`
  in that mode (magnitude and echo times given, defaults otherwise); ``romeo_temporal_wa2``: the
  temporal mode with ROMEO's linear extrapolation ``wrap_addition=2.0`` rad;
* ``skimage``: :func:`skimage.restoration.unwrap_phase` (3D, masked array), echo by echo.

Correctness: the true unwrapped phase is ``phi0 + 2 pi GAMMA_BAR B0 1e-6 total_field TE`` (the
simulator's ``phase_offset`` and true ``total_field``). A voxel of the brain mask counts as
*wrong* in an echo when its residual ``unwrapped - truth`` differs from the median residual over
the mask (one free constant per echo) by more than pi, i.e. it is off by 2 pi k. Columns:
``wrong_per_echo`` (list), ``wrong_max`` (worst echo), ``wrong_total``. ``s_per_echo`` and
``cpu_s_per_echo``: wall and CPU (all threads) seconds of the unwrapping call alone (modules
imported and the compiled kernel loaded beforehand, scoring not included) divided by the number
of echoes; ``peak_rss_mib``: the forked process's peak. Two voxel counts are printed per phantom
to read the errors against: ``noise_limited`` (per echo: the measured phase itself is more than
pi/2 from the true one, noise at short T2*), ``no_signal`` (per echo: the noise-free magnitude,
from the same phantom simulated without noise, is below the noise std ``sigma`` of one channel:
the signal has decayed into the noise, so the measured phase is noise and neither the voxel's
echoes nor its neighbours fix its 2 pi k) and ``ill_sampled`` (the true first-echo phase steps
to a mask neighbour reach pi/2 or more: next to veins and sinuses, where a 2 pi error cannot be
told from the data); ``wrong_with_signal`` (per echo) leaves out the ``no_signal`` voxels and
``wrong_resolvable`` all three. The numba compile time of
the growth kernel is reported apart (it is cached on disk, so only the first run after
installation pays it). ``--threads`` limits the FFT/BLAS/numba
threads (issue 11: 2 cores); numbers measured on a shared machine are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

PHANTOMS = {
    "3T": dict(field_strength=3.0, echo_times=(0.004, 0.008, 0.012, 0.016, 0.020)),
    "7T": dict(field_strength=7.0, echo_times=(0.004, 0.008, 0.012, 0.016, 0.020, 0.030)),
}
METHODS = ("laplacian", "romeo_temporal", "romeo_temporal_wa2", "romeo_spatial", "romeo_individual", "skimage")


def _inputs(name: str, shape, voxel: float, oversample: int, snr, cache: str | None) -> dict:
    import numpy as np

    path = f"{cache}_{name}.npz" if cache else None
    if path and os.path.exists(path):
        return dict(np.load(path))
    from qsmkit.physics import ppm_to_phase
    from qsmkit.simulate import simulate_phantom

    t0 = time.perf_counter()
    kw = PHANTOMS[name]
    ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, oversample=oversample, snr=snr, **kw)
    te = np.asarray(ph.echo_times, dtype=np.float64)
    truth = (ph.phase_offset.data[..., None]
             + ppm_to_phase(ph.truth["total_field"].data[..., None], te, float(ph.field_strength)))
    d = dict(phase=ph.phase.data.astype(np.float32), magnitude=ph.magnitude.data.astype(np.float32),
             truth=truth.astype(np.float32), mask=ph.truth["mask"].data > 0, echo_times=te,
             voxel_size=np.asarray(ph.magnitude.voxel_size), field_strength=np.float64(ph.field_strength))
    sigma = ph.meta.get("noise_sigma")
    if snr is not None and sigma:  # the noise-free magnitude of the same head, for the no_signal count
        clean = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, oversample=oversample, snr=None, **kw)
        d.update(clean_magnitude=clean.magnitude.data.astype(np.float32), noise_sigma=np.float64(sigma))
    vs = tuple(float(v) for v in d["voxel_size"])
    print(f"simulated {name}: {d['mask'].shape} at {vs} mm in {time.perf_counter() - t0:.0f} s", flush=True)
    if path:
        np.savez(path, **d)
    return d


def wrong_voxels(unwrapped, truth, mask, exclude=None) -> list[int]:
    """Per echo: voxels of ``mask`` whose residual differs from the median residual by more than pi
    (``exclude``: an optional (x, y, z, echo) array of voxels not to count)."""
    import numpy as np

    out = []
    for e in range(truth.shape[-1]):
        r = (unwrapped[..., e] - truth[..., e])[mask].astype(np.float64)
        bad = np.abs(r - np.median(r)) > np.pi
        if exclude is not None:
            bad &= ~exclude[..., e][mask]
        out.append(int(np.count_nonzero(bad)))
    return out


def ill_sampled(truth_echo1, mask):
    """Mask voxels with a true first-echo phase step of pi/2 or more to a mask neighbour."""
    import numpy as np

    out = np.zeros(mask.shape, bool)
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(None, -1), slice(1, None)
        step = np.abs(truth_echo1[tuple(hi)] - truth_echo1[tuple(lo)])
        steep = mask[tuple(lo)] & mask[tuple(hi)] & (step >= np.pi / 2)
        out[tuple(lo)] |= steep
        out[tuple(hi)] |= steep
    return out


def _compile_seconds() -> tuple[float, float]:
    """Seconds of the first call on a tiny volume after import: with an empty numba cache (the
    compile) and with the on-disk cache (loading the compiled kernel)."""
    code = ("import time, numpy as np; from qsmkit_unwrap.romeo import romeo_unwrap; t = time.perf_counter(); "
            "romeo_unwrap(np.zeros((4, 4, 4), np.float32)); print(time.perf_counter() - t)")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for env in ({"NUMBA_CACHE_DIR": tmp}, {}):
            r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                               text=True)
            if r.returncode:
                raise SystemExit(f"timing the numba compile failed:\n{r.stderr[-2000:]}")
            times.append(float(r.stdout.strip().splitlines()[-1]))
    return times[0], times[1]


def _run(method: str, d: dict, threads: int):
    import numpy as np
    import scipy.fft as sfft

    ph, mag, m, te = d["phase"], d["magnitude"], d["mask"], d["echo_times"]
    if method == "laplacian":
        from qsmkit_unwrap import laplacian_unwrap

        with sfft.set_workers(threads):
            return laplacian_unwrap(ph, tuple(float(v) for v in d["voxel_size"]), m, iterations=30, snap=True)
    if method.startswith("romeo_"):
        from qsmkit_unwrap.romeo import romeo_unwrap

        if method == "romeo_temporal_wa2":
            return romeo_unwrap(ph, mag, m, te, mode="temporal", wrap_addition=2.0)
        return romeo_unwrap(ph, mag, m, te, mode=method.split("_", 1)[1])
    if method == "skimage":
        from skimage.restoration import unwrap_phase

        out = np.zeros_like(ph)
        for e in range(ph.shape[-1]):
            u = unwrap_phase(np.ma.masked_array(ph[..., e], ~m))
            out[..., e] = np.ma.filled(u, 0)
        return out
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--voxel", type=float, default=1.0, help="isotropic voxel edge, mm")
    ap.add_argument("--oversample", type=int, default=1, help="simulator oversampling (its default is 2)")
    ap.add_argument("--snr", default="100", help="simulator SNR, or 'none' for noise-free phase")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="file prefix: <prefix>_<phantom>.npz reuses the simulated inputs")
    ap.add_argument("--phantoms", default="3T,7T")
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy as np

    from _measure import measure, table

    snr = None if a.snr.lower() in ("none", "inf") else float(a.snr)
    shape = tuple(int(v) for v in a.shape.split(","))
    cold, warm = _compile_seconds()
    # import every method (and load the compiled kernel) here, so that the forked runs time the work only
    import skimage.restoration  # noqa: F401

    from qsmkit_unwrap import laplacian_unwrap  # noqa: F401
    from qsmkit_unwrap.romeo import romeo_unwrap

    romeo_unwrap(np.zeros((4, 4, 4, 2), np.float32), echo_times=(1.0, 2.0))
    print(f"numba growth kernel: first call {cold:.1f} s with an empty cache (compile), {warm:.2f} s with "
          f"the on-disk cache (load)", flush=True)
    for name in a.phantoms.split(","):
        d = _inputs(name, shape, a.voxel, a.oversample, snr, a.cache)
        n_e = d["phase"].shape[-1]
        m, truth = d["mask"], d["truth"]
        noisy = np.abs(np.angle(np.exp(1j * (d["phase"] - truth)))) > np.pi / 2
        steep = ill_sampled(truth[..., 0], m)
        if "clean_magnitude" in d:
            no_signal = d["clean_magnitude"] < float(d["noise_sigma"])
        else:  # noise-free phantom (or an older cache): every voxel has signal
            no_signal = np.zeros(noisy.shape, bool)
        unresolvable = noisy | no_signal | steep[..., None]
        rows = []
        for method in a.methods.split(","):
            def run(method=method):
                t0, c0 = time.perf_counter(), time.process_time()
                u = _run(method, d, a.threads)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                bad = wrong_voxels(u, truth, m)
                return {"unwrap_s": dt, "unwrap_cpu_s": cpu, "wrong_per_echo": bad, "wrong_max": max(bad),
                        "wrong_total": sum(bad), "wrong_with_signal": wrong_voxels(u, truth, m, no_signal),
                        "wrong_resolvable": wrong_voxels(u, truth, m, unresolvable)}

            r = measure(run)
            r["s_per_echo"] = r["unwrap_s"] / n_e
            r["cpu_s_per_echo"] = r["unwrap_cpu_s"] / n_e
            rows.append({"method": method, **r})
            print(f"{name} {method}: {r['unwrap_s']:.1f} s, wrong per echo {r['wrong_per_echo']}", flush=True)
        print(f"\n{name}: shape {m.shape}, voxel {tuple(float(v) for v in d['voxel_size'])} mm, {int(m.sum())} mask "
              f"voxels, echoes {[round(1e3 * float(t), 1) for t in d['echo_times']]} ms, "
              f"B0 {float(d['field_strength'])} T, "
              f"SNR {a.snr}, {a.threads} threads; noise_limited per echo {noisy[m].sum(axis=0).tolist()}, "
              f"no_signal per echo {no_signal[m].sum(axis=0).tolist()}, ill_sampled {int(steep.sum())}")
        print(table(rows, ["method", "s_per_echo", "cpu_s_per_echo", "unwrap_s", "peak_rss_mib", "wrong_max",
                           "wrong_total", "wrong_per_echo", "wrong_with_signal", "wrong_resolvable"]) + "\n",
              flush=True)


if __name__ == "__main__":
    main()
