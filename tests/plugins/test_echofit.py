"""Tests of the multi-echo weighted least-squares fit (qsmkit_echofit)."""

import numpy as np
import pytest

from qsmkit.errors import GeometryError, InputDataError, MissingArtifactError, StageError, UnitsError
from qsmkit.physics import GAMMA, ppm_to_phase
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_echofit import WeightedFit, weighted_fit

TE = np.array([0.004, 0.009, 0.014, 0.019, 0.024])
B0 = 3.0


def _linear_case(shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    field = rng.uniform(-2.0, 2.0, shape).astype(np.float32)  # ppm
    phi0 = rng.uniform(-3.0, 3.0, shape).astype(np.float32)   # rad
    phase = np.stack([phi0 + ppm_to_phase(field, t, B0) for t in TE], -1).astype(np.float32)
    mag = (rng.uniform(0.2, 1.0, shape)[..., None] * np.exp(-TE / 0.03)).astype(np.float32)
    return field, phi0, phase, mag


def test_exact_linear_phase_is_fitted_exactly():
    field, phi0, phase, mag = _linear_case()
    res = weighted_fit(phase, mag, TE, B0)
    np.testing.assert_allclose(res["field"], field, atol=2e-5)
    np.testing.assert_allclose(res["phi0"], phi0, atol=2e-3)
    assert res["field"].dtype == np.float32 and res["noise_weight"].dtype == np.float32
    # without the offset model, a phase that has no offset is fitted exactly too
    phase0 = np.stack([ppm_to_phase(field, t, B0) for t in TE], -1)
    res0 = weighted_fit(phase0, mag, TE, B0, fit_offset=False)
    np.testing.assert_allclose(res0["field"], field, atol=2e-5)
    # uniform weights give the same exact answer
    np.testing.assert_allclose(weighted_fit(phase, None, TE, B0, weighting="uniform")["field"], field, atol=2e-5)


def test_mask_zeroes_outside_and_constant_offsets_per_echo_do_not_matter():
    field, phi0, phase, mag = _linear_case()
    mask = np.zeros(field.shape, bool)
    mask[2:10, 2:8, 1:7] = True
    res = weighted_fit(phase, mag, TE, B0, mask)
    assert np.all(res["field"][~mask] == 0) and np.all(res["noise_weight"][~mask] == 0)
    np.testing.assert_allclose(res["field"][mask], field[mask], atol=2e-5)
    # a per-echo constant that is linear in TE (what Laplacian unwrapping leaves) is a constant field
    shifted = phase + (0.7 + 35.0 * TE)[None, None, None, :].astype(np.float32)
    res2 = weighted_fit(shifted, mag, TE, B0, mask)
    offset = 35.0 / (GAMMA * B0 * 1e-6)
    np.testing.assert_allclose(res2["field"][mask], field[mask] + offset, atol=5e-5)


def test_single_echo_errors_are_repaired_by_2pi_moves():
    field, phi0, phase, mag = _linear_case(seed=1)
    bad = phase.copy()
    bad[3, 4, 5, 3] += 2 * np.pi      # one echo off by one cycle (a local unwrapping error)
    bad[6, 2, 1, 4] -= 4 * np.pi      # a late echo off by two cycles
    res = weighted_fit(bad, mag, TE, B0)
    assert res["n_corrected"] == 2
    np.testing.assert_allclose(res["field"], field, atol=2e-5)
    off = weighted_fit(bad, mag, TE, B0, correct_wraps=False)
    assert abs(off["field"][3, 4, 5] - field[3, 4, 5]) > 0.05


def test_noise_weight_is_the_inverse_std_of_the_field():
    """Monte Carlo: complex Gaussian noise on a known signal; 1/noise_weight matches the spread."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 40)
    true_field = 0.1  # ppm
    m0 = np.where(np.arange(shape[0])[:, None, None] < 20, 1.0, 0.5) * np.ones(shape)  # two levels
    t2s = 0.035
    sig = np.stack([m0 * np.exp(-t / t2s) * np.exp(1j * (0.4 + ppm_to_phase(true_field, t, B0))) for t in TE], -1)
    sigma = 0.02
    sig = sig + sigma * (rng.normal(size=sig.shape) + 1j * rng.normal(size=sig.shape))
    # the phase does not wrap here (at most 0.4 + 1.9 rad), so the angle is the unwrapped phase
    res = weighted_fit(np.angle(sig).astype(np.float32), np.abs(sig).astype(np.float32), TE, B0)
    assert res["sigma"] == pytest.approx(sigma, rel=0.05)
    for sl in (np.s_[:20], np.s_[20:]):
        f = res["field"][sl]
        predicted = np.median(1.0 / res["noise_weight"][sl])
        assert np.std(f) == pytest.approx(predicted, rel=0.08)
        assert np.mean(f) == pytest.approx(true_field, abs=3 * predicted / np.sqrt(f.size) + 1e-4)
    # the brighter half has the smaller field noise, by the magnitude ratio
    assert np.median(res["noise_weight"][:20]) / np.median(res["noise_weight"][20:]) == pytest.approx(2.0, rel=0.02)


def _ctx(phase, mag=None, te=TE, b0=B0, mask=None):
    art = {"unwrapped_phase": Volume.from_array(phase, units="rad"), "echo_times": te, "field_strength": b0}
    if mag is not None:
        art["magnitude"] = Volume.from_array(mag)
    if mask is not None:
        art["mask"] = Volume.from_array(mask)
    return StageContext(art, stage_label="echo_combine/weighted_fit", log=lambda s: None)


def test_stage_outputs_and_errors():
    field, phi0, phase, mag = _linear_case()
    p = WeightedFit.validate_params({}, "stages.2")
    out = WeightedFit().run(_ctx(phase, mag), p)
    assert out["total_field"].units == "ppm" and out["noise_weight"].units == "1/ppm"
    assert out["total_field"].data.shape == field.shape
    np.testing.assert_allclose(out["total_field"].data, field, atol=2e-5)
    with pytest.raises(InputDataError, match="echo times"):
        WeightedFit().run(_ctx(phase, mag, te=TE[:4]), p)
    with pytest.raises(UnitsError, match="milliseconds"):
        WeightedFit().run(_ctx(phase, mag, te=TE * 1000), p)
    with pytest.raises(UnitsError, match="tesla"):
        WeightedFit().run(_ctx(phase, mag, b0=-3.0), p)
    with pytest.raises(StageError, match="fit_offset"):
        WeightedFit().run(_ctx(phase[..., :1], mag[..., :1], te=TE[:1]), p)
    one = WeightedFit().run(_ctx(phase0 := np.stack([ppm_to_phase(field, TE[0], B0)], -1), mag[..., :1],
                                 te=TE[:1]), WeightedFit.validate_params({"fit_offset": False}, "s"))
    np.testing.assert_allclose(one["total_field"].data, field, atol=2e-5)
    assert phase0.shape[-1] == 1
    with pytest.raises(GeometryError):
        WeightedFit().run(_ctx(phase, mag[..., :4]), p)
    with pytest.raises(MissingArtifactError, match="uniform"):
        WeightedFit().run(_ctx(phase), p)
    uni = WeightedFit().run(_ctx(phase), WeightedFit.validate_params({"weighting": "uniform"}, "s"))
    np.testing.assert_allclose(uni["total_field"].data, field, atol=2e-5)
    with pytest.raises(StageError, match="empty"):
        WeightedFit().run(_ctx(phase, mag, mask=np.zeros(field.shape, bool)), p)
    assert load_registry().get("echo_combine", "weighted_fit") is WeightedFit


def test_phantom_field_from_true_phase(phantom_noiseless):
    """With the true (unwrapped) phase of the noiseless phantom, the fit gives the true total field.

    Only voxels whose signal is a single tissue follow the linear model exactly; voxels that
    mix tissues (block-averaged complex signal) do not, so the check is on the median error and
    on 95 % of the mask eroded by one voxel.
    """
    from qsmkit_mask import erode_mm

    ph = phantom_noiseless
    tot = ph.truth["total_field"].data
    mask = ph.truth["mask"].data
    # unwrap the phase using the truth: wrapped phase + 2 pi k nearest to phi0 + true field * TE
    phi0 = ph.phase_offset.data if ph.phase_offset is not None else 0.0
    ref = np.stack([phi0 + ppm_to_phase(tot, t, ph.field_strength) for t in ph.echo_times], -1)
    wrapped = ph.phase.data
    unwrapped = wrapped + 2 * np.pi * np.round((ref - wrapped) / (2 * np.pi))
    res = weighted_fit(unwrapped, ph.magnitude.data, ph.echo_times, ph.field_strength, mask)
    inner = erode_mm(mask, 1.0, ph.magnitude.voxel_size)
    err = np.abs(res["field"] - tot)[inner]
    assert np.median(err) < 1e-3 and np.percentile(err, 95) < 0.01


def _staged(phase, mag, mask, aff=None):
    aff = np.diag([2.0, 2.0, 2.0, 1.0]) if aff is None else aff
    return {"unwrapped_phase": Volume(phase, aff, units="rad"), "magnitude": Volume(mag, aff),
            "mask": Volume(mask, aff, units="bool"), "echo_times": TE, "field_strength": B0}


def _run_logged(cls, art, params):
    p = cls.validate_params(params, where="stages.0")
    lines = []
    ctx = StageContext(dict(art), stage_label=f"{cls.kind}/{cls.name}", log=lines.append)
    return cls().run(ctx, p), lines


def test_margin_fits_a_shell_around_the_mask():
    from qsmkit.operators import dilate_mm

    field, phi0, phase, mag = _linear_case()
    mask = np.zeros(field.shape, bool)
    mask[3:9, 3:7, 2:6] = True
    art = _staged(phase, mag, mask)
    plain, _ = _run_logged(WeightedFit, art, {})
    grown, lines = _run_logged(WeightedFit, art, {"fit_margin_mm": 2.0})
    shell = dilate_mm(mask, 2.0, (2.0, 2.0, 2.0)) & ~mask   # one 2 mm voxel around the mask
    f0, f1 = np.asarray(plain["total_field"].data), np.asarray(grown["total_field"].data)
    assert np.array_equal(f1[mask], f0[mask]) and np.all(f0[shell] == 0)
    np.testing.assert_allclose(f1[shell], field[shell], atol=2e-5)
    assert np.all(f1[~(mask | shell)] == 0) and np.all(np.asarray(grown["noise_weight"].data)[shell] > 0)
    assert any("2 mm margin" in ln for ln in lines)
    # a margin below the voxel size is one voxel
    thin, _ = _run_logged(WeightedFit, art, {"fit_margin_mm": 0.5})
    assert np.array_equal(np.asarray(thin["total_field"].data), f1)
    # unwrapping that ran inside the mask only leaves zeros around it: the fit stays in the mask, and says so
    inside_only = np.where(mask[..., None], phase, 0).astype(np.float32)
    out, lines = _run_logged(WeightedFit, _staged(inside_only, mag, mask), {"fit_margin_mm": 2.0})
    assert np.all(np.asarray(out["total_field"].data)[~mask] == 0)
    assert any("unwrap stage before the mask stage" in ln for ln in lines)


def test_nonlinear_fit_margin_fits_the_shell_too():
    from qsmkit.operators import dilate_mm
    from qsmkit_echofit import NonlinearFit

    field, phi0, phase, mag = _linear_case(shape=(16, 14, 12))
    field = np.full_like(field, 0.3)  # smooth: one alias branch everywhere
    phase = np.stack([phi0 + ppm_to_phase(field, t, B0) for t in TE], -1).astype(np.float32)
    mask = np.zeros(field.shape, bool)
    mask[4:12, 4:10, 3:9] = True
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    art = {**_staged(phase, mag, mask, aff), "phase": Volume(np.angle(np.exp(1j * phase)).astype(np.float32), aff,
                                                              units="rad")}
    out, _ = _run_logged(NonlinearFit, art, {"fit_margin_mm": 4.0})
    grown = dilate_mm(mask, 4.0, (2.0, 2.0, 2.0))
    f = np.asarray(out["total_field"].data)
    np.testing.assert_allclose(f[grown], field[grown], atol=1e-4)
    assert np.all(f[~grown] == 0)
