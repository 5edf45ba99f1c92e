"""Loss-free front end (issue 11, acceptance 2): chi from the wrapped phase against chi from the true total field.

    python benchmarks/bench_frontend.py [--masks true,phase_quality] [--unwrap laplacian,romeo]
                                        [--fit weighted_fit,nonlinear_fit] [--background vsharp,pdf,lbv]
                                        [--phase-offset smooth|coil|none] [--mcpc] [--haemorrhage]
                                        [--threads 2] [--workdir DIR] [--shape 112,128,96] [--voxel 1.5]

Input: the simulator's default phantom (:func:`qsmkit.simulate.simulate_phantom`: 112 x 128 x 96 at
1.5 mm, 5 echoes 4-20 ms, 3 T, SNR 100, seed 0, oversample 2), written once as NIfTI files
(``Phantom.write``) to ``--workdir`` (default: a temporary folder). Every row is one pipeline
built as a mapping and run with the Python pipeline API (:func:`qsmkit.pipeline.build_plan` +
:func:`qsmkit.pipeline.run_plan`, outputs not written), each in a fresh process (wall time,
CPU time of all threads, peak RSS of that process, inputs and imports included):

* front-end rows ``mask / unwrap / fit / background``: inputs magnitude, phase, echo times, field
  strength (and the true brain mask for mask ``true``); stages ``[unwrap romeo -> mask
  phase_quality]`` (the new mask; it needs ROMEO's quality map), ``[phase_offset mcpc3ds]`` with
  ``--mcpc``, ``unwrap <unwrap>`` (inside the mask), ``echo_combine <fit>``, ``background
  <background>``, ``inversion medi``, all with default parameters (background ``tfi``: no
  background stage, ``inversion tfi`` instead of MEDI; its ``local`` column is empty; with
  ``--fit-margin-mm`` the echo fit also covers that shell around the mask, unwrapped unmasked);
* reference rows ``<mask> / truth / truth / background``: the TRUE total field, the same mask
  (the true mask, or the phase_quality mask made by the front end from the data) and the
  analytic noise weight ``2 pi GAMMA_BAR B0 sqrt(sum_e (|S_e| TE_e)^2) / sigma`` (1/ppm, as
  ``bench_background.py``), then ``background <background>`` and ``inversion medi``.

Columns (NRMSE in %, ``qsmkit.metrics.nrmse(truth, estimate, mask)``), all on ONE evaluation
mask: the true brain mask eroded by ``--eval-erode-mm`` (default 4.5 mm, three voxels), the same
for every row. Voxels a chain's final mask drops count as zero (QSM-CI style); ``kept`` is the
fraction of the evaluation mask the chain's final mask keeps.

* ``chi``: chi against the true chi, both demeaned over the evaluation mask and zeroed outside it
  (as ``qsmkit evaluate``);
* ``local``: local field against the true local field, both demeaned over the evaluation mask;
* ``d_chi``: ``chi`` minus the reference row with the same mask kind and background method
  (acceptance 2: within 2 percentage points for the new mask + ROMEO + nonlinear fit);
* ``seconds``, ``cpu_seconds``, ``peak_rss_mib``: the whole pipeline run (MEDI included).

Every row runs with the pipeline's ``device: cpu``. When torch sees CUDA (``--device auto``, the
default) the reference rows run once more with ``device: cuda`` (issue 20; ``device`` column
``cuda``: PDF and MEDI, the torch stages, on the GPU; CUDA start-up included as in a
``qsmkit run``), with ``gpu_peak_mib`` (``torch.cuda.max_memory_allocated``).

The default set is 20 pipelines (2 masks x 2 backgrounds x (1 reference + 2 unwrappers x 2 fits)),
about 15 min on 2 shared cores. A method that is not registered (e.g. written by another plugin later) is skipped with a note,
so the script can be rerun as methods land. Timings on a shared machine are upper bounds; the
CPU seconds divided by ``--threads`` approximate the time on idle cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))


def _phantom_files(workdir: Path, shape, voxel: float, phase_offset: str, haemorrhage: bool) -> dict:
    """Simulate once and write the files the pipelines read (reused when already there)."""
    import json

    import numpy as np

    tag = f"{'x'.join(map(str, shape))}_{voxel:g}mm_{phase_offset}{'_haem' if haemorrhage else ''}"
    folder = workdir / f"phantom_{tag}"
    info_path = folder / "bench_frontend.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    from qsmkit.io import save_nifti, write_json
    from qsmkit.physics import GAMMA_BAR
    from qsmkit.simulate import simulate_phantom

    t0 = time.perf_counter()
    ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, seed=0, phase_offset=phase_offset,
                          haemorrhage=haemorrhage)
    paths = {k: str(v) for k, v in ph.write(folder).items()}
    mag, te = ph.magnitude.data, np.asarray(ph.echo_times)
    nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                     / ph.meta["noise_sigma"])
    paths["noise_weight"] = str(save_nifti(ph.mask.like(nw.astype(np.float32), units="1/ppm"),
                                           folder / "noise_weight.nii.gz"))
    info = {"paths": paths, "echo_times": te.tolist(), "field_strength": float(ph.field_strength),
            "shape": list(shape), "voxel": voxel}
    write_json(info, info_path)
    print(f"simulated {tuple(shape)} at {voxel:g} mm (phase_offset {phase_offset}) in "
          f"{time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return info


def _registered(kind: str, method: str) -> bool:
    from qsmkit.plugins import load_registry

    return method in load_registry().methods(kind)


def _spec(info: dict, row: dict, new_mask_file: str | None) -> dict:
    p = info["paths"]
    inputs = {"magnitude": p["magnitude"], "echo_times": info["echo_times"], "field_strength": info["field_strength"]}
    stages: list[dict] = []
    if row["unwrap"] == "truth":
        inputs.update(total_field=p["total_field"], noise_weight=p["noise_weight"],
                      mask=p["mask"] if row["mask"] == "true" else new_mask_file)
    else:
        inputs["phase"] = p["phase"]
        if row["mask"] == "true":
            inputs["mask"] = p["mask"]
        else:
            stages += [{"stage": "unwrap", "method": "romeo"}, {"stage": "mask", "method": row["mask"]}]
        if row.get("mcpc"):
            stages.append({"stage": "phase_offset", "method": "mcpc3ds"})
        margin = row.get("fit_margin_mm", 0.0)
        unwrap = {"stage": "unwrap", "method": row["unwrap"]}
        fit = {"stage": "echo_combine", "method": row["fit"]}
        if margin > 0:  # the fit's margin needs the phase unwrapped around the mask
            unwrap["params"], fit["params"] = {"use_mask": False}, {"fit_margin_mm": margin}
        stages += [unwrap, fit]
    if row["background"] == "tfi":  # total field inversion: no background stage
        stages.append({"stage": "inversion", "method": "tfi"})
    else:
        stages += [{"stage": "background", "method": row["background"]}, {"stage": "inversion", "method": "medi"}]
    return {"name": "bench-frontend", "inputs": inputs, "stages": stages, "output_dir": str(Path(p["phase"]).parent
                                                                                          / "unused_out")}


def _run_pipeline(spec: dict, threads: int, device: str = "cpu") -> dict:
    import numpy as np
    import scipy.fft as sfft
    import torch

    from qsmkit.pipeline import build_plan, run_plan
    from qsmkit.plugins import load_registry

    torch.set_num_threads(threads)
    reg = load_registry()
    plan = build_plan({**spec, "device": device}, reg)
    with sfft.set_workers(threads):
        res = run_plan(plan, reg, log=lambda m: None, write=False)
    a = res.artifacts
    chi = np.asarray(a["chi"].data, np.float32)
    local = (np.asarray(a["local_field"].data, np.float32) if "local_field" in a  # tfi rows have none
             else np.full(chi.shape, np.nan, np.float32))
    out = {"_chi": chi, "_local": local, "_mask": np.asarray(a["mask"].data) > 0}
    from _gpu import gpu_peak_mib

    out.update({k.replace(" ", "_").lower(): v for k, v in gpu_peak_mib(device).items()})
    return out


def _new_mask(info: dict, kind: str) -> str | None:
    """The front end's own mask (unwrap romeo -> mask <kind>) written once, for the reference rows."""
    import numpy as np

    from qsmkit.io import load_nifti, save_nifti
    from qsmkit.pipeline import build_plan, run_plan
    from qsmkit.plugins import load_registry

    out = Path(info["paths"]["phase"]).parent / f"mask_{kind}.nii.gz"
    if out.exists():
        return str(out)
    p = info["paths"]
    spec = {"inputs": {"magnitude": p["magnitude"], "phase": p["phase"], "echo_times": info["echo_times"],
                       "field_strength": info["field_strength"]},
            "stages": [{"stage": "unwrap", "method": "romeo"}, {"stage": "mask", "method": kind}],
            "output_dir": str(out.parent / "unused_out")}
    reg = load_registry()
    res = run_plan(build_plan(spec, reg), reg, log=lambda m: None, write=False)
    ref = load_nifti(p["mask"], "mask")
    save_nifti(ref.like(np.asarray(res.artifacts["mask"].data) > 0, units="bool"), out)
    return str(out)


