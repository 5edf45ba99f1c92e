"""Per-stage wall time of a 5-orientation COSMOS run at whole-head size (issue 5, acceptance 5).

    python benchmarks/bench_cosmos.py                        # 200 x 240 x 180 at 1 mm, 5 echoes
    python benchmarks/bench_cosmos.py --shape 96 112 80 --voxel-size 2   # quick check
    python benchmarks/bench_cosmos.py --truth-fields         # skip the per-orientation stages
    python benchmarks/bench_cosmos.py --truth-fields --cache sim.pkl --register-only   # registration only
    python benchmarks/bench_cosmos.py --truth-fields --register-method known   # exact transforms, no registration

Simulates the built-in head at five orientations (rotations of 10-25 deg about x and y), then
runs, through the registered plugins and timed one by one:

* per orientation: ``mask/threshold``, ``unwrap/laplacian``, ``echo_combine/weighted_fit``,
  ``background/vsharp`` (or, with ``--truth-fields``, the simulator's true local fields and masks);
* ``register/simpleitk`` (4 rigid registrations + resampling, each orientation's in one worker
  process; ``--verbose`` prints each one's registration and resampling CPU seconds);
* ``inversion/cosmos`` closed form, and the default weighted CG (from the closed form, stopped at
  relative residual ``--cg-tol``);
* ``inversion/tkd`` on the reference orientation, for the accuracy comparison.

Prints a table of wall times and CPU seconds (user + sys of this process and its finished
worker processes; compare CPU seconds on a shared machine), the load average, peak resident
memory, rotation errors (deg) and translation errors at the brain centre (mm) of the registration against the simulator's true rotations, and
NRMSE / HFEN / XSIM of COSMOS and TKD against the true chi (demeaned over the COSMOS mask).

It also prints the share of each error that is a quadratic polynomial over the mask, and the NRMSE
without it. A susceptibility pattern ``c |x|^2`` (a radial profile: white matter inside, grey
matter outside) makes a field that is harmonic inside the mask for *every* B0 direction
(``lap(D chi) = lap(chi)/3 - d2chi/db2 = 2c - 2c = 0``), so background-field removal deletes it from
every orientation's local field and no inversion of local fields can get it back. From wrapped
phase this component is most of the COSMOS error; from the true local fields it is not.
``--json FILE`` also writes the numbers. Timings on a shared machine include contention.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

ROTATIONS = [(0, 0, 0), (15, 0, 0), (0, 20, 0), (-10, 12, 0), (25, 0, 0)]
PER_ORIENTATION = [("mask", "threshold"), ("unwrap", "laplacian"), ("echo_combine", "weighted_fit"),
                   ("background", "vsharp")]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _cpu_s() -> float:
    """CPU seconds (user + sys) of this process and of its finished child processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


#: CPU seconds per timed entry (same keys as the wall times)
CPU: dict[str, float] = {}


def _run_stage(registry, kind, method, art, params=None, log=None):
    from qsmkit.stage import StageContext

    cls = registry.get(kind, method)
    p = cls.validate_params(params or {}, where=f"{kind}/{method}")
    t0, c0 = time.perf_counter(), _cpu_s()
    ctx = StageContext(art, stage_label=f"{kind}/{method}", log=log or (lambda m: None))
    out = cls().run(ctx, p)
    dt = time.perf_counter() - t0
    CPU["last"] = _cpu_s() - c0
    metrics = getattr(ctx, "metrics", None)   # stages report metrics through the context
    if metrics and "metrics" not in out:
        out = {**out, "metrics": metrics}
    return out, dt


