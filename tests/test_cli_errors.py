"""Bad input: one-line error, exit status 2, and nothing written to the output folder."""

import numpy as np
import pytest

from helpers import oblique_affine, run_cli, write_nifti

SHAPE = (12, 12, 10)
TE = "[0.004, 0.008, 0.012]"


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    a = oblique_affine((1.0, 1.0, 1.5), 10.0)
    write_nifti(tmp_path / "mag.nii.gz", rng.uniform(1, 2, SHAPE + (3,)).astype(np.float32), a)
    write_nifti(tmp_path / "phase.nii.gz", rng.uniform(-3.1, 3.1, SHAPE + (3,)).astype(np.float32), a)
    write_nifti(tmp_path / "lf.nii.gz", rng.normal(0, 0.01, SHAPE).astype(np.float32), a)
    write_nifti(tmp_path / "mask.nii.gz", np.ones(SHAPE, np.uint8), a)
    return tmp_path


def pipeline(folder, inputs=None, stages=None, extra="", output_dir="out"):
    inputs = inputs or (f"magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: {TE}, field_strength: 3.0, "
                        "local_field: lf.nii.gz, mask: mask.nii.gz")
    stages = stages or "  - {stage: inversion, method: tkd}\n"
    p = folder / "p.yaml"
    p.write_text(f"name: t\ninputs: {{{inputs}}}\nstages:\n{stages}{extra}output_dir: {output_dir}\n")
    return p


def check_error(capsys, folder, args, needle, out="out"):
    code, stdout, stderr = run_cli(args, capsys)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert code == 2, (code, stderr)
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr  # one line, the last
    assert "Traceback" not in stderr
    assert needle in errors[0], errors[0]
    assert not (folder / out).exists() or not any((folder / out).iterdir())
    return errors[0]


def test_runs_when_valid(data, capsys):
    code, out, err = run_cli(["run", pipeline(data)], capsys)
    assert code == 0, err
    assert (data / "out" / "chi.nii.gz").exists()


def test_missing_file(data, capsys):
    p = pipeline(data, inputs=f"magnitude: nope.nii.gz, phase: phase.nii.gz, echo_times: {TE}, field_strength: 3,"
                              " local_field: lf.nii.gz, mask: mask.nii.gz")
    check_error(capsys, data, ["run", p], "inputs.magnitude: file not found")


def test_not_a_nifti(data, capsys):
    (data / "mag.nii.gz").write_bytes(b"\x1f\x8b garbage")
    check_error(capsys, data, ["run", pipeline(data)], "is not a readable NIfTI file")


def test_3d_4d_mismatch(data, capsys):
    write_nifti(data / "mag.nii.gz", np.ones(SHAPE, np.float32), oblique_affine((1.0, 1.0, 1.5), 10.0))
    check_error(capsys, data, ["run", pipeline(data)], "magnitude has 1 echo(es) but phase has 3")


def test_grid_mismatch(data, capsys):
    write_nifti(data / "mask.nii.gz", np.ones((12, 12, 9), np.uint8), oblique_affine((1.0, 1.0, 1.5), 10.0))
    check_error(capsys, data, ["run", pipeline(data)], "all inputs must be on the same voxel grid")


def test_affine_mismatch(data, capsys):
    write_nifti(data / "mask.nii.gz", np.ones(SHAPE, np.uint8), oblique_affine((1.0, 1.0, 1.5), 12.0))
    check_error(capsys, data, ["run", pipeline(data)], "have different affines")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf(data, capsys, bad):
    lf = np.zeros(SHAPE, np.float32)
    lf[3, 4, 5] = bad
    write_nifti(data / "lf.nii.gz", lf, oblique_affine((1.0, 1.0, 1.5), 10.0))
    check_error(capsys, data, ["run", pipeline(data)], "contains 1 NaN/inf voxels")


def test_echo_count(data, capsys):
    p = pipeline(data, inputs="magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: [0.004, 0.008], "
                              "field_strength: 3, local_field: lf.nii.gz, mask: mask.nii.gz")
    check_error(capsys, data, ["run", p], "echo_times has 2 values but the phase has 3 echoes")


