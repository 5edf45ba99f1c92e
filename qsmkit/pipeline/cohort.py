"""Cohorts: one pipeline over every run of a BIDS dataset, into a BIDS derivative dataset.

``qsmkit run pipeline.yaml --bids BIDS_DIR`` finds the runs (:mod:`qsmkit.io.bids`), gives each
the pipeline with its own ``inputs`` (the BIDS files and sidecar values), runs them on an
executor (:mod:`qsmkit.executors`) and exports each finished run to BIDS derivative names.

Layout of the derivative dataset (default ``BIDS_DIR/derivatives/qsmkit``)::

    dataset_description.json            DatasetType derivative, GeneratedBy qsmkit + the pipeline
    sub-01/[ses-1/]anat/sub-01_Chimap.nii.gz (+ .json: Units ppm, pipeline, method)
                        sub-01_desc-brain_mask.nii.gz, sub-01_desc-localfield_MEGRE.nii.gz, ...
    sub-01/figures/sub-01_qc_chi.png    the QC pictures, when the pipeline draws them
    .qsmkit/runs/<run key>/             each run's own output folder (provenance.json, all artifacts)

Each run's folder is a single-run output folder (:mod:`qsmkit.pipeline.outputs`): locked,
staged and committed as a set with a journal, so a run killed at any point (SIGKILL included)
leaves either its previous complete outputs or none; the BIDS names are then hard links (or
copies) of its files, each renamed into place. A rerun of the same command

* skips a run whose ``provenance.json`` records the same qsmkit version, the same input files
  (SHA-256) and the same stages with the same parameters (a stage's ``device`` is not compared);
* otherwise recomputes from the first stage that differs, giving the cached outputs of the
  unchanged stages before it as inputs (:func:`resume_point` says when that is safe: an artifact
  that a later stage rewrites in place, like the mask that V-SHARP erodes, is cached only in its
  final state, so the resume moves back to before its first writer);
* re-exports every finished run, which repairs an export that a kill interrupted.

A failing run (bad file, failed stage, dead worker) is recorded with its one-line error and never
stops the others; :func:`summary_table` lists every run at the end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import OutputError, QsmkitError
from ..io.bids import BidsRun, find_runs

#: hidden folder inside the derivative dataset holding the runs' own folders (ignored by BIDS tools)
WORK_DIR = ".qsmkit"
#: pipeline ``inputs`` keys that still apply to BIDS runs (the pipeline's value wins over the sidecars')
CARRIED_INPUTS = ("invert_phase", "phase_units", "b0_direction", "ignore_sidecars")
#: pipeline ``inputs`` keys used only when the sidecars do not give them
FALLBACK_INPUTS = ("echo_times", "field_strength")
#: acquisition inputs whose values (files by SHA-256) decide whether a run's cache is still valid
FINGERPRINT_INPUTS = ("magnitude", "phase", "echo_times", "field_strength", "phase_units", "invert_phase",
                      "b0_direction")
#: artifacts with a BIDS suffix of their own; any other is ``desc-<name>`` with the source's suffix
BIDS_NAMES = {"chi": ("", "Chimap"), "mask": ("brain", "mask")}
#: units written into the derivative sidecars
ARTIFACT_UNITS = {"chi": "ppm", "local_field": "ppm", "total_field": "ppm", "unwrapped_phase": "rad",
                  "noise_weight": "1/ppm", "mask": "", "r2star": "1/s", "t2star": "s"}
BIDS_VERSION = "1.10.0"
_TMP = ".qsmkit-tmp-"


@dataclass
class Job:
    """One run of a cohort, as sent to an executor (plain data: it pickles for any worker)."""

    key: str
    spec: dict
    source: str
    overrides: list
    overwrite: bool
    run_dir: str
    cache_dir: str
    log_path: str
    #: stages before this index are not run: their outputs are given from the cache
    resume_from: int = 0
    #: cached artifact name -> file in the run folder
    cached: dict = field(default_factory=dict)
    estimate_bytes: int = 0
    needs_gpu: bool = False
    threads: int | None = None


@dataclass
class Outcome:
    """What became of one run: ``done``, ``cached`` (nothing to recompute) or ``failed``."""

    key: str
    status: str
    duration_s: float = 0.0
    error: str = ""
    ran: list = field(default_factory=list)
    note: str = ""
    #: peak resident memory of the worker process so far (MiB; workers are reused across runs)
    peak_rss_mib: float = 0.0
    worker_pid: int = 0
    estimate_mib: float = 0.0


# --------------------------------------------------------------------------- fingerprints and resume
def _canon(value: Any) -> str:
    from ..io.atomic import _jsonable

    return json.dumps(value, sort_keys=True, default=_jsonable)


def _stage_key(kind: str, method: str, params: Mapping[str, Any]) -> str:
    return _canon([kind, method, {k: v for k, v in dict(params).items() if k != "device"}])


def _input_key(record: Mapping[str, Any]) -> str:
    def strip(v: Any) -> Any:  # files by content, not by where they are
        if isinstance(v, dict) and "sha256" in v:
            return v["sha256"]
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return _canon({k: strip(record[k]) for k in FINGERPRINT_INPUTS if k in record})


def read_previous(run_dir: Path) -> dict | None:
    """The ``provenance.json`` of a complete earlier run in ``run_dir`` (``None`` if none or unfinished)."""
    from .outputs import JOURNAL, PROVENANCE

    if (run_dir / JOURNAL).exists():
        return None
    try:
        rec = json.loads((run_dir / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("stages"), list) else None


def resume_point(plan, previous: Mapping[str, Any] | None) -> tuple[int | None, dict[str, str], str]:
    """Where a rerun of ``plan`` starts given the earlier run's provenance.

    Returns ``(None, {}, why)`` when the earlier run is complete and current (nothing to do), else
    ``(k, cached, why)``: stages ``< k`` are given their cached outputs ``cached`` (artifact ->
    file name in the run folder) and not run; ``k == 0`` is a full run.
    """
    from .. import __version__
    from .provenance import input_record

    if previous is None:
        return 0, {}, "new run"
    if previous.get("qsmkit_version") != __version__:
        return 0, {}, f"qsmkit {previous.get('qsmkit_version')} -> {__version__}: full run"
    if _input_key(previous.get("inputs") or {}) != _input_key(input_record(plan.inputs)):
        return 0, {}, "input files or acquisition changed: full run"
    now = [_stage_key(s.kind, s.method, s.params) for s in plan.steps]
    before = [_stage_key(r.get("stage"), r.get("method"), r.get("params") or {}) for r in previous["stages"]]
    if now == before:
        return None, {}, "unchanged since the last run"
    first = next((i for i, (a, b) in enumerate(zip(now, before)) if a != b), min(len(now), len(before)))
    files = {str(n) for n in previous.get("outputs") or []}
    steps = plan.steps
    for k in range(first, 0, -1):
        later_writes = {w for s in steps[k:] for w in (*s.cls.writes, *s.cls.optional_writes)}
        later_reads = {r for s in steps[k:] if s.run for r in (*s.cls.reads, *s.cls.optional_reads)}
        earlier = {w for s in steps[:k] for w in (*s.cls.writes, *s.cls.optional_writes)}
        cached = {a: f"{a}.nii.gz" for a in earlier - later_writes if f"{a}.nii.gz" in files}
        required = {w for s in steps[:k] for w in s.cls.writes} & later_reads
        if all(a in cached for a in required) and not (earlier & later_writes & later_reads):
            return k, cached, f"stage {k} ({steps[k].kind}/{steps[k].method}) changed: rerun from it"
    return 0, {}, f"stage {first} changed and no earlier output can be reused: full run"


# --------------------------------------------------------------------------- planning a cohort
@dataclass
class Cohort:
    """A prepared cohort: the runs, the jobs to execute, the outcomes already known."""

    bids_dir: Path
    out_dir: Path
    pipeline: Path
    name: str
    runs: list[BidsRun]
    jobs: list[Job]
    known: list[Outcome]
    notes: list[str] = field(default_factory=list)
    #: the folder holds another pipeline's results, replaced as a whole (``--overwrite``)
    replace: bool = False


def run_spec(spec: Mapping[str, Any], run: BidsRun, run_dir: Path) -> dict:
    """The pipeline for one BIDS run: the BIDS inputs (see :data:`CARRIED_INPUTS`) and its own output folder."""
    s = copy.deepcopy(dict(spec))
    given = s.get("inputs") if isinstance(s.get("inputs"), dict) else {}
    inputs = run.inputs()
    for key in FALLBACK_INPUTS:
        if key in given and key not in inputs:
            inputs[key] = given[key]
    for key in CARRIED_INPUTS:
        if key in given:
            inputs[key] = given[key]
    s["inputs"] = inputs
    s["output_dir"] = str(run_dir)
    return s


def estimate_peak_bytes(plan) -> int:
    """Estimated peak memory of one run (see :func:`qsmkit.executors.run_peak_bytes`)."""
    from ..executors import run_peak_bytes

    return run_peak_bytes(plan)


def _needs_gpu(plan) -> bool:
    return any(s.run and s.params.get("device", None) == "cuda" for s in plan.steps) or plan.device == "cuda"


def _check_derivative_folder(out: Path, bids_dir: Path, identity: dict, overwrite: bool) -> bool:
    """Refuse an output folder that is the raw dataset or holds another pipeline's (or no qsmkit) results.

    Returns True when it holds another pipeline's results that ``--overwrite`` replaces.
    """
    out_r, bids_r = out.resolve(), bids_dir.resolve()
    if out_r == bids_r or bids_r.is_relative_to(out_r):
        raise OutputError(f"--output-dir {out}: would write over the BIDS dataset {bids_dir}; give a derivatives "
                          f"folder (default {bids_dir / 'derivatives' / 'qsmkit'})")
    if out_r.is_relative_to(bids_r) and out_r.relative_to(bids_r).parts[0] != "derivatives":
        raise OutputError(f"--output-dir {out}: inside the raw dataset but not under derivatives/; choose "
                          f"{bids_dir / 'derivatives' / 'qsmkit'} or a folder outside {bids_dir}")
    if not out.is_dir() or not [p for p in out.iterdir() if p.name not in (WORK_DIR, ".bidsignore")]:
        return False
    desc = out / "dataset_description.json"
    try:
        data = json.loads(desc.read_text())
    except (OSError, ValueError):
        data = None
    gen = [g for g in (data or {}).get("GeneratedBy") or [] if isinstance(g, dict) and g.get("Name") == "qsmkit"]
    if not gen:
        if not overwrite:
            raise OutputError(f"--output-dir {out} holds files qsmkit did not write; choose an empty or new folder, "
                              f"or pass --overwrite to write beside them")
        return False
    theirs = gen[0].get("Pipeline") or {}
    if {"name": theirs.get("name"), "file": theirs.get("file")} != identity:
        if not overwrite:
            raise OutputError(f"--output-dir {out} holds the results of pipeline '{theirs.get('name')}' "
                              f"({theirs.get('file')}); choose another folder (e.g. derivatives/qsmkit-"
                              f"{identity['name']}), or pass --overwrite to replace them")
        return True
    return False


def prepare_cohort(pipeline: str | Path, bids_dir: str | Path, registry, out_dir: str | Path | None = None,
                   overrides: Sequence[str] = (), overwrite: bool = False, participant_label: Sequence[str] = (),
                   session_label: Sequence[str] = (), run: Sequence[str] = (), acq: Sequence[str] = ()) -> Cohort:
    """Find the runs and validate the pipeline for each; a run that fails validation is a failed outcome."""
    from .outputs import pipeline_identity
    from .plan import build_plan
    from .spec import apply_overrides, load_yaml

    source = Path(pipeline).resolve()
    spec, touched = apply_overrides(load_yaml(source), overrides)
    bids = Path(bids_dir).expanduser()
    bids = bids if bids.is_absolute() else Path.cwd() / bids
    runs = find_runs(bids, participant_label, session_label, run, acq)
    out = Path(out_dir).expanduser() if out_dir is not None else bids / "derivatives" / "qsmkit"
    out = out if out.is_absolute() else Path.cwd() / out
    name = str(spec.get("name") or source.stem)[:200] if isinstance(spec, dict) else source.stem
    replace = _check_derivative_folder(out, bids, pipeline_identity(name, source), overwrite)
    cohort = Cohort(bids, out, source, name, runs, [], [])
    cohort.replace = replace
    if isinstance(spec, dict) and spec.get("output_dir"):
        cohort.notes.append(f"output_dir of {source.name} is not used with --bids: outputs go to {out}")
    work = out / WORK_DIR
    for r in runs:
        run_dir = work / "runs" / r.key
        job = Job(r.key, {}, str(source), list(overrides), overwrite, str(run_dir), str(work / "cache" / r.key),
                  str(work / "logs" / f"{r.key}.log"))
        try:
            job.spec = run_spec(spec, r, run_dir)
            plan = build_plan(job.spec, registry, source, None, touched, overrides, overwrite)
            k, cached, why = resume_point(plan, None if replace else read_previous(run_dir))
            if k is None:
                cohort.known.append(Outcome(r.key, "cached", note=why))
                continue
            job.resume_from, job.cached = k, cached
            job.estimate_bytes = estimate_peak_bytes(plan)
            job.needs_gpu = _needs_gpu(plan)
            cohort.jobs.append(job)
            if k:
                cohort.notes.append(f"{r.key}: {why}")
        except QsmkitError as exc:
            cohort.known.append(Outcome(r.key, "failed", error=_one_line(exc)))
    return cohort


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, QsmkitError) else f"internal error: {type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- running one job (in a worker)
def _limit_threads(n: int | None) -> None:
    if not n:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (a copy across file systems), renamed into place."""
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return  # already in place (a rerun): nothing is rewritten
    except OSError:
        pass
    tmp = dst.with_name(_TMP + dst.name)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _measured(o: Outcome, job: Job) -> Outcome:
    import resource

    o.peak_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    o.worker_pid = os.getpid()
    o.estimate_mib = round(job.estimate_bytes / 2**20, 1)
    return o


