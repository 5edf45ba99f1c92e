"""Never lose or mix a user's data (issue 16): output folders, reruns, inputs, interruption.

Each test asserts the one-line message, the exit status and the exact set of files in the output
folder afterwards; where a user's files pre-exist, that not one byte of them changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import oblique_affine, run_cli, write_nifti

SHAPE = (16, 16, 12)
AFFINE = oblique_affine((1.0, 1.0, 1.5), 10.0)
TE = [0.004, 0.008, 0.012]


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (relative path -> hash)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def one_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "lf.nii.gz", rng.normal(0, 0.01, SHAPE).astype(np.float32), AFFINE)
    write_nifti(tmp_path / "mask.nii.gz", np.ones(SHAPE, np.uint8), AFFINE)
    return tmp_path


def tkd_pipeline(folder: Path, out: str = "out", stages: str = "  - {stage: inversion, method: tkd}\n",
                 inputs: str = "local_field: lf.nii.gz, mask: mask.nii.gz", name: str = "t") -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(f"name: {name}\nqc: false\ninputs: {{{inputs}}}\nstages:\n{stages}output_dir: {out}\n")  # exact file lists
    return p


# --------------------------------------------------------------------------- output folder
def test_refuses_folder_with_foreign_files_and_keeps_them(data, capsys):
    """-o at a data folder (e.g. from qsmkit simulate) must not replace its chi.nii.gz."""
    sim = data / "sim"
    assert run_cli(["simulate", sim, "--shape", "16,16,12"], capsys)[0] == 0
    before = digest(sim)
    code, _, err = run_cli(["run", tkd_pipeline(data), "-o", sim], capsys)
    assert code == 2
    msg = one_error(err)
    assert "holds files qsmkit did not write" in msg and "--overwrite" in msg and "chi.nii.gz" in msg
    assert digest(sim) == before


def test_overwrite_replaces_same_named_files_and_keeps_others(data, capsys):
    out = data / "out"
    out.mkdir()
    (out / "chi.nii.gz").write_bytes(b"user data")
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["run", tkd_pipeline(data), "--overwrite"], capsys)
    assert code == 0, err
    assert names(out) == ["chi.nii.gz", "notes.txt", "provenance.json"]
    assert (out / "notes.txt").read_text() == "keep me"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["outputs"] == ["chi.nii.gz", "provenance.json"] and prov["other_files"] == ["notes.txt"]
    assert nib.load(str(out / "chi.nii.gz")).shape == SHAPE


def test_rerun_replaces_previous_outputs_as_a_set(data, capsys):
    """A rerun that writes fewer artifacts removes the previous run's others (no stale metrics)."""
    two = "  - {stage: inversion, method: tkd}\n  - {stage: reference, method: mean}\n"
    p = tkd_pipeline(data, stages="  - {stage: background, method: vsharp}\n" + two,
                     inputs="total_field: lf.nii.gz, mask: mask.nii.gz")
    assert run_cli(["run", p], capsys)[0] == 0
    first = names(data / "out")
    assert "local_field.nii.gz" in first
    p.write_text(p.read_text().replace("total_field: lf.nii.gz", "local_field: lf.nii.gz")
                 .replace("  - {stage: background, method: vsharp}\n", ""))
    code, _, err = run_cli(["run", p], capsys)
    assert code == 0, err
    after = names(data / "out")
    assert after == ["chi.nii.gz", "provenance.json"]
    prov = json.loads((data / "out" / "provenance.json").read_text())
    assert sorted(prov["outputs"]) == after and prov["other_files"] == []


def test_rerun_drops_stale_metrics(tmp_path, capsys):
    """A simulated run writes metrics.json; the same pipeline on files must not leave it behind."""
    p = tmp_path / "q.yaml"
    p.write_text("name: q\ninputs: {simulate: {shape: [24, 24, 20], voxel_size: [2, 2, 2]}}\n"
                 "stages:\n  - {stage: mask, method: threshold}\n  - {stage: unwrap, method: laplacian}\n"
                 "  - {stage: echo_combine, method: weighted_fit}\n  - {stage: background, method: vsharp}\n"
                 "  - {stage: inversion, method: tkd}\noutput_dir: out\n")
    assert run_cli(["run", p], capsys)[0] == 0
    assert "metrics.json" in names(tmp_path / "out")
    sim = tmp_path / "sim"
    assert run_cli(["simulate", sim, "--shape", "24,24,20", "--voxel-size", "2,2,2"], capsys)[0] == 0
    p.write_text(f"name: q\ninputs: {{local_field: {sim}/local_field.nii.gz, mask: {sim}/mask.nii.gz}}\n"
                 "stages:\n  - {stage: inversion, method: tkd}\noutput_dir: out\n")
    code, _, err = run_cli(["run", p], capsys)
    assert code == 0, err
    assert names(tmp_path / "out") == ["chi.nii.gz", "provenance.json", "qc_chi.png"]  # stale QC pictures gone too