def test_echo_times_in_ms(data, capsys):
    p = pipeline(data, inputs="magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: [4, 8, 12], "
                              "field_strength: 3, local_field: lf.nii.gz, mask: mask.nii.gz")
    check_error(capsys, data, ["run", p], "look like milliseconds")


def test_phase_not_in_radians(data, capsys):
    ph = np.random.default_rng(1).integers(0, 4096, SHAPE + (3,)).astype(np.float32)
    write_nifti(data / "phase.nii.gz", ph, oblique_affine((1.0, 1.0, 1.5), 10.0))
    line = check_error(capsys, data, ["run", pipeline(data)], "not radians")
    assert "phase_units" in line


def test_unknown_stage_kind(data, capsys):
    p = pipeline(data, stages="  - {stage: invert, method: tkd}\n")
    check_error(capsys, data, ["run", p], "unknown stage kind 'invert'; known kinds: mask, unwrap")


def test_unknown_method_lists_valid(data, capsys):
    p = pipeline(data, stages="  - {stage: inversion, method: tkdd}\n")
    check_error(capsys, data, ["run", p], "unknown inversion method 'tkdd'; valid methods: ")
    assert "tkd" in check_error(capsys, data, ["run", p], "valid methods")


def test_unknown_parameter_lists_valid(data, capsys):
    p = pipeline(data, stages="  - {stage: inversion, method: tkd, params: {treshold: 0.1}}\n")
    check_error(capsys, data, ["run", p], "unknown parameter 'treshold' for inversion method 'tkd'; valid "
                                          "parameters: threshold, padding")


def test_out_of_range_parameter(data, capsys):
    p = pipeline(data, stages="  - {stage: inversion, method: tkd, params: {threshold: 5}}\n")
    check_error(capsys, data, ["run", p], "stages.0.params.threshold = 5.0 is out of range [0.01, 1.0]")


def test_wrong_parameter_type(data, capsys):
    p = pipeline(data, stages="  - {stage: inversion, method: tkd, params: {threshold: high}}\n")
    check_error(capsys, data, ["run", p], "expected a number, got 'high'")


def test_python_tag_refused(data, capsys):
    p = data / "p.yaml"
    p.write_text("name: !!python/object/apply:os.system ['touch pwned']\ninputs: {mask: mask.nii.gz}\n"
                 "stages: []\noutput_dir: out\n")
    check_error(capsys, data, ["run", p], "safe_load")
    assert not (data / "pwned").exists()


def test_output_dir_overwriting_input(data, capsys):
    write_nifti(data / "chi.nii.gz", np.zeros(SHAPE, np.float32), oblique_affine((1.0, 1.0, 1.5), 10.0))
    p = pipeline(data, inputs="local_field: lf.nii.gz, mask: mask.nii.gz, noise_weight: chi.nii.gz", output_dir=".")
    check_error(capsys, data, ["run", p], "would overwrite the input file", out="nonexistent")


def test_missing_output_dir(data, capsys):
    p = data / "p.yaml"
    p.write_text("inputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\nstages:\n  - {stage: inversion, method: tkd}\n")
    check_error(capsys, data, ["run", p], "no output_dir")


def test_bad_set_override(data, capsys):
    check_error(capsys, data, ["run", pipeline(data), "--set", "stages.7.params.threshold=0.2"],
                "'stages.7' is not an index of a list of 1 items")


def test_missing_artifact_names_producer(data, capsys):
    p = pipeline(data, inputs="mask: mask.nii.gz")
    check_error(capsys, data, ["run", p], "needs 'local_field', which no input or earlier stage provides; add a "
                                          "'background' stage")


def test_missing_echo_times(data, capsys):
    p = pipeline(data, inputs="magnitude: mag.nii.gz, phase: phase.nii.gz, field_strength: 3, "
                              "local_field: lf.nii.gz, mask: mask.nii.gz")
    check_error(capsys, data, ["run", p], "no echo_times")


def test_unknown_top_level_key(data, capsys):
    p = pipeline(data, extra="outputs: here\n")
    check_error(capsys, data, ["run", p], "unknown key 'outputs'")


def test_debug_shows_traceback(data):
    p = pipeline(data, stages="  - {stage: inversion, method: tkdd}\n")
    from qsmkit.errors import PluginError
    with pytest.raises(PluginError):
        run_cli(["--debug", "run", p])
