"""Per-stage wall time and peak memory of the TKD pipeline (pipelines/tkd.yaml) on a simulated head.

    python benchmarks/bench_pipeline.py [--shape 180,216,180] [--voxel-size 1,1,1] [--echoes 5]

The phantom is simulated once and written as NIfTI (not timed); the pipeline then runs from those
files in a fresh process, as `qsmkit run` would. Goal (issue 3): whole pipeline <= 15 s and <= 4 GB
on 2 cores for ~180 x 216 x 180 x 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _measure import measure, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--voxel-size", default="1,1,1")
    ap.add_argument("--echoes", type=int, default=5)
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "tkd.yaml"))
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    vs = tuple(float(s) for s in args.voxel_size.split(","))
    tes = [0.004 * (i + 1) for i in range(args.echoes)]

    from qsmkit.pipeline import load_plan, run_plan
    from qsmkit.plugins import load_registry
    from qsmkit.simulate import simulate_phantom

    work = Path(tempfile.mkdtemp(prefix="qsmkit-bench-"))
    t0 = time.perf_counter()
    ph = simulate_phantom(shape=shape, voxel_size=vs, echo_times=tes, seed=0)
    t_sim = time.perf_counter() - t0
    files = ph.write(work / "data")
    del ph
    overrides = [f"inputs.magnitude={files['magnitude']}", f"inputs.phase={files['phase']}",
                 f"inputs.echo_times={tes}", "inputs.field_strength=3.0"]
    stage_rows: list[dict] = []

    def run() -> dict:
        import resource

        registry = load_registry()
        plan = load_plan(args.pipeline, registry, overrides, work / "out")
        result = run_plan(plan, registry, log=lambda m: None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"stages": [(s["stage"], s["method"], s.get("duration_s")) for s in result.provenance["stages"]],
                "write_and_load_s": result.provenance["duration_s"] - sum(
                    s.get("duration_s") or 0 for s in result.provenance["stages"]), "peak": peak}

    res = measure(run)
    for kind, method, dt in res["stages"]:
        stage_rows.append({"stage": f"{kind}/{method}", "seconds": dt if dt is not None else "skipped"})
    stage_rows.append({"stage": "load inputs + write outputs", "seconds": res["write_and_load_s"]})
    stage_rows.append({"stage": "whole pipeline (wall)", "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"]})
    print(f"TKD pipeline on a simulated head {'x'.join(map(str, shape))} x {args.echoes} echoes, voxel {vs} mm; "
          f"{os.cpu_count()} CPUs visible (simulation, not timed below: {t_sim:.1f} s)")
    print(table(stage_rows, ["stage", "seconds", "cpu_seconds"]))
    print(f"peak RSS {res['peak_rss_mib']:.0f} MiB; CPU time {res['cpu_seconds']:.1f} s")


if __name__ == "__main__":
    main()