def run_job(job: Job) -> Outcome:
    """Run one job to an :class:`Outcome`; never raises for a failing run (executors call this)."""
    t0 = time.perf_counter()
    cache = Path(job.cache_dir)
    log_path = Path(job.log_path)
    lines: list[str] = []
    try:
        _limit_threads(job.threads)
        from ..plugins import load_registry
        from .plan import build_plan
        from .run import run_plan

        registry = load_registry()
        spec = copy.deepcopy(job.spec)
        if job.cached:  # the cached files are linked out of the folder this run replaces
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            for art, fname in job.cached.items():
                _link(Path(job.run_dir) / fname, cache / fname)
                spec["inputs"][art] = str(cache / fname)
        plan = build_plan(spec, registry, Path(job.source), None, set(), job.overrides, job.overwrite)
        for step in plan.steps[:job.resume_from]:
            step.run, step.reason = False, "unchanged since the last run: its outputs are cached"
        res = run_plan(plan, registry, log=lines.append, keep=set(job.cached))
        ran = [r["stage"] + "/" + r["method"] for r in res.provenance["stages"] if r.get("status") == "ran"]
        return _measured(Outcome(job.key, "done", time.perf_counter() - t0, ran=ran,
                                 note=f"from stage {job.resume_from}" if job.resume_from else ""), job)
    except BaseException as exc:  # noqa: BLE001 - a run's failure is its outcome
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        lines.append(f"error: {_one_line(exc)}")
        return _measured(Outcome(job.key, "failed", time.perf_counter() - t0, error=_one_line(exc)), job)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("\n".join(lines) + "\n")
        except OSError:
            pass


