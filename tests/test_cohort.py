"""Cohorts (``qsmkit run --bids``): executors, failure isolation, caching and resume, SIGKILL safety.

One small BIDS dataset (3 simulated subjects, 40^3 at 3 mm, 3 echoes; sub-03's second phase echo
is corrupt) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsmkit.cli import main

PIPELINE = """\
name: fast
qc: false
inputs: {simulate: {}}
stages:
  - {stage: mask, method: threshold}
  - {stage: unwrap, method: laplacian}
  - {stage: echo_combine, method: weighted_fit}
  - {stage: background, method: vsharp}
  - {stage: inversion, method: tkd, params: {threshold: 0.15}}
  - {stage: reference, method: mean}
output_dir: unused
"""
GOOD = ("sub-01", "sub-02")


def write_bids(root: Path, n: int = 3, corrupt: str | None = "sub-03") -> Path:
    """A BIDS dataset of ``n`` simulated subjects (per-echo files, field strength inherited from the root)."""
    from qsmkit.io import save_nifti
    from qsmkit.simulate import simulate_phantom

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "cohort test", "BIDSVersion": "1.10.0"}')
    (root / "MEGRE.json").write_text('{"MagneticFieldStrength": 3.0}')
    for i in range(n):
        sub = f"sub-{i + 1:02d}"
        ph = simulate_phantom(shape=(40, 40, 40), voxel_size=(3.0, 3.0, 3.0), echo_times=(0.004, 0.008, 0.012),
                              snr=100, seed=i)
        anat = root / sub / "anat"
        anat.mkdir(parents=True)
        for e, te in enumerate(ph.echo_times):
            for part, vol in (("mag", ph.magnitude), ("phase", ph.phase)):
                stem = f"{sub}_echo-{e + 1}_part-{part}_MEGRE"
                save_nifti(vol.like(vol.data[..., e]), anat / f"{stem}.nii.gz")
                side = {"EchoTime": float(te), **({"Units": "rad"} if part == "phase" else {})}
                (anat / f"{stem}.json").write_text(json.dumps(side))
    if corrupt:
        (root / corrupt / "anat" / f"{corrupt}_echo-2_part-phase_MEGRE.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    return root


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The dataset, the pipeline, and one finished local-executor run of it (2 workers)."""
    base = tmp_path_factory.mktemp("cohort")
    bids = write_bids(base / "bids")
    pipe = base / "fast.yaml"
    pipe.write_text(PIPELINE)
    out = base / "local"
    proc = _qsmkit("run", pipe, "--bids", bids, "--output-dir", out, "--workers", "2")
    return {"base": base, "bids": bids, "pipe": pipe, "out": out, "first": proc, "files": _files(out)}


class Result:
    """What one ``qsmkit`` command line gave: exit status, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _qsmkit(*args) -> Result:
    """``qsmkit ARGS`` in this process (the runs still go to worker processes), output captured."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return Result(rc, out.getvalue(), err.getvalue())


