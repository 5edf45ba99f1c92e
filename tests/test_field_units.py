"""Fields given as files in Hz, rad/s or radians instead of ppm: detected (one line, exit 2) or converted."""

import math

import nibabel as nib
import numpy as np
import pytest

from helpers import run_cli, write_nifti
from qsmkit.errors import ConfigError, UnitsError
from qsmkit.io.units import check_field_units, convert_field_units, field_amplitude
from qsmkit.physics import GAMMA_BAR

B0 = 3.0
HZ_PER_PPM = GAMMA_BAR * 1e-6 * B0          # 127.7 Hz per ppm at 3 T
SHAPE = (16, 16, 12)


def _sphere_field(amplitude_ppm: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth field (ppm) whose robust amplitude is about ``amplitude_ppm``, and a ball mask."""
    g = np.indices(SHAPE, dtype=np.float32)
    c = [(n - 1) / 2 for n in SHAPE]
    r2 = sum(((g[i] - c[i]) / (SHAPE[i] / 2)) ** 2 for i in range(3))
    mask = r2 < 0.8
    f = amplitude_ppm * np.sin(2.0 * g[0] / SHAPE[0] * math.pi) * np.cos(g[2] / SHAPE[2] * math.pi)
    return (f * mask).astype(np.float32), mask


def test_ppm_passes_for_total_and_local_fields():
    tot, mask = _sphere_field(2.0)
    loc, _ = _sphere_field(0.1)
    assert 1.0 < check_field_units(tot, mask, "total_field", B0) < 3.0
    assert check_field_units(loc, mask, "local_field", B0) < 0.2
    assert field_amplitude(tot, None) == pytest.approx(field_amplitude(tot, mask), rel=0.05)


@pytest.mark.parametrize("artifact, amp", [("total_field", 1.0), ("local_field", 0.1)])
def test_hz_detected_with_the_numbers_and_the_declaration(artifact, amp):
    f, mask = _sphere_field(amp)
    with pytest.raises(UnitsError) as e:
        check_field_units(f * HZ_PER_PPM, mask, artifact, B0)
    msg = str(e.value)
    assert "\n" not in msg
    assert "probably Hz" in msg and "field_units: hz" in msg, msg
    implied = float(msg.split("probably Hz (")[1].split(" ppm")[0])
    assert implied == pytest.approx(field_amplitude(f, mask), rel=0.01)


def test_rad_s_detected():
    f, mask = _sphere_field(1.0)
    with pytest.raises(UnitsError, match=r"probably rad/s .*field_units: rad_s"):
        check_field_units(f * 2 * math.pi * HZ_PER_PPM, mask, "total_field", B0)


def test_radians_of_phase_detected_with_the_echo_time():
    f, mask = _sphere_field(2.0)          # 2 ppm at 3 T and 20 ms: about 30 rad
    te = 0.02
    with pytest.raises(UnitsError, match=r"probably radians of phase .*'field_units: rad' .*echo_times"):
        check_field_units(f * 2 * math.pi * HZ_PER_PPM * te, mask, "total_field", B0, [te])


@pytest.mark.parametrize("units, scale", [("hz", HZ_PER_PPM), ("rad_s", 2 * math.pi * HZ_PER_PPM),
                                          ("rad", 2 * math.pi * HZ_PER_PPM * 0.015), ("ppm", 1.0)])
def test_declared_units_convert_to_ppm(units, scale):
    f, _ = _sphere_field(0.7)
    got = convert_field_units(f * scale, units, B0, [0.015])
    np.testing.assert_allclose(got, f, rtol=1e-5, atol=1e-7)
    assert got.dtype == np.float32


def test_conversion_needs_field_strength_and_one_echo_time():
    f, _ = _sphere_field(0.7)
    with pytest.raises(ConfigError, match="field_strength"):
        convert_field_units(f, "hz", None)
    with pytest.raises(ConfigError, match="one value"):
        convert_field_units(f, "rad", B0, [0.01, 0.02])


# ---------------------------------------------------------------- through the command line
@pytest.fixture
def folder(tmp_path):
    f, mask = _sphere_field(0.1)
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    write_nifti(tmp_path / "lf_ppm.nii.gz", f, aff)
    write_nifti(tmp_path / "lf_hz.nii.gz", f * np.float32(HZ_PER_PPM), aff)
    write_nifti(tmp_path / "mask.nii.gz", mask.astype(np.uint8), aff)
    return tmp_path


def _pipeline(folder, field, extra=""):
    p = folder / "p.yaml"
    p.write_text(f"name: t\ninputs: {{local_field: {field}, mask: mask.nii.gz{extra}}}\n"
                 "stages:\n  - {stage: inversion, method: tkd}\noutput_dir: out\n")
    return p


def test_cli_hz_field_is_one_line_exit_2(folder, capsys):
    code, _, err = run_cli(["run", _pipeline(folder, "lf_hz.nii.gz")], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err
    assert "inputs.local_field" in lines[0] and "probably Hz" in lines[0] and "field_units: hz" in lines[0]
    assert not (folder / "out").exists() or not any((folder / "out").iterdir())


def test_cli_declared_hz_matches_the_ppm_run(folder, capsys):
    code, _, err = run_cli(["run", _pipeline(folder, "lf_ppm.nii.gz"), "--output-dir", folder / "a"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", _pipeline(folder, "lf_hz.nii.gz", ", field_units: hz, field_strength: 3.0"),
                            "--output-dir", folder / "b"], capsys)
    assert code == 0, err
    a = nib.load(str(folder / "a" / "chi.nii.gz")).get_fdata()
    b = nib.load(str(folder / "b" / "chi.nii.gz")).get_fdata()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())


def test_cli_declaration_errors(folder, capsys):
    code, _, err = run_cli(["validate", _pipeline(folder, "lf_hz.nii.gz", ", field_units: hz")], capsys)
    assert code == 2 and "field_strength" in err.strip().splitlines()[-1]
    code, _, err = run_cli(["validate", _pipeline(folder, "lf_hz.nii.gz", ", field_units: gauss")], capsys)
    assert code == 2 and "choose one of ppm, hz, rad_s, rad" in err.strip().splitlines()[-1]