def test_other_pipeline_outputs_are_refused(data, capsys):
    assert run_cli(["run", tkd_pipeline(data, name="a")], capsys)[0] == 0
    before = digest(data / "out")
    code, _, err = run_cli(["run", tkd_pipeline(data, name="b")], capsys)
    assert code == 2 and "the outputs of another pipeline's run" in one_error(err)
    assert digest(data / "out") == before


def test_previous_output_used_as_input_is_never_removed(data, capsys):
    p = tkd_pipeline(data, stages="  - {stage: background, method: vsharp}\n  - {stage: inversion, method: tkd}\n",
                     inputs="total_field: lf.nii.gz, mask: mask.nii.gz")
    assert run_cli(["run", p], capsys)[0] == 0
    p.write_text(p.read_text().replace("total_field: lf.nii.gz", "local_field: out/local_field.nii.gz")
                 .replace("  - {stage: background, method: vsharp}\n", ""))
    before = digest(data / "out")
    code, _, err = run_cli(["run", p, "--overwrite"], capsys)
    assert code == 2 and "which this run reads as input" in one_error(err)
    assert digest(data / "out") == before


def test_output_below_a_file_is_refused_before_running(data, capsys):
    (data / "afile").write_text("x")
    code, _, err = run_cli(["validate", tkd_pipeline(data, out="afile/sub")], capsys)
    assert code == 2 and "is below" in one_error(err) and "which is a file" in err
    code, _, err = run_cli(["run", tkd_pipeline(data), "-o", data / "afile"], capsys)
    assert code == 2 and "is a file; give a folder" in one_error(err)
    assert (data / "afile").read_text() == "x"


def test_unwritable_output_is_refused_before_running(data, capsys):
    # root may write anywhere that os.access allows; a folder in /proc cannot be created by anyone
    code, _, err = run_cli(["validate", tkd_pipeline(data), "-o", "/proc/qsmkit-test-out"], capsys)
    assert code == 2 and "output_dir /proc/qsmkit-test-out" in one_error(err)


def test_concurrent_run_is_refused(data, capsys):
    out = data / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running qsmkit holds
        code, _, err = run_cli(["run", tkd_pipeline(data)], capsys)
    finally:
        os.close(fd)
    assert code == 2 and "in use by another qsmkit run" in one_error(err)
    assert names(out) == []


def test_failed_run_leaves_no_folder(data, capsys):
    p = tkd_pipeline(data, out="new/deeper")
    write_nifti(data / "lf.nii.gz", np.full(SHAPE, np.nan, np.float32), AFFINE)
    code, _, err = run_cli(["run", p], capsys)
    assert code == 2 and "NaN/inf" in one_error(err)
    assert not (data / "new").exists()