# --------------------------------------------------------------------------- BIDS derivatives
def derivative_name(run: BidsRun, artifact: str) -> str:
    """The BIDS derivative file name of an artifact of ``run`` (``sub-01_Chimap.nii.gz``, ...)."""
    desc, suffix = BIDS_NAMES.get(artifact, (artifact.replace("_", ""), run.suffix))
    return f"{run.label}{'_desc-' + desc if desc else ''}_{suffix}.nii.gz"


def dataset_description(name: str, source: Path, pipeline_sha: str | None, bids_dir: Path) -> dict:
    """``dataset_description.json`` of the derivative dataset (``GeneratedBy`` names the pipeline)."""
    from .. import __version__

    raw = bids_dir.resolve().as_uri()
    return {"Name": f"qsmkit: {name}", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "qsmkit", "Version": __version__,
                             "Description": f"QSM pipeline '{name}' ({source.name})",
                             "Pipeline": {"name": name, "file": str(source), "sha256": pipeline_sha}}],
            "SourceDatasets": [{"URL": raw}], "DatasetLinks": {"raw": raw}}


#: the derivative's ``.bidsignore``: BIDS has no suffix for a field map in ppm or an unwrapped
#: multi-echo phase in anat/, so those intermediates keep the source's suffix and are declared here
BIDSIGNORE = "".join(f"*_desc-*_{s}.nii.gz\n*_desc-*_{s}.json\n" for s in ("MEGRE", "T2starw", "GRE")) + "figures/\n"


