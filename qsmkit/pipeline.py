"""YAML pipeline: load (safe_load) -> apply ``--set`` overrides -> validate into a plan -> run.

The contract is DESIGN.md §2. Validation happens before anything runs: unknown keys, stage kinds,
methods and parameters, missing or inconsistent input files, and an output folder that would
overwrite an input are all reported as one-line :class:`~qsmkit.errors.QsmkitError` messages.
A run writes every Volume artifact that its stages produced as ``<artifact>.nii.gz`` plus
``provenance.json`` (and ``metrics.json`` when a ground truth or a stage supplies metrics);
each file lands atomically, and nothing is written unless every stage succeeded.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from . import inputs as _in
from .errors import ConfigError, InputDataError, MissingArtifactError, OutputError, QsmkitError, StageError
from .registry import StageRegistry
from .stage import PRODUCED_BY, Params, Stage, StageContext
from .volume import Volume

TOP_KEYS = ("name", "description", "inputs", "stages", "output_dir")
STAGE_KEYS = ("stage", "method", "params")
#: stage kinds that run once per orientation in a multi-orientation (COSMOS) pipeline
PER_ORIENTATION_KINDS = ("mask", "unwrap", "echo_combine", "background")
#: artifacts compared with the simulator's ground truth for metrics.json
TRUTH_COMPARED = ("chi", "local_field")


# --------------------------------------------------------------------------- loading
def load_yaml(path: str | Path) -> dict:
    """Read a pipeline file with ``yaml.safe_load`` (plain YAML only; python tags are refused)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise ConfigError(f"{p}: {tag.strip()}; pipelines are read with yaml.safe_load, which allows plain "
                          f"YAML only (remove the tag)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file; give a YAML pipeline") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a pipeline must be a YAML mapping with 'inputs', 'stages' and 'output_dir'")
    return data


