"""``qsmkit report DIR``: one HTML page for a cohort of runs, with their QC pictures and ROI means.

A *run folder* is a folder that a qsmkit run committed: it holds a ``provenance.json`` that qsmkit
wrote (see :mod:`qsmkit.pipeline.outputs`). The report finds every run folder at or below ``DIR``
(hidden folders such as staging folders are skipped), and a folder left with a commit journal but
no ``provenance.json`` (a run killed mid-commit) is listed as *incomplete*. In a cohort's derivative
dataset (``qsmkit run --bids``, :mod:`qsmkit.pipeline.cohort`) the run folders are
``.qsmkit/runs/<key>/`` and ``.qsmkit/summary.json`` holds the last invocation's outcomes: the
report takes each run's status and error line from it, and lists the runs that failed before
writing anything. For each run it shows:

* its folder, pipeline, status (``finished``, or the ``status`` the provenance records), start
  time, duration and the stage methods, from ``provenance.json``;
* χ against the simulator's truth (NRMSE, XSIM), when the run wrote a ``metrics.json``;
* its QC pictures (:mod:`qsmkit.qc`), each a link to the full-size PNG.

ROI means of χ (ppm) form a second table, one row per run, from the first source that applies:

1. ``--labels FILE``: a label map on the runs' grid; the means are over each label within the run's
   ``mask.nii.gz`` (when present). Names come from a BIDS ``dseg.tsv``-style table next to it
   (``<labels>.tsv`` or ``dseg.tsv`` with columns ``index`` and ``name``), else from the simulator's
   :data:`qsmkit.simulate.LABELS` when a ``phantom.json`` sits beside it (a ``qsmkit simulate``
   folder), else ``label_<n>``;
2. a ``labels.nii.gz`` in the run folder (the simulator's ``labels`` artifact), named as above;
3. the ``roi_means`` of ``metrics.json``, which a run on the simulated phantom computes with the
   phantom's truth labels (χ demeaned over the mask, as every truth metric).

The page is written atomically (``report.html`` in ``DIR`` by default; beside ``DIR`` as
``<DIR>-report.html`` when ``DIR`` is itself a run folder, so the next run into it does not find
a file it did not write). Pictures are linked by relative paths, so the folder can be moved or
copied with its report.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeometryError, InputDataError, OutputError
from .io.atomic import atomic_path
from .qc import QC_FILES

__all__ = ["RunInfo", "find_runs", "roi_table", "write_report"]

REPORT_NAME = "report.html"
#: marks a page this module wrote (an existing page without it is not replaced without --overwrite)
GENERATOR = "qsmkit report"
_JOURNAL = ".qsmkit-commit.json"
#: a cohort's work folder (runs in ``.qsmkit/runs/<key>/``, outcomes in ``.qsmkit/summary.json``)
COHORT_DIR = ".qsmkit"
#: at most this many folder levels below DIR are searched (a BIDS derivatives tree is 3-4 deep)
MAX_DEPTH = 8


@dataclass
class RunInfo:
    """One run folder as the report shows it."""

    path: Path
    rel: str
    status: str
    pipeline: str = ""
    started: str = ""
    duration_s: float | None = None
    stages: list[str] = field(default_factory=list)
    error: str = ""
    pictures: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    roi: dict[str, float] = field(default_factory=dict)
    roi_source: str = ""


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_run_record(data: dict | None) -> bool:
    return bool(data) and "qsmkit_version" in data and isinstance(data.get("outputs"), list)


def _rel(folder: Path, root: Path) -> str:
    """How the page names a run: its folder below DIR (a cohort's ``.qsmkit/runs/<key>`` as ``<key>``)."""
    rel = Path(os.path.relpath(folder, root)).as_posix()
    head = f"{COHORT_DIR}/runs/"
    if rel.startswith(head):
        return rel[len(head):]
    if f"/{head}" in rel:  # DIR above the derivative dataset
        before, after = rel.split(f"/{head}", 1)
        return f"{before}/{after}"
    return rel


def _run_info(folder: Path, root: Path, prov: dict | None) -> RunInfo:
    rel = _rel(folder, root)
    if prov is None:
        return RunInfo(folder, rel, "incomplete", error="interrupted during its commit (a journal, no "
                                                         "provenance.json); rerun it to finish")
    stages = [f"{s.get('stage')}/{s.get('method')}" + ("" if s.get("status", "ran") == "ran" else " (skipped)")
              for s in prov.get("stages") or [] if isinstance(s, dict)]
    outputs = set(prov.get("outputs") or [])
    info = RunInfo(folder, rel, str(prov.get("status") or "finished"),
                   pipeline=str((prov.get("pipeline") or {}).get("name") or ""),
                   started=str(prov.get("started") or ""), duration_s=prov.get("duration_s"), stages=stages,
                   error=str(prov.get("error") or ""),
                   pictures=[n for n in QC_FILES if n in outputs and (folder / n).is_file()])
    metrics = _read_json(folder / "metrics.json") if "metrics.json" in outputs else None
    info.metrics = metrics or {}
    return info


def _merge_summary(runs: list[RunInfo], path: Path, root: Path) -> None:
    """A cohort's last outcomes (``.qsmkit/summary.json``, :mod:`qsmkit.pipeline.cohort`): the status
    and error line of each run, and the runs that failed before writing anything."""
    data = _read_json(path)
    outcomes = data.get("runs") if data else None
    if not isinstance(outcomes, list):
        return
    folders = {r.path.resolve(): r for r in runs}
    for o in outcomes:
        if not isinstance(o, dict) or not isinstance(o.get("key"), str):
            continue
        folder = path.parent / "runs" / o["key"]
        run = folders.get(folder.resolve())
        status, error = str(o.get("status") or ""), str(o.get("error") or "")
        if run is None:
            run = RunInfo(folder, _rel(folder, root), status or "failed",
                          duration_s=o.get("duration_s"), error=error)
            runs.append(run)
            continue
        if status == "failed" and run.status != "incomplete":
            run.status, run.error = "failed", error + " (the pictures are of the previous, complete run)"
        elif status and run.status != "incomplete":
            run.status = {"done": "finished", "cached": "finished (unchanged)"}.get(status, status)


def find_runs(root: str | Path) -> list[RunInfo]:
    """Every run folder at or below ``root`` (see the module docstring), sorted by relative path.

    Raises :class:`~qsmkit.errors.InputDataError` for a missing folder, a file, or a folder without runs.
    """
    root = Path(root)
    if not root.exists():
        raise InputDataError(f"report: {root} does not exist; give the folder that holds the run folders "
                             f"(the --output-dir of qsmkit run)")
    if not root.is_dir():
        raise InputDataError(f"report: {root} is a file; give the folder that holds the run folders")
    runs: list[RunInfo] = []
    summaries: list[Path] = []
    base_depth = len(root.resolve().parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (not d.startswith(".") or d == COHORT_DIR)
                             and len(here.resolve().parts) - base_depth < MAX_DEPTH)
        files = set(filenames)
        prov = _read_json(here / "provenance.json") if "provenance.json" in files else None
        if _is_run_record(prov) and _JOURNAL not in files:
            runs.append(_run_info(here, root, prov))
        elif _JOURNAL in files:
            runs.append(_run_info(here, root, None))
        if here.name == COHORT_DIR and "summary.json" in files:
            summaries.append(here / "summary.json")
    for path in summaries:
        _merge_summary(runs, path, root)
    if not runs:
        raise InputDataError(f"report: no qsmkit run folders (with provenance.json) at or below {root}; run a "
                             f"pipeline with --output-dir inside it first")
    return sorted(runs, key=lambda r: r.rel)


# --------------------------------------------------------------------------- ROI means
def _label_names(labels_path: Path) -> dict[int, str] | None:
    """Names of a label map: a dseg-style TSV beside it, the simulator's names, or None (label_<n>)."""
    stem = labels_path.name.split(".")[0]
    for tsv in (labels_path.with_name(f"{stem}.tsv"), labels_path.with_name("dseg.tsv")):
        if tsv.is_file():
            names: dict[int, str] = {}
            lines = tsv.read_text(encoding="utf-8").splitlines()
            head = [h.strip().lower() for h in lines[0].split("\t")] if lines else []
            if "index" in head and "name" in head:
                i, n = head.index("index"), head.index("name")
                for line in lines[1:]:
                    cells = line.split("\t")
                    if len(cells) > max(i, n) and cells[i].strip().lstrip("-").isdigit():
                        names[int(cells[i])] = cells[n].strip()
                return names
    if (labels_path.parent / "phantom.json").is_file():
        from .simulate import LABELS

        return dict(LABELS)
    return None


def _roi_from_map(run: RunInfo, labels_path: Path, lab_cache: dict) -> None:
    from .io import load_nifti
    from .metrics import roi_means

    if labels_path not in lab_cache:
        vol = load_nifti(labels_path, "labels")
        names = _label_names(labels_path)
        lab_cache[labels_path] = (vol, names if names is not None else {})
    lab, names = lab_cache[labels_path]
    chi_path = run.path / "chi.nii.gz"
    if not chi_path.is_file():
        return
    chi = load_nifti(chi_path, f"{run.rel}/chi.nii.gz")
    if chi.grid_shape != lab.grid_shape or not np.allclose(chi.affine, lab.affine, atol=1e-3):
        raise GeometryError(f"report: the label map {labels_path} (grid {lab.grid_shape}) is not on the grid of "
                            f"{chi_path} ({chi.grid_shape}); give a label map in the runs' space")
    mask = None
    if (run.path / "mask.nii.gz").is_file():
        m = load_nifti(run.path / "mask.nii.gz", f"{run.rel}/mask.nii.gz")
        if m.grid_shape == chi.grid_shape:
            mask = np.asarray(m.data).reshape(m.grid_shape) > 0.5
    data = np.asarray(lab.data).reshape(lab.grid_shape)
    run.roi = roi_means(np.asarray(chi.data).reshape(chi.grid_shape), data,
                        {**{int(k): f"label_{int(k)}" for k in np.unique(np.rint(data))}, **names}, mask=mask)
    run.roi_source = (f"{os.path.basename(labels_path)}, within the run's mask" if mask is not None
                      else os.path.basename(labels_path))


def roi_table(runs: list[RunInfo], labels: str | Path | None = None) -> list[str]:
    """Fill each run's ROI means (see the module docstring); returns the label names, in first-seen order."""
    cache: dict = {}
    given = Path(labels) if labels is not None else None
    if given is not None and not given.is_file():
        raise InputDataError(f"report: --labels {given} is not a file; give a label map NIfTI (integer labels)")
    for run in runs:
        if run.status == "incomplete":
            continue
        if given is not None:
            _roi_from_map(run, given, cache)
        elif (run.path / "labels.nii.gz").is_file():
            _roi_from_map(run, run.path / "labels.nii.gz", cache)
        else:
            rm = (run.metrics.get("chi") or {}).get("roi_means") if isinstance(run.metrics.get("chi"), dict) else None
            est = rm.get("estimate") if isinstance(rm, dict) else None
            if isinstance(est, dict) and est:
                run.roi = {str(k): float(v) for k, v in est.items()}
                run.roi_source = "metrics.json (simulator's labels, demeaned over the mask)"
    order: list[str] = []
    for run in runs:
        order += [k for k in run.roi if k not in order]
    return order


# --------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.failed,.incomplete{color:#a00;font-weight:bold}.run{margin:1.5em 0;border-top:1px solid #ddd;padding-top:.5em}
.run img{max-width:32%;margin-right:1%;border:1px solid #ddd}code{font-size:90%}"""


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return f"{v:.{digits}f}"
    return ""


def _link(report_dir: Path, target: Path) -> str:
    return html.escape(Path(os.path.relpath(target, report_dir)).as_posix(), quote=True)


def render(runs: list[RunInfo], labels: list[str], root: Path, report_path: Path) -> str:
    """The HTML page (a string) for ``runs``, with links relative to ``report_path``'s folder."""
    e = html.escape
    rdir = report_path.parent
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta name="generator" content="{GENERATOR}">',
           f"<title>qsmkit report: {e(root.name or str(root))}</title><style>{_CSS}</style></head><body>",
           f"<h1>qsmkit report: {e(str(root))}</h1>",
           f"<p>{len(runs)} run(s): {e(summary)}. Written {e(now)}. χ pictures use a fixed window of −0.1 … 0.2 "
           f"ppm; local-field pictures a symmetric window of ± the 99th percentile of |field| in the mask; the "
           f"red line is the mask outline over the first echo's magnitude.</p>",
           "<h2>Runs</h2><table><tr><th>run</th><th>pipeline</th><th>status</th><th>started</th>"
           "<th>duration (s)</th><th>stages</th><th>χ NRMSE (%)</th><th>χ XSIM</th><th>pictures</th></tr>"]
    for r in runs:
        chi = r.metrics.get("chi") if isinstance(r.metrics.get("chi"), dict) else {}
        pics = " ".join(f'<a href="{_link(rdir, r.path / p)}">{e(p[3:-4])}</a>' for p in r.pictures)
        status = e(r.status) + (f"<br><small>{e(r.error)}</small>" if r.error else "")
        out.append(f'<tr><td><a href="#run-{e(r.rel, quote=True)}">{e(r.rel)}</a></td><td>{e(r.pipeline)}</td>'
                   f'<td class="{e(r.status, quote=True)}">{status}</td><td>{e(r.started)}</td>'
                   f'<td class="num">{_fmt(r.duration_s, 1)}</td><td>{e(" → ".join(r.stages))}</td>'
                   f'<td class="num">{_fmt(chi.get("nrmse"), 1)}</td><td class="num">{_fmt(chi.get("xsim"))}</td>'
                   f"<td>{pics}</td></tr>")
    out.append("</table>")
    if labels:
        out.append("<h2>ROI means of χ (ppm)</h2><table><tr><th>run</th>"
                   + "".join(f"<th>{e(n)}</th>" for n in labels) + "<th>source</th></tr>")
        for r in runs:
            if r.roi:
                out.append(f"<tr><td>{e(r.rel)}</td>" + "".join(f'<td class="num">{_fmt(r.roi.get(n), 4)}</td>'
                                                              for n in labels)
                           + f"<td>{e(r.roi_source)}</td></tr>")
        out.append("</table>")
    out.append("<h2>Pictures</h2>")
    for r in runs:
        out.append(f'<div class="run" id="run-{e(r.rel, quote=True)}"><h3>{e(r.rel)}</h3>')
        if not r.pictures:
            out.append("<p>no QC pictures (the run had qc: false, or it did not finish)</p>")
        for p in r.pictures:
            src = _link(rdir, r.path / p)
            out.append(f'<a href="{src}"><img src="{src}" alt="{e(r.rel)} {e(p)}" loading="lazy"></a>')
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def default_report_path(root: Path) -> Path:
    """``DIR/report.html``, or ``<DIR>-report.html`` beside ``DIR`` when ``DIR`` is itself a run folder."""
    if _is_run_record(_read_json(root / "provenance.json")):
        return root.parent / f"{root.resolve().name}-report.html"
    return root / REPORT_NAME


def write_report(root: str | Path, output: str | Path | None = None, labels: str | Path | None = None,
                 overwrite: bool = False) -> tuple[Path, list[RunInfo]]:
    """Find the runs below ``root``, compute the ROI table and write the HTML page atomically.

    Returns (the page's path, the runs). An existing page that qsmkit did not write is refused
    unless ``overwrite``.
    """
    root = Path(root)
    runs = find_runs(root)
    names = roi_table(runs, labels)
    path = Path(output) if output is not None else default_report_path(root)
    if path.is_dir():
        raise OutputError(f"report: {path} is a folder; give the HTML file to write (e.g. {path / REPORT_NAME})")
    if path.exists() and not overwrite:
        try:
            ours = f'content="{GENERATOR}"' in path.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError:
            ours = False
        if not ours:
            raise OutputError(f"report: {path} exists and qsmkit did not write it; choose another --output or pass "
                              f"--overwrite")
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(render(runs, names, root, path), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"report: cannot write {path} ({exc.strerror or exc}); choose a folder you can write "
                          f"to with --output") from None
    return path, runs


def describe(runs: list[RunInfo]) -> list[str]:
    """One line per run for the terminal: folder, status, duration."""
    lines = []
    for r in runs:
        dur = f"{r.duration_s:.1f} s" if isinstance(r.duration_s, (int, float)) else "-"
        lines.append(f"  {r.rel}: {r.status}, {dur}, {len(r.pictures)} QC picture(s)"
                     + (f"; {r.error}" if r.error else ""))
    return lines

