"""The QSM-CI contract plugin: ``qsmkit qsm-ci run`` for each stage, ``qsmkit qsm-ci export``, and the
leaderboard's own tools (the ``qsm-ci`` package: its manifest parser, local runner and scorer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import run_cli

SHAPE, VOXEL = (48, 48, 48), (3.0, 3.0, 3.0)
#: stage -> (--method, produced file, truth file, least correlation with the truth, slope range)
CASES = {
    "field-mapping": ("romeo", "totalfield.nii.gz", "truth_totalfield.nii.gz", 0.95, (0.8, 1.25)),
    "bfr": ("vsharp", "localfield.nii.gz", "truth_localfield.nii.gz", 0.7, (0.5, 1.5)),
    "dipole": ("tkd", "chimap.nii.gz", "truth_chimap.nii.gz", 0.85, (0.4, 1.3)),
    "bfr+dipole": ("vsharp+tkd", "chimap.nii.gz", "truth_chimap.nii.gz", 0.6, (0.3, 1.5)),
    "end-to-end": ("laplacian+vsharp+tkd", "chimap.nii.gz", "truth_chimap.nii.gz", 0.4, (0.2, 1.5)),
}
CONSUMES = {"field-mapping": ("phase", "magnitude", "mask", "params"), "bfr": ("totalfield", "mask", "params"),
            "dipole": ("localfield", "mask", "params"), "bfr+dipole": ("totalfield", "mask", "params", "magnitude"),
            "end-to-end": ("phase", "magnitude", "mask", "params")}
FILE = {"phase": "phase.nii.gz", "magnitude": "magnitude.nii.gz", "mask": "mask.nii.gz", "params": "params.json",
        "totalfield": "totalfield.nii.gz", "localfield": "localfield.nii.gz"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A QSM-CI input folder from the simulated head (all canonical inputs), truths in another folder."""
    from qsmkit.io import save_nifti
    from qsmkit.simulate import simulate_phantom

    root = tmp_path_factory.mktemp("qsmci")
    src, truth = root / "all_inputs", root / "truth"
    src.mkdir()
    truth.mkdir()
    ph = simulate_phantom(shape=SHAPE, voxel_size=VOXEL, seed=0)
    t = ph.truth
    save_nifti(ph.phase, src / "phase.nii.gz")
    save_nifti(ph.magnitude, src / "magnitude.nii.gz")
    save_nifti(t["mask"], src / "mask.nii.gz")
    save_nifti(t["total_field"], src / "totalfield.nii.gz")
    save_nifti(t["local_field"], src / "localfield.nii.gz")
    save_nifti(t["total_field"], truth / "truth_totalfield.nii.gz")
    save_nifti(t["local_field"], truth / "truth_localfield.nii.gz")
    save_nifti(t["chi"], truth / "truth_chimap.nii.gz")
    art = ph.artifacts()
    (src / "params.json").write_text(json.dumps({
        "TE": [float(x) for x in art["echo_times"]], "B0": float(art["field_strength"]),
        "B0_dir": [0.0, 0.0, 1.0], "voxel_size": list(VOXEL)}))
    return root, src, truth


def _stage_input(root: Path, src: Path, stage: str, name: str | None = None) -> Path:
    """A folder with exactly what ``stage`` consumes (as QSM-CI mounts it)."""
    d = root / (name or f"in_{stage}")
    d.mkdir(exist_ok=True)
    for art in CONSUMES[stage]:
        shutil.copy(src / FILE[art], d / FILE[art])
    return d


def _load(path):
    import nibabel as nib

    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