def write_description(cohort: Cohort) -> None:
    from ..io.atomic import atomic_path
    from .provenance import sha256

    _write_if_changed(dataset_description(cohort.name, cohort.pipeline, sha256(cohort.pipeline), cohort.bids_dir),
                      cohort.out_dir / "dataset_description.json")
    ignore = cohort.out_dir / ".bidsignore"
    if not ignore.exists() or ignore.read_text() != BIDSIGNORE:
        with atomic_path(ignore) as tmp:
            tmp.write_text(BIDSIGNORE)


def _write_if_changed(obj: dict, path: Path) -> None:
    """Write a JSON sidecar atomically unless it already holds the same content."""
    from ..io import write_json

    try:
        if json.loads(path.read_text()) == json.loads(_canon(obj)):
            return
    except (OSError, ValueError):
        pass
    write_json(obj, path)


def export_run(cohort: Cohort, run: BidsRun) -> list[Path]:
    """Give a finished run's files their BIDS derivative names (hard links), with JSON sidecars."""
    run_dir = cohort.out_dir / WORK_DIR / "runs" / run.key
    rec = read_previous(run_dir)
    if rec is None:
        return []
    anat = cohort.out_dir / run.subject_dir
    anat.mkdir(parents=True, exist_ok=True)
    methods = _producers(rec)
    stages = [{k: s.get(k) for k in ("stage", "method", "params", "status")} for s in rec["stages"]]
    raw = [f"bids:raw:{Path(p).relative_to(cohort.bids_dir).as_posix()}" for p in run.phase + run.magnitude]
    written: list[Path] = []
    outputs = [str(n) for n in rec.get("outputs") or []]
    vols = sorted(n for n in outputs if n.endswith(".nii.gz"))
    # the Chimap last: its presence says the run's other derivative files are in place
    for fname in sorted(vols, key=lambda n: n == "chi.nii.gz"):
        art = fname[: -len(".nii.gz")]
        dst = anat / derivative_name(run, art)
        side = {"Units": ARTIFACT_UNITS.get(art, ""), "Description": f"qsmkit artifact '{art}'",
                "Sources": raw, "Pipeline": rec.get("pipeline", {}).get("name"),
                "Method": methods.get(art, ""), "Stages": stages,
                "QsmkitVersion": rec.get("qsmkit_version")}
        if art == "chi":
            side["Description"] = "magnetic susceptibility (chi), ppm, relative to the pipeline's reference"
        _write_if_changed(side, dst.with_name(dst.name[: -len(".nii.gz")] + ".json"))
        _link(run_dir / fname, dst)
        written.append(dst)
    keep = {p.name for p in written} | {p.name.replace(".nii.gz", ".json") for p in written}
    for f in _stale_exports(anat, run, keep):
        f.unlink(missing_ok=True)
    pngs = [n for n in outputs if n.endswith(".png")]
    if pngs:
        figs = cohort.out_dir / run.subject_dir.parent / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        for n in pngs:
            dst = figs / f"{run.label}_{n}"
            _link(run_dir / n, dst)
            written.append(dst)
    return written


