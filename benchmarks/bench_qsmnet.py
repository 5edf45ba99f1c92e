"""QSMnet with the shipped weights: accuracy on an unseen simulated head, inference time, training throughput.

    python benchmarks/bench_qsmnet.py [--parts accuracy infer train] [--checkpoint FILE] [--methods qsmnet tkd medi]
                                      [--cache heads.npz] [--results rows.jsonl]

* ``accuracy`` (``qsmnet`` = the stage's defaults, cubic B-spline resampling; ``qsmnet-linear``
  the same with linear resampling): a simulated head NOT used in training (anatomy seed 4242, its own head shape,
  pose, tissue values and a haematoma; training used seeds 1000-1011 and validation 900), inverted
  from its TRUE local field by QSMnet, TKD (threshold 0.15, corrected) and MEDI (defaults) in
  three versions: 1 mm with B0 along the voxel z axis; 1 mm oblique (voxel grid rotated 18/-12 deg,
  so QSMnet resamples into its B0-aligned frame); 1.5 mm (QSMnet resamples to 1 mm and back).
  NRMSE / HFEN (%) and XSIM against the true chi (``qsmkit.metrics.evaluate``: demeaned in the mask).
* ``infer``: a 1 mm whole head of 200 x 240 x 180 voxels through the stage (in a fresh process:
  wall s, CPU s, peak RSS).
* ``train``: training throughput (patches/s) of the shipped config's network and of the published
  width-32 network on 64^3 patches, on the CPU and, where torch sees one, the GPU.

Every timing is wall AND CPU seconds; the load average is printed, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _measure import measure, table  # noqa: E402

TEST_FIELD_STRENGTH = 3.0
TEST_HEAD = dict(anatomy_seed=4242, head_semi_axes_mm=(50.0, 58.0, 47.0), rotation_deg=(4.0, -6.0, 5.0),
                 haemorrhage=True, chi_overrides={"grey_matter": 0.03, "white_matter": -0.025, "globus_pallidus": 0.16,
                                                  "putamen": 0.10, "caudate": 0.06, "vein": 0.45},
                 snr=None, echo_times=(0.02,), seed=3, oversample=2)


def _loadavg() -> str:
    return open("/proc/loadavg").read().split()[0]


def _oblique_affine(shape, vs, angles):
    from qsmkit.simulate import rotation_matrix

    r = rotation_matrix(angles)
    a = np.eye(4)
    a[:3, :3] = r * np.asarray(vs)[None, :]
    a[:3, 3] = -r @ (np.asarray(vs) * (np.asarray(shape) - 1) / 2)
    return a


def _heads(shape, cache: str = "") -> dict:
    """The three versions of the test head: ``{name: {local_field, chi, mask, magnitude: Volume}}``
    (simulated, or read back from ``cache``, an .npz this function wrote)."""
    from qsmkit.simulate import simulate_phantom
    from qsmkit.volume import Volume

    names = ("1 mm", "1 mm oblique", "1.5 mm")
    keys = ("local_field", "chi", "mask", "magnitude")
    if cache and os.path.exists(cache):
        z = np.load(cache)
        if [int(v) for v in z["shape"]] == list(shape):
            return {n: {k: Volume(z[f"{i}_{k}"], z[f"{i}_affine"], units="ppm", b0_direction=z[f"{i}_b0"])
                        for k in keys} for i, n in enumerate(names)}
    s15 = tuple(int(round(n / 1.5)) for n in shape)
    phs = [simulate_phantom(shape, (1.0, 1.0, 1.0), **TEST_HEAD),
           simulate_phantom(shape, affine=_oblique_affine(shape, (1, 1, 1), (18.0, -12.0, 0.0)), **TEST_HEAD),
           simulate_phantom(s15, (1.5, 1.5, 1.5), **TEST_HEAD)]
    out = {}
    for n, ph in zip(names, phs):
        mag = ph.magnitude.like(np.ascontiguousarray(ph.magnitude.data[..., 0]))
        out[n] = {"local_field": ph.truth["local_field"], "chi": ph.truth["chi"], "mask": ph.truth["mask"],
                  "magnitude": mag}
    if cache:
        arrs = {"shape": np.asarray(shape)}
        for i, n in enumerate(names):
            arrs[f"{i}_affine"] = out[n]["chi"].affine
            arrs[f"{i}_b0"] = np.asarray(out[n]["chi"].b0_direction)
            for k in keys:
                arrs[f"{i}_{k}"] = np.asarray(out[n][k].data)
        np.savez(cache, **arrs)
    return out


def accuracy(args) -> list[dict]:
    from qsmkit.metrics import evaluate
    from qsmkit.plugins import load_registry
    from qsmkit.stage import StageContext

    reg = load_registry()
    t0 = time.perf_counter()
    heads = _heads(tuple(args.shape), args.cache)
    print(f"test heads ready in {time.perf_counter() - t0:.0f} s (load {_loadavg()})", flush=True)
    params = {"qsmnet": {"checkpoint": args.checkpoint or "", "device": "cpu"},
              "qsmnet-linear": {"checkpoint": args.checkpoint or "", "device": "cpu", "interpolation": "linear"},
              "tkd": {},
              "medi": {"lambda": 1000.0, "max_iter": 15}}   # MEDI as in pipelines/medi_quickstart.yaml
    methods = [(m, params[m]) for m in args.methods]
    rows = []
    for version, h in heads.items():
        f, m = h["local_field"], h["mask"]
        art = {"local_field": f, "mask": m, "magnitude": h["magnitude"], "field_strength": TEST_FIELD_STRENGTH,
               "echo_times": np.asarray(TEST_HEAD["echo_times"])}
        for name, params in methods:
            cls = reg.get("inversion", name.split("-")[0])
            lines = []
            ctx = StageContext({k: v for k, v in art.items() if k in cls.reads + getattr(cls, "optional_reads", ())},
                               log=lines.append)
            w0, c0 = time.perf_counter(), time.process_time()
            chi = cls().run(ctx, cls.validate_params(params, cls.name))["chi"].data
            w, c = time.perf_counter() - w0, time.process_time() - c0
            ev = evaluate(h["chi"].data, chi, m.data > 0)
            rows.append({"head": version, "grid": "x".join(map(str, f.grid_shape)), "method": name,
                         "NRMSE %": ev["nrmse"], "HFEN %": ev["hfen"], "XSIM": ev["xsim"], "wall s": w, "CPU s": c,
                         "load": _loadavg()})
            print(table(rows[-1:], list(rows[-1])), flush=True)
            if args.results:
                with open(args.results, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
            for ln in lines:
                if ln.startswith("qsmnet"):
                    print("   ", ln)
    return rows


def infer(args) -> dict:
    import numpy as np

    from qsmkit.operators import Dipole
    from qsmkit.plugins import load_registry
    from qsmkit.simulate import simulate_susceptibility
    from qsmkit.stage import StageContext
    from qsmkit.volume import Volume

    shape = (200, 240, 180)
    h = simulate_susceptibility(shape, (1, 1, 1), oversample=1, anatomy_seed=4243, fov_fraction=0.86)
    mask = h["mask"].data > 0
    field = Dipole(shape, (1, 1, 1), (0, 0, 1)).apply(h["chi"].data) * mask
    fv = Volume.from_array(field.astype(np.float32), (1, 1, 1), units="ppm")
    cls = load_registry().get("inversion", "qsmnet")
    p = cls.validate_params({"checkpoint": args.checkpoint or "", "device": "cpu"}, "qsmnet")

    def go():
        import torch

        torch.set_num_threads(args.threads)
        cls().run(StageContext({"local_field": fv, "mask": fv.like(mask)}), p)
        return {"threads": args.threads}

    r = measure(go)
    r.update({"case": f"1 mm whole head {shape}, brain box {tuple(int(v) for v in np.ptp(np.argwhere(mask), 0) + 1)}",
              "load": _loadavg()})
    print(table([r], ["case", "threads", "seconds", "cpu_seconds", "peak_rss_mib", "load"]), flush=True)
    return r


def train_throughput(args) -> list[dict]:
    import torch

    from qsmkit_qsmnet.loss import QSMnetLoss
    from qsmkit_qsmnet.network import QSMnet

    rows = []
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devs:
        cases = [(8, True, 32, 4), (32, False, 64, 5)] if dev == "cuda" else [(8, True, 32, 4), (32, False, 64, 1)]
        for width, residual, p, b in cases:
            torch.manual_seed(0)
            if dev == "cpu":
                torch.set_num_threads(args.threads)
            net = QSMnet(width, residual).to(dev)
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            loss = QSMnetLoss((p, p, p))
            x = torch.randn(b, 2 if residual else 1, p, p, p, device=dev)
            y = torch.randn(b, 1, p, p, p, device=dev)
            m = torch.ones_like(y)
            if dev == "cpu":
                net = net.to(memory_format=torch.channels_last_3d)
                x = x.contiguous(memory_format=torch.channels_last_3d)
            steps = 3 if dev == "cpu" else 20
            for i in range(steps + 1):
                if i == 1:
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    w0, c0 = time.perf_counter(), time.process_time()
                opt.zero_grad()
                loss(net(x), y, m)[0].backward()
                opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            rows.append({"device": dev, "width": width, "residual": residual, "patch": p, "batch": b,
                         "patches/s": steps * b / w, "wall s": w, "CPU s": c, "load": _loadavg()})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["accuracy", "infer", "train"], choices=["accuracy", "infer", "train"])
    ap.add_argument("--checkpoint", default="", help="QSMnet checkpoint (default: the shipped weights)")
    ap.add_argument("--shape", nargs=3, type=int, default=[112, 128, 104], help="1 mm test head grid")
    ap.add_argument("--methods", nargs="+", default=["qsmnet", "tkd", "medi"], choices=["qsmnet", "qsmnet-linear", "tkd", "medi"])
    ap.add_argument("--cache", default="", help="keep the simulated test heads in this .npz (reused when present)")
    ap.add_argument("--results", default="", help="append each accuracy row (JSON) to this file; the final "
                    "table then shows all rows in it")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"load average {_loadavg()} at start; {os.cpu_count()} CPUs", flush=True)
    if "accuracy" in args.parts:
        rows = accuracy(args)
        if args.results:
            with open(args.results) as fh:
                rows = [json.loads(ln) for ln in fh if ln.strip()]
        print("\n" + table(rows, ["head", "grid", "method", "NRMSE %", "HFEN %", "XSIM", "wall s", "CPU s", "load"]))
    if "infer" in args.parts:
        infer(args)
    if "train" in args.parts:
        train_throughput(args)


if __name__ == "__main__":
    main()