def apply_overrides(spec: dict, overrides: Sequence[str]) -> tuple[dict, set[str]]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML); returns (spec, overridden keys)."""
    spec = copy.deepcopy(spec)
    touched: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. stages.4.params.lambda=500")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node: Any = spec
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"--set {key}: '{here}' is not an index of a list of {len(node)} items")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth])}' is a value, not a mapping or list")
        touched.add(".".join(parts))
    return spec, touched


# --------------------------------------------------------------------------- plan
@dataclass
class Step:
    """One stage of a validated pipeline."""

    index: int
    kind: str
    method: str
    cls: type[Stage]
    params: Params
    run: bool = True
    reason: str = ""
    per_orientation: bool = False

    @property
    def label(self) -> str:
        return f"stages.{self.index} {self.kind}/{self.method}"


@dataclass
class Plan:
    """A validated pipeline, ready to run."""

    name: str
    source: Path | None
    inputs: dict
    steps: list[Step]
    output_dir: Path
    given: set[str]
    overrides: list[str] = field(default_factory=list)
    multi_orientation: bool = False

    def summary(self) -> list[str]:
        lines = [f"pipeline '{self.name}': {sum(s.run for s in self.steps)} of {len(self.steps)} stages run; "
                 f"outputs to {self.output_dir}"]
        for s in self.steps:
            state = "run " if s.run else "skip"
            extra = f"  ({s.reason})" if s.reason else ""
            params = ", ".join(f"{k}={v!r}" for k, v in s.params.items())
            per = " [per orientation]" if s.per_orientation and self.multi_orientation else ""
            lines.append(f"  {state} {s.label}{per}{extra}" + (f"\n         {params}" if s.run and params else ""))
        return lines


def _check_keys(mapping: Mapping, allowed: Sequence[str], where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(allowed)}")


def _resolve_inputs(raw: Mapping[str, Any], base: Path, touched: set[str]) -> dict:
    """Inputs with file paths resolved (against the YAML folder, or the cwd for ``--set`` values)."""
    out: dict[str, Any] = {}

    def resolve(key_path: str, value: Any) -> Any:
        if isinstance(value, str) and (_in.is_nifti_path(value) or value.lower().endswith((".h5", ".hdf5", ".mat"))):
            return _in.resolve_path(value, Path.cwd() if key_path in touched else base)
        return value

    for key, value in raw.items():
        if key == "orientations":
            if not isinstance(value, list) or len(value) < 2:
                raise ConfigError("inputs.orientations must be a list of at least two {magnitude, phase} mappings "
                                  "(the first is the reference)")
            orients = []
            for i, o in enumerate(value):
                if not isinstance(o, dict):
                    raise ConfigError(f"inputs.orientations.{i} must be a mapping with magnitude and phase")
                orients.append({k: resolve(f"inputs.orientations.{i}.{k}", v) for k, v in o.items()})
            out[key] = orients
        else:
            out[key] = resolve(f"inputs.{key}", value)
    return out


def build_plan(spec: Mapping[str, Any], registry: StageRegistry, source: Path | None = None,
               output_dir: str | Path | None = None, touched: set[str] | None = None,
               overrides: Sequence[str] = ()) -> Plan:
    """Validate a pipeline mapping against the registry and the input files; return a :class:`Plan`."""
    touched = touched or set()
    base = source.parent if source is not None else Path.cwd()
    _check_keys(spec, TOP_KEYS, "pipeline")
    raw_inputs = spec.get("inputs")
    if not isinstance(raw_inputs, dict) or not raw_inputs:
        raise ConfigError("pipeline: 'inputs' must be a mapping (files, echo_times, field_strength, or simulate)")
    inputs = _resolve_inputs(raw_inputs, base, touched)
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("pipeline: 'stages' must be a non-empty list of {stage, method, params}")

    steps: list[Step] = []
    for i, entry in enumerate(stages):
        where = f"stages.{i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{stage: inversion, method: tkd}}")
        _check_keys(entry, STAGE_KEYS, where)
        kind, method = entry.get("stage"), entry.get("method")
        if not isinstance(kind, str) or not isinstance(method, str):
            raise ConfigError(f"{where} needs 'stage' (a stage kind) and 'method' (its implementation)")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params must be a mapping of parameter names to values")
        cls = registry.get(kind, method)
        steps.append(Step(i, kind, method, cls, cls.validate_params(params, where)))

    multi = "orientations" in inputs or (isinstance(inputs.get("simulate"), dict) and "orientations" in inputs["simulate"])
    given = _given_artifacts(inputs)
    _mark_skips(steps, given, multi)

    out = output_dir if output_dir is not None else spec.get("output_dir")
    if out is None or out == "":
        raise ConfigError("pipeline: no output_dir; add 'output_dir: out/sub-01' to the file or pass --output-dir")
    out_path = Path(out).expanduser()
    if not out_path.is_absolute():
        out_path = (Path.cwd() if output_dir is not None or "output_dir" in touched else base) / out_path
    plan = Plan(str(spec.get("name") or (source.stem if source else "pipeline")), source, inputs, steps,
                out_path, given, list(overrides), multi)
    _check_inputs_exist(plan)
    _check_output_dir(plan)
    return plan


def _given_artifacts(inputs: Mapping[str, Any]) -> set[str]:
    given = {k for k in inputs if k not in _in.RESERVED - {"magnitude", "phase", "echo_times", "field_strength"}}
    if "simulate" in inputs:
        given |= {"magnitude", "phase", "echo_times", "field_strength"}
    if "orientations" in inputs:
        keys = [set(o) for o in inputs["orientations"]]
        if any(k != keys[0] for k in keys):
            raise ConfigError("inputs.orientations: every orientation must give the same keys "
                              f"(the first gives {', '.join(sorted(keys[0]))})")
        given |= keys[0]
    return given


def _mark_skips(steps: list[Step], given: set[str], multi: bool) -> None:
    """Decide which stages run: skip those whose outputs are given or not needed downstream."""
    # artifacts some stage transforms in place (reads and writes them): a given one is raw input to
    # that transform, so later readers still need the stages before them
    raw = set().union(*(set(s.cls.reads) & set(s.cls.writes) for s in steps))
    final_given = given - raw
    needed: set[str] = set()
    last_run = None
    for step in reversed(steps):
        writes = set(step.cls.writes)
        step.per_orientation = step.kind in PER_ORIENTATION_KINDS
        # a stage that rewrites what it reads (reference: chi -> chi, undersample: kspace -> kspace)
        # transforms a given artifact rather than producing it, so giving it does not skip the stage
        if writes and writes <= given and not writes & set(step.cls.reads):
            step.run, step.reason = False, "its outputs are given as inputs"
            continue
        if last_run is not None and not ((writes | set(step.cls.optional_writes)) & needed):
            step.run, step.reason = False, "later stages do not need its outputs"
            continue
        last_run = step
        needed -= writes
        needed |= set(step.cls.reads) - final_given
        if "orientations" in step.cls.reads and multi:  # made of every per-orientation stage's outputs
            needed |= {w for s in steps if s.kind in PER_ORIENTATION_KINDS for w in s.cls.writes}
    available = set(given)
    for step in steps:
        if not step.run:
            continue
        if multi and not step.per_orientation:
            available.add("orientations")
        missing = [r for r in step.cls.reads if r not in available]
        if missing:
            key = missing[0]
            src = PRODUCED_BY.get(key)
            hint = f"add a '{src}' stage before it or give '{key}' under inputs" if src else f"give '{key}' under inputs"
            raise MissingArtifactError(f"{step.label} needs '{key}', which no input or earlier stage provides; {hint}")
        available |= set(step.cls.writes)


def _check_inputs_exist(plan: Plan) -> None:
    for name, path in _in.file_inputs(plan.inputs).items():
        if not path.exists():
            raise ConfigError(f"inputs.{name}: file not found: {path}; check the path (relative paths resolve "
                              f"against the pipeline file's folder)")


def _output_names(plan: Plan) -> set[str]:
    names = {"provenance.json", "metrics.json"}
    for s in plan.steps:
        if s.run:
            names |= {f"{w}{ext}" for w in (*s.cls.writes, *s.cls.optional_writes) for ext in (".nii.gz", ".json")}
    return names


def _check_output_dir(plan: Plan) -> None:
    out = plan.output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file; give a folder")
    targets = {(out / n) for n in _output_names(plan)}
    for name, path in _in.file_inputs(plan.inputs).items():
        rp = path.resolve()
        if rp in targets or rp == out:
            raise OutputError(f"output_dir {out} would overwrite the input file {rp} ({name}); choose another "
                              f"output_dir")
    if plan.source is not None and plan.source.resolve() in targets:
        raise OutputError(f"output_dir {out} would overwrite the pipeline file; choose another output_dir")


def load_plan(path: str | Path, registry: StageRegistry, overrides: Sequence[str] = (),
              output_dir: str | Path | None = None) -> Plan:
    """Load, override and validate a pipeline file."""
    source = Path(path)
    spec, touched = apply_overrides(load_yaml(source), overrides)
    return build_plan(spec, registry, source.resolve(), output_dir, touched, overrides)


# --------------------------------------------------------------------------- run
def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_inputs(plan: Plan) -> tuple[dict, list[dict] | None, dict]:
    """Load and check all inputs; returns (artifacts, per-orientation artifacts or None, truth)."""
    inputs = plan.inputs
    b0_world = inputs.get("b0_direction")
    if b0_world is not None:
        vec = np.asarray(b0_world, dtype=float) if isinstance(b0_world, (list, tuple)) else None
        if vec is None or vec.shape != (3,) or not np.all(np.isfinite(vec)) or np.linalg.norm(vec) == 0:
            raise ConfigError(f"inputs.b0_direction must be a non-zero 3-vector in scanner coordinates, got {b0_world!r}")
    units = inputs.get("phase_units", "rad")
    if units not in _in.PHASE_UNITS:
        raise ConfigError(f"inputs.phase_units = {units!r}; choose one of {', '.join(_in.PHASE_UNITS)}")
    per: list[dict] | None = None
    if "simulate" in inputs:
        art, per = _in.simulate_inputs(inputs["simulate"])
        extra = {k: v for k, v in inputs.items() if k not in ("simulate",)}
        if any(isinstance(v, Path) for v in extra.values()):
            raise ConfigError("inputs: 'simulate' cannot be combined with input files; use one or the other")
        art.update({k: v for k, v in extra.items() if k not in _in.RESERVED})
    elif "orientations" in inputs:
        per = []
        for i, o in enumerate(inputs["orientations"]):
            a = _in.load_acquisition(o, f"inputs.orientations.{i}", b0_world, inputs)
            per.append(a)
        art = dict(per[0])
    else:
        art = _in.load_acquisition(inputs, "inputs", b0_world, inputs)
    truth = art.pop("truth", None) or {}
    for a in per or []:
        a.pop("truth", None)
    groups = per if per is not None else [art]
    for i, a in enumerate(groups):
        where = f"inputs.orientations.{i}" if per is not None else "inputs"
        _complete_acquisition(a, inputs, where)
    if per is not None:
        te0, b00 = per[0].get("echo_times"), per[0].get("field_strength")
        for i, a in enumerate(per[1:], 1):
            if te0 is not None and (a.get("echo_times") is None or not np.allclose(a["echo_times"], te0)):
                raise InputDataError(f"inputs.orientations.{i}: echo times differ from the reference "
                                         f"orientation's; COSMOS needs the same echo times for every orientation")
            if b00 is not None and a.get("field_strength") != b00:
                raise InputDataError(f"inputs.orientations.{i}: field strength differs from the reference "
                                         f"orientation's")
        art = dict(per[0])
    return art, per, truth


def _complete_acquisition(art: dict, inputs: Mapping[str, Any], where: str) -> None:
    """Echo times and field strength from inputs or BIDS sidecars, checked against the echo count."""
    phase = art.get("phase")
    side: dict = {}
    if isinstance(phase, Volume) and phase.meta.get("source"):
        side = _in._read_sidecar(Path(phase.meta["source"]))
    n_echoes = phase.shape[3] if isinstance(phase, Volume) else None
    te = art.get("echo_times", inputs.get("echo_times"))
    if te is None and side:
        te = side.get("EchoTimes", side.get("EchoTime"))
    if te is not None:
        art["echo_times"] = _in.check_echo_times(te, n_echoes)
    elif n_echoes is not None:
        raise ConfigError(f"{where}: no echo_times; add 'echo_times: [...]' (seconds) under inputs or an "
                          f"EchoTime list in the phase image's JSON sidecar")
    b0 = art.get("field_strength", inputs.get("field_strength", side.get("MagneticFieldStrength")))
    if b0 is not None:
        art["field_strength"] = _in.check_field_strength(b0)
    elif phase is not None:
        raise ConfigError(f"{where}: no field_strength; add 'field_strength: 3.0' (tesla) under inputs")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_outputs(step: Step, out: Any) -> dict:
    if not isinstance(out, dict):
        raise StageError(f"{step.label}: the plugin returned {type(out).__name__}, not a mapping of artifacts")
    missing = [w for w in step.cls.writes if w not in out]
    if missing:
        raise StageError(f"{step.label}: the plugin did not produce {', '.join(missing)}")
    for name, value in out.items():
        if isinstance(value, Volume) and np.issubdtype(value.data.dtype, np.floating):
            if not np.all(np.isfinite(value.data)):
                raise StageError(f"{step.label} produced NaN/inf in '{name}'; check its inputs and parameters")
    return out


def _run_step(step: Step, art: dict, log: Callable[[str], None], tag: str = "") -> float:
    ctx = StageContext(art, stage_label=f"{step.kind}/{step.method}", log=lambda m: log(f"      {m}"))
    t0 = time.perf_counter()
    try:
        out = step.cls().run(ctx, step.params)
    except QsmkitError:
        raise
    except MemoryError:
        raise StageError(f"{step.label}{tag}: out of memory; crop the volume or lower padding") from None
    out = _check_outputs(step, out)
    if isinstance(out.get("metrics"), dict) and isinstance(art.get("metrics"), dict):
        out["metrics"] = {**art["metrics"], **out["metrics"]}  # stages add to the run's metrics
    art.update(out)
    return time.perf_counter() - t0


@dataclass
class RunResult:
    """What a run produced: the final artifacts, the files written and the provenance record."""

    artifacts: dict
    files: list[Path]
    provenance: dict
    metrics: dict


def run_plan(plan: Plan, registry: StageRegistry | None = None, log: Callable[[str], None] = _log_default,
             write: bool = True) -> RunResult:
    """Run a validated plan: load inputs, run stages, then write outputs atomically."""
    from . import __version__

    started = _dt.datetime.now(_dt.timezone.utc)
    t_all = time.perf_counter()
    art, per, truth = load_inputs(plan)
    produced: set[str] = set()
    records = []
    n = len(plan.steps)
    merged = per is None
    for step in plan.steps:
        rec = {"index": step.index, "stage": step.kind, "method": step.method, "params": dict(step.params)}
        if registry is not None:
            plugin, dist = registry.provider(step.kind, step.method)
            rec.update(plugin=plugin, distribution=dist)
        if not step.run:
            rec.update(status="skipped", reason=step.reason)
            log(f"[{step.index + 1}/{n}] {step.kind}/{step.method}: skipped ({step.reason})")
            records.append(rec)
            continue
        if per is not None and step.per_orientation:
            durations = []
            for i, a in enumerate(per):
                durations.append(_run_step(step, a, log, f" (orientation {i})"))
            dt = float(sum(durations))
            rec["durations_s"] = [round(d, 3) for d in durations]
            art = dict(per[0]) if not merged else art
        else:
            if per is not None and not merged:
                art = dict(per[0])
                art["orientations"] = per
                merged = True
            dt = _run_step(step, art, log)
        produced |= set(step.cls.writes) | (set(step.cls.optional_writes) & set(art))
        rec.update(status="ran", duration_s=round(dt, 3))
        records.append(rec)
        log(f"[{step.index + 1}/{n}] {step.kind}/{step.method}: {dt:.2f} s")
    if per is not None and not merged:
        art = dict(per[0])
    metrics = _metrics(art, truth, produced)
    provenance = {
        "qsmkit_version": __version__,
        "pipeline": {"name": plan.name, "file": str(plan.source) if plan.source else None,
                     "sha256": _sha256(plan.source) if plan.source and plan.source.exists() else None,
                     "overrides": plan.overrides},
        "started": started.isoformat(timespec="seconds"),
        "duration_s": None,
        "platform": {"python": platform.python_version(), "machine": platform.machine(),
                     "packages": _package_versions()},
        "inputs": _input_record(plan.inputs),
        "stages": records,
        "outputs": [],
    }
    files: list[Path] = []
    if write:
        files = _write_outputs(plan, art, produced, provenance, metrics, t_all)
        log(f"wrote {len(files)} files to {plan.output_dir}")
    return RunResult(art, files, provenance, metrics)


def _metrics(art: dict, truth: Mapping[str, Volume], produced: set[str]) -> dict:
    metrics: dict[str, Any] = dict(art.get("metrics") or {})
    if not truth:
        return metrics
    from . import metrics as qm

    mask = art.get("mask")
    region = truth["mask"].data.astype(bool) if "mask" in truth else None
    if isinstance(mask, Volume) and mask.grid_shape == (region.shape if region is not None else mask.grid_shape):
        region = mask.data.astype(bool) if region is None else (region & mask.data.astype(bool))
    labels = truth.get("labels")
    for name in TRUTH_COMPARED:
        if name in produced and name in truth and isinstance(art.get(name), Volume):
            est = art[name].data
            if est.shape != truth[name].data.shape or region is None or not region.any():
                continue
            metrics[name] = qm.evaluate(est, truth[name].data, region,
                                        labels=labels.data if labels is not None and name == "chi" else None)
    return metrics


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("numpy", "scipy", "nibabel", "torch", "SimpleITK", "h5py", "pluggy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _input_record(inputs: Mapping[str, Any]) -> dict:
    rec: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "orientations":
            rec[key] = [_input_record(o) for o in value]
        elif isinstance(value, Path):
            rec[key] = {"path": str(value), "sha256": _sha256(value) if value.is_file() else None}
        else:
            rec[key] = value
    return rec


def _json_ready(value: Any) -> bool:
    import json

    from .io.atomic import _jsonable

    try:
        json.dumps(value, default=_jsonable)
        return True
    except (TypeError, ValueError):
        return False


def _write_outputs(plan: Plan, art: dict, produced: set[str], provenance: dict, metrics: dict,
                   t_all: float) -> list[Path]:
    """Write produced Volumes, metrics and provenance: staged in a hidden folder, then renamed in."""
    from .io import save_nifti, write_json

    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=".qsmkit-staging-", dir=out))
    try:
        staged: list[tuple[Path, Path]] = []
        for name in sorted(produced - {"metrics"}):
            value = art.get(name)
            if isinstance(value, Volume):
                tmp = stage_dir / f"{name}.nii.gz"
                save_nifti(value, tmp)
                staged.append((tmp, out / tmp.name))
            elif isinstance(value, (dict, list)) and _json_ready(value):  # e.g. registration transforms
                tmp = stage_dir / f"{name}.json"
                write_json(value, tmp)
                staged.append((tmp, out / tmp.name))
        if metrics:
            write_json(metrics, stage_dir / "metrics.json")
            staged.append((stage_dir / "metrics.json", out / "metrics.json"))
        provenance["outputs"] = [dst.name for _, dst in staged] + ["provenance.json"]
        provenance["duration_s"] = round(time.perf_counter() - t_all, 3)
        write_json(provenance, stage_dir / "provenance.json")
        staged.append((stage_dir / "provenance.json", out / "provenance.json"))
        for src, dst in staged:
            src.replace(dst)
        return [dst for _, dst in staged]
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
