"""Per-stage wall time and peak memory of the TKD pipeline (pipelines/tkd.yaml) on a simulated head.

    python benchmarks/bench_pipeline.py [--shape 180,216,180] [--voxel-size 1,1,1] [--echoes 5]

The phantom is simulated once and written as NIfTI (not timed); the pipeline then runs from those
files in a fresh process, as `qsmkit run` would. Goal (issue 3): whole pipeline <= 15 s and <= 4 GB
on 2 cores for ~180 x 216 x 180 x 5.

Each stage row has its wall and CPU seconds (user + system of all threads, measured around the
stage's ``run`` in the child process). The run's device is set explicitly (``device: cpu``); when
torch sees CUDA and the pipeline has torch stages (``--pipeline`` with e.g. PDF or MEDI; the TKD
pipeline has none), the pipeline runs a second time with ``device: cuda`` (issue 20), printed as
its own table with the peak GPU memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _gpu import cuda_available  # noqa: E402
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
    registry = load_registry()
    from qsmkit.params import DEVICE

    plan0 = load_plan(args.pipeline, registry, overrides, work / "out")
    has_torch = any(st.run and st.cls.param_map().get("device") == DEVICE for st in plan0.steps)
    devices = ["cpu"] + (["cuda"] if has_torch and cuda_available() else [])

    def run(device: str) -> dict:
        import resource

        cpu_s: list = []
        depth = [0]

        def timed(orig):
            def run_stage(self, ctx, p):
                depth[0] += 1
                c0 = time.process_time()
                try:
                    return orig(self, ctx, p)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        cpu_s.append(time.process_time() - c0)
            return run_stage

        for cls in {st.cls for st in plan0.steps}:  # the child's own classes: CPU time per stage
            for klass in cls.__mro__:
                if "run" in vars(klass) and not getattr(vars(klass)["run"], "_timed", False):
                    wrapped = timed(vars(klass)["run"])
                    wrapped._timed = True
                    klass.run = wrapped
        plan = load_plan(args.pipeline, registry, overrides, work / f"out-{device}")
        plan.device = device
        result = run_plan(plan, registry, log=lambda m: None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        ran = [s for s in result.provenance["stages"] if s.get("duration_s") is not None]
        out = {"stages": [(s["stage"], s["method"], s.get("duration_s")) for s in result.provenance["stages"]],
               "stage_cpu": cpu_s if len(cpu_s) == len(ran) else [None] * len(ran),
               "write_and_load_s": result.provenance["duration_s"] - sum(
                   s.get("duration_s") or 0 for s in result.provenance["stages"]), "peak": peak}
        if device == "cuda":
            import torch

            out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out

    print(f"pipeline {Path(args.pipeline).name} on a simulated head {'x'.join(map(str, shape))} x {args.echoes} "
          f"echoes, voxel {vs} mm; {os.cpu_count()} CPUs visible (simulation, not timed below: {t_sim:.1f} s)")
    for device in devices:
        res = measure(lambda: run(device))
        stage_rows: list[dict] = []
        cpus = iter(res["stage_cpu"])
        for kind, method, dt in res["stages"]:
            stage_rows.append({"stage": f"{kind}/{method}", "seconds": dt if dt is not None else "skipped",
                               "cpu_seconds": (next(cpus, None) if dt is not None else "") or ""})
        stage_rows.append({"stage": "load inputs + write outputs", "seconds": res["write_and_load_s"]})
        stage_rows.append({"stage": "whole pipeline (wall)", "seconds": res["seconds"],
                           "cpu_seconds": res["cpu_seconds"]})
        print(f"\ndevice: {device}; load average {os.getloadavg()[0]:.1f}")
        print(table(stage_rows, ["stage", "seconds", "cpu_seconds"]))
        print(f"peak RSS {res['peak_rss_mib']:.0f} MiB; CPU time {res['cpu_seconds']:.1f} s"
              + (f"; peak GPU memory {res['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in res else ""))


if __name__ == "__main__":
    main()
