"""MCPC-3D-S phase-offset stage (``phase_offset/mcpc3ds``; Eckstein et al. 2018) on simulated data.

Acceptance (issue 11): on a phantom with a coil-like, wrapping phi0 (``phase_offset="coil"``,
~7.5 rad across the brain) MCPC-3D-S recovers phi0 to < 0.05 rad RMS in the brain (measured
0.016 on this 64^3 x 1.5 mm head, 0.007 on the default phantom), and the total field after
MCPC-3D-S -> unwrap -> weighted fit matches the field of the phi0-free phantom to < 1 % NRMSE over
the whole brain mask (noise-free; with noise, beyond the noise-only difference). The bipolar option removes an odd/even term ``delta = b (1 + x/FOV)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_stage
from qsmkit.errors import GeometryError, InputDataError, ParameterError
from qsmkit.metrics import nrmse
from qsmkit.plugins import load_registry
from qsmkit.simulate import simulate_phantom

from qsmkit_echofit import WeightedFit
from qsmkit_unwrap import RomeoUnwrap
from qsmkit_unwrap.mcpc3ds import MCPC3DS, smooth_phase

KW = dict(shape=(64, 64, 64), voxel_size=(1.5, 1.5, 1.5), seed=0)


@pytest.fixture(scope="module")
def coil():
    return simulate_phantom(phase_offset="coil", **KW)


@pytest.fixture(scope="module")
def no_offset():
    return simulate_phantom(phase_offset="none", **KW)


def _art(p, mask=True):
    art = dict(p.artifacts())
    art.pop("truth")
    if mask:
        art["mask"] = p.mask
    return art


def _wrapped_err(a, b, m):
    e = np.angle(np.exp(1j * (a - b)))[m]
    return float(np.sqrt(np.mean(e ** 2)))


def test_coil_phi0_recovered(coil, no_offset):
    m = coil.mask.data
    assert np.ptp(coil.phase_offset.data[m]) > 2 * np.pi          # the offset really wraps
    out = run_stage(MCPC3DS, _art(coil))
    assert out["phase"].units == "rad" and out["phase"].data.shape == coil.phase.data.shape
    assert out["phase"].data.min() >= -np.pi and out["phase"].data.max() < np.pi
    err = _wrapped_err(out["phase_offset"].data, coil.phase_offset.data, m)
    assert err < 0.05, err                                         # measured 0.016
    lap = run_stage(MCPC3DS, _art(coil), {"unwrapper": "laplacian"})  # the other unwrapper: the same
    assert _wrapped_err(lap["phase_offset"].data, coil.phase_offset.data, m) < 0.05
    # without the offset correction the offset is all there: a sanity check of the metric
    assert _wrapped_err(np.zeros_like(m, np.float32), coil.phase_offset.data, m) > 1.0
    # the corrected phase is the offset-free phase up to the small phi0 error and the noise
    d = _wrapped_err(out["phase"].data[..., 0], no_offset.phase.data[..., 0], m)
    assert d < 0.05, d


def _total_field(phase_offset, snr):
    """MCPC-3D-S (coil offset only) -> unwrap (romeo) -> weighted fit: the total field (ppm)."""
    p = simulate_phantom(phase_offset=phase_offset, snr=snr, **KW)
    art = _art(p)
    if phase_offset == "coil":
        art = run_stage(MCPC3DS, art)
    art = run_stage(RomeoUnwrap, art)
    return run_stage(WeightedFit, art)["total_field"].data, p


@pytest.fixture(scope="module")
def fields():
    """Total fields of the coil-phi0 phantom after MCPC-3D-S and of the phi0-free phantom,
    noise-free and at the simulator's default SNR, and the masks (whole, eroded by 3 mm)."""
    from qsmkit_mask import erode_mm

    out = {}
    for snr in (None, 100.0):
        for mode in ("coil", "none"):
            out[mode, snr], p = _total_field(mode, snr)
    m = p.mask.data > 0
    return out, m, erode_mm(m, 3.0, p.mask.voxel_size)