def _producers(rec: Mapping[str, Any]) -> dict[str, str]:
    """Artifact -> the method of the stage that last wrote it in a run (for the derivative sidecars)."""
    from ..plugins import load_registry

    reg = load_registry()
    out: dict[str, str] = {}
    for s in rec["stages"]:
        try:
            cls = reg.get(s["stage"], s["method"])
        except (QsmkitError, KeyError, TypeError):
            continue
        for art in (*cls.writes, *cls.optional_writes):
            out[art] = s["method"]
    return out


def _exported(path: Path) -> bool:
    """Whether a derivative file (or its sidecar) was written by :func:`export_run`."""
    side = path if path.suffix == ".json" else path.with_name(path.name.split(".")[0] + ".json")
    try:
        return "QsmkitVersion" in json.loads(side.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _stale_exports(anat: Path, run: BidsRun, keep: set[str]) -> list[Path]:
    """Files of ``run`` that an earlier export wrote and this one does not (a stage removed, ...)."""
    from ..io.bids import parse_name

    stale = []
    for f in sorted(anat.glob(f"{run.label}_*")):
        parsed = parse_name(f.name)
        if parsed is None or f.name in keep:
            continue
        ents = {k: v for k, v in parsed[0].items() if k != "desc"}
        if ents == run.entities and _exported(f):
            stale.append(f)
    return stale


def retire_results(out: Path) -> None:
    """Remove what qsmkit wrote into a derivative folder (another pipeline's results, on --overwrite)."""
    ours = [f for f in sorted(out.glob("sub-*/**/*")) if f.is_file() and (
        f.suffix in (".json", ".gz", ".nii") and _exported(f) or f.parent.name == "figures" and "_qc_" in f.name)]
    for f in ours:  # decided before any sidecar goes
        f.unlink()
    for d in sorted({p for f in ours for p in f.parents if out in p.parents}, key=lambda p: -len(p.parts)):
        try:
            d.rmdir()  # folders left empty
        except OSError:
            pass
    shutil.rmtree(out / WORK_DIR / "runs", ignore_errors=True)


def clean_exports(out_dir: Path) -> None:
    """Remove temporary files an interrupted export left (hidden ``.qsmkit-tmp-*`` names)."""
    for tmp in out_dir.glob(f"sub-*/**/{_TMP}*"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the whole cohort
def write_summary(cohort: Cohort, outcomes: Sequence[Outcome]) -> Path:
    """``.qsmkit/summary.json``: every run's outcome of the last invocation (machine-readable table)."""
    from dataclasses import asdict

    from ..io import write_json

    path = cohort.out_dir / WORK_DIR / "summary.json"
    write_json({"pipeline": cohort.name, "bids_dir": str(cohort.bids_dir),
                "runs": [asdict(o) for o in sorted(outcomes, key=lambda o: o.key)]}, path)
    return path


def summary_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Lines of the end-of-cohort table: run, status, duration, error (or note)."""
    w = max([len(o.key) for o in outcomes] + [3])
    lines = [f"{'run':<{w}}  {'status':<7}  {'seconds':>8}  error / note"]
    for o in sorted(outcomes, key=lambda o: o.key):
        lines.append(f"{o.key:<{w}}  {o.status:<7}  {o.duration_s:>8.1f}  {o.error or o.note}")
    n_failed = sum(o.status == "failed" for o in outcomes)
    lines.append(f"{len(outcomes)} runs: {sum(o.status == 'done' for o in outcomes)} done, "
                 f"{sum(o.status == 'cached' for o in outcomes)} unchanged, {n_failed} failed")
    return lines


def run_cohort(cohort: Cohort, executor: str = "local", workers: int | None = None, scheduler: str | None = None,
               log: Callable[[str], None] = lambda m: None) -> list[Outcome]:
    """Run a prepared cohort's jobs, export every finished run, and return all outcomes."""
    import fcntl

    from ..executors import make_executor

    out = cohort.out_dir
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    lock = os.open(out / WORK_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"--output-dir {out} is in use by another qsmkit cohort run; wait for it to finish or "
                              f"choose another folder") from None
        if cohort.replace:  # another pipeline's results go as a whole, never mixed with ours
            retire_results(out)
            log(f"removed another pipeline's results from {out} (--overwrite)")
        clean_exports(out)
        write_description(cohort)
        by_key = {r.key: r for r in cohort.runs}
        outcomes = list(cohort.known)
        for o in cohort.known:
            if o.status == "cached":
                export_run(cohort, by_key[o.key])
            elif o.status == "failed":
                log(f"{o.key}: failed: {o.error}")
        total = len(cohort.runs)
        for note in cohort.notes:
            log(note)
        done = len(outcomes)

        def finished(o: Outcome) -> None:
            nonlocal done
            done += 1
            outcomes.append(o)
            if o.status == "done":
                export_run(cohort, by_key[o.key])
            msg = f"failed: {o.error}" if o.status == "failed" else f"done in {o.duration_s:.1f} s"
            log(f"[{done}/{total}] {o.key}: {msg}")

        try:
            if cohort.jobs:
                with make_executor(executor, workers, scheduler, log) as ex:
                    ex.run(cohort.jobs, finished)
        finally:
            write_summary(cohort, outcomes)
        return outcomes
    finally:
        os.close(lock)
