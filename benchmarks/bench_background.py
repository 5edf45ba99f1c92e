"""Background field removal on the simulator's whole-head phantom at 1 mm (180 x 216 x 180).

    python benchmarks/bench_background.py [--shape 180,216,180] [--voxel 1.0] [--oversample 1]
                                          [--threads 2] [--cache FILE]
                                          [--methods vsharp,sharp,resharp,ismv]

Input: :func:`qsmkit.simulate.simulate_phantom` on the 1 mm grid of ``bench_medi.py`` (the
simulator's default grid is 1.5 mm: ``--shape 112,128,96 --voxel 1.5``), seed 0, ``oversample=1``
to keep the set-up short (as ``bench_medi.py``); each method runs with its default parameters from the TRUE total field and the true brain
mask, in a fresh process (wall time, peak RSS). Columns: local-field NRMSE (%) against the true
local field over the method's own eroded mask (``qsmkit.metrics.nrmse(truth, estimate, mask)``),
the same over the whole given mask (eroded voxels count as zero), the fraction of the mask kept,
seconds and peak RSS (MiB). ``--threads`` limits the FFT/BLAS threads (issue 17: 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def _inputs(shape, voxel: float, oversample: int, cache: str | None) -> dict:
    import numpy as np

    if cache and os.path.exists(cache):
        return dict(np.load(cache))
    from qsmkit.simulate import simulate_phantom

    t0 = time.perf_counter()
    ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, oversample=oversample)
    d = dict(total=ph.truth["total_field"].data.astype(np.float32),
             local=ph.truth["local_field"].data.astype(np.float32),
             mask=ph.truth["mask"].data > 0, voxel_size=np.asarray(ph.magnitude.voxel_size))
    print(f"simulated {d['mask'].shape} at {tuple(d['voxel_size'])} mm in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if cache:
        np.savez(cache, **d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--voxel", type=float, default=1.0, help="isotropic voxel edge, mm")
    ap.add_argument("--oversample", type=int, default=1, help="simulator oversampling (its default is 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="npz file to reuse the simulated inputs")
    ap.add_argument("--methods", default="vsharp,sharp,resharp,ismv")
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy as np
    import scipy.fft as sfft

    from _measure import measure, table
    from qsmkit.metrics import nrmse
    from qsmkit_bgremove import ismv, resharp, sharp
    from qsmkit_vsharp import vsharp

    d = _inputs(tuple(int(v) for v in a.shape.split(",")), a.voxel, a.oversample, a.cache)
    fns = {"vsharp": vsharp, "sharp": sharp, "resharp": resharp, "ismv": ismv}
    tot, loc, m, vs = d["total"], d["local"], d["mask"], tuple(float(v) for v in d["voxel_size"])
    rows = []
    for name in a.methods.split(","):
        fn = fns[name]

        def run(fn=fn):
            with sfft.set_workers(a.threads):
                lo, e = fn(tot, m, vs)
            return {"nrmse_own_mask": nrmse(loc, lo, e), "nrmse_given_mask": nrmse(loc, lo, m),
                    "mask_kept": float(e.sum() / m.sum())}

        r = measure(run)
        rows.append({"method": name, **r})
        print(f"{name}: {r['seconds']:.1f} s", flush=True)
    print(f"\nshape {m.shape}, voxel {vs} mm, {int(m.sum())} mask voxels, {a.threads} threads")
    print(table(rows, ["method", "nrmse_own_mask", "nrmse_given_mask", "mask_kept", "seconds",
                       "cpu_seconds", "peak_rss_mib"]))


if __name__ == "__main__":
    main()
