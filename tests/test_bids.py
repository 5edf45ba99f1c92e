"""BIDS input discovery (qsmkit.io.bids) and the derivative layout (BIDS schema), plus a qsm-forward dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import oblique_affine, write_nifti
from qsmkit.errors import ConfigError, InputDataError
from qsmkit.io.bids import find_runs, inherited_sidecar, labels, parse_name

PIPELINE = """\
name: fast
qc: false
inputs: {simulate: {}}
stages:
  - {stage: mask, method: threshold}
  - {stage: unwrap, method: laplacian}
  - {stage: echo_combine, method: weighted_fit}
  - {stage: background, method: sharp}
  - {stage: inversion, method: tkd}
output_dir: unused
"""


def _img(path: Path, shape=(4, 4, 4), affine=None, side: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, np.zeros(shape, np.float32), affine)
    if side is not None:
        path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps(side))
    return path


def _pair(anat: Path, stem: str, te=None, units=None, **kw) -> None:
    """A part-mag / part-phase pair ``<stem>_part-X_<suffix>``; ``stem`` holds ``{part}``."""
    for part in ("mag", "phase"):
        side = {} if te is None else {"EchoTime": te}
        if part == "phase" and units is not None:
            side["Units"] = units
        _img(anat / stem.format(part=part), side=side or None, **kw)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    (root / "MEGRE.json").write_text('{"MagneticFieldStrength": 3.0}')  # inherited by every MEGRE image
    anat = root / "sub-01" / "anat"
    for e, te in ((1, 0.004), (2, 0.008), (10, 0.04)):  # echo-10 sorts after echo-2, by number
        _pair(anat, f"sub-01_echo-{e}_part-{{part}}_MEGRE.nii.gz", te=te)
    (anat / "sub-01_part-phase_MEGRE.json").write_text('{"Units": "arbitrary"}')  # applies to all phase echoes
    for ses in ("1", "2"):
        sanat = root / "sub-02" / f"ses-{ses}" / "anat"
        _pair(sanat, f"sub-02_ses-{ses}_acq-fast_run-1_part-{{part}}_T2starw.nii", shape=(4, 4, 4, 3),
              te=[0.005, 0.01, 0.015], units="rad")
    _pair(root / "sub-03" / "anat", "sub-03_part-{part}_GRE.nii.gz", te=0.02)  # single echo, 3D
    (root / "sub-03" / "anat" / "sub-03_part-phase_GRE.json").write_text(
        json.dumps({"EchoTime": 0.02, "MagneticFieldStrength": 7.0}))
    # not inputs: derivatives, a T1w, a magnitude-only file
    _img(root / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_echo-1_part-phase_MEGRE.nii.gz")
    _img(anat / "sub-01_T1w.nii.gz")
    return root


def test_parse_name_and_labels():
    assert parse_name("sub-01_ses-a_echo-2_part-phase_MEGRE.nii.gz") == (
        {"sub": "01", "ses": "a", "echo": "2", "part": "phase"}, "MEGRE", ".nii.gz")
    assert parse_name("sub-01_echo-1_echo-2_MEGRE.nii") is None  # repeated entity
    assert parse_name("notbids.nii.gz") == ({}, "notbids", ".nii.gz")
    assert labels(["sub-01,02", "sub-03 4"], "sub") == {"01", "02", "03", "4"}


def test_discovery_forms_and_sidecar_inheritance(dataset):
    runs = {r.key: r for r in find_runs(dataset)}
    assert sorted(runs) == ["sub-01_MEGRE", "sub-02_ses-1_acq-fast_run-1_T2starw",
                            "sub-02_ses-2_acq-fast_run-1_T2starw", "sub-03_GRE"]
    r1 = runs["sub-01_MEGRE"]
    assert [p.name for p in r1.phase] == [f"sub-01_echo-{e}_part-phase_MEGRE.nii.gz" for e in (1, 2, 10)]
    assert r1.echo_times == [0.004, 0.008, 0.04]
    assert r1.field_strength == 3.0  # from the dataset-level MEGRE.json
    assert r1.phase_units == "scaled"  # Units: arbitrary, from the subject-level part-phase sidecar
    assert r1.subject_dir == Path("sub-01/anat")
    r2 = runs["sub-02_ses-2_acq-fast_run-1_T2starw"]
    assert len(r2.phase) == 1 and r2.echo_times == [0.005, 0.01, 0.015] and r2.phase_units == "rad"
    assert r2.field_strength is None  # MEGRE.json does not apply to T2starw images
    assert r2.subject_dir == Path("sub-02/ses-2/anat") and r2.label == "sub-02_ses-2_acq-fast_run-1"
    r3 = runs["sub-03_GRE"]
    assert r3.echo_times == [0.02] and r3.field_strength == 7.0  # the image's own sidecar overrides
    assert r3.phase_units is None and "phase_units" not in r3.inputs()  # no Units: the engine's default (rad)
    ins = r1.inputs()
    assert ins["phase_units"] == "scaled" and len(ins["phase"]) == 3 and ins["field_strength"] == 3.0


def test_inheritance_order(dataset):
    img = dataset / "sub-01" / "anat" / "sub-01_echo-1_part-phase_MEGRE.nii.gz"
    (dataset / "sub-01" / "sub-01_MEGRE.json").write_text('{"MagneticFieldStrength": 1.5, "Units": "rad"}')
    side = inherited_sidecar(img, dataset)
    # deeper files override shallower ones; within a folder, more entities override fewer
    assert side["MagneticFieldStrength"] == 1.5 and side["Units"] == "arbitrary" and side["EchoTime"] == 0.004


def test_filters(dataset):
    keys = lambda **kw: [r.key for r in find_runs(dataset, **kw)]  # noqa: E731
    assert keys(participant_label=["sub-03"]) == ["sub-03_GRE"]
    assert keys(participant_label=["01", "3"]) == ["sub-01_MEGRE"]  # labels are compared exactly
    assert keys(session_label=["ses-2"]) == ["sub-02_ses-2_acq-fast_run-1_T2starw"]
    assert len(keys(run=["01"], acq=["fast"])) == 2  # run-1 == run-01
    with pytest.raises(ConfigError, match=r"no multi-echo GRE runs matching participant 99"):
        find_runs(dataset, participant_label=["99"])


def test_bad_datasets(tmp_path, dataset):
    with pytest.raises(ConfigError, match="not a folder"):
        find_runs(tmp_path / "missing")
    with pytest.raises(ConfigError, match="looks like a subject folder"):
        find_runs(dataset / "sub-01")
    (dataset / "sub-03" / "anat" / "sub-03_part-mag_GRE.nii.gz").unlink()
    with pytest.raises(InputDataError, match="phase images but no part-mag image"):
        find_runs(dataset)
    (dataset / "sub-03" / "anat" / "sub-03_part-phase_GRE.json").write_text('{"EchoTime": 0.02, "Units": "deg C"}')
    _img(dataset / "sub-03" / "anat" / "sub-03_part-mag_GRE.nii.gz")
    with pytest.raises(InputDataError, match="phase Units 'deg C' is not 'rad' or 'arbitrary'"):
        find_runs(dataset)


def test_b0_dir_is_voxel_frame(tmp_path):
    """``B0_dir`` (voxel frame, as qsm-forward and QSM-CI write it) reaches the stages unchanged."""
    from qsmkit.physics import b0_direction_from_affine

    root = tmp_path / "b"
    aff = oblique_affine((1.0, 1.0, 2.0), 25.0, "x")
    b0_voxel = [0.1, 0.3, 0.95]
    _pair(root / "sub-1" / "anat", "sub-1_echo-1_part-{part}_MEGRE.nii.gz", affine=aff, te=0.01)
    side = root / "sub-1" / "anat" / "sub-1_echo-1_part-phase_MEGRE.json"
    side.write_text(json.dumps({"EchoTime": 0.01, "B0_dir": b0_voxel, "MagneticFieldStrength": 3}))
    (run,) = find_runs(root)
    got = b0_direction_from_affine(aff, run.b0_direction)  # what load_nifti does with inputs.b0_direction
    np.testing.assert_allclose(got, np.asarray(b0_voxel) / np.linalg.norm(b0_voxel), atol=1e-9)


def _schema_regexes():
    schema = pytest.importorskip("bidsschematools.schema")
    rules = pytest.importorskip("bidsschematools.rules")
    s = schema.load_schema()
    return [re.compile(r["regex"]) for r in rules.regexify_filename_rules(s.rules.files.deriv.imaging, s, level=1)
            + rules.regexify_filename_rules(s.rules.files.common.core, s, level=1)]


def check_derivative_layout(out: Path) -> list[str]:
    """Check a derivative dataset against the BIDS schema's derivative file rules (bidsschematools,
    installed with bids-validator) and ``dataset_description.json``; returns the Chimap paths."""
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "qsmkit" and gen["Version"] and gen["Pipeline"]["name"]
    ignore = [ln.strip() for ln in (out / ".bidsignore").read_text().splitlines() if ln.strip()]
    regexes = _schema_regexes()
    chimaps = []
    import fnmatch

    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out).as_posix()
        if f.is_dir() or any(part.startswith(".") for part in f.relative_to(out).parts):
            continue  # hidden files and folders are not part of a BIDS dataset
        valid = any(r.match(rel) for r in regexes)
        if rel.endswith("_Chimap.nii.gz") or "_mask." in rel or rel == "dataset_description.json":
            assert valid, f"{rel} breaks the BIDS derivative naming rules"
        if not valid:
            assert any(fnmatch.fnmatch(f.name, p) or rel.startswith(p.rstrip("/").split("/")[-1]) or
                       f"/{p.rstrip('/')}/" in f"/{rel}" for p in ignore), f"{rel} is neither BIDS nor .bidsignored"
        if rel.endswith("_Chimap.nii.gz"):
            side = json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())
            assert side["Units"] == "ppm" and side["Method"] and side["Pipeline"]
            chimaps.append(rel)
    return chimaps


def test_qsm_forward_dataset_runs_as_is(tmp_path, monkeypatch, capsys):
    """Acceptance 0: a dataset written by QSMxT's simulator (qsm-forward), echo times and B0 from its sidecars."""
    qf = pytest.importorskip("qsm_forward")
    from qsmkit.cli import main

    bids = tmp_path / "qf"
    chi = qf.generate_susceptibility_phantom(resolution=[40, 40, 40], background=0, large_cylinder_val=0.005,
                                             small_cylinder_radii=[3, 3, 3, 5],
                                             small_cylinder_vals=[0.05, 0.1, 0.2, 0.5])
    recon = qf.ReconParams(voxel_size=np.array([1.0, 1.0, 1.0]), TEs=np.array([0.004, 0.012, 0.02]), TR=0.05,
                           flip_angle=15, B0=7, peak_snr=100, random_seed=1)  # its defaults otherwise
    qf.generate_bids(qf.TissueParams(chi=chi), recon, str(bids))
    pipe = tmp_path / "fast.yaml"
    pipe.write_text(PIPELINE)
    capsys.readouterr()
    rc = main(["run", str(pipe), "--bids", str(bids), "--workers", "1", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    deriv = bids / "derivatives" / "qsmkit"
    assert check_derivative_layout(deriv) == ["sub-1/anat/sub-1_Chimap.nii.gz"]
    prov = json.loads((deriv / ".qsmkit" / "runs" / "sub-1_MEGRE" / "provenance.json").read_text())
    assert prov["inputs"]["echo_times"] == [0.004, 0.012, 0.02] and prov["inputs"]["field_strength"] == 7
    assert (bids / "derivatives" / "qsm-forward").is_dir()  # its own derivatives were not taken as inputs
    import nibabel as nib

    truth = np.asarray(nib.load(bids / "derivatives" / "qsm-forward" / "sub-1" / "anat" / "sub-1_Chimap.nii").dataobj)
    est = np.asarray(nib.load(deriv / "sub-1" / "anat" / "sub-1_Chimap.nii.gz").dataobj)
    mask = np.asarray(nib.load(deriv / "sub-1" / "anat" / "sub-1_desc-brain_mask.nii.gz").dataobj) > 0
    for value in (0.05, 0.1, 0.2):  # its small cylinders (ppm), inside our eroded mask
        region = np.isclose(truth, value) & mask
        assert region.sum() > 100 and abs(est[region].mean() - value) < 0.4 * value
