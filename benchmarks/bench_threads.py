"""Stage wall time alone and beside a CPU-bound process, for several thread settings (issue 20).

    python benchmarks/bench_threads.py                      # ESPIRiT, CG-SENSE, CS, MEDI; 4 settings
    python benchmarks/bench_threads.py --stages espirit --settings default 1 --repeats 5

Each (stage, setting, condition) runs in a fresh process, because the OpenMP environment must be
set before torch is imported. The stage runs through the engine (:func:`qsmkit.pipeline.run_step`),
so the thread decision of :mod:`qsmkit.threads` applies exactly as in ``qsmkit run``. "loaded"
starts a competing pure-Python busy loop (pinned to the last core) before the child starts and
stops it after; "quiet" has none (the machine may still carry other users' load: the load
average is printed with each row). Each row is the fastest of ``--repeats`` runs after one warm-up.

Settings:

* ``default``: what ``qsmkit run`` does (:func:`qsmkit.threads.prepare_environment`: idle workers
  spin 30 000 rounds, then sleep; then per stage the cores other processes leave free);
* ``auto-passive``, ``auto-spin3k``, ``auto-spin300k``: the same thread decision with workers that
  sleep at once (the default before), or spin 3 000 / 300 000 rounds;
* ``2-spin``: 2 threads, OpenMP's default wait policy (idle workers spin before they sleep): qsmkit
  before issue 20;
* ``2-passive``: 2 threads, ``OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0``;
* ``2-spin30k``: 2 threads with the default's wait policy (30 000 spin rounds), loaded or not;
* ``1``: ``OMP_NUM_THREADS=1``;
* ``1-late``: ``QSMKIT_THREADS=1``: one thread set by the engine at the stage (torch started with all).

Stages: ``espirit`` (coil maps, 2 slices 15 x 640 x 368), ``sense`` (CG-SENSE, 30 iterations),
``cs`` (L1-wavelet FISTA, 30 iterations), ``medi`` (the ``--medi-shape`` head, default parameters),
``dip`` (30 Adam steps of the default DIP on a 64 x 80 x 64 head at 2.8 mm, no early stop, so
every setting does the same work).

Columns: stage, setting, threads the engine chose (quiet/loaded), quiet wall s, loaded wall s,
ratio loaded/quiet, CPU s (this process's user+system time of the fastest run, quiet / loaded),
load average at the start of the row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "default": {},
    "2-spin": {"QSMKIT_THREADS": "2"},
    "2-passive": {"QSMKIT_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "2-spin30k": {"QSMKIT_THREADS": "2", "GOMP_SPINCOUNT": "30000"},
    "1": {"OMP_NUM_THREADS": "1"},
    "1-late": {"QSMKIT_THREADS": "1"},
    # the engine's thread decision with other wait policies than the default's 30 000 spin rounds
    "auto-passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "auto-spin3k": {"GOMP_SPINCOUNT": "3000"},
    "auto-spin300k": {"GOMP_SPINCOUNT": "300000"},
}
STAGES = ("espirit", "sense", "cs", "medi", "dip")


# --------------------------------------------------------------------------- inputs (made once, in the parent)
def make_inputs(folder: Path, medi_shape, medi_voxel: float) -> None:
    """Write the k-space slices and the MEDI head to ``folder`` (npz files)."""
    from qsmkit_kspace.masks import random_mask
    from qsmkit_kspace.simulate import simulate_multicoil

    if not (folder / "kspace.npz").exists():
        H, W, C = 640, 368, 15
        sim = simulate_multicoil((2, H, W), C, extent=(2.0, W / 320, 0.6), noise=0.002, seed=0)
        col, _, _ = random_mask(W, [0.08], [4], seed=0)
        ku = (sim["kspace"] * col).astype(np.complex64)
        np.savez(folder / "kspace.npz", kspace=ku, mask=np.asarray(col, bool))
    if not (folder / "medi.npz").exists():
        from qsmkit.physics import GAMMA_BAR
        from qsmkit.simulate import simulate_phantom

        ph = simulate_phantom(shape=tuple(medi_shape), voxel_size=(medi_voxel,) * 3, seed=0, oversample=1)
        mag = ph.magnitude.data
        te = np.asarray(ph.echo_times)
        nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                         / ph.meta["noise_sigma"])
        np.savez(folder / "medi.npz", field=ph.truth["local_field"].data, mask=ph.truth["mask"].data.astype(bool),
                 magnitude=mag, noise_weight=nw.astype(np.float32), echo_times=te,
                 field_strength=np.float64(ph.field_strength), affine=ph.magnitude.affine,
                 b0=np.asarray(ph.magnitude.b0_direction))
    if not (folder / "dip.npz").exists():
        from qsmkit.simulate import simulate_phantom

        ph = simulate_phantom(shape=(64, 80, 64), voxel_size=(2.8,) * 3, seed=0, oversample=1)
        np.savez(folder / "dip.npz", field=ph.truth["local_field"].data, mask=ph.truth["mask"].data.astype(bool),
                 affine=ph.magnitude.affine, b0=np.asarray(ph.magnitude.b0_direction))


# --------------------------------------------------------------------------- one measurement (in a child)
def _step(registry, kind: str, method: str, params: dict):
    from qsmkit.pipeline.plan import Step

    cls = registry.get(kind, method)
    return Step(0, kind, method, cls, cls.validate_params(params, f"{kind}/{method}"))


def child(stage: str, folder: Path, repeats: int) -> dict:
    from qsmkit.kspace import KSpaceData
    from qsmkit.pipeline import run_step
    from qsmkit.pipeline import fanout
    from qsmkit.plugins import load_registry
    from qsmkit.volume import Volume

    reg = load_registry()
    if stage == "medi":
        d = np.load(folder / "medi.npz")
        aff, b0 = d["affine"], d["b0"]
        vol = lambda a, u: Volume(a, aff, units=u, b0_direction=b0)  # noqa: E731
        art = {"local_field": vol(d["field"], "ppm"), "mask": vol(d["mask"], "bool"),
               "magnitude": vol(d["magnitude"], "a.u."), "noise_weight": vol(d["noise_weight"], "1/ppm"),
               "echo_times": d["echo_times"], "field_strength": float(d["field_strength"])}
        step = _step(reg, "inversion", "medi", {"device": "cpu"})
    elif stage == "dip":
        d = np.load(folder / "dip.npz")
        aff, b0 = d["affine"], d["b0"]
        vol = lambda a, u: Volume(a, aff, units=u, b0_direction=b0)  # noqa: E731
        art = {"local_field": vol(d["field"], "ppm"), "mask": vol(d["mask"], "bool")}
        # a fixed number of steps (no early stop): the same work in every setting
        step = _step(reg, "inversion", "dip", {"device": "cpu", "max_iter": 30, "early_stop": False,
                                               "log_every": 1000})
    else:
        d = np.load(folder / "kspace.npz")
        kd = KSpaceData(d["kspace"], slice_indices=(0, 1), crop_size=(320, 320))
        art = {"kspace": kd, "sampling_mask": d["mask"][None, :]}
        maps_step = _step(reg, "coil_maps", "espirit", {"device": "cpu"})
        if stage == "espirit":
            step = maps_step
        else:
            run_step(maps_step, art, lambda m: None, {})
            params = {"device": "cpu", "max_iter": 30}
            step = _step(reg, "recon", "sense" if stage == "sense" else "cs_wavelet",
                         params if stage == "sense" else {**params, "lambda": 0.002, "solver": "fista"})
    best = None
    for r in range(repeats + 1):  # the first run warms up (imports, allocator, FFT plans)
        a = dict(art)
        c0, t0 = os.times(), time.perf_counter()
        run_step(step, a, lambda m: None, {})
        wall = time.perf_counter() - t0
        c1 = os.times()
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        if r > 0 and (best is None or wall < best["wall_s"]):
            best = {"wall_s": wall, "cpu_s": cpu, "threads": fanout.last_threads[0]}
    return best


# --------------------------------------------------------------------------- the parent
def _busy_loop() -> subprocess.Popen:
    """A CPU-bound pure-Python process pinned to the last core."""
    code = ("import os\ntry:\n    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})\nexcept Exception:\n"
            "    pass\nwhile True:\n    pass\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    return p


def measure(stage: str, setting: str, loaded: bool, folder: Path, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "QSMKIT_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    if setting == "default" or setting.startswith("auto"):
        env["BENCH_PREPARE"] = "1"  # the child calls qsmkit.threads.prepare_environment() as the CLI does
    busy = _busy_loop() if loaded else None
    try:
        r = subprocess.run([sys.executable, __file__, "--child", stage, "--folder", str(folder),
                            "--repeats", str(repeats)], env=env, capture_output=True, text=True, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if r.returncode != 0:
        raise RuntimeError(f"{stage}/{setting}: child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--medi-shape", type=int, nargs=3, default=(120, 144, 120))
    ap.add_argument("--medi-voxel", type=float, default=1.5, help="mm")
    ap.add_argument("--folder", help="where the inputs are (or are made); default a temporary folder")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if os.environ.get("BENCH_PREPARE"):
            from qsmkit.threads import prepare_environment

            prepare_environment()
        print(json.dumps(child(a.child, Path(a.folder), a.repeats)))
        return []
    tmp = None
    if a.folder:
        folder = Path(a.folder)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    t0 = time.perf_counter()
    make_inputs(folder, a.medi_shape, a.medi_voxel)
    print(f"inputs: 2 k-space slices 15 x 640 x 368 (4x random), MEDI head {tuple(a.medi_shape)} at "
          f"{a.medi_voxel} mm; made in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs", flush=True)
    rows = []
    hdr = (f"{'stage':8s} {'setting':10s} {'threads q/l':>11s} {'quiet s':>8s} {'loaded s':>9s} {'ratio':>6s} "
           f"{'CPU s q/l':>11s}  load avg")
    print(hdr)
    print("-" * len(hdr), flush=True)
    for stage in a.stages:
        for setting in a.settings:
            la = _loadavg()
            q = measure(stage, setting, False, folder, a.repeats)
            lo = measure(stage, setting, True, folder, a.repeats)
            row = {"stage": stage, "setting": setting, "threads_quiet": q["threads"], "threads_loaded": lo["threads"],
                   "quiet_wall_s": q["wall_s"], "loaded_wall_s": lo["wall_s"], "ratio": lo["wall_s"] / q["wall_s"],
                   "quiet_cpu_s": q["cpu_s"], "loaded_cpu_s": lo["cpu_s"], "loadavg": la}
            rows.append(row)
            print(f"{stage:8s} {setting:10s} {q['threads']:>5d}/{lo['threads']:<5d} {q['wall_s']:8.2f} "
                  f"{lo['wall_s']:9.2f} {row['ratio']:6.2f} {q['cpu_s']:5.1f}/{lo['cpu_s']:<5.1f}  {la}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