def test_outputs_honour_the_umask(data, capsys):
    old = os.umask(0o022)
    try:
        assert run_cli(["run", tkd_pipeline(data)], capsys)[0] == 0
    finally:
        os.umask(old)
    for f in (data / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_provenance_lists_every_file(data, capsys):
    assert run_cli(["run", tkd_pipeline(data, stages="  - {stage: inversion, method: tkd}\n"
                                                      "  - {stage: reference, method: mean}\n")], capsys)[0] == 0
    prov = json.loads((data / "out" / "provenance.json").read_text())
    assert sorted(prov["outputs"] + prov["other_files"]) == names(data / "out")


# --------------------------------------------------------------------------- strict inputs
@pytest.mark.parametrize("key, hint", [("invert_phse", "invert_phase"), ("brainmask", "mask"),
                                       ("echo_time", "echo_times"), ("local_feild", "local_field")])
def test_unknown_input_key_suggests(data, capsys, key, hint):
    p = tkd_pipeline(data, inputs=f"local_field: lf.nii.gz, mask: mask.nii.gz, {key}: true")
    code, _, err = run_cli(["validate", p], capsys)
    assert code == 2 and f"inputs: unknown key '{key}' (did you mean '{hint}'?)" in one_error(err)


def test_unknown_key_in_orientation_and_simulate(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("inputs:\n  orientations:\n    - {magnitude: a.nii.gz, phse: b.nii.gz}\n    - {magnitude: a.nii.gz}\n"
                 "stages:\n  - {stage: inversion, method: cosmos}\noutput_dir: o\n")
    code, _, err = run_cli(["validate", p], capsys)
    assert code == 2 and "inputs.orientations.0: unknown key 'phse' (did you mean 'phase'?)" in one_error(err)
    p.write_text("inputs: {simulate: {snrr: 10}}\nstages:\n  - {stage: mask, method: threshold}\noutput_dir: o\n")
    code, _, err = run_cli(["validate", p], capsys)
    assert code == 2 and "unknown option 'snrr' (did you mean 'snr'?)" in one_error(err)


def test_duplicate_yaml_key_is_an_error(data, capsys):
    p = data / "d.yaml"
    p.write_text("name: d\ninputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\nstages:\n"
                 "  - {stage: inversion, method: tkd, params: {threshold: 0.1, threshold: 0.3}}\noutput_dir: out\n")
    code, _, err = run_cli(["validate", p], capsys)
    assert code == 2 and "duplicate key 'threshold' at line 4" in one_error(err)


def test_non_binary_mask_warns(data, capsys):
    m = np.zeros(SHAPE, np.float32)
    m[2:-2, 2:-2, 2:-2] = 5.0
    m[4, 4, 4] = 0.3
    write_nifti(data / "mask.nii.gz", m, AFFINE)
    code, _, err = run_cli(["run", tkd_pipeline(data)], capsys)
    assert code == 0, err
    warns = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warns) == 1 and "values span 0..5, not 0/1; voxels > 0.5 are taken as the mask" in warns[0]


def test_qform_sform_disagreement(data, capsys):
    img = nib.load(str(data / "lf.nii.gz"))
    img.set_qform(oblique_affine((1.0, 1.0, 1.5), 45.0), code=1)  # 35 deg away from the sform
    nib.save(img, str(data / "lf.nii.gz"))
    code, _, err = run_cli(["validate", tkd_pipeline(data)], capsys)
    assert code == 2 and "sform and qform rotated 35.0 deg apart" in one_error(err)
    shifted = AFFINE.copy()
    shifted[:3, 3] += 2.0
    img.set_qform(shifted, code=1)
    nib.save(img, str(data / "lf.nii.gz"))
    code, _, err = run_cli(["run", tkd_pipeline(data)], capsys)
    assert code == 0 and "warning: " in err and "the sform is used" in err


# --------------------------------------------------------------------------- acquisition values
@pytest.fixture
def gre(tmp_path):
    """A 3-echo GRE acquisition as a 4D pair and as per-echo 3D files, with BIDS sidecars."""
    from qsmkit.simulate import simulate_phantom

    ph = simulate_phantom(shape=(24, 24, 20), voxel_size=(2.0, 2.0, 2.0), echo_times=(0.005, 0.010, 0.015),
                          field_strength=7.0, seed=1)
    mag, phase = ph.magnitude.data, ph.phase.data
    a = ph.magnitude.affine
    write_nifti(tmp_path / "mag.nii.gz", mag, a)
    write_nifti(tmp_path / "phase.nii.gz", phase, a)
    (tmp_path / "phase.json").write_text(json.dumps({"EchoTime": [0.005, 0.010, 0.015], "MagneticFieldStrength": 7}))
    for e in range(3):
        for part, arr in (("mag", mag), ("phase", phase)):
            stem = f"sub-01_echo-{e + 1}_part-{part}_MEGRE"
            write_nifti(tmp_path / f"{stem}.nii.gz", arr[..., e], a)
            (tmp_path / f"{stem}.json").write_text(json.dumps({"EchoTime": 0.005 * (e + 1),
                                                               "MagneticFieldStrength": 7.0}))
    return tmp_path


def fit_pipeline(folder: Path, inputs: str) -> Path:
    p = folder / "fit.yaml"
    p.write_text(f"name: fit\ninputs: {{{inputs}}}\nstages:\n  - {{stage: mask, method: threshold}}\n"
                 "  - {stage: unwrap, method: laplacian}\n  - {stage: echo_combine, method: weighted_fit}\n"
                 "output_dir: out\n")
    return p


def test_echo_times_and_field_strength_from_4d_sidecar(gre, capsys):
    code, out, err = run_cli(["validate", fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz")], capsys)
    assert code == 0, err
    assert "echo times [0.005, 0.01, 0.015] s from" in out and "field strength 7 T from" in out
    code, _, err = run_cli(["run", fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz")], capsys)
    assert code == 0, err and "echo times [0.005, 0.01, 0.015] s from" in err


def test_pipeline_value_disagreeing_with_sidecar_is_an_error(gre, capsys):
    p = fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: [0.004, 0.008, 0.012]")
    code, _, err = run_cli(["validate", p], capsys)
    msg = one_error(err)
    assert code == 2 and "[0.004, 0.008, 0.012] s in the pipeline disagree with EchoTime [0.005, 0.01, 0.015]" in msg
    assert "ignore_sidecars: true" in msg
    p = fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz, field_strength: 3.0")
    code, _, err = run_cli(["validate", p], capsys)
    assert code == 2 and "field_strength 3 T in the pipeline disagrees with MagneticFieldStrength 7 T" in one_error(err)
    p = fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz, field_strength: 3.0, ignore_sidecars: true, "
                          "echo_times: [0.005, 0.010, 0.015]")
    code, out, err = run_cli(["validate", p], capsys)
    assert code == 0 and "field strength 3 T from the pipeline" in out


def test_per_echo_files_match_the_4d_pair(gre, capsys):
    """A list of per-echo 3D files (BIDS MEGRE form, given out of order) gives the 4D result."""
    four = fit_pipeline(gre, "magnitude: mag.nii.gz, phase: phase.nii.gz")
    assert run_cli(["run", four, "-o", gre / "o4"], capsys)[0] == 0
    lst = lambda part, order: "[" + ", ".join(f"sub-01_echo-{e}_part-{part}_MEGRE.nii.gz" for e in order) + "]"
    per = fit_pipeline(gre, f"magnitude: {lst('mag', (2, 1, 3))}, phase: {lst('phase', (2, 1, 3))}")
    code, _, err = run_cli(["run", per, "-o", gre / "o3"], capsys)
    assert code == 0, err
    assert "reordered by their sidecars' EchoTime" in err
    for name in ("total_field.nii.gz", "unwrapped_phase.nii.gz", "noise_weight.nii.gz"):
        a = nib.load(str(gre / "o4" / name)).get_fdata()
        b = nib.load(str(gre / "o3" / name)).get_fdata()
        assert np.allclose(a, b, atol=1e-6), name


def test_per_echo_forms_validate_and_run_agree(gre, capsys):
    for inputs, needle in [
        ("magnitude: mag.nii.gz, phase: [phase.nii.gz]", "per-echo files must be 3D"),
        ("magnitude: [sub-01_echo-1_part-mag_MEGRE.nii.gz], phase: [sub-01_echo-1_part-phase_MEGRE.nii.gz, "
         "sub-01_echo-2_part-phase_MEGRE.nii.gz]", "magnitude has 1 echo(es) but phase has 2"),
        (f"magnitude: mag.nii.gz, phase: {gre}", "is a folder; give the file itself"),
        ("magnitude: mag.nii.gz, phase: [1, 2]", "must be one NIfTI file or a list of per-echo NIfTI files"),
    ]:
        for cmd in ("validate", "run"):
            code, _, err = run_cli([cmd, fit_pipeline(gre, inputs)], capsys)
            assert code == 2 and needle in one_error(err), (cmd, inputs, err)
    assert not (gre / "out").exists()


def test_shipped_pipelines_carry_no_acquisition_placeholders():
    import yaml

    root = Path(__file__).resolve().parents[1] / "pipelines"
    for p in root.glob("*.yaml"):
        inputs = yaml.safe_load(p.read_text()).get("inputs", {})
        if "simulate" not in inputs:
            assert not {"echo_times", "field_strength"} & set(inputs), p.name


# --------------------------------------------------------------------------- interruption
def _quick_pipeline(folder: Path, shape=(40, 40, 32)) -> Path:
    p = folder / "q.yaml"
    p.write_text(f"name: q\ninputs: {{simulate: {{shape: {list(shape)}, voxel_size: [1.5, 1.5, 1.5], seed: 3}}}}\n"
                 "stages:\n  - {stage: mask, method: threshold}\n  - {stage: unwrap, method: laplacian}\n"
                 "  - {stage: echo_combine, method: weighted_fit}\n  - {stage: background, method: vsharp}\n"
                 "  - {stage: inversion, method: tkd}\n  - {stage: reference, method: mean}\noutput_dir: out\n"
                 "qc: false\n")  # QC pictures cost ~1 s per run here; their atomicity is tested in test_qc.py
    return p


def _start(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qsmkit.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(out: Path) -> dict:
    """Comparable content of a run's outputs: NIfTI data and affines, metrics; provenance's file list."""
    snap = {}
    for f in sorted(out.iterdir()):
        if f.name.endswith(".nii.gz"):
            img = nib.load(str(f))
            snap[f.name] = (hashlib.sha256(np.asarray(img.dataobj).tobytes()).hexdigest(), img.affine.tobytes())
        elif f.name == "provenance.json":
            snap[f.name] = sorted(json.loads(f.read_text())["outputs"])
        else:
            snap[f.name] = f.read_bytes()  # metrics.json, the QC PNGs
    return snap


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_during_run_cleans_up(tmp_path, sig, code, name):
    proc = _start(["run", _quick_pipeline(tmp_path, (64, 64, 48))], tmp_path)
    while True:  # wait until the stages are running
        line = proc.stderr.readline()
        assert line, "the run ended before its first stage"
        if line.startswith("[1/"):
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == code, rest
    assert f"interrupted ({name}); nothing was written" in rest.strip().splitlines()[-1]
    assert names(tmp_path / "out") == []


def test_sigkill_at_random_points_then_rerun(tmp_path):
    """10 runs killed at random moments; each rerun ends with the uninterrupted run's outputs."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    p = _quick_pipeline(ref_dir)
    t0 = time.perf_counter()
    ref = _start(["run", p], ref_dir)
    ref.communicate(timeout=120)
    duration = time.perf_counter() - t0
    assert ref.returncode == 0
    expected = _snapshot(ref_dir / "out")
    rng = random.Random(16)
    work = tmp_path / "w"
    work.mkdir()
    p = _quick_pipeline(work)
    for trial in range(10):
        proc = _start(["run", p], work)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.kill()
        proc.communicate(timeout=60)
        rerun = _start(["run", p], work)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, (trial, err)
        assert _snapshot(work / "out") == expected, trial
        assert not [n for n in names(work / "out") if n.startswith(".")], trial


@pytest.mark.parametrize("crash_at", range(7))
def test_crash_inside_the_commit_is_finished_by_the_next_run(data, capsys, monkeypatch, crash_at):
    """A process that dies between any two steps of the commit leaves a folder the next run completes."""
    from qsmkit.pipeline import outputs

    stages = "  - {stage: background, method: vsharp}\n  - {stage: inversion, method: tkd}\n"
    p = tkd_pipeline(data, stages=stages, inputs="total_field: lf.nii.gz, mask: mask.nii.gz")
    assert run_cli(["run", p], capsys)[0] == 0
    p.write_text(p.read_text().replace("total_field: lf.nii.gz", "local_field: lf.nii.gz")
                 .replace("  - {stage: background, method: vsharp}\n", ""))
    calls = {"n": 0}
    real_replace, real_unlink = os.replace, Path.unlink

    class Killed(BaseException):
        pass

    def step():
        calls["n"] += 1
        if calls["n"] == crash_at + 1:
            raise Killed()

    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (step(), real_replace(a, b)))
    monkeypatch.setattr(outputs.Path, "unlink", lambda self, missing_ok=False: (step(), real_unlink(self, missing_ok=missing_ok)))
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(Killed):
        from qsmkit.cli import main

        main(["run", str(p)])
    monkeypatch.undo()
    code, _, err = run_cli(["run", p], capsys)
    assert code == 0, err
    assert names(data / "out") == ["chi.nii.gz", "provenance.json"]


def test_simulate_refuses_a_folder_of_other_files(data, capsys):
    assert run_cli(["run", tkd_pipeline(data)], capsys)[0] == 0
    before = digest(data / "out")
    code, _, err = run_cli(["simulate", data / "out", "--shape", "16,16,12"], capsys)
    assert code == 2 and "already holds files (chi.nii.gz, provenance.json)" in one_error(err)
    assert digest(data / "out") == before
    assert run_cli(["simulate", data / "sim", "--shape", "16,16,12"], capsys)[0] == 0
    assert run_cli(["simulate", data / "sim", "--shape", "16,16,12", "--seed", "1"], capsys)[0] == 0  # its own
