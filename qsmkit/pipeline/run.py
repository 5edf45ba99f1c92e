"""Running a validated plan: lock the output folder, load inputs, run the steps, record, commit.

Nothing is written unless every stage succeeded; then every Volume artifact a stage produced
lands as ``<artifact>.nii.gz`` (JSON-ready values as ``<artifact>.json``), with
``metrics.json`` (when a ground truth or a stage supplies metrics) and ``provenance.json`` last
(see :mod:`qsmkit.pipeline.outputs` for the folder rules).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..inputs import RESERVED
from ..io.acquisition import load_acquisition, simulate_inputs
from ..registry import StageRegistry
from ..stage import Params
from ..threads import set_run_threads
from ..volume import Volume
from .fanout import run_steps
from .outputs import PROVENANCE, OutputFolder, pipeline_identity
from .plan import Plan
from .provenance import provenance, truth_metrics


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_inputs(plan: Plan) -> tuple[dict, list[dict] | None, dict]:
    """Load the prepared inputs' data; returns (artifacts, per-acquisition artifacts or None, truth)."""
    inputs = plan.inputs
    b0_world = inputs.get("b0_direction")
    per: list[dict] | None = None
    if "simulate" in inputs:
        art, per = simulate_inputs(inputs["simulate"])
        art.update({k: v for k, v in inputs.items() if k not in RESERVED})
    elif "orientations" in inputs:
        per = [load_acquisition(o, f"inputs.orientations.{i}", b0_world, inputs)
               for i, o in enumerate(inputs["orientations"])]
        art = dict(per[0])
    else:
        art = load_acquisition(inputs, "inputs", b0_world, inputs)
    if "simulate" not in inputs:  # fields given as files: in ppm, or converted from inputs.field_units
        from ..io.units import apply_field_units
        apply_field_units(art, inputs)
    truth = art.pop("truth", None) or {}
    for a in per or []:
        a.pop("truth", None)
    return art, per, truth


@dataclass
class RunResult:
    """What a run produced: the final artifacts, the files written and the provenance record."""

    artifacts: dict
    files: list
    provenance: dict
    metrics: dict


def _json_ready(value: Any) -> bool:
    from ..io.atomic import _jsonable

    try:
        json.dumps(value, default=_jsonable)
        return True
    except (TypeError, ValueError):
        return False


def _qc_pictures(art: dict, stage, title: str, produced: set[str]) -> list[str]:
    """Draw the QC PNGs (:mod:`qsmkit.qc`) into the staging folder; a drawing failure costs the
    pictures (one warning line), never the run's outputs."""
    import warnings

    from ..errors import QsmkitWarning
    from ..qc import QC_FILES, write_qc

    try:
        return write_qc(art, stage, title=title, produced=produced)
    except Exception as exc:  # matplotlib trouble (fonts, a broken install) must not lose the results
        for name in QC_FILES:
            (stage / name).unlink(missing_ok=True)
        warnings.warn(f"QC pictures not drawn ({type(exc).__name__}: {exc}); the run's outputs are complete",
                      QsmkitWarning, stacklevel=2)
        return []


def _stage_files(folder: OutputFolder, art: dict, produced: set[str], metrics: dict, record: dict,
                 t_all: float) -> list[str]:
    """Write the outputs into the staging folder; returns their names (``provenance.json`` last)."""
    from ..io import save_nifti, write_json

    stage = folder.stage_dir()
    names: list[str] = []
    for name in sorted(produced):
        value = art.get(name)
        if isinstance(value, Volume):
            save_nifti(value, stage / f"{name}.nii.gz")
            names.append(f"{name}.nii.gz")
        elif isinstance(value, (dict, list)) and _json_ready(value):  # e.g. registration transforms
            write_json(value, stage / f"{name}.json")
            names.append(f"{name}.json")
    if getattr(folder.plan, "qc", False):  # the QC pictures go through the same staging and commit
        names += _qc_pictures(art, stage, folder.plan.name, produced)
    if metrics:
        write_json(metrics, stage / "metrics.json")
        names.append("metrics.json")
    record["outputs"] = names + [PROVENANCE]
    record["other_files"] = sorted(folder.state.foreign - set(record["outputs"]))
    record["duration_s"] = round(time.perf_counter() - t_all, 3)
    write_json(record, stage / PROVENANCE)
    return names + [PROVENANCE]


def resolve_run_device(plan: Plan, log: Callable[[str], None]) -> str | None:
    """Resolve the run's device once and hand it to every torch stage whose ``device`` is ``auto``.

    numpy-only stages (those declaring :data:`qsmkit.params.CPU_DEVICE`) do not make a run import torch.
    """
    from ..params import CPU_DEVICE

    auto = [s for s in plan.steps if s.run and s.params.get("device", None) == "auto"
            and s.cls.param_map().get("device") is not CPU_DEVICE]
    if not auto:
        return None
    from ..device import resolve_device

    device = resolve_device(plan.device).type
    for step in auto:
        step.params = Params({**step.params, "device": device})
    log(f"device: {device} (for the stages set to auto)")
    return device


def run_plan(plan: Plan, registry: StageRegistry | None = None, log: Callable[[str], None] = _log_default,
             write: bool = True, keep: frozenset[str] | set[str] = frozenset()) -> RunResult:
    """Run a validated plan: load inputs, run stages, then write outputs atomically (if ``write``).

    ``keep`` names input artifacts written with the outputs as if a stage had produced them (a cohort
    resume gives the cached outputs of unchanged stages as inputs; see :mod:`qsmkit.pipeline.cohort`).
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    t_all = time.perf_counter()
    folder_cm = OutputFolder(plan) if write else contextlib.nullcontext()
    with folder_cm as folder:
        for note in plan.notes:
            log(note)
        device = resolve_run_device(plan, log)
        art, per, truth = load_inputs(plan)

        def provider(step) -> dict:
            if registry is None:
                return {}
            plugin, dist = registry.provider(step.kind, step.method)
            return {"plugin": plugin, "distribution": dist}

        previous_threads = set_run_threads(getattr(plan, "threads", None))
        try:
            res = run_steps(plan, art, per, log, provider)
        finally:
            set_run_threads(previous_threads)
        metrics = {**res.metrics, **truth_metrics(res.artifacts, truth, res.produced)}
        record = provenance(plan, pipeline_identity(plan.name, plan.source), res.records, started)
        record["device"] = device
        record["threads"] = getattr(plan, "threads", None) or "auto"
        files: list = []
        if write:
            names = _stage_files(folder, res.artifacts, res.produced | set(keep), metrics, record, t_all)
            files = folder.commit(names)
            log(f"wrote {len(files)} files to {plan.output_dir}")
    return RunResult(res.artifacts, files, record, metrics)
