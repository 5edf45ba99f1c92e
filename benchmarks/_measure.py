"""Benchmark helper: wall time and peak resident memory of a function, each run in a fresh process."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from typing import Any, Callable


def _child(fn: Callable[[], Any], q) -> None:
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        extra = fn()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        q.put((dt, cpu, r1.ru_maxrss / 1024.0, (r1.ru_maxrss - r0.ru_maxrss) / 1024.0,
               extra if isinstance(extra, dict) else None))
    except BaseException as exc:  # report instead of leaving the parent waiting
        q.put(exc)


def measure(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> dict:
    """Run ``fn`` in a forked process; return wall and CPU seconds, peak RSS (MiB), RSS increase.

    CPU seconds (user + system, all threads) divided by the cores used approximates the wall
    time on an idle machine, which helps when the machine is shared.

    ``setup`` runs in the parent before forking (e.g. to build inputs), so its memory is shared and
    not counted in the increase. ``fn`` may return a dict of extra numbers to report.
    """
    if setup is not None:
        setup()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, q))
    p.start()
    got = q.get()
    p.join()
    if isinstance(got, BaseException):
        raise got
    dt, cpu, peak, inc, extra = got
    return {"seconds": dt, "cpu_seconds": cpu, "peak_rss_mib": peak, "rss_increase_mib": inc, **(extra or {})}


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns``."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[c for c in columns]] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