def test_total_field_unchanged_by_offset_and_correction(fields):
    """Noise-free: the total field after MCPC-3D-S equals that of the phi0-free phantom to < 1 %
    NRMSE over the whole brain mask (measured 0.28 %; eroded by 3 mm 0.13 %). Before the
    uncertain-voxel re-decision of unwrap/romeo this was 6 %: one mastoid-edge voxel whose echo-2
    magnitude is 8 % of echo 1's (a signal null) took the other 2 pi of the echo 1 -> 2 difference
    (the residual phi0 error there, 0.05 rad, changed the growth path), and with echoes at
    multiples of 4 ms all later echoes follow that line: -2.57 instead of -0.61 ppm."""
    f, m, inner = fields
    assert nrmse(f["none", None], f["coil", None], m) < 1.0
    assert nrmse(f["none", None], f["coil", None], inner) < 0.5


def test_total_field_unchanged_with_noise_beyond_the_noise_itself(fields):
    """With noise the correction rotates the noise (n exp(-i phi0)): the two phantoms carry different
    noise realisations, so their fields differ by the noise alone (measured 3.3 % over the whole
    mask: 2.1 % and 2.6 % between each noisy field and its noise-free one). The 1 % criterion is
    read as the difference beyond that: sqrt(e^2 - n_none^2 - n_coil^2) < 1 % (measured 0.4 %;
    on the eroded mask e = 1.08 % against a noise-only 1.18 %)."""
    f, m, inner = fields
    for msk in (m, inner):
        e = nrmse(f["none", 100.0], f["coil", 100.0], msk)
        n_none = nrmse(f["none", None], f["none", 100.0], msk)
        n_coil = nrmse(f["coil", None], f["coil", 100.0], msk)
        assert e * e - n_none ** 2 - n_coil ** 2 < 1.0, (e, n_none, n_coil)


def test_bipolar_term_removed():
    b = 0.8
    p = simulate_phantom(phase_offset="coil", bipolar=b, **KW)
    m = p.mask.data
    art = _art(p)
    plain = run_stage(MCPC3DS, art)
    corr = run_stage(MCPC3DS, art, {"bipolar": True})
    delta = np.broadcast_to(p.meta["bipolar_phase"], m.shape)
    # the estimated odd/even term is the simulated one (constant + readout ramp)
    assert _wrapped_err(corr["bipolar_phase"].data, delta, m) < 0.02
    # without the bipolar option the odd/even term leaks into phi0 (TE1/dTE * delta = 0.8 rad)
    assert _wrapped_err(plain["phase_offset"].data, p.phase_offset.data, m) > 0.5
    assert _wrapped_err(corr["phase_offset"].data, p.phase_offset.data, m) < 0.05
    # after the correction, the even echoes lie on the line of the odd ones: (phi1 + phi3)/2 - phi2
    # (equal spacing) is -delta in the data and ~0 after the correction, up to noise
    for q, want in ((p.phase.data, -delta[m]), (corr["phase"].data, 0.0)):
        resid = np.angle(np.exp(1j * (q[..., 0] + q[..., 2] - 2 * q[..., 1]))[m]) / 2
        assert np.sqrt(np.mean((resid - want) ** 2)) < 0.05
    with pytest.raises(InputDataError, match="equally spaced"):
        run_stage(MCPC3DS, {**art, "echo_times": np.array([0.004, 0.008, 0.014, 0.016, 0.020])}, {"bipolar": True})


def test_smoothing_first_order_keeps_a_linear_phase():
    """A linear phase (0.15 rad/mm, wrapping; the coil phantom has up to 0.1 rad/mm) is kept by the
    first-order smoothing also at the mask edge and across a magnitude step, where the plain
    weighted average is off by up to ~0.8 sigma |grad|. Left: third-order terms of the truncated
    kernel, (sigma |grad|)^3 (measured RMS 0.004 rad; plain 0.17)."""
    shape, vs = (40, 36, 30), (1.5, 1.5, 2.0)
    x, y, z = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vs)], indexing="ij")
    phi = 0.12 * x - 0.08 * y + 0.05 * z
    c = [(n - 1) * v / 2 for n, v in zip(shape, vs)]
    mask = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 20.0 ** 2
    w = mask.astype(np.float32) * (1.0 + 0.5 * (x > c[0]))          # a magnitude step too
    wrapped = np.angle(np.exp(1j * phi)).astype(np.float32)
    s1 = smooth_phase(wrapped, w, vs, 4.0)
    s0 = smooth_phase(wrapped, w, vs, 4.0, first_order=False)
    assert (phi[mask] > np.pi).any() and (phi[mask] < np.pi).any()       # the input wraps
    e1, e0 = _wrapped_err(s1, phi, mask), _wrapped_err(s0, phi, mask)
    assert e1 < 0.01 and e0 > 10 * e1, (e1, e0)


