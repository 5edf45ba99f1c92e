"""Cohort throughput: subjects per minute with 1 and 2 workers, and the peak memory of each worker.

    python benchmarks/bench_cohort.py [--subjects 8] [--shape 64,64,64] [--voxel 3.0] [--echoes 4]
                                      [--workers 1,2] [--executors local,dask] [--keep DIR]

Input: a BIDS dataset of ``--subjects`` simulated heads (:func:`qsmkit.simulate.simulate_phantom`,
seeds 0..n-1, SNR 100, 3 T, echo times 4, 8, 12, ... ms; per-echo ``_echo-<n>_part-{mag,phase}_MEGRE``
files with sidecars), written once. The pipeline is the quick one (threshold mask, Laplacian
unwrapping, weighted echo fit, V-SHARP, TKD, mean reference) with QC pictures off.

Each row is one fresh ``qsmkit run fast.yaml --bids DIR --executor E --workers N`` command in a
new process, into a new output folder (so nothing is cached):

* ``seconds``: wall time of the whole command (start-up, worker start-up, runs, export);
* ``subj_per_min``: ``subjects / seconds * 60``;
* ``run_s``: the mean of the runs' own durations (inside the workers);
* ``peak_worker_mib``: the largest peak RSS of a worker process (``ru_maxrss`` that each worker
  reports after each run; workers are reused, so it is the worker's peak over all its runs);
* ``est_mib``: qsmkit's own estimate of one run's peak (:func:`qsmkit.executors.run_peak_bytes`),
  which decides how many runs fit in memory side by side; it should be above ``peak_worker_mib``.

The worker count is what was asked for; qsmkit lowers it only if the runs do not fit in memory
(it says so on stderr). Wall times on a shared machine are upper bounds: compare rows of one
invocation, and rerun on a quiet machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import table  # noqa: E402

PIPELINE = """\
name: fast
qc: false
inputs: {simulate: {}}
stages:
  - {stage: mask, method: threshold}
  - {stage: unwrap, method: laplacian}
  - {stage: echo_combine, method: weighted_fit}
  - {stage: background, method: vsharp}
  - {stage: inversion, method: tkd}
  - {stage: reference, method: mean}
output_dir: unused
"""


def write_dataset(root: Path, n: int, shape, voxel: float, echoes: int) -> None:
    from qsmkit.io import save_nifti
    from qsmkit.simulate import simulate_phantom

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "bench_cohort", "BIDSVersion": "1.10.0"}')
    (root / "MEGRE.json").write_text('{"MagneticFieldStrength": 3.0}')
    tes = tuple(0.004 * (i + 1) for i in range(echoes))
    for i in range(n):
        sub = f"sub-{i + 1:02d}"
        ph = simulate_phantom(shape=shape, voxel_size=(voxel,) * 3, echo_times=tes, snr=100, seed=i)
        anat = root / sub / "anat"
        anat.mkdir(parents=True)
        for e, te in enumerate(tes):
            for part, vol in (("mag", ph.magnitude), ("phase", ph.phase)):
                stem = f"{sub}_echo-{e + 1}_part-{part}_MEGRE"
                save_nifti(vol.like(vol.data[..., e]), anat / f"{stem}.nii.gz")
                side = {"EchoTime": te, **({"Units": "rad"} if part == "phase" else {})}
                (anat / f"{stem}.json").write_text(json.dumps(side))


def one(pipe: Path, bids: Path, out: Path, executor: str, workers: int, n: int) -> dict:
    cmd = [sys.executable, "-m", "qsmkit.cli", "run", str(pipe), "--bids", str(bids), "--output-dir", str(out),
           "--executor", executor, "--workers", str(workers)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)  # the run and the workers it waited for
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    runs = json.loads((out / ".qsmkit" / "summary.json").read_text())["runs"]
    done = [r for r in runs if r["status"] == "done"]
    return {"executor": executor, "workers": workers, "subjects": len(done), "seconds": dt, "cpu_s": cpu,
            "subj_per_min": len(done) / dt * 60.0, "run_s": sum(r["duration_s"] for r in done) / max(len(done), 1),
            "worker_pids": len({r["worker_pid"] for r in done}),
            "peak_worker_mib": max(r["peak_rss_mib"] for r in done), "est_mib": max(r["estimate_mib"] for r in done)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--shape", default="64,64,64")
    ap.add_argument("--voxel", type=float, default=3.0)
    ap.add_argument("--echoes", type=int, default=4)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--executors", default="local,dask")
    ap.add_argument("--keep", type=Path, help="Work in this (new) folder and keep it, instead of a temporary one.")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    base = a.keep or Path(tempfile.mkdtemp(prefix="bench_cohort-"))
    bids = base / "bids"
    t0 = time.perf_counter()
    write_dataset(bids, a.subjects, shape, a.voxel, a.echoes)
    print(f"dataset: {a.subjects} subjects, {shape} at {a.voxel} mm, {a.echoes} echoes "
          f"(written in {time.perf_counter() - t0:.1f} s) in {bids}")
    pipe = base / "fast.yaml"
    pipe.write_text(PIPELINE)
    rows = []
    for ex in a.executors.split(","):
        for w in (int(v) for v in a.workers.split(",")):
            rows.append(one(pipe, bids, base / f"out-{ex}-{w}", ex, w, a.subjects))
            print(f"  {ex} x{w}: {rows[-1]['seconds']:.1f} s", flush=True)
    print(table(rows, ["executor", "workers", "subjects", "seconds", "cpu_s", "subj_per_min", "run_s", "worker_pids",
                       "peak_worker_mib", "est_mib"]))
    if a.keep is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
