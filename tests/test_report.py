"""``qsmkit report DIR``: the cohort's HTML index (runs, QC pictures, ROI means) and its errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from helpers import run_cli
from qsmkit.errors import InputDataError
from qsmkit.qc import QC_FILES
from qsmkit.report import find_runs, roi_table, write_report

SIM = {"shape": [48, 48, 48], "voxel_size": [3.0, 3.0, 3.0], "seed": 0}
STAGES = [{"stage": "mask", "method": "threshold"}, {"stage": "unwrap", "method": "laplacian"},
          {"stage": "echo_combine", "method": "weighted_fit"}, {"stage": "background", "method": "vsharp"},
          {"stage": "inversion", "method": "tkd"}, {"stage": "reference", "method": "mean"}]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """cohort/sub-01 and sub-02 (finished runs), sub-03 (killed mid-commit), phantom/ (its labels)."""
    from qsmkit.pipeline import build_plan, run_plan
    from qsmkit.plugins import load_registry
    from qsmkit.simulate import simulate_phantom

    root = tmp_path_factory.mktemp("cohort")
    reg = load_registry()
    plan = build_plan({"name": "report-test", "inputs": {"simulate": dict(SIM)}, "stages": STAGES}, reg,
                      output_dir=root / "sub-01")
    run_plan(plan, reg, log=lambda m: None)
    shutil.copytree(root / "sub-01", root / "sub-02")
    (root / "sub-03").mkdir()
    (root / "sub-03" / ".qsmkit-commit.json").write_text(json.dumps({"pipeline": {}, "files": ["chi.nii.gz"]}))
    phantom_dir = tmp_path_factory.mktemp("phantom")
    simulate_phantom(shape=tuple(SIM["shape"]), voxel_size=tuple(SIM["voxel_size"]), seed=0).write(phantom_dir)
    return root, phantom_dir


def test_the_index_lists_every_run_and_links_its_pictures(cohort):
    root, _ = cohort
    path, runs = write_report(root)
    assert path == root / "report.html"
    assert [r.rel for r in runs] == ["sub-01", "sub-02", "sub-03"]
    assert [r.status for r in runs] == ["finished", "finished", "incomplete"]
    page = path.read_text(encoding="utf-8")
    assert 'name="generator" content="qsmkit report"' in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(imgs) == sorted(f"{s}/{p}" for s in ("sub-01", "sub-02") for p in QC_FILES)
    for src in imgs:
        assert (root / src).is_file()
    prov = json.loads((root / "sub-01" / "provenance.json").read_text())
    assert f'<td class="num">{prov["duration_s"]:.1f}</td>' in page
    assert "inversion/tkd" in page and "interrupted during its commit" in page
    assert not [p for p in root.iterdir() if p.name.startswith(".report")]  # atomic: no temporary file left


def test_roi_means_come_from_the_simulator_metrics_without_labels(cohort):
    root, _ = cohort
    runs = find_runs(root)
    names = roi_table(runs)
    est = json.loads((root / "sub-01" / "metrics.json").read_text())["chi"]["roi_means"]["estimate"]
    assert names == list(est)
    assert runs[0].roi == pytest.approx(est) and "metrics.json" in runs[0].roi_source
    assert runs[2].roi == {}


def test_labels_option_gives_roi_means_of_chi_within_the_mask(cohort, capsys, tmp_path):
    from qsmkit.io import load_nifti
    from qsmkit.metrics import roi_means
    from qsmkit.simulate import LABELS

    root, phantom_dir = cohort
    out = tmp_path / "index.html"
    code, stdout, err = run_cli(["report", root, "--labels", phantom_dir / "labels.nii.gz", "--output", out], capsys)
    assert code == 0, err
    assert f"report: {out}" in stdout and "sub-03: incomplete" in err
    chi = load_nifti(root / "sub-02" / "chi.nii.gz").data
    mask = load_nifti(root / "sub-02" / "mask.nii.gz").data > 0.5
    labels = load_nifti(phantom_dir / "labels.nii.gz").data
    want = roi_means(chi, labels, LABELS, mask=mask)
    assert "putamen" in want and "thalamus" in want
    page = out.read_text(encoding="utf-8")
    row = re.search(r"<tr><td>sub-02</td>(.*?)</tr>", page.split("ROI means")[1]).group(1)
    header = re.findall(r"<th>([^<]+)</th>", page.split("ROI means")[1].split("</tr>")[0])[1:-1]
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)
    got = dict(zip(header, cells))
    for name, value in want.items():
        assert got[name] == f"{value:.4f}", name
    assert "labels.nii.gz, within the run" in row
    imgs = re.findall(r'<img src="([^"]+)"', page)  # links are relative to the page, not to DIR
    assert imgs and all((out.parent / src).resolve().is_file() for src in imgs)


def test_a_run_folder_itself_gets_its_report_beside_it(cohort):
    root, _ = cohort
    path, runs = write_report(root / "sub-01")
    assert path == root / "sub-01-report.html" and [r.rel for r in runs] == ["."]
    assert '<img src="sub-01/qc_chi.png"' in path.read_text(encoding="utf-8")
    path.unlink()


@pytest.mark.parametrize("case", ["missing", "file", "empty"])
def test_one_line_errors_for_a_folder_without_runs(tmp_path, capsys, case):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("not a folder")
    elif case == "empty":
        (target / "sub-01").mkdir(parents=True)
    code, _, err = run_cli(["report", target], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: report: ")
    assert {"missing": "does not exist", "file": "is a file", "empty": "no qsmkit run folders"}[case] in lines[0]
    with pytest.raises(InputDataError):
        find_runs(target)


def test_labels_on_another_grid_and_a_foreign_page_are_refused(cohort, tmp_path, capsys):
    from helpers import write_nifti

    root, _ = cohort
    other = write_nifti(tmp_path / "labels.nii.gz", np.ones((10, 10, 10), np.int16))
    code, _, err = run_cli(["report", root, "--labels", other, "--output", tmp_path / "r.html"], capsys)
    assert code == 2 and "is not on the grid of" in err and len(err.strip().splitlines()) == 1
    foreign = tmp_path / "mine.html"
    foreign.write_text("<html>my notes</html>")
    code, _, err = run_cli(["report", root, "--output", foreign], capsys)
    assert code == 2 and "qsmkit did not write it" in err
    assert foreign.read_text() == "<html>my notes</html>"
    assert run_cli(["report", root, "--output", foreign, "--overwrite"]) == 0
    assert "qsmkit report" in foreign.read_text()
    assert run_cli(["report", root, "--output", foreign]) == 0  # its own page is replaced without --overwrite


def test_a_cohort_derivative_folder_with_its_summary(cohort, tmp_path):
    """The layout of `qsmkit run --bids`: runs in .qsmkit/runs/<key>/, outcomes in .qsmkit/summary.json."""
    root, _ = cohort
    deriv = tmp_path / "derivatives" / "qsmkit"
    runs_dir = deriv / ".qsmkit" / "runs"
    shutil.copytree(root / "sub-01", runs_dir / "sub-01")
    shutil.copytree(root / "sub-02", runs_dir / "sub-02")
    (runs_dir / "sub-01" / ".qsmkit-staging-abc").mkdir()  # a leftover staging folder is not a run
    (deriv / "dataset_description.json").write_text('{"Name": "x", "DatasetType": "derivative"}')
    (deriv / ".qsmkit" / "summary.json").write_text(json.dumps({"pipeline": "p", "runs": [
        {"key": "sub-01", "status": "done", "duration_s": 3.0, "error": ""},
        {"key": "sub-02", "status": "failed", "duration_s": 0.5, "error": "inversion/tkd: out of memory"},
        {"key": "sub-03", "status": "failed", "duration_s": 0.1, "error": "phase: not a NIfTI file"}]}))
    path, runs = write_report(deriv)
    assert [(r.rel, r.status) for r in runs] == [("sub-01", "finished"), ("sub-02", "failed"), ("sub-03", "failed")]
    assert runs[2].error == "phase: not a NIfTI file" and not runs[2].pictures
    page = path.read_text(encoding="utf-8")
    assert "phase: not a NIfTI file" in page and "out of memory" in page
    assert '<img src=".qsmkit/runs/sub-01/qc_chi.png"' in page
    assert all((deriv / src).is_file() for src in re.findall(r'<img src="([^"]+)"', page))


def test_help_imports_neither_matplotlib_nor_tqdm():
    import subprocess
    import sys

    script = ("import io, sys, contextlib\nfrom qsmkit.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
              "print([m for m in ('matplotlib', 'tqdm', 'nibabel') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