def _files(out: Path) -> dict[str, bytes]:
    """The derivative dataset's files (hidden work folders excluded), by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(out).parts)}


def _prov(out: Path, sub: str) -> dict:
    return json.loads((out / ".qsmkit" / "runs" / f"{sub}_MEGRE" / "provenance.json").read_text())


def _check_result(proc, out: Path) -> None:
    from test_bids import check_derivative_layout

    assert proc.returncode == 1, proc.stderr  # one run failed
    table = proc.stdout
    assert "sub-01_MEGRE  done" in table and "sub-02_MEGRE  done" in table
    failed = [ln for ln in table.splitlines() if ln.startswith("sub-03_MEGRE")]
    assert len(failed) == 1 and "failed" in failed[0] and "sub-03_echo-2_part-phase_MEGRE.nii.gz is not a " \
        "readable NIfTI file" in failed[0]
    assert "3 runs: 2 done, 0 unchanged, 1 failed" in table
    assert "Traceback" not in proc.stderr
    assert check_derivative_layout(out) == [f"{s}/anat/{s}_Chimap.nii.gz" for s in GOOD]
    assert not (out / "sub-03").exists()


def test_local_executor_isolates_a_corrupt_subject(cohort):
    """Acceptance 1 (local process pool): 2 Chimaps, a clear failure line, exit status 1."""
    _check_result(cohort["first"], cohort["out"])
    import nibabel as nib

    chi = np.asarray(nib.load(cohort["out"] / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").dataobj)
    mask = np.asarray(nib.load(cohort["out"] / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    assert mask.sum() > 1000 and np.abs(chi[mask]).max() > 0.01  # a susceptibility map, not zeros
    side = json.loads((cohort["out"] / "sub-01" / "anat" / "sub-01_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["Method"] == "mean" and side["Pipeline"] == "fast"
    assert [s["method"] for s in side["Stages"]] == ["threshold", "laplacian", "weighted_fit", "vsharp", "tkd", "mean"]


def test_dask_localcluster_gives_the_same_outputs(cohort):
    """Acceptance 1 (Dask LocalCluster on 127.0.0.1): the same outputs, bit for bit, as the local pool."""
    pytest.importorskip("distributed")
    out = cohort["base"] / "dask"
    proc = _qsmkit("run", cohort["pipe"], "--bids", cohort["bids"], "--output-dir", out, "--executor", "dask",
                   "--workers", "1")
    assert "LocalCluster on 127.0.0.1" in proc.stderr
    _check_result(proc, out)
    ref = _files(cohort["out"])
    got = _files(out)
    assert sorted(got) == sorted(ref)
    for name in got:
        if name.endswith(".nii.gz"):
            assert got[name] == ref[name], name


def test_rerun_recomputes_nothing_and_a_changed_parameter_only_its_stage(cohort, tmp_path):
    """Acceptance 2: the same command again runs no stage; a new TKD threshold reruns TKD and later only."""
    out, sub = cohort["out"], "sub-01"
    prov_file = out / ".qsmkit" / "runs" / f"{sub}_MEGRE" / "provenance.json"
    before = prov_file.read_bytes(), prov_file.stat().st_mtime_ns
    files_before = _files(out)
    mtimes = {out / k: (out / k).stat().st_mtime_ns for k in files_before}
    proc = _qsmkit("run", cohort["pipe"], "--bids", cohort["bids"], "--output-dir", out, "--workers", "2")
    assert proc.returncode == 1  # sub-03 is still corrupt and is tried again
    assert "0 to run, 2 unchanged, 1 invalid" in proc.stderr
    assert "sub-01_MEGRE  cached" in proc.stdout and "sub-02_MEGRE  cached" in proc.stdout
    assert (prov_file.read_bytes(), prov_file.stat().st_mtime_ns) == before  # no run, no new record
    assert _files(out) == files_before
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in mtimes)  # nothing rewritten, not even a sidecar

    args = ("--bids", cohort["bids"], "--participant-label", "01", "--set", "stages.4.params.threshold=0.25")
    proc = _qsmkit("run", cohort["pipe"], *args, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "stage 4 (inversion/tkd) changed: rerun from it" in proc.stderr
    stages = _prov(out, sub)["stages"]
    assert [s["status"] for s in stages] == ["skipped"] * 4 + ["ran"] * 2
    assert all("cached" in s["reason"] for s in stages[:4])
    # the resumed result is the one a fresh run with the new parameter computes
    fresh = tmp_path / "fresh"
    proc = _qsmkit("run", cohort["pipe"], *args, "--output-dir", fresh)
    assert proc.returncode == 0, proc.stderr
    assert [s["status"] for s in _prov(fresh, sub)["stages"]] == ["ran"] * 6
    new, ref = _files(out), _files(fresh)
    assert new[f"{sub}/anat/{sub}_Chimap.nii.gz"] == ref[f"{sub}/anat/{sub}_Chimap.nii.gz"]
    assert new[f"{sub}/anat/{sub}_Chimap.nii.gz"] != files_before[f"{sub}/anat/{sub}_Chimap.nii.gz"]
    for name in ref:  # every cached intermediate is still exported, unchanged
        if name.endswith(".nii.gz") and "Chimap" not in name:
            assert new[name] == files_before[name] == ref[name], name


def test_sigkill_then_rerun_matches_an_uninterrupted_run(cohort):
    """Acceptance 3: SIGKILL to the whole process group mid-cohort, rerun: the same files as an uninterrupted run."""
    out = cohort["base"] / "killed"
    cmd = [sys.executable, "-m", "qsmkit.cli", "run", str(cohort["pipe"]), "--bids", str(cohort["bids"]),
           "--output-dir", str(out), "--workers", "1", "--participant-label", "01,02"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / ".qsmkit" / "runs" / "sub-01_MEGRE" / "provenance.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, wherever they are
    proc.wait()
    assert first.exists(), "the first run never finished"
    import nibabel as nib

    for name in _files(out):  # whatever the kill left under BIDS names is complete
        path = out / name
        if name.endswith(".nii.gz"):
            data = np.asarray(nib.load(path).dataobj)  # reads every voxel: a truncated file fails here
            assert data.shape[:3] == (40, 40, 40) and data.size in (40 ** 3, 3 * 40 ** 3), name  # 3D, or 3 echoes
        elif name.endswith(".json"):
            json.loads(path.read_text())

    rerun = _qsmkit(*cmd[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert _files(out) == cohort["files"]  # the uninterrupted run's files (sub-03 never had any)
    hidden = [p for p in out.rglob(".*") if p.name not in (".qsmkit", ".bidsignore")]
    assert not [p for p in hidden if "staging" in p.name or "tmp" in p.name or "commit" in p.name]


def test_another_pipelines_results_are_refused(cohort, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(PIPELINE.replace("name: fast", "name: other"))
    proc = _qsmkit("run", other, "--bids", cohort["bids"], "--output-dir", cohort["out"], "--participant-label", "01")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output-dir ")
    assert "holds the results of pipeline 'fast'" in proc.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = _qsmkit("run", other, "--bids", cohort["bids"], "--output-dir", foreign)
    assert proc.returncode == 2 and "holds files qsmkit did not write" in proc.stderr
    proc = _qsmkit("run", other, "--bids", cohort["bids"], "--output-dir", cohort["bids"])
    assert proc.returncode == 2 and "would write over the BIDS dataset" in proc.stderr


def test_overwrite_replaces_another_pipelines_results_as_a_whole(cohort, tmp_path):
    out = tmp_path / "deriv"
    shutil.copytree(cohort["out"], out)
    other = tmp_path / "other.yaml"
    other.write_text(PIPELINE.replace("name: fast", "name: other"))
    proc = _qsmkit("run", other, "--bids", cohort["bids"], "--output-dir", out, "--participant-label", "02",
                   "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "removed another pipeline's results" in proc.stderr
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Pipeline"]["name"] == "other"
    # sub-01 was 'fast''s and is not part of this run: gone, not left beside 'other''s sub-02
    assert sorted(_files(out)) == ["dataset_description.json"] + sorted(
        k for k in cohort["files"] if k.startswith("sub-02/"))
    assert json.loads((out / "sub-02" / "anat" / "sub-02_Chimap.json").read_text())["Pipeline"] == "other"


@pytest.mark.parametrize("args, message", [
    (["--workers", "2"], "error: --workers needs --bids BIDS_DIR"),
    (["--bids", "{missing}"], "not a folder; give the BIDS dataset's root folder"),
    (["--bids", "{bids}", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --executor dask"),
    (["--bids", "{bids}", "--participant-label", "42"], "no multi-echo GRE runs matching participant 42"),
])
def test_cli_errors_are_one_line(cohort, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "nope", bids=cohort["bids"]) for a in args]
    rc = main(["run", str(cohort["pipe"]), *args, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_memory_estimate_and_worker_fit(cohort):
    from qsmkit.executors import fit_workers, run_peak_bytes
    from qsmkit.pipeline.cohort import prepare_cohort
    from qsmkit.plugins import load_registry

    reg = load_registry()
    c = prepare_cohort(cohort["pipe"], cohort["bids"], reg, cohort["base"] / "est")
    (job,) = [j for j in c.jobs if j.key == "sub-01_MEGRE"]
    assert [o.key for o in c.known if o.status == "failed"] == ["sub-03_MEGRE"]  # failed at validation
    from qsmkit.pipeline.plan import build_plan

    plan = build_plan(job.spec, reg, cohort["pipe"])
    est = run_peak_bytes(plan)
    assert est == job.estimate_bytes and est > 40 ** 3 * 3 * 4
    assert fit_workers(8, [est], 3 * est + 1) == 3 and fit_workers(8, [est], est // 2) == 1
    assert fit_workers(2, [est], None) == 2


def _crash_on_boom(job):
    """A stand-in for run_job (runs in a worker process): the job named 'boom' kills its worker."""
    from qsmkit.pipeline.cohort import Outcome

    if job.key == "boom":
        os._exit(9)
    return Outcome(job.key, "done", note=str(os.getpid()))


def test_a_dead_worker_fails_only_its_run():
    from qsmkit.executors import LocalExecutor
    from qsmkit.pipeline.cohort import Job

    jobs = [Job(k, {}, "", [], False, "", "", "") for k in ("a", "boom", "c")]
    got = []
    LocalExecutor(1, log=lambda m: None).run(jobs, got.append, fn=_crash_on_boom)
    status = {o.key: (o.status, o.error) for o in got}
    assert status["a"] == ("done", "") and status["c"] == ("done", "")
    assert status["boom"][0] == "failed" and "worker process died" in status["boom"][1]
    assert got[0].note != got[-1].note  # the pool was started again after the crash


@pytest.mark.parametrize("override, start, cached", [
    ("stages.4.params.threshold=0.3", 4, {"mask", "unwrapped_phase", "total_field", "noise_weight", "local_field"}),
    # the reference stage rewrites chi in place: the cached chi is already referenced, so TKD reruns too
    ("stages.5.params.statistic=median", 4, {"mask", "unwrapped_phase", "total_field", "noise_weight",
                                             "local_field"}),
    # V-SHARP rewrites the mask in place: only its final (eroded) state is cached, so nothing before it is reused
    ("stages.3.params.radii_mm=[6.0, 3.0]", 0, set()),
    ("stages.0.params.threshold=0.2", 0, set()),
])
def test_resume_point(cohort, override, start, cached):
    """Which stage a rerun starts from, and which cached outputs it is given (no run needed)."""
    from qsmkit.pipeline.cohort import prepare_cohort
    from qsmkit.plugins import load_registry

    c = prepare_cohort(cohort["pipe"], cohort["bids"], load_registry(), cohort["out"], overrides=[override],
                       participant_label=["02"])
    (job,) = c.jobs
    assert job.resume_from == start and set(job.cached) == cached
