"""Planning: a pipeline mapping (with prepared inputs) -> a validated :class:`Plan` of :class:`Step`.

Skip rules: a stage whose outputs are all given as inputs is skipped, and so is a stage whose
outputs no later stage needs, unless a later stage may use them (an optional read) and the stage
can run (a mask stage before an unwrapper that reads a mask only when there is one). In a run over several acquisitions (``inputs.orientations``), a
stage's :attr:`~qsmkit.stage.Stage.scope` decides how it runs: ``"each"`` stages before the first
``"joint"`` stage run once per acquisition; a ``"joint"`` stage sees all of them as the
:data:`~qsmkit.stage.ACQUISITIONS` artifact; every stage after it runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, MissingArtifactError
from ..inputs import RESERVED, prepare_inputs
from ..registry import StageRegistry
from ..stage import ACQUISITIONS, PRODUCED_BY, Params, Stage
from .spec import STAGE_KEYS, TOP_KEYS, apply_overrides, check_keys, load_yaml


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
    #: what validation assumed or completed (echo times from sidecars, ...), logged by a run
    notes: list[str] = field(default_factory=list)
    #: replace files in the output folder that this pipeline's earlier runs did not write
    overwrite: bool = False
    #: the run's torch device (``auto``, ``cpu``, ``cuda``): stages whose ``device`` is ``auto`` get it
    device: str = "auto"
    #: draw the QC pictures (:mod:`qsmkit.qc`) into the output folder (pipeline key ``qc``, default true)
    qc: bool = True
    #: CPU threads per stage (pipeline key ``threads``, ``qsmkit run --threads``); None: decided per
    #: stage from the free cores (:mod:`qsmkit.threads`)
    threads: int | None = None

    def summary(self) -> list[str]:
        lines = [f"pipeline '{self.name}': {sum(s.run for s in self.steps)} of {len(self.steps)} stages run; "
                 f"outputs to {self.output_dir}"]
        lines += [f"  {n}" for n in self.notes]
        for s in self.steps:
            state = "run " if s.run else "skip"
            extra = f"  ({s.reason})" if s.reason else ""
            params = ", ".join(f"{k}={v!r}" for k, v in s.params.items())
            per = " [per orientation]" if s.per_orientation else ""
            lines.append(f"  {state} {s.label}{per}{extra}" + (f"\n         {params}" if s.run and params else ""))
        return lines


def known_artifacts(registry: StageRegistry) -> set[str]:
    """Every artifact name a registered stage reads or writes (the keys ``inputs`` may give)."""
    names: set[str] = set()
    for _, cls in registry.items():
        names |= set(cls.reads) | set(cls.optional_reads) | set(cls.writes) | set(cls.optional_writes)
    return names - {ACQUISITIONS}


def _steps(stages: Any, registry: StageRegistry) -> list[Step]:
    if not isinstance(stages, list) or not stages:
        raise ConfigError("pipeline: 'stages' must be a non-empty list of {stage, method, params}")
    steps: list[Step] = []
    for i, entry in enumerate(stages):
        where = f"stages.{i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{stage: inversion, method: tkd}}")
        check_keys(entry, STAGE_KEYS, where)
        kind, method = entry.get("stage"), entry.get("method")
        if not isinstance(kind, str) or not isinstance(method, str):
            raise ConfigError(f"{where} needs 'stage' (a stage kind) and 'method' (its implementation)")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params must be a mapping of parameter names to values")
        cls = registry.get(kind, method)
        steps.append(Step(i, kind, method, cls, cls.validate_params(params, where)))
    return steps


def given_artifacts(inputs: Mapping[str, Any]) -> set[str]:
    """Artifacts a prepared ``inputs`` section provides before any stage runs."""
    given = {k for k in inputs if k not in RESERVED - {"magnitude", "phase", "echo_times", "field_strength"}}
    if "simulate" in inputs:
        given |= {"magnitude", "phase", "echo_times", "field_strength"}
    if "orientations" in inputs:
        given |= set(inputs["orientations"][0])
    return given


def _is_multi(inputs: Mapping[str, Any]) -> bool:
    sim = inputs.get("simulate")
    return "orientations" in inputs or (isinstance(sim, dict) and "orientations" in sim)


_UNNEEDED = "later stages do not need its outputs"


def mark_skips(steps: list[Step], given: set[str], multi: bool) -> None:
    """Decide which stages run (see the module docstring) and check every read is provided."""
    # artifacts some stage transforms in place (reads and writes them): a given one is raw input to
    # that transform, so later readers still need the stages before them
    raw = set().union(*(set(s.cls.reads) & set(s.cls.writes) for s in steps))
    final_given = given - raw
    first_joint = next((s.index for s in steps if s.cls.scope == "joint"), None) if multi else None
    for step in steps:
        step.per_orientation = multi and first_joint is not None and step.index < first_joint
    needed: set[str] = set()
    last_run = None
    for step in reversed(steps):
        writes = set(step.cls.writes)
        # a stage that rewrites what it reads (reference: chi -> chi, undersample: kspace -> kspace)
        # transforms a given artifact rather than producing it, so giving it does not skip the stage
        if writes and writes <= given and not writes & set(step.cls.reads):
            step.run, step.reason = False, "its outputs are given as inputs"
            continue
        if last_run is not None and not ((writes | set(step.cls.optional_writes)) & needed):
            step.run, step.reason = False, _UNNEEDED
            continue
        last_run = step
        needed -= writes
        needed |= set(step.cls.reads) - final_given
        if step.cls.scope == "joint" and multi:  # made of every per-acquisition stage's outputs
            needed |= {w for s in steps if s.per_orientation for w in (*s.cls.writes, *s.cls.optional_writes)}
    _run_optional_providers(steps, given)
    _check_reads(steps, given, multi)


def _run_optional_providers(steps: list[Step], given: set[str]) -> None:
    """Run a stage skipped as unneeded when a later running stage reads one of its outputs optionally
    and everything the stage itself needs is available (a mask stage before an unwrapper that only
    may use a mask); a stage that cannot run (its inputs are missing) stays skipped."""
    available = set(given)
    for i, step in enumerate(steps):
        if not step.run and step.reason == _UNNEEDED:
            outs = set(step.cls.writes) | set(step.cls.optional_writes)
            wanted = any(outs & set(later.cls.optional_reads) for later in steps[i + 1:] if later.run)
            if wanted and set(step.cls.reads) <= available:
                step.run, step.reason = True, ""
        if step.run:
            available |= set(step.cls.writes)


def _check_reads(steps: list[Step], given: set[str], multi: bool) -> None:
    available = set(given)
    for step in steps:
        if not step.run:
            continue
        if multi and step.cls.scope == "joint":
            available.add(ACQUISITIONS)
        missing = [r for r in step.cls.reads if r not in available]
        if missing:
            key = missing[0]
            if key == ACQUISITIONS:
                raise MissingArtifactError(f"{step.label} combines several acquisitions; give them as "
                                           f"inputs.orientations (a list of {{magnitude, phase}}, the reference first)")
            src = PRODUCED_BY.get(key)
            hint = f"add a '{src}' stage before it or give '{key}' under inputs" if src else f"give '{key}' under inputs"
            raise MissingArtifactError(f"{step.label} needs '{key}', which no input or earlier stage provides; {hint}")
        available |= set(step.cls.writes)


def build_plan(spec: Mapping[str, Any], registry: StageRegistry, source: Path | None = None,
               output_dir: str | Path | None = None, touched: set[str] | None = None,
               overrides: Sequence[str] = (), overwrite: bool = False) -> Plan:
    """Validate a pipeline mapping against the registry, its input files and its output folder."""
    from .outputs import check_output_dir

    touched = touched or set()
    base = source.parent if source is not None else Path.cwd()
    check_keys(spec, TOP_KEYS, "pipeline")
    prepared = prepare_inputs(spec.get("inputs"), base, touched, known_artifacts(registry))
    steps = _steps(spec.get("stages"), registry)
    multi = _is_multi(prepared.values)
    mark_skips(steps, given_artifacts(prepared.values), multi)
    for step in steps:
        if step.run:
            step.cls.check_inputs(prepared.values, step.params)

    out = output_dir if output_dir is not None else spec.get("output_dir")
    if out is None or out == "":
        raise ConfigError("pipeline: no output_dir; add 'output_dir: out/sub-01' to the file or pass --output-dir")
    if not isinstance(out, (str, Path)):
        raise ConfigError(f"pipeline: output_dir must be a folder path, got {out!r}")
    out_path = Path(out).expanduser()
    if not out_path.is_absolute():
        out_path = (Path.cwd() if output_dir is not None or "output_dir" in touched else base) / out_path
    name = spec.get("name")
    if name is not None and not isinstance(name, (str, int, float)):
        raise ConfigError(f"pipeline: name must be a short text, got a {type(name).__name__}")
    device = spec.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"pipeline: device = {device!r}; choose auto, cpu or cuda (a stage's own device "
                          f"parameter overrides it)")
    qc = spec.get("qc", True)
    if not isinstance(qc, bool):
        raise ConfigError(f"pipeline: qc = {qc!r}; give true (draw the QC pictures, the default) or false")
    from ..threads import check_threads

    threads = check_threads(spec.get("threads"), "pipeline: threads")
    plan = Plan(str(name or (source.stem if source else "pipeline"))[:200], source, prepared.values, steps,
                out_path, given_artifacts(prepared.values), list(overrides), multi, prepared.notes, overwrite,
                device, qc=qc, threads=threads)
    check_output_dir(plan)
    return plan


def load_plan(path: str | Path, registry: StageRegistry, overrides: Sequence[str] = (),
              output_dir: str | Path | None = None, overwrite: bool = False) -> Plan:
    """Load, override and validate a pipeline file."""
    source = Path(path)
    spec, touched = apply_overrides(load_yaml(source), overrides)
    return build_plan(spec, registry, source.resolve(), output_dir, touched, overrides, overwrite)