def test_bad_inputs(coil):
    art = _art(coil)
    with pytest.raises(InputDataError, match="echo times"):
        run_stage(MCPC3DS, {**art, "echo_times": coil.echo_times[:3]})
    with pytest.raises(GeometryError, match="magnitude shape"):
        run_stage(MCPC3DS, {**art, "magnitude": coil.magnitude.like(coil.magnitude.data[..., :4])})
    with pytest.raises(InputDataError, match="multi-echo"):
        run_stage(MCPC3DS, {**art, "phase": coil.phase.like(coil.phase.data[..., :1]),
                            "magnitude": coil.magnitude.like(coil.magnitude.data[..., :1])})
    with pytest.raises(InputDataError, match="zero everywhere"):
        run_stage(MCPC3DS, {**art, "magnitude": coil.magnitude.like(np.zeros_like(coil.magnitude.data))})
    with pytest.raises(ParameterError, match="echoes"):
        run_stage(MCPC3DS, art, {"echoes": [2, 2]})
    with pytest.raises(ParameterError):
        MCPC3DS.validate_params({"unwrapper": "best"}, "stages.1")
    assert load_registry().get("phase_offset", "mcpc3ds") is MCPC3DS


def test_pipeline_plan_runs_phase_offset_stage(tmp_path):
    """The plugin-defined kind plans and runs in a pipeline: it transforms the given phase."""
    from qsmkit.pipeline import build_plan, run_plan

    spec = {"inputs": {"simulate": {"shape": [40, 40, 40], "voxel_size": [2.0, 2.0, 2.0], "phase_offset": "coil",
                                    "oversample": 1}},
            "stages": [{"stage": "phase_offset", "method": "mcpc3ds"},
                       {"stage": "unwrap", "method": "romeo"},
                       {"stage": "echo_combine", "method": "weighted_fit"}],
            "output_dir": str(tmp_path / "out")}
    plan = build_plan(spec, load_registry())
    assert [s.run for s in plan.steps] == [True, True, True]
    res = run_plan(plan, log=lambda m: None)
    assert (tmp_path / "out" / "phase_offset.nii.gz").exists()
    assert res.artifacts["phase_offset"].units == "rad"
    assert np.isfinite(res.artifacts["total_field"].data).all()


def test_nonlinear_fit_after_mcpc3ds_reports_the_datas_phase_offset(tmp_path):
    """With MCPC-3D-S first, the fit's own offset is a residual; the phase_offset written is still the
    measured data's phi0 (removed + residual), not the residual alone."""
    from qsmkit.pipeline import build_plan, run_plan

    spec = {"qc": False,
            "inputs": {"simulate": {"shape": [40, 40, 40], "voxel_size": [2.0, 2.0, 2.0], "phase_offset": "coil",
                                    "oversample": 1, "snr": None}},
            "stages": [{"stage": "phase_offset", "method": "mcpc3ds"},
                       {"stage": "unwrap", "method": "romeo"},
                       {"stage": "echo_combine", "method": "nonlinear_fit"}],
            "output_dir": str(tmp_path / "out")}
    res = run_plan(build_plan(spec, load_registry()), log=lambda m: None)
    truth = simulate_phantom(shape=(40, 40, 40), voxel_size=(2.0, 2.0, 2.0), phase_offset="coil", oversample=1,
                             snr=None)
    m = truth.mask.data > 0
    assert _wrapped_err(res.artifacts["phase_offset"].data, truth.phase_offset.data, m) < 0.05