@pytest.mark.parametrize("stage", list(CASES))
def test_each_stage_writes_its_canonical_output_in_ppm_on_the_input_grid(case, stage, capsys):
    root, src, truth = case
    method, produced, truth_file, min_corr, (lo, hi) = CASES[stage]
    ind, out = _stage_input(root, src, stage), root / f"out_{stage}"
    code, stdout, err = run_cli(["qsm-ci", "run", "--stage", stage, "--method", method, ind, out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [produced]  # the canonical output only
    assert f"{produced.split('.')[0]}: {out / produced}" in stdout
    img, data = _load(out / produced)
    mimg, mask = _load(ind / "mask.nii.gz")
    assert data.shape == mask.shape == SHAPE and data.dtype == np.float32
    assert np.allclose(img.affine, mimg.affine)
    _, t = _load(truth / truth_file)
    m = (mask > 0) & (data != 0)
    assert m.sum() > 0.5 * (mask > 0).sum()
    r, tt = data[m] - data[m].mean(), t[m] - t[m].mean()
    corr = float(np.corrcoef(r, tt)[0, 1])
    slope = float(r @ tt / (tt @ tt))  # ppm vs ppm: about 1 (Hz would be ~128, rad ~1e-2..)
    assert corr > min_corr and lo < slope < hi, (corr, slope)


def test_the_leaderboard_scorer_reads_qsmkit_outputs(case, capsys):
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    root, src, truth = case
    ind, out = _stage_input(root, src, "dipole", "in_score"), root / "out_score"
    assert run_cli(["qsm-ci", "run", "-q", "--stage", "dipole", "--method", "tkd", ind, out]) == 0
    recon = qsm_eval.load(out / "chimap.nii.gz")
    metrics, _ = qsm_eval.score_arrays(recon, qsm_eval.load(truth / "truth_chimap.nii.gz"),
                                       qsm_eval.load(ind / "mask.nii.gz"), "chi")
    assert metrics["coverage"] == pytest.approx(1.0)
    assert metrics["correlation"] > 0.85 and metrics["xsim"] > 0.5 and metrics["nrmse"] < 60


def test_config_json_overrides_the_declared_parameters(case, capsys):
    root, src, _ = case
    ind = _stage_input(root, src, "dipole", "in_config")
    assert run_cli(["qsm-ci", "run", "-q", "--stage", "dipole", "--method", "tkd", ind, root / "o_default"]) == 0
    (ind / "config.json").write_text(json.dumps({"threshold": 0.4}))
    assert run_cli(["qsm-ci", "run", "-q", "--stage", "dipole", "--method", "tkd", ind, root / "o_set"]) == 0
    a, b = _load(root / "o_default" / "chimap.nii.gz")[1], _load(root / "o_set" / "chimap.nii.gz")[1]
    assert np.abs(a - b).mean() > 0.05 * np.abs(a).mean()  # the threshold reached TKD
    (ind / "config.json").write_text(json.dumps({"tkd.threshold": 0.4}))  # method.name is accepted too
    assert run_cli(["qsm-ci", "run", "-q", "--stage", "dipole", "--method", "tkd", ind, root / "o_dot"]) == 0
    assert np.array_equal(_load(root / "o_dot" / "chimap.nii.gz")[1], b)
    (ind / "config.json").write_text(json.dumps({"treshold": 0.4}))
    code, _, err = run_cli(["qsm-ci", "run", "--stage", "dipole", "--method", "tkd", ind, root / "o_bad"], capsys)
    assert code == 2 and "config.json sets 'treshold'" in err and "valid: threshold" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("what", ["no_totalfield", "no_params", "no_te", "bad_json", "no_folder"])
def test_missing_canonical_inputs_are_one_line_errors(case, capsys, what):
    root, src, _ = case
    stage = "field-mapping" if what == "no_te" else "bfr"
    ind = _stage_input(root, src, stage, f"in_{what}")
    if what == "no_totalfield":
        (ind / "totalfield.nii.gz").unlink()
    elif what == "no_params":
        (ind / "params.json").unlink()
    elif what == "no_te":
        p = json.loads((ind / "params.json").read_text())
        del p["TE"]
        (ind / "params.json").write_text(json.dumps(p))
    elif what == "bad_json":
        (ind / "params.json").write_text("{TE: 1")
    elif what == "no_folder":
        shutil.rmtree(ind)
    method = "laplacian" if stage == "field-mapping" else "vsharp"
    code, _, err = run_cli(["qsm-ci", "run", "--stage", stage, "--method", method, ind, root / f"o_{what}"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: qsm-ci: "), err
    want = {"no_totalfield": "has no totalfield.nii.gz", "no_params": "has no params.json",
            "no_te": "no 'TE'", "bad_json": "is not valid JSON", "no_folder": "does not exist"}[what]
    assert want in lines[0]
    assert not (root / f"o_{what}").exists()


@pytest.mark.parametrize("stage,method,msg", [
    ("dipole", "vsharp", "not a method of the dipole stage"),
    ("bfr+dipole", "tkd+tv", "names two inversion methods"),
    ("dipole", "cosmos", "several head orientations"),
    ("field-mapping", "unwrap/nope", "no unwrap method 'nope'"),
])
def test_method_choices_are_checked(case, capsys, stage, method, msg):
    root, src, _ = case
    code, _, err = run_cli(["qsm-ci", "run", "--stage", stage, "--method", method, src, root / "o_m"], capsys)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_b0_direction_in_voxel_coordinates_is_kept_for_an_oblique_grid():
    from helpers import oblique_affine
    from qsmkit.physics import b0_direction_from_affine
    from qsmkit_qsmci.contract import world_direction

    affine = oblique_affine(tilt_deg=25.0)
    b_vox = np.array([0.2, -0.3, 0.93])
    b_vox /= np.linalg.norm(b_vox)
    b_world = world_direction(affine, b_vox)
    assert np.allclose(b0_direction_from_affine(affine, b_world), b_vox, atol=1e-9)


def test_export_writes_a_submission_per_method_that_qsm_ci_parses(tmp_path, capsys):
    from qsmkit.plugins import load_registry

    reg = load_registry()
    code, stdout, err = run_cli(["qsm-ci", "export", tmp_path], capsys)
    assert code == 0, err
    algos = tmp_path / "algorithms"
    slugs = sorted(p.name for p in algos.iterdir())
    want = ({f"{m}-qsmkit" for m in reg.methods("unwrap")} | {f"{m}-qsmkit" for m in reg.methods("background")}
            | {"tkd-qsmkit", "medi-qsmkit", "tv-qsmkit"})
    assert want <= set(slugs) and "cosmos-qsmkit" not in slugs
    doc = yaml.safe_load((algos / "tkd-qsmkit" / "algorithm.yml").read_text())
    assert {k: doc[k] for k in ("slug", "stage", "language", "source", "run")} == {
        "slug": "tkd-qsmkit", "stage": "dipole", "language": "Python", "source": "qsmkit", "run": "bash run.sh"}
    assert doc["inputs"] == ["localfield", "mask", "params"]
    tkd = reg.get("inversion", "tkd")
    assert {p["name"]: p["default"] for p in doc["parameters"]} == {p.name: p.default for p in tkd.params
                                                                    if p.name != "device"}
    medi = yaml.safe_load((algos / "medi-qsmkit" / "algorithm.yml").read_text())
    assert medi["optional_inputs"] == ["magnitude"]
    vs = yaml.safe_load((algos / "vsharp-qsmkit" / "algorithm.yml").read_text())
    assert vs["stage"] == "bfr" and vs["inputs"] == ["totalfield", "mask", "params"]
    run_sh = algos / "tkd-qsmkit" / "run.sh"
    assert os.access(run_sh, os.X_OK)
    assert 'qsm-ci run --stage dipole --method tkd "$IN" "$OUT"' in run_sh.read_text()
    assert "FROM python" in (algos / "tkd-qsmkit" / "Dockerfile").read_text()
    # the leaderboard's own manifest parser accepts every folder
    runner = pytest.importorskip("qsm_ci.runner")
    for slug in slugs:
        meta = runner._parse_manifest(algos / slug)
        assert meta["slug"] == slug and set(runner._consumes(meta)) <= {"phase", "magnitude", "mask", "params",
                                                                        "totalfield", "localfield"}
    # a rerun replaces its own folders; a foreign one is refused
    assert run_cli(["qsm-ci", "export", tmp_path, "--stage", "bfr", "--image", "ghcr.io/x/qsmkit:1"]) == 0
    assert not (algos / "vsharp-qsmkit" / "Dockerfile").exists()
    assert yaml.safe_load((algos / "vsharp-qsmkit" / "algorithm.yml").read_text())["image"] == "ghcr.io/x/qsmkit:1"
    (algos / "tkd-qsmkit" / "algorithm.yml").write_text("name: mine\nslug: tkd-qsmkit\nstage: dipole\n")
    code, _, err = run_cli(["qsm-ci", "export", tmp_path], capsys)
    assert code == 2 and "qsmkit did not write" in err


def test_qsm_ci_local_runner_runs_and_scores_an_exported_submission(case, tmp_path):
    """The leaderboard CLI: `qsm-ci run --runner local <folder> ... --truth` runs our run.sh and scores it."""
    pytest.importorskip("qsm_ci")
    root, src, truth = case
    bindir = Path(sys.executable).parent
    qsmci = shutil.which("qsm-ci", path=str(bindir)) or shutil.which("qsm-ci")
    qsmkit = shutil.which("qsmkit", path=str(bindir))
    if qsmci is None or qsmkit is None:
        pytest.skip("the qsm-ci / qsmkit executables are not installed next to this Python")
    assert run_cli(["qsm-ci", "export", tmp_path, "--stage", "dipole"]) == 0
    env = {**os.environ, "QSMKIT": qsmkit, "QSMKIT_PROGRESS": "0"}
    proc = subprocess.run([qsmci, "run", "--runner", "local", str(tmp_path / "algorithms" / "tkd-qsmkit"),
                           "--localfield", str(src / "localfield.nii.gz"), "--mask", str(src / "mask.nii.gz"),
                           "--params", str(src / "params.json"), "--truth", str(truth / "truth_chimap.nii.gz"),
                           "--set", "threshold=0.2", "-o", str(tmp_path / "scored") + "/"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "scored" / "chimap.nii.gz").is_file()
    assert "overrides: {'threshold': 0.2}" in proc.stdout
    scores = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines()
              if len(ln.split()) == 2 and ln.split()[0] in ("nrmse", "correlation", "xsim", "coverage")}
    assert float(scores["correlation"]) > 0.85 and float(scores["coverage"]) == pytest.approx(1.0)


def test_a_voxel_size_that_disagrees_with_the_header_is_a_warning(case, capsys):
    root, src, _ = case
    ind = _stage_input(root, src, "dipole", "in_vs")
    p = json.loads((ind / "params.json").read_text())
    (ind / "params.json").write_text(json.dumps({**p, "voxel_size": [1.0, 1.0, 1.0]}))
    code, _, err = run_cli(["qsm-ci", "run", "-q", "--stage", "dipole", "--method", "tkd", ind, root / "o_vs"], capsys)
    assert code == 0 and "warning: qsm-ci: params.json voxel_size [1.0, 1.0, 1.0] mm differs" in err
    assert (root / "o_vs" / "chimap.nii.gz").is_file()


def test_a_total_field_inversion_replaces_the_background_stage():
    from qsmkit.plugins import load_registry
    from qsmkit_qsmci.contract import choose_methods
    from qsmkit.errors import ConfigError

    reg = load_registry()
    total = [m for m in reg.methods("inversion") if "total_field" in reg.get("inversion", m).reads]
    if not total:
        pytest.skip("no inversion of the total field is registered")
    m = total[0]
    assert choose_methods("bfr+dipole", m, reg) == [("inversion", m)]
    assert choose_methods("end-to-end", f"romeo+{m}", reg) == [("unwrap", "romeo"), ("echo_combine", "weighted_fit"),
                                                                ("inversion", m)]
    with pytest.raises(ConfigError, match="inverts the total field"):
        choose_methods("dipole", m, reg)
    with pytest.raises(ConfigError, match="needs no background stage"):
        choose_methods("bfr+dipole", f"vsharp+{m}", reg)
