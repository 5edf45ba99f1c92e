"""TKD, TV-ADMM, RTS and MEDI from the TRUE local field on the 1 mm whole-head phantom (issue 17, acceptance 3).

    python benchmarks/bench_inversion_tv.py [--shape 180,216,180] [--threads 2] [--device cpu]
                                            [--cache FILE] [--skip-medi]

Inputs as in ``bench_medi.py`` (its ``_inputs``: the simulator's head, 5 echoes, 3 T, SNR 100,
``oversample=1``; MEDI gets the magnitude and the multi-echo noise weights, default settings).
Each method runs in a fresh forked process (wall s of the child, solve s of the call itself, CPU s
of all threads, peak RSS; torch and the plugins are imported before forking). Speed-up: MEDI's solve
s over the method's. Metrics
(NRMSE %, HFEN %, XSIM, :func:`qsmkit.metrics.evaluate`) against the true chi over the mask.
Goal: tv and rts within 3 NRMSE points of MEDI and at least 3x faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
from _measure import measure, table  # noqa: E402
from bench_medi import _inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=None, help="npz file to reuse the simulated inputs")
    ap.add_argument("--skip-medi", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    d = _inputs(shape, args.cache)
    m = d["mask"]
    vs, b0 = tuple(float(v) for v in d["voxel_size"]), d["b0"]

    from qsmkit import metrics as qm
    import torch  # noqa: F401  (imported before forking: the children time the solve, not the import)
    import qsmkit_medi  # noqa: F401
    import qsmkit_tkd  # noqa: F401
    import qsmkit_tv  # noqa: F401

    def job(method):
        def fn():
            import torch

            torch.set_num_threads(args.threads)
            t = time.perf_counter()
            if method == "tkd":
                from qsmkit_tkd import tkd

                chi, info = tkd(d["field"], m, vs, b0), ""
            elif method == "tv":
                from qsmkit_tv import tv_admm

                chi, i = tv_admm(d["field"], m, vs, b0, device=args.device, return_info=True)
                info = f"{i['n_iter']} it, {'x'.join(map(str, i['fft_shape']))}"
            elif method == "rts":
                from qsmkit_tv import rts

                chi, i = rts(d["field"], m, vs, b0, device=args.device, return_info=True)
                info = f"{i['cg_iter']} cg + {i['n_iter']} it, {'x'.join(map(str, i['fft_shape']))}"
            else:
                from qsmkit_medi import medi

                r = medi(d["field"], m, vs, b0, d["magnitude"], d["noise_weight"],
                         field_strength=float(d["field_strength"]), echo_times=d["echo_times"], device=args.device)
                chi, info = r.chi, f"{r.n_iter} GN, {sum(r.cg_iters)} cg"
            return {"solve s": time.perf_counter() - t, "chi": chi, "info": info}
        return fn

    rows = []
    for method in ["tkd", "tv", "rts"] + ([] if args.skip_medi else ["medi"]):
        res = measure(job(method))
        ev = qm.evaluate(d["chi"], res.pop("chi"), m)
        rows.append({"method": method, "device": args.device, "threads": args.threads, "seconds": res["seconds"],
                     "solve s": res["solve s"], "cpu s": res["cpu_seconds"], "peak RSS MiB": res["peak_rss_mib"], "nrmse %": ev["nrmse"],
                     "hfen %": ev["hfen"], "xsim": ev["xsim"], "info": res["info"]})
    medi_row = next((r for r in rows if r["method"] == "medi"), None)
    if medi_row:
        for r in rows:
            r["vs MEDI pts"] = r["nrmse %"] - medi_row["nrmse %"]
            r["speed-up"] = medi_row["solve s"] / r["solve s"]
    print(f"inversion from the true local field, {'x'.join(map(str, shape))} at 1 mm ({int(m.sum())} mask voxels), "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
    print(table(rows, ["method", "device", "threads", "seconds", "solve s", "cpu s", "peak RSS MiB", "nrmse %", "hfen %",
                       "xsim", "vs MEDI pts", "speed-up", "info"]))


if __name__ == "__main__":
    main()
