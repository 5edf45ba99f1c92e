"""Phase units (``inputs.phase_units: rad | deg | scaled``) and bad magnitude input (issue 11).

Each detection path of :func:`qsmkit.io.acquisition.convert_phase`: radians pass untouched,
degrees convert, vendor integers (signed -4096..4095 and unsigned 0..4095) are rescaled from the
range detected in the data (stated in one ``warning:`` line), and undeclared non-radian phase
is a one-line error naming the ``phase_units`` to set. Echo-count and not-radians cases of the
CLI are in ``test_bad_input_catalogue.py`` / ``test_cli_errors.py`` (not repeated here).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import oblique_affine, run_cli, write_nifti
from qsmkit.errors import QsmkitWarning, UnitsError
from qsmkit.io.acquisition import convert_phase, scaled_phase_range
from qsmkit.volume import Volume

SHAPE = (12, 12, 10)
AFFINE = oblique_affine((1.0, 1.0, 1.5), 10.0)
TE = "[0.004, 0.008, 0.012]"
CHAIN = ("  - {stage: mask, method: threshold}\n  - {stage: unwrap, method: laplacian}\n"
         "  - {stage: echo_combine, method: weighted_fit}\n")


def _phi(seed=0):
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, SHAPE + (3,)).astype(np.float32)


def _vol(data):
    return Volume(np.array(data), AFFINE)


def _close_wrapped(a, b, atol):
    np.testing.assert_allclose(np.angle(np.exp(1j * (a.astype(np.float64) - b))), 0.0, atol=atol)


def test_radians_pass_unchanged():
    phi = _phi()
    out = convert_phase(_vol(phi), "rad", False)
    np.testing.assert_array_equal(out.data, phi)
    assert out.units == "rad"
    np.testing.assert_allclose(convert_phase(_vol(phi), "rad", True).data, -phi, atol=1e-6)   # invert_phase


def test_degrees_convert_and_undeclared_degrees_are_an_error():
    phi = _phi()
    out = convert_phase(_vol(np.rad2deg(phi)), "deg", False)
    _close_wrapped(out.data, phi, 1e-5)
    assert out.data.min() >= -np.pi and out.data.max() < np.pi
    # 0..360 degrees too
    _close_wrapped(convert_phase(_vol(np.rad2deg(phi) % 360), "deg", False).data, phi, 1e-5)
    for deg in (np.rad2deg(phi), np.rad2deg(phi) % 360):
        with pytest.raises(UnitsError, match=r"looks like degrees.*set inputs.phase_units: deg$") as e:
            convert_phase(_vol(deg), "rad", False)
        assert "\n" not in str(e.value)
    with pytest.raises(UnitsError, match="beyond \\+-360 degrees; set inputs.phase_units: scaled"):
        convert_phase(_vol(np.full(SHAPE, 4000.0, np.float32)), "deg", False)


def _to_ints(phi, signed):
    if signed:   # Siemens-like 13-bit signed: -4096..4095 <-> [-pi, pi)
        return np.clip(np.round(phi / np.pi * 4096), -4096, 4095)
    return np.round((phi + np.pi) / (2 * np.pi) * 4096) % 4096      # 12-bit unsigned: 0..4095


@pytest.mark.parametrize("signed", [True, False])
def test_scaled_integers_are_detected_and_rescaled(signed):
    phi = _phi(1)
    ints = _to_ints(phi, signed)
    want = "integer range -4096..4095" if signed else "integer range 0..4095"
    with pytest.warns(QsmkitWarning, match=f"inputs.phase: phase_units scaled: {want}"):
        out = convert_phase(_vol(ints.astype(np.int16)), "scaled", False)
    _close_wrapped(out.data, phi, np.pi / 4096 + 1e-6)
    assert out.meta["phase_scaling"]["how"].startswith(want)
    # the range comes from the integer width, not from the data's min/max: a phase that does not
    # use the whole range (|phase| < 0.6 pi) is still scaled correctly, as long as it reaches past
    # half of the range (any wrapped phase image does: it spans [-pi, pi))
    small = (0.6 * phi).astype(np.float32)
    part = _to_ints(small, signed)
    assert np.ptp(part) < 0.65 * (8192 if signed else 4096)
    with pytest.warns(QsmkitWarning, match=want):
        sub = convert_phase(_vol(part.astype(np.float32)), "scaled", False)
    _close_wrapped(sub.data, small, np.pi / 4096 + 1e-6)
    # and undeclared, the integers are a one-line error that names scaled
    with pytest.raises(UnitsError, match="vendor's integer scale.*set inputs.phase_units: scaled") as e:
        convert_phase(_vol(ints.astype(np.float32)), "rad", False)
    assert "\n" not in str(e.value)


def test_scaled_range_rules():
    assert scaled_phase_range(np.array([0, 17, 255], np.int32))[:2] == (0.0, 255.0)
    assert scaled_phase_range(np.array([3, 4095], np.int32))[:2] == (0.0, 4095.0)
    assert scaled_phase_range(np.array([0, 4096], np.int32))[:2] == (0.0, 8191.0)
    assert scaled_phase_range(np.array([-2048, 2047], np.int32))[:2] == (-2048.0, 2047.0)
    assert scaled_phase_range(np.array([-4000.0, 10.0]))[:2] == (-4096.0, 4095.0)
    lo, hi, how = scaled_phase_range(np.array([-1.5, 2.5]))                 # not integers: min..max
    assert (lo, hi) == (-1.5, 2.5) and "not integers" in how


def _write(folder, phase, mag=None) -> None:
    mag = np.random.default_rng(0).uniform(1, 2, SHAPE + (3,)).astype(np.float32) if mag is None else mag
    write_nifti(folder / "mag.nii.gz", mag, AFFINE)
    write_nifti(folder / "phase.nii.gz", phase, AFFINE)


def _pipeline(folder, extra=""):
    p = folder / "p.yaml"
    p.write_text(f"name: t\ninputs: {{magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: {TE}, "
                 f"field_strength: 3.0{extra}}}\nstages:\n{CHAIN}output_dir: out\n")
    return p


def test_scaled_phase_through_the_cli_states_the_range(tmp_path, capsys):
    phi = _phi(2)
    _write(tmp_path, np.clip(np.round(phi / np.pi * 4096), -4096, 4095).astype(np.int16))
    code, out, err = run_cli(["run", _pipeline(tmp_path, ", phase_units: scaled")], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "phase_units scaled" in ln]
    assert len(lines) == 1 and "integer range -4096..4095 (13-bit signed) rescaled to [-pi, pi)" in lines[0], err
    assert (tmp_path / "out" / "total_field.nii.gz").exists()


def _one_error(capsys, args, needle, folder):
    code, _, err = run_cli(args, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert needle in errors[0], errors[0]
    assert not (folder / "out").exists() or not any((folder / "out").iterdir())
    return errors[0]


def test_undeclared_degrees_through_the_cli(tmp_path, capsys):
    _write(tmp_path, np.rad2deg(_phi(3)))
    _one_error(capsys, ["run", _pipeline(tmp_path)], "looks like degrees", tmp_path)
    # declared, it runs
    with warnings.catch_warnings():
        warnings.simplefilter("error", QsmkitWarning)     # degrees need no assumption: no warning line
        code, _, err = run_cli(["run", _pipeline(tmp_path, ", phase_units: deg")], capsys)
    assert code == 0, err


def test_all_zero_magnitude_is_a_one_line_error(tmp_path, capsys):
    _write(tmp_path, _phi(4), np.zeros(SHAPE + (3,), np.float32))
    _one_error(capsys, ["run", _pipeline(tmp_path)], "inputs.magnitude: the magnitude is zero everywhere", tmp_path)
