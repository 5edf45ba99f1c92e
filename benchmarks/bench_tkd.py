"""TKD time and peak memory on a 1 mm whole-head grid (180 x 216 x 180), float32, 2 CPU threads.

    python benchmarks/bench_tkd.py [--shape 180,216,180] [--padding 1.5] [--repeats 3]

Goal (issue 2): under 2 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _measure import measure, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="180,216,180")
    ap.add_argument("--padding", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    from qsmkit import fft as qfft
    from qsmkit_tkd import tkd

    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, shape).astype(np.float32)
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, np.float32) - 1)[:, None, None, None] / 2
    mask = (((idx - centre) / (0.42 * np.asarray(shape, np.float32))[:, None, None, None]) ** 2).sum(0) <= 1
    del idx
    rows = []
    for padding in sorted({1.0, args.padding}):
        for r in range(args.repeats):
            res = measure(lambda: tkd(field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), 0.15, padding))
            rows.append({"shape": "x".join(map(str, shape)), "padding": padding,
                         "fft grid": "x".join(map(str, qfft.padded_shape(shape, padding))), "run": r + 1,
                         "seconds": res["seconds"], "cpu s": res["cpu_seconds"], "peak RSS MiB": res["peak_rss_mib"],
                         "RSS increase MiB": res["rss_increase_mib"]})
    print(f"TKD benchmark, {os.cpu_count()} CPUs visible, scipy.fft workers=-1")
    print(table(rows, ["shape", "padding", "fft grid", "run", "seconds", "cpu s", "peak RSS MiB", "RSS increase MiB"]))


if __name__ == "__main__":
    main()