def _quadratic_share(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Share of the (demeaned) error energy that is a polynomial of degree <= 2 over ``mask``."""
    idx = np.argwhere(mask).astype(np.float64)
    x = (idx - idx.mean(0)) / max(1.0, float(np.abs(idx - idx.mean(0)).max()))
    cols = [np.ones(len(x))] + [x[:, i] for i in range(3)] + [x[:, i] * x[:, j] for i in range(3) for j in range(i, 3)]
    t = truth[mask] - truth[mask].mean()
    err = (estimate[mask] - estimate[mask].mean()) - t
    basis = np.stack(cols, 1)
    res = err - basis @ np.linalg.lstsq(basis, err, rcond=None)[0]
    return {"quadratic_share": 1.0 - float(res @ res) / float(err @ err),
            "nrmse_without_quadratic": 100.0 * float(np.linalg.norm(res) / np.linalg.norm(t))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 240, 180))
    ap.add_argument("--voxel-size", type=float, default=1.0, help="isotropic voxel size, mm")
    ap.add_argument("--oversample", type=int, default=2,
                    help="simulator fine-grid factor (1 is 8x cheaper but simulates with the inversion's own "
                         "kernel, which flatters every inversion)")
    ap.add_argument("--truth-fields", action="store_true",
                    help="use the simulator's local fields/masks instead of the per-orientation stages")
    ap.add_argument("--cg-tol", type=float, default=1e-2, help="CG relative residual (the stage default)")
    ap.add_argument("--register-params", default="{}",
                    help='JSON parameters of the register stage, e.g. \'{"metric": "correlation"}\'')
    ap.add_argument("--register-method", default="simpleitk",
                    help="register method: simpleitk, or known (the simulator's true matrices, no registration)")
    ap.add_argument("--cache", help="with --truth-fields: pickle of the simulated orientations; written when "
                                    "missing, read when present (the simulation is then not timed)")
    ap.add_argument("--register-only", action="store_true", help="stop after the registration (no inversions)")
    ap.add_argument("--verbose", action="store_true", help="print the stages' progress lines")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from qsmkit import metrics as qm
    from qsmkit.plugins import load_registry
    from qsmkit.simulate import simulate_phantom
    from qsmkit_register.rigid import rotation_angle_deg

    log = (lambda m: print(f"      {m}", file=sys.stderr)) if args.verbose else None
    reg = load_registry()
    shape, vs = tuple(args.shape), (args.voxel_size,) * 3
    times: dict[str, float] = {"simulate": 0.0}
    cpu: dict[str, float] = {"simulate": 0.0}
    per_stage: dict[str, list] = {f"{k}/{m}": [] for k, m in PER_ORIENTATION}
    per_stage_cpu: dict[str, list] = {f"{k}/{m}": [] for k, m in PER_ORIENTATION}
    orients, truths = [], []
    cached = None
    if args.cache and args.truth_fields:
        import os
        import pickle

        if os.path.exists(args.cache):
            with open(args.cache, "rb") as fh:
                cached = pickle.load(fh)
            orients, truths = cached["orients"], cached["truths"]
            print(f"read {len(orients)} simulated orientations from {args.cache}", file=sys.stderr, flush=True)
    for i, rot in enumerate(ROTATIONS if cached is None else []):
        t0, c0 = time.perf_counter(), _cpu_s()
        ph = simulate_phantom(shape=shape, voxel_size=vs, rotation_deg=rot, seed=i, oversample=args.oversample)
        times["simulate"] += time.perf_counter() - t0
        cpu["simulate"] += _cpu_s() - c0
        print(f"orientation {i} {rot}: simulated in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        art = ph.artifacts()
        art.pop("truth")
        if args.truth_fields:
            art.update(mask=ph.truth["mask"], local_field=ph.truth["local_field"])
        else:
            for kind, method in PER_ORIENTATION:
                out, dt = _run_stage(reg, kind, method, art, log=log)
                art.update(out)
                per_stage[f"{kind}/{method}"].append(dt)
                per_stage_cpu[f"{kind}/{method}"].append(CPU["last"])
        keep = {k: art[k] for k in ("mask", "local_field", "noise_weight", "echo_times", "field_strength")
                if k in art}
        keep["magnitude"] = art["magnitude"].like(art["magnitude"].data[..., :1])  # first echo only
        orients.append(keep)
        truths.append({"chi": ph.truth["chi"], "mask": ph.truth["mask"], "rotation": ph.rotation,
                        "centre": np.asarray(ph.meta["rotation_center_mm"])})
        del ph, art
    if args.cache and args.truth_fields and cached is None:
        import pickle

        with open(args.cache, "wb") as fh:
            pickle.dump({"orients": orients, "truths": truths}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    for name, ts in per_stage.items():
        if ts:
            times[name + " (5 orientations)"] = float(sum(ts))
            cpu[name + " (5 orientations)"] = float(sum(per_stage_cpu[name]))

    art = dict(orients[0])
    art["orientations"] = orients
    reg_params = json.loads(args.register_params)
    if args.register_method == "known":  # the simulator's exact transforms: reference x -> R (x - c) + c
        mats = []
        for t in truths:
            m = np.eye(4)
            m[:3, :3], m[:3, 3] = t["rotation"], t["centre"] - t["rotation"] @ t["centre"]
            mats.append(m.tolist())
        reg_params = {"source": "matrices", "matrices": mats, **reg_params}
    reg_name = f"register/{args.register_method}"
    out, times[reg_name] = _run_stage(reg, "register", args.register_method, art, reg_params, log=log)
    cpu[reg_name] = CPU["last"]
    art.update(out)
    print(f"registered in {times[reg_name]:.1f} s", file=sys.stderr, flush=True)

    # registration accuracy against the simulator's rotations (reference x <-> R (x - c) + c)
    ref_aff = orients[0]["local_field"].affine
    idx = np.argwhere(truths[0]["mask"].data).mean(0)
    centre = ref_aff[:3, :3] @ idx + ref_aff[:3, 3]
    rot_err, trans_err = [], []
    for tr, t in zip(out["transforms"][1:], truths[1:]):
        mat = np.asarray(tr["matrix"])
        true = np.eye(4)
        true[:3, :3] = t["rotation"]
        true[:3, 3] = t["centre"] - t["rotation"] @ t["centre"]
        rot_err.append(rotation_angle_deg(mat[:3, :3] @ t["rotation"].T))
        trans_err.append(float(np.linalg.norm((mat - true)[:3, :3] @ centre + (mat - true)[:3, 3])))
    if args.register_only:
        print(f"{reg_name}: wall {times[reg_name]:.1f} s, CPU {cpu[reg_name]:.1f} s, load average "
              f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
        print("registration error vs truth: rotation (deg) " + ", ".join(f"{e:.4f}" for e in rot_err)
              + "; translation at brain centre (mm) " + ", ".join(f"{e:.4f}" for e in trans_err))
        return {"times_s": times, "cpu_s": cpu, "rotation_error_deg": rot_err, "translation_error_mm": trans_err,
                "transforms": out["transforms"], "orientations": out["orientations"]}

    res, times["inversion/cosmos closed_form"] = _run_stage(reg, "inversion", "cosmos", art, {"solver": "closed_form"},
                                                            log=log)
    cpu["inversion/cosmos closed_form"] = CPU["last"]
    chi_truth = truths[0]["chi"].data
    region = res["mask"].data & truths[0]["mask"].data
    acc = {"cosmos_closed_form": qm.evaluate(chi_truth, res["chi"].data, region)}
    res_cg, dt = _run_stage(reg, "inversion", "cosmos", art, {"solver": "cg", "tol": args.cg_tol, "device": "cpu"},
                            log=log)
    n_it = res_cg["metrics"]["cosmos"]["cg"]["iterations"]
    times[f"inversion/cosmos cg ({n_it} it, incl. closed-form start)"] = dt
    cpu[f"inversion/cosmos cg ({n_it} it, incl. closed-form start)"] = CPU["last"]
    acc["cosmos_cg"] = qm.evaluate(chi_truth, res_cg["chi"].data, region)
    estimates = {"cosmos_closed_form": res["chi"].data, "cosmos_cg": res_cg["chi"].data}
    ref_art = {"local_field": orients[0]["local_field"], "mask": orients[0]["mask"]}
    tk, times["inversion/tkd (reference only)"] = _run_stage(reg, "inversion", "tkd", ref_art)
    cpu["inversion/tkd (reference only)"] = CPU["last"]
    acc["tkd_reference"] = qm.evaluate(chi_truth, tk["chi"].data, region)
    estimates["tkd_reference"] = tk["chi"].data
    for name, est in estimates.items():
        acc[name].update(_quadratic_share(est, chi_truth, region))

    print(f"\nCOSMOS benchmark: 5 orientations, grid {shape} at {args.voxel_size} mm "
          f"({'truth local fields' if args.truth_fields else 'from wrapped phase'}), simulator oversample "
          f"{args.oversample}")
    print(f"load average at the end {' '.join(open('/proc/loadavg').read().split()[:3])}"
          if sys.platform.startswith("linux") else "")
    print(f"{'stage':58s} {'wall s':>8s} {'CPU s':>8s}")
    for name, dt in times.items():
        print(f"{name:58s} {dt:8.1f} {cpu.get(name, float('nan')):8.1f}")
    print(f"peak RSS {_peak_rss_gb():.2f} GB")
    print("registration error vs truth: rotation (deg) " + ", ".join(f"{e:.3f}" for e in rot_err)
          + "; translation at brain centre (mm) " + ", ".join(f"{e:.3f}" for e in trans_err))
    for name, e in acc.items():
        print(f"{name:24s} NRMSE {e['nrmse']:6.1f} %  HFEN {e['hfen']:6.1f} %  XSIM {e['xsim']:.3f}  "
              f"quadratic share of the error {100 * e['quadratic_share']:4.1f} %, NRMSE without it "
              f"{e['nrmse_without_quadratic']:5.1f} %")
    ratio = acc["cosmos_cg"]["nrmse"] / acc["tkd_reference"]["nrmse"]
    ratio_cf = acc["cosmos_closed_form"]["nrmse"] / acc["tkd_reference"]["nrmse"]
    print(f"NRMSE ratio COSMOS / TKD = {ratio:.2f} (CG, the default), {ratio_cf:.2f} (closed form)")
    result = {"shape": list(shape), "voxel_size_mm": args.voxel_size, "truth_fields": args.truth_fields,
              "oversample": args.oversample, "times_s": times, "cpu_s": cpu, "peak_rss_gb": _peak_rss_gb(),
              "rotation_error_deg": rot_err, "translation_error_mm": trans_err,
              "accuracy": {k: {m: float(v[m]) for m in ("nrmse", "hfen", "xsim", "quadratic_share",
                                                          "nrmse_without_quadratic")} for k, v in acc.items()},
              "nrmse_ratio_cosmos_tkd": ratio}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
