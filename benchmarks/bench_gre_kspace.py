"""Raw multi-coil multi-echo GRE k-space -> chi (pipelines/gre_kspace_to_qsm.yaml) vs the coil-free images.

    nice -n 10 python benchmarks/bench_gre_kspace.py [--shape 84,96,72] [--voxel-size 2,2,2] [--coils 8]
                                                    [--snr 100] [--seed 0]

One simulated head (qsmkit_kspace.simulate_gre: the qsmkit head phantom seen by loop coils with
their phase, noise white in k-space, first-echo brain SNR ``--snr`` of the combined image) is
written once (not timed). Each row then runs one pipeline in a fresh process:

- ``coil-free``: the QSM chain of pipelines/gre_kspace_to_qsm.yaml (romeo -> phase_quality ->
  nonlinear_fit -> pdf -> medi -> mean) on the coil-free complex images: the same noisy coil
  images combined with the *true* sensitivities (same noise; only recon + combination differ);
- ``coil-free uniform noise``: the same chain on the object with independent, spatially uniform
  noise of the same mean brain SNR (the phantom's own noise model);
- ``kspace sense``: the whole pipeline (kspace_read/gre -> coil_combine/sense -> the same chain);
- ``kspace aspire``: coil_combine/aspire instead (per-coil phase offsets, no maps);
- ``kspace sense 2x ...``: undersample/gre (uniform: every 2nd ky line + 16 calibration lines;
  poisson: 2x Poisson disc in (ky, kz)) and CG-SENSE per echo.

chi NRMSE (%) against the truth, demeaned, over: ``own`` = truth mask & the row's mask (what
metrics.json reports for a simulated input), ``common`` = truth mask & every row's mask (the same
voxels for all rows: the fair comparison). Wall and CPU seconds and peak RSS are per pipeline;
the load average is printed because the machine may be shared.

Every row runs with the pipeline's ``device: cpu``; when torch sees CUDA (``--device auto``, the
default) each row is repeated with ``device: cuda`` (issue 20; rows ``... [cuda]``: the torch stages
coil_combine/sense, pdf and medi on the GPU, CUDA start-up included in the wall time as in a
``qsmkit run``), with ``GPU MiB`` = ``torch.cuda.max_memory_allocated`` of that run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _gpu import devices as _devices, gpu_peak_mib  # noqa: E402
from _measure import measure, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "gre_kspace_to_qsm.yaml"


def _run(spec: dict, out: Path, device: str = "cpu") -> dict:
    from qsmkit.pipeline import run_plan
    from qsmkit.pipeline.plan import build_plan
    from qsmkit.plugins import load_registry

    reg = load_registry()
    plan = build_plan({**spec, "device": device}, reg, PIPELINE, out)
    res = run_plan(plan, reg, log=lambda m: None)
    stages = {f"{s['stage']}/{s['method']}": s.get("duration_s") for s in res.provenance["stages"]}
    out = {"chi": res.artifacts["chi"].data.astype(np.float32), "mask": res.artifacts["mask"].data > 0,
           "total_field": res.artifacts["total_field"].data.astype(np.float32), "stage_s": stages}
    out.update(gpu_peak_mib(device))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="84,96,72")
    ap.add_argument("--voxel-size", default="2,2,2")
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "both"),
                    help="auto / both: also every row on CUDA when torch sees a GPU")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    devices = _devices(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    vs = tuple(float(s) for s in args.voxel_size.split(","))

    import nibabel as nib

    from qsmkit import metrics as qm
    from qsmkit.pipeline.spec import load_yaml
    from qsmkit_kspace.simulate_gre import simulate_gre_files

    work = Path(tempfile.mkdtemp(prefix="qsmkit-bench-gre-"))
    t0 = time.perf_counter()
    files = simulate_gre_files(work / "data", shape=shape, voxel_size=vs, n_coils=args.coils, snr=args.snr,
                               seed=args.seed)
    t_sim = time.perf_counter() - t0
    truth = np.asarray(nib.load(str(files["chi"])).dataobj, np.float32)
    tmask = np.asarray(nib.load(str(files["mask"])).dataobj) > 0
    tfield = np.asarray(nib.load(str(files["total_field"])).dataobj, np.float32)
    base = load_yaml(PIPELINE)
    base["qc"] = False
    chain = base["stages"][2:]
    te = [0.004, 0.008, 0.012, 0.016, 0.020]

    def kspace_spec(combine: dict, under: dict | None = None) -> dict:
        s = copy.deepcopy(base)
        s["inputs"] = {"kspace": str(files["kspace"]), "format": "gre"}
        s["stages"] = [base["stages"][0]] + ([under] if under else []) + [combine] + copy.deepcopy(chain)
        return s

    sense = copy.deepcopy(base["stages"][1])
    rows_spec = {
        "coil-free": {**copy.deepcopy(base), "inputs": {"magnitude": str(files["coilfree_magnitude"]),
                                                         "phase": str(files["coilfree_phase"]), "echo_times": te,
                                                         "field_strength": 3.0}, "stages": copy.deepcopy(chain)},
        "coil-free uniform noise": {**copy.deepcopy(base), "inputs": {
            "magnitude": str(files["coilfree_uniform_magnitude"]), "phase": str(files["coilfree_uniform_phase"]),
            "echo_times": te, "field_strength": 3.0}, "stages": copy.deepcopy(chain)},
        "kspace sense (full)": kspace_spec(sense),
        "kspace sense (full, coil bias kept)": kspace_spec({**sense, "params": {**sense["params"], "homogenize_mm": 0}}),
        "kspace aspire (full)": kspace_spec({"stage": "coil_combine", "method": "aspire", "params": {"sigma_mm": 4}}),
        "kspace sense 2x uniform": kspace_spec(sense, {"stage": "undersample", "method": "gre", "params": {
            "pattern": "uniform", "acceleration": 2, "calib": [16, 16]}}),
        "kspace sense 2x poisson": kspace_spec(sense, {"stage": "undersample", "method": "gre", "params": {
            "pattern": "poisson", "acceleration": 2, "calib": [24, 24]}}),
    }
    if args.rows:
        keep = [r.strip() for r in args.rows.split(",")]
        rows_spec = {k: v for k, v in rows_spec.items() if k in keep}
    results = {}
    for dev in devices:
        for name0, spec in rows_spec.items():
            name = name0 if dev == "cpu" else f"{name0} [{dev}]"
            out = work / f"{name0.replace(' ', '_').replace('(', '').replace(')', '')}-{dev}"
            results[name] = measure(lambda spec=spec, out=out, dev=dev: _run(spec, out, dev))
            results[name]["load"] = open("/proc/loadavg").read().split()[0]
            print(f"  {name}: {results[name]['seconds']:.1f} s ({results[name]['cpu_seconds']:.1f} CPU s)",
                  file=sys.stderr, flush=True)
    common = tmask.copy()
    for r in results.values():
        common &= r["mask"]
    rows = []
    for name, r in results.items():
        own = tmask & r["mask"]
        e_own = qm.evaluate(truth, r["chi"], own)
        e_com = qm.evaluate(truth, r["chi"], common)
        f_com = qm.nrmse(tfield - tfield[common].mean(), r["total_field"] - r["total_field"][common].mean(), common)
        rows.append({"pipeline": name, "chi NRMSE own %": e_own["nrmse"], "chi NRMSE common %": e_com["nrmse"],
                     "chi HFEN common %": e_com["hfen"], "total field NRMSE common %": f_com,
                     "mask voxels": int(r["mask"].sum()), "wall s": r["seconds"], "CPU s": r["cpu_seconds"],
                     "peak MiB": r["peak_rss_mib"], "GPU MiB": r.get("gpu_peak_mib", ""),
                     "coil_combine s": r["stage_s"].get("coil_combine/sense")
                     or r["stage_s"].get("coil_combine/aspire") or "", "load": r["load"]})
    ref = rows[0]["chi NRMSE common %"]
    for row in rows:
        row["vs coil-free pp"] = row["chi NRMSE common %"] - ref
    print(f"GRE k-space -> chi on a simulated head {'x'.join(map(str, shape))} x 5 echoes x {args.coils} coils, "
          f"{vs} mm, SNR {args.snr:g}, seed {args.seed}; {os.cpu_count()} CPUs visible; simulation (not timed) "
          f"{t_sim:.1f} s; common region {int(common.sum())} voxels of the {int(tmask.sum())}-voxel true mask")
    print(table(rows, ["pipeline", "chi NRMSE common %", "vs coil-free pp", "chi NRMSE own %", "chi HFEN common %",
                       "total field NRMSE common %", "mask voxels", "coil_combine s", "wall s", "CPU s", "peak MiB",
                       "GPU MiB", "load"]))
    print(f"load average at the end: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
