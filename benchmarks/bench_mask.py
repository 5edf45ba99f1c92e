"""Brain masks against the simulator's true brain mask: Dice and time per method and case (issue 11).

    python benchmarks/bench_mask.py [--cases 3T,7T,haemorrhage,bias,opening]
                                    [--methods threshold,threshold-open,threshold-erode,bet,phase_quality,...]
                                    [--shape 112,128,96] [--voxel 1.5 | 1.5,1.5,2.5] [--threads 2]

Other grids: ``--shape 180,216,180 --voxel 1`` (life size at 1 mm), ``--shape 80,96,72 --voxel 2``,
``--shape 112,128,58 --voxel 1.5,1.5,2.5`` (anisotropic); the head scales with the field of view.

Inputs: :func:`qsmkit.simulate.simulate_phantom` on the simulator's default grid (112 x 128 x 96 at
1.5 mm, seed 0, oversample 2), one phantom per case:

* ``3T``: the default phantom (5 echoes 4-20 ms, 3 T);
* ``7T``: ``field_strength=7.0``, 6 echoes 4-30 ms;
* ``haemorrhage``: the default phantom with ``haemorrhage=True`` (a 9 mm haematoma, chi +1 ppm);
* ``bias`` (stress, not in the acceptance): the 3T magnitude times a smooth receive bias
  ``1 + 0.45 tanh(0.9 x + 0.6 y - 0.5 z)`` (x, y, z in [-1, 1] over the grid: x0.55 to x1.45);
* ``opening`` (stress): the 3T magnitude with an 8 mm radius tube of soft tissue (0.6) through the
  skull base into the neck, as the foramen magnum joins the brain and the neck in real heads
  (the phase is that of the 3T phantom; the quality map, from it and the changed magnitude,
  is then set to 0.8, tissue-like reliable phase, in the tube).

The truth is ``phantom.truth["mask"]``: the brain, ventricles, sulci and the inner half of the
subarachnoid CSF, whose border lies ~1 mm inside the skull (not the intracranial cavity).
Methods (each run through its Stage class with the stage defaults unless noted, in a fresh
process for wall time and peak RSS; setup, simulation and the quality map are not timed):

* ``threshold``: ``mask/threshold`` (Otsu on the first echo, largest component, fill);
* ``threshold-open``: the same with ``erode_mm: 3, dilate_mm: 3``;
* ``threshold-erode``: the same with ``erode_mm: 1.5`` (moves the border off the skull);
* ``bet``: ``mask/bet`` (BET-like surface on the first echo, ``margin_mm: 1``);
* ``phase_quality``: ``mask/phase_quality`` (Otsu on ROMEO's quality, 3 mm opening, fill) with
  the magnitude; ``phase_quality-robust``: with ``method: robust``.

The ROMEO quality map comes from ``unwrap/romeo`` (defaults, no mask, magnitude and echo times
given), once per case; its time is printed. Columns: Dice against the truth, the fraction of
the mask outside the truth (``extra``) and of the truth missed (``missed``), wall seconds, CPU
seconds and peak RSS (MiB) of the child process. Times measured on a shared machine are upper
bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

TE_3T = (0.004, 0.008, 0.012, 0.016, 0.020)
TE_7T = (0.004, 0.008, 0.012, 0.016, 0.020, 0.030)
METHODS = {
    "threshold": ("threshold", {}),
    "threshold-open": ("threshold", {"erode_mm": 3.0, "dilate_mm": 3.0}),
    "threshold-erode": ("threshold", {"erode_mm": 1.5}),
    "bet": ("bet", {}),
    "phase_quality": ("phase_quality", {}),
    "phase_quality-robust": ("phase_quality", {"method": "robust"}),
}


def _phantom(case: str, shape, voxel):
    import numpy as np

    from qsmkit.simulate import simulate_phantom

    kw = dict(shape=shape, voxel_size=voxel, seed=0)
    if case == "7T":
        kw.update(field_strength=7.0, echo_times=TE_7T)
    elif case == "haemorrhage":
        kw.update(haemorrhage=True)
    ph = simulate_phantom(**kw)
    mag = np.asarray(ph.magnitude.data, dtype=np.float32).copy()
    truth = ph.truth["mask"].data > 0
    tube = None
    if case == "bias":
        g = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in mag.shape[:3]], indexing="ij")
        mag *= (1.0 + 0.45 * np.tanh(0.9 * g[0] + 0.6 * g[1] - 0.5 * g[2]))[..., None].astype(np.float32)
    elif case == "opening":
        vs = np.asarray(ph.magnitude.voxel_size)
        labels = ph.truth["labels"].data
        c = np.array(np.nonzero(truth)).mean(axis=1)
        i, j, k = np.meshgrid(*[np.arange(n) for n in mag.shape[:3]], indexing="ij")
        tube = (((i - c[0]) * vs[0]) ** 2 + ((j - c[1]) * vs[1]) ** 2 <= 8.0 ** 2) & (k < c[2]) & ~truth
        tube &= np.isin(labels, (0, 1, 12, 13, 14))
        mag[tube] = 0.6
    return ph, ph.magnitude.like(mag), truth, tube


def _quality(ph, mag):
    from qsmkit.plugins import load_registry
    from qsmkit.stage import StageContext

    cls = load_registry().get("unwrap", "romeo")
    art = {"phase": ph.phase, "magnitude": mag, "echo_times": ph.artifacts()["echo_times"]}
    t0 = time.perf_counter()
    out = cls().run(StageContext(art, log=lambda s: None), cls.validate_params({}, "romeo"))
    return out["quality"], time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="3T,7T,haemorrhage,bias,opening")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--shape", default="112,128,96")
    ap.add_argument("--voxel", default="1.5", help="voxel size in mm: one value or three (x,y,z)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np

    from _measure import measure, table
    from qsmkit.plugins import load_registry
    from qsmkit.stage import StageContext

    reg = load_registry()
    shape = tuple(int(s) for s in a.shape.split(","))
    voxel = tuple(float(v) for v in a.voxel.split(","))
    voxel = voxel * 3 if len(voxel) == 1 else voxel
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows = []
    for case in [c for c in a.cases.split(",") if c]:
        t0 = time.perf_counter()
        ph, mag, truth, tube = _phantom(case, shape, voxel)
        print(f"{case}: simulated {shape} at {voxel} mm in {time.perf_counter() - t0:.1f} s", flush=True)
        quality = None
        if any(METHODS[m][0] == "phase_quality" for m in methods):
            quality, tq = _quality(ph, mag)
            if tube is not None:
                quality = quality.like(np.where(tube, np.float32(0.8), quality.data))
            print(f"{case}: ROMEO quality map in {tq:.1f} s", flush=True)
        for name in methods:
            method, params = METHODS[name]
            cls = reg.get("mask", method)
            art = {"magnitude": mag} if method != "phase_quality" else {"quality": quality, "magnitude": mag}

            def run(cls=cls, art=art, params=params):
                out = cls().run(StageContext(art, log=lambda s: None), cls.validate_params(params, "bench"))
                m = np.asarray(out["mask"].data, dtype=bool)
                inter = float((m & truth).sum())
                return {"dice": 2.0 * inter / float(m.sum() + truth.sum()),
                        "extra": float((m & ~truth).sum()) / float(truth.sum()),
                        "missed": float((truth & ~m).sum()) / float(truth.sum())}

            r = measure(run)
            rows.append({"method": name, "case": case, **r})
            print(f"  {name}: Dice {r['dice']:.4f} in {r['seconds']:.1f} s", flush=True)
    print()
    print(table(rows, ["method", "case", "dice", "extra", "missed", "seconds", "cpu_seconds", "peak_rss_mib"]))


if __name__ == "__main__":
    main()
