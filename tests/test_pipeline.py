"""The YAML pipeline runner: overrides, skipping, provenance, geometry, atomic outputs."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsmkit.errors import ConfigError, QsmkitError
from qsmkit.pipeline import apply_overrides, load_plan, run_plan
from qsmkit.plugins import load_registry
from helpers import oblique_affine, run_cli, sphere_field, write_nifti

SHAPE = (40, 40, 32)


@pytest.fixture
def folder(tmp_path):
    a = oblique_affine((1.0, 1.0, 1.2), 15.0)
    field, _ = sphere_field(SHAPE, (1, 1, 1.2), 5.0, 0.2, (0, 0, 1))
    write_nifti(tmp_path / "lf.nii.gz", field, a, sform_code=2, qform_code=1)
    write_nifti(tmp_path / "mask.nii.gz", np.ones(SHAPE, np.uint8), a)
    (tmp_path / "p.yaml").write_text(
        "name: tkd-test\nqc: false\ninputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\n"
        "stages:\n  - {stage: mask, method: threshold}\n  - {stage: inversion, method: tkd, params: {threshold: 0.2}}\n"
        "output_dir: results\n")
    return tmp_path


def test_overrides_parse_yaml_values():
    spec = {"stages": [{"stage": "inversion", "params": {"lambda": 1}}], "inputs": {}}
    out, touched = apply_overrides(spec, ["stages.0.params.lambda=500", "inputs.phase=x.nii.gz", "inputs.te=[1, 2]"])
    assert out["stages"][0]["params"]["lambda"] == 500 and out["inputs"]["te"] == [1, 2]
    assert spec["stages"][0]["params"]["lambda"] == 1  # the original is not modified
    assert touched == {"stages.0.params.lambda", "inputs.phase", "inputs.te"}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides(spec, ["stages"])


def test_run_writes_outputs_with_input_geometry(folder, capsys):
    code, out, err = run_cli(["run", folder / "p.yaml", "--set", "stages.1.params.threshold=0.15"], capsys)
    assert code == 0, err
    res = folder / "results"
    assert sorted(p.name for p in res.iterdir()) == ["chi.nii.gz", "provenance.json"]
    src, chi = nib.load(str(folder / "lf.nii.gz")), nib.load(str(res / "chi.nii.gz"))
    assert np.array_equal(src.affine, chi.affine) and chi.header["sform_code"] == 2 and chi.header["qform_code"] == 1
    prov = json.loads((res / "provenance.json").read_text())
    assert prov["stages"][0]["status"] == "skipped" and "given as inputs" in prov["stages"][0]["reason"]
    assert prov["stages"][1]["params"]["threshold"] == 0.15 and prov["stages"][1]["duration_s"] >= 0
    assert prov["stages"][1]["plugin"] == "tkd" and prov["qsmkit_version"]
    assert len(prov["inputs"]["local_field"]["sha256"]) == 64
    assert prov["pipeline"]["overrides"] == ["stages.1.params.threshold=0.15"]
    assert "[2/2] inversion/tkd:" in err and "skipped" in err


def test_output_dir_option_and_relative_paths(folder, tmp_path_factory, capsys, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["run", folder / "p.yaml", "--output-dir", "o2"], capsys)
    assert code == 0, err
    assert (elsewhere / "o2" / "chi.nii.gz").exists() and not (folder / "results").exists()


def test_validate_prints_plan_and_writes_nothing(folder, capsys):
    code, out, _ = run_cli(["validate", folder / "p.yaml"], capsys)
    assert code == 0
    assert "skip stages.0 mask/threshold  (its outputs are given as inputs)" in out
    assert "run  stages.1 inversion/tkd" in out and out.strip().endswith("valid")
    assert not (folder / "results").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stage_failure_writes_nothing(folder):
    plan = load_plan(folder / "p.yaml", load_registry())
    plan.steps[1].params._values["threshold"] = float("nan")  # makes TKD produce NaN
    with pytest.raises(Exception):
        run_plan(plan, log=lambda m: None)
    assert not (folder / "results").exists()


def test_rerun_replaces_outputs_atomically(folder, capsys):
    for _ in range(2):
        assert run_cli(["run", folder / "p.yaml", "-q"], capsys)[0] == 0
    names = [p.name for p in (folder / "results").iterdir()]
    assert not any(n.startswith(".") for n in names)


def test_in_place_stage_is_not_skipped_when_its_artifact_is_given(folder):
    """reference reads and writes chi: giving chi must run it, not skip it."""
    (folder / "r.yaml").write_text(
        "inputs: {chi: lf.nii.gz, mask: mask.nii.gz}\nstages:\n  - {stage: reference, method: mean}\n"
        "output_dir: r\n")
    plan = load_plan(folder / "r.yaml", load_registry())
    assert plan.steps[0].run
    res = run_plan(plan, log=lambda m: None)
    chi = res.artifacts["chi"].data
    assert abs(float(chi[res.artifacts["mask"].data].mean())) < 1e-6



def test_stage_runs_when_a_later_stage_may_use_its_output(folder):
    """A mask stage before stages that read a mask only optionally runs (it was once skipped); a
    stage that could not run (its inputs missing) stays skipped."""
    (folder / "u.yaml").write_text(
        "inputs: {simulate: {shape: [32, 32, 24], voxel_size: [3, 3, 3]}}\nstages:\n"
        "  - {stage: mask, method: threshold}\n  - {stage: unwrap, method: laplacian}\noutput_dir: u\n")
    plan = load_plan(folder / "u.yaml", load_registry())
    assert [s.run for s in plan.steps] == [True, True]
    (folder / "v.yaml").write_text(
        "inputs: {local_field: lf.nii.gz, mask: mask.nii.gz, magnitude: mask.nii.gz}\nstages:\n"
        "  - {stage: echo_combine, method: weighted_fit}\n  - {stage: inversion, method: medi}\noutput_dir: v\n")
    plan = load_plan(folder / "v.yaml", load_registry())
    assert [s.run for s in plan.steps] == [False, True]   # medi may read noise_weight; no phase to fit

def test_stage_sees_only_declared_artifacts(folder, capsys):
    """A stage reading an artifact it did not declare gets an error naming it; undeclared outputs too."""
    from qsmkit import Stage, hookimpl
    from qsmkit.errors import UndeclaredArtifactError
    from qsmkit.plugins import load_registry
    from qsmkit.stage import StageContext

    class Peeker(Stage):
        kind, name = "inversion", "peeker"
        reads = ("local_field",)

        def run(self, ctx, p):
            mask = ctx["mask"]
            return {"chi": ctx["local_field"].like(mask.data * 1.0)}

    with pytest.raises(UndeclaredArtifactError, match="reads 'mask', which it does not declare"):
        Peeker().run(StageContext({"local_field": None, "mask": None}, "inversion/peeker", declared=Peeker.reads), {})

    class Plugin:
        @hookimpl
        def qsmkit_register_stages(registry):
            registry.add(Peeker)

    reg = load_registry(extra_plugins=[Plugin])
    (folder / "p.yaml").write_text("inputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\n"
                                   "stages:\n  - {stage: inversion, method: peeker}\noutput_dir: results\n")
    plan = load_plan(folder / "p.yaml", reg)
    with pytest.raises(UndeclaredArtifactError, match="inversion/peeker reads 'mask'"):
        run_plan(plan, reg, log=lambda m: None)
    assert not (folder / "results").exists()

    class Leaker(Stage):
        kind, name = "inversion", "leaker"
        reads, writes = ("local_field",), ("chi",)

        def run(self, ctx, p):
            return {"chi": ctx["local_field"], "metrics": {"x": 1}}

    class Plugin2:
        @hookimpl
        def qsmkit_register_stages(registry):
            registry.add(Leaker)

    reg = load_registry(extra_plugins=[Plugin2])
    (folder / "p.yaml").write_text((folder / "p.yaml").read_text().replace("peeker", "leaker"))
    plan = load_plan(folder / "p.yaml", reg)
    with pytest.raises(QsmkitError, match="returned 'metrics', which its class does not declare.*report_metrics"):
        run_plan(plan, reg, log=lambda m: None)


def test_run_device_resolved_once_for_auto_stages(folder, capsys):
    code, _, err = run_cli(["run", folder / "p.yaml", "--set", "device=cpu", "--set",
                            "stages.1={stage: inversion, method: dip, params: {max_iter: 3, min_iterations: 1, "
                            "channels: 4, depth: 2}}"], capsys)
    assert code == 0, err
    prov = json.loads((folder / "results" / "provenance.json").read_text())
    assert prov["device"] == "cpu" and prov["stages"][1]["params"]["device"] == "cpu"
    assert "device: cpu (for the stages set to auto)" in err
    code, _, err = run_cli(["validate", folder / "p.yaml", "--set", "device=gpu"], capsys)
    assert code == 2 and "device = 'gpu'; choose auto, cpu or cuda" in err