def _demeaned(truth, est, mask) -> float:
    import numpy as np

    from qsmkit.metrics import nrmse

    t = np.where(mask, truth - truth[mask].mean(), 0.0)
    e = np.where(mask, est - est[mask].mean(), 0.0)
    return nrmse(t, e, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default="true,phase_quality")
    ap.add_argument("--unwrap", default="laplacian,romeo")
    ap.add_argument("--fit", default="weighted_fit,nonlinear_fit")
    ap.add_argument("--background", default="vsharp,pdf", help="e.g. vsharp,sharp,resharp,ismv,pdf,lbv,tfi")
    ap.add_argument("--phase-offset", default="smooth", choices=("smooth", "coil", "none"),
                    help="simulator phase offset (coil: wrapping, use with --mcpc)")
    ap.add_argument("--haemorrhage", action="store_true", help="simulate with the haematoma")
    ap.add_argument("--mcpc", action="store_true", help="add phase_offset/mcpc3ds before unwrapping")
    ap.add_argument("--eval-erode-mm", type=float, default=4.5)
    ap.add_argument("--fit-margin-mm", type=float, default=0.0,
                    help="echo fit also in this shell around the mask (unwrapping then unmasked), e.g. 2.5 for tfi")
    ap.add_argument("--shape", default="112,128,96")
    ap.add_argument("--voxel", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="folder for the phantom files (reused between runs)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "both"),
                    help="auto / both: the reference rows once more on CUDA when torch sees a GPU")
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)

    import numpy as np

    from _gpu import devices as _devices
    from _measure import measure, table
    from qsmkit.io import load_nifti
    from qsmkit_mask import erode_mm

    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_frontend_"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = _phantom_files(workdir, tuple(int(v) for v in a.shape.split(",")), a.voxel, a.phase_offset,
                          a.haemorrhage)
    p = info["paths"]
    chi_t = load_nifti(p["chi"], "chi").data
    loc_t = load_nifti(p["local_field"], "local_field").data
    mask_t = load_nifti(p["mask"], "mask").data > 0.5
    ev = erode_mm(mask_t, a.eval_erode_mm, load_nifti(p["mask"], "mask").voxel_size)

    notes, rows = [], []
    masks, unwraps, fits, bgs = (s.split(",") for s in (a.masks, a.unwrap, a.fit, a.background))
    avail = {("mask", m): m == "true" or _registered("mask", m) for m in masks}
    avail.update({("unwrap", u): _registered("unwrap", u) for u in unwraps})
    avail.update({("echo_combine", f): _registered("echo_combine", f) for f in fits})
    avail.update({("background", b): _registered("inversion", "tfi") if b == "tfi" else _registered("background", b)
                  for b in bgs})
    if "phase_quality" in masks and not _registered("unwrap", "romeo"):
        avail[("mask", "phase_quality")] = False
        notes.append("mask phase_quality needs unwrap/romeo's quality map: romeo is not registered")
    for (kind, m), ok in avail.items():
        if not ok and not any(m in n for n in notes):
            notes.append(f"{kind}/{m} is not registered: skipped")
    masks = [m for m in masks if avail[("mask", m)]]
    bgs = [b for b in bgs if avail[("background", b)]]
    plan = []
    for mk in masks:
        new_file = None if mk == "true" else _new_mask(info, mk)
        for bg in bgs:
            plan.append(({"mask": mk, "unwrap": "truth", "fit": "truth", "background": bg}, new_file))
            for u in unwraps:
                for f in fits:
                    if avail[("unwrap", u)] and avail[("echo_combine", f)]:
                        plan.append(({"mask": mk, "unwrap": u, "fit": f, "background": bg, "mcpc": a.mcpc,
                                      "fit_margin_mm": a.fit_margin_mm}, new_file))
    if "cuda" in _devices(a.device):  # GPU rows: the reference rows (pdf / medi are the torch stages)
        plan += [(dict(row, device="cuda"), f) for row, f in plan if row["unwrap"] == "truth"]
    ref = {}
    for row, new_file in plan:
        dev = row.get("device", "cpu")
        label = f"{row['mask']}/{row['unwrap']}/{row['fit']}/{row['background']}" + ("" if dev == "cpu" else f" [{dev}]")
        spec = _spec(info, row, new_file)
        try:
            r = measure(lambda spec=spec, dev=dev: _run_pipeline(spec, a.threads, dev))
        except Exception as exc:            # a method that fails is reported, the table goes on
            notes.append(f"{label}: failed: {type(exc).__name__}: {exc}")
            continue
        chi, lo, own = r.pop("_chi"), r.pop("_local"), r.pop("_mask")
        keep = ev & own
        chi_e = _demeaned(chi_t, np.where(keep, chi, 0.0), ev)
        loc_e = _demeaned(loc_t, np.where(keep, lo, 0.0), ev)
        out = {"mask": row["mask"], "unwrap": row["unwrap"], "fit": row["fit"], "background": row["background"],
               "device": dev, "chi": chi_e, "local": loc_e, "kept": float(keep.sum() / ev.sum()), **r}
        if row["unwrap"] == "truth" and dev == "cpu":
            ref[(row["mask"], row["background"])] = chi_e
        out["d_chi"] = chi_e - ref[(row["mask"], row["background"])] if (row["mask"], row["background"]) in ref else ""
        rows.append(out)
        print(f"{label}: chi {chi_e:.2f} %, local {loc_e:.2f} %, {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s)",
              flush=True)
    print(f"\nfront end on the phantom {tuple(info['shape'])} at {info['voxel']:g} mm (phase_offset "
          f"{a.phase_offset}{', haemorrhage' if a.haemorrhage else ''}{', MCPC-3D-S' if a.mcpc else ''}); "
          f"evaluation mask: true mask eroded by {a.eval_erode_mm:g} mm, {int(ev.sum())} voxels; {a.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    gpu = any(r["device"] != "cpu" for r in rows)
    print(table(rows, ["mask", "unwrap", "fit", "background"] + (["device"] if gpu else []) +
                ["chi", "d_chi", "local", "kept", "seconds", "cpu_seconds", "peak_rss_mib"] +
                (["gpu_peak_mib"] if gpu else [])))
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
