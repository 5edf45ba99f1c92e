"""Running a plan's steps over one acquisition, or over several (``inputs.orientations``).

Stages with ``scope = "each"`` before the first ``scope = "joint"`` stage run once per
acquisition, each on its own artifacts. The joint stage then sees every acquisition's artifacts as
the :data:`~qsmkit.stage.ACQUISITIONS` list, and it and every later stage run once on the
reference acquisition's artifacts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import QsmkitError, StageError
from ..stage import ACQUISITIONS, StageContext
from ..threads import limited, stage_threads
from ..volume import Volume
from .plan import Plan, Step


@dataclass
class StepsResult:
    """The final artifacts, one provenance record per step, what was produced and stage metrics."""

    artifacts: dict
    records: list[dict] = field(default_factory=list)
    produced: set[str] = field(default_factory=set)
    metrics: dict = field(default_factory=dict)


def _check_outputs(step: Step, out: Any) -> dict:
    if not isinstance(out, dict):
        raise StageError(f"{step.label}: the plugin returned {type(out).__name__}, not a mapping of artifacts")
    missing = [w for w in step.cls.writes if w not in out]
    if missing:
        raise StageError(f"{step.label}: the plugin did not produce {', '.join(missing)}")
    declared = set(step.cls.writes) | set(step.cls.optional_writes)
    extra = sorted(set(out) - declared)
    if extra:
        hint = "; report metrics with ctx.report_metrics()" if "metrics" in extra else ""
        raise StageError(f"{step.label}: the plugin returned '{extra[0]}', which its class does not declare in writes "
                         f"or optional_writes{hint}")
    for name, value in out.items():
        if isinstance(value, Volume) and np.issubdtype(value.data.dtype, np.floating):
            if not np.all(np.isfinite(value.data)):
                raise StageError(f"{step.label} produced NaN/inf in '{name}'; check its inputs and parameters")
    return out


#: the thread count :func:`run_step` last ran a stage with (recorded in the provenance)
last_threads: list[int] = []


def run_step(step: Step, art: dict, log: Callable[[str], None], metrics: dict, tag: str = "") -> float:
    """Run one stage on ``art`` (updated in place with its outputs); returns the seconds it took."""
    declared = (*step.cls.reads, *step.cls.optional_reads) + ((ACQUISITIONS,) if step.cls.scope == "joint" else ())
    ctx = StageContext(art, stage_label=f"{step.kind}/{step.method}", log=lambda m: log(f"      {m}"),
                       declared=declared)
    stage = step.cls()
    n_threads = stage_threads(stage, ctx, step.params)  # qsmkit.threads: cores free now, capped by the stage
    t0 = time.perf_counter()
    try:
        with limited(n_threads):
            out = stage.run(ctx, step.params)
    except QsmkitError:
        raise
    except MemoryError:
        raise StageError(f"{step.label}{tag}: out of memory; crop the volume or lower padding") from None
    art.update(_check_outputs(step, out))
    metrics.update(ctx.metrics)
    last_threads[:] = [n_threads]
    return time.perf_counter() - t0


def run_steps(plan: Plan, art: dict, per: list[dict] | None, log: Callable[[str], None],
              provider: Callable[[Step], dict] = lambda s: {}) -> StepsResult:
    """Run every step of ``plan`` in order (see the module docstring)."""
    res = StepsResult(art)
    n = len(plan.steps)
    for step in plan.steps:
        rec = {"index": step.index, "stage": step.kind, "method": step.method, "params": dict(step.params),
               **provider(step)}
        if not step.run:
            rec.update(status="skipped", reason=step.reason)
            log(f"[{step.index + 1}/{n}] {step.kind}/{step.method}: skipped ({step.reason})")
            res.records.append(rec)
            continue
        if per is not None and step.per_orientation:
            durations = [run_step(step, a, log, res.metrics, f" (orientation {i})") for i, a in enumerate(per)]
            dt = float(sum(durations))
            rec["durations_s"] = [round(d, 3) for d in durations]
            res.artifacts = dict(per[0])
        else:
            if per is not None:  # the first stage after the per-acquisition ones: merge
                res.artifacts = dict(per[0])
                if step.cls.scope == "joint":
                    res.artifacts[ACQUISITIONS] = per
                per = None
            dt = run_step(step, res.artifacts, log, res.metrics)
        res.produced |= set(step.cls.writes) | (set(step.cls.optional_writes) & set(res.artifacts))
        rec.update(status="ran", duration_s=round(dt, 3), threads=last_threads[0] if last_threads else None)
        res.records.append(rec)
        log(f"[{step.index + 1}/{n}] {step.kind}/{step.method}: {dt:.2f} s")
    if per is not None:
        res.artifacts = dict(per[0])
    return res
