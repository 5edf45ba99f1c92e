"""Tests of the MEDI inversion plugin (qsmkit_medi): operators, masks, the closed-form limit,
Gauss-Newton monotonicity, accuracy on the simulator phantom against TKD, MEDI+0, MERIT, SMV,
and user errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmkit import Volume  # noqa: E402
from qsmkit import metrics as qm  # noqa: E402
from qsmkit.errors import (InputDataError, MissingArtifactError, ParameterError,  # noqa: E402
                           StageError)
from qsmkit.physics import GAMMA_BAR, dipole_convolve, dipole_kernel  # noqa: E402
from qsmkit.stage import StageContext  # noqa: E402
from qsmkit_medi import (MEDI, csf_mask_from_r2star, gradient_mask, medi, phase_scale,  # noqa: E402
                         r2star_map)

medi_mod = sys.modules["qsmkit_medi.medi"]


# --------------------------------------------------------------------------- helpers
def blob_phantom(n: int = 40, b0=(0.0, 0.0, 1.0), vs=(1.0, 1.0, 1.0)):
    """A spherical 'brain' with ellipsoidal inclusions; magnitude piecewise constant per region.

    Returns chi (ppm), its field (ppm, zero-padded x2 convolution, masked), mask and magnitude.
    """
    g = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * v for v in vs], indexing="ij")
    rad = 0.42 * n
    mask = sum(x * x for x in g) <= rad * rad
    chi = np.where(mask, -0.02, 0).astype(np.float32)
    mag = np.where(mask, 0.8, 0).astype(np.float32)
    specs = [((0.3, 0, 0), (0.12, 0.2, 0.15), 0.12, 0.5), ((-0.3, 0.1, 0.05), (0.1, 0.1, 0.2), 0.06, 0.6),
             ((0, -0.3, -0.1), (0.15, 0.08, 0.08), -0.08, 1.0), ((0.0, 0.25, 0.25), (0.06, 0.06, 0.06), 0.3, 0.3),
             ((0.0, 0.0, 0.0), (0.08, 0.15, 0.1), 0.0, 1.2)]
    for c, r, val, mg in specs:
        e = sum(((x - ci * n) / (ri * n)) ** 2 for x, ci, ri in zip(g, c, r)) <= 1
        chi[e & mask] = val
        mag[e & mask] = mg
    field = dipole_convolve(chi, vs, b0, padding=2.0) * mask
    return chi, field.astype(np.float32), mask, mag


def fisher_noise_weight(ph) -> np.ndarray:
    """Inverse noise std (1/ppm) of a multi-echo field fit with known offset, from the phantom's
    magnitude and noise level: ``2 pi GAMMA_BAR B0 1e-6 sqrt(sum_j (|S_j| TE_j)^2) / sigma``."""
    mag = ph.magnitude.data
    te = np.asarray(ph.echo_times)
    scale = 2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6 / ph.meta["noise_sigma"]
    return (np.sqrt(np.sum((mag * te) ** 2, axis=3)) * scale).astype(np.float32)


def run_stage(params=None, log=None, **artifacts):
    p = MEDI.validate_params(params or {}, where="stages.0")
    ctx = StageContext(artifacts, stage_label="inversion/medi", log=log)
    return MEDI().run(ctx, p)


def demeaned_nrmse(est, truth, mask):
    return qm.nrmse(np.where(mask, truth - truth[mask].mean(), 0), np.where(mask, est - est[mask].mean(), 0), mask)


@pytest.fixture(scope="module")
def blob():
    return blob_phantom(40)


@pytest.fixture(scope="module")
def small_inputs(phantom_small):
    """Artifacts of phantom_small for MEDI from the true local field (3 T, 5 echoes)."""
    t = phantom_small.truth
    f = t["local_field"]
    return dict(local_field=f, mask=t["mask"], magnitude=phantom_small.magnitude,
                noise_weight=f.like(fisher_noise_weight(phantom_small), units="1/ppm"),
                field_strength=phantom_small.field_strength, echo_times=np.asarray(phantom_small.echo_times))


@pytest.fixture(scope="module")
def small_medi(small_inputs):
    """Default MEDI on phantom_small's true local field, with the solver history (one run, shared)."""
    a = small_inputs
    f = a["local_field"]
    return medi(f.data, a["mask"].data, f.voxel_size, f.b0_direction, a["magnitude"].data,
                a["noise_weight"].data, field_strength=a["field_strength"], echo_times=a["echo_times"])


# --------------------------------------------------------------------------- registration
def test_registered_through_entry_point():
    from qsmkit.plugins import load_registry

    cls = load_registry().get("inversion", "medi")
    assert cls.__name__ == "MEDI" and cls.kind == "inversion" and cls.name == "medi"
    assert {"lambda", "edge_percentage", "smv_radius_mm", "merit", "lambda_csf", "max_iter", "cg_max_iter",
            "tol", "device", "padding"} <= set(cls.param_map())


# --------------------------------------------------------------------------- operators
def test_difference_operator_adjoint_and_dipole_symmetry():
    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    dh = torch.from_numpy(np.ascontiguousarray(dipole_kernel(shape, (1.0, 1.2, 0.9), (0.2, 0.1, 1.0))[..., :5]))
    ops = medi_mod._Ops(shape, dh, torch.device("cpu"))
    x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    y = torch.from_numpy(rng.normal(size=(3,) + shape).astype(np.float32))
    y[0, -1] = 0
    y[1, :, -1] = 0
    y[2, :, :, -1] = 0
    gx = ops.diff(x).clone()
    dty = ops.diff_t(y, torch.empty(shape))
    lhs, rhs = float(torch.sum(gx.double() * y.double())), float(torch.sum(x.double() * dty.double()))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # forward differences: x[i+1] - x[i], zero in the last slice
    assert torch.allclose(gx[0, :-1], x[1:] - x[:-1]) and float(gx[2, :, :, -1].abs().max()) == 0
    # the real dipole convolution is self-adjoint and equals real(ifft(D fft(x)))
    z = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    dx, dz = ops.dconv(x).clone(), ops.dconv(z).clone()
    lhs = float(torch.sum(dx.double() * z.double()))
    assert lhs == pytest.approx(float(torch.sum(x.double() * dz.double())), rel=1e-4)
    full = np.fft.ifftn(dipole_kernel(shape, (1.0, 1.2, 0.9), (0.2, 0.1, 1.0)) * np.fft.fftn(x.numpy())).real
    np.testing.assert_allclose(dx.numpy(), full, atol=1e-5)


def test_edge_mask_and_phase_scale_are_the_cores():
    """MEDI re-exports the core's edge mask and phase scale (shared with TFI; tested in the core)."""
    import qsmkit.operators
    import qsmkit.physics

    assert gradient_mask is qsmkit.operators.gradient_mask and phase_scale is qsmkit.physics.phase_scale


# --------------------------------------------------------------------------- closed-form limit
@pytest.mark.parametrize("amplitude", [1.0, 20.0])
def test_no_regularisation_gives_closed_form_least_squares(amplitude):
    """lambda large, M_G = 0, noise-free, full mask, uniform weights, no padding: the Gauss-Newton
    result is the minimum-norm least-squares solution ifft(F / D) (D != 0), in the linear regime
    (field ~ 0.03 ppm) and in the nonlinear one (field ~ 0.6 ppm, residual phases ~ pi/2)."""
    n = 32
    rng = np.random.default_rng(0)
    g = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    chi = np.zeros((n, n, n), np.float32)
    for _ in range(6):
        c, r, a = rng.uniform(8, 24, 3), rng.uniform(2, 5), rng.uniform(-0.1, 0.1)
        chi += a * np.exp(-sum((gi - ci) ** 2 for gi, ci in zip(g, c)) / (2 * r * r))
    chi *= amplitude
    d = dipole_kernel((n, n, n), (1, 1, 1), (0, 0, 1))
    f = np.fft.ifftn(d * np.fft.fftn(chi)).real.astype(np.float32)
    ls = np.fft.ifftn(np.where(d != 0, np.fft.fftn(f) / np.where(d == 0, 1, d), 0)).real
    res = medi(f, np.ones((n, n, n), bool), (1, 1, 1), (0, 0, 1), edge_mask=np.zeros((3, n, n, n), bool),
               lam=1e6, padding=1.0, max_iter=4, cg_max_iter=50, cg_tol=1e-6, tol=0)
    assert res.work_shape == (n, n, n)
    err = np.linalg.norm(res.chi - ls) / np.linalg.norm(ls)
    assert err < 2e-3
    assert all(b <= a for a, b in zip(res.cost, res.cost[1:]))


# --------------------------------------------------------------------------- phantom: acceptance
def test_gauss_newton_cost_decreases_monotonically(small_medi):
    r = small_medi
    assert r.n_iter >= 3
    assert all(b <= a for a, b in zip(r.cost, r.cost[1:])), r.cost
    assert all(s == 1.0 for s in r.steps), "full Gauss-Newton steps should decrease the cost without backtracking"
    assert r.cost[-1] < 0.3 * r.cost[0]
    assert r.update[0] == pytest.approx(1.0) and r.update[-1] < r.update[0]


def test_medi_beats_tkd_on_simulator_phantom(small_inputs, small_medi, phantom_small):
    """Acceptance 1: NRMSE <= 0.8 x TKD's from the true local field (measured: MEDI ~19 %,
    TKD ~35 % on phantom_small), with better HFEN and XSIM and less error around the haemorrhage."""
    from scipy import ndimage
    from qsmkit_tkd import tkd

    a = small_inputs
    f, m = a["local_field"], a["mask"].data.astype(bool)
    truth = phantom_small.truth["chi"].data
    chi_tkd = tkd(f.data, m, f.voxel_size, f.b0_direction)
    chi_medi = small_medi.chi
    e_tkd, e_medi = qm.evaluate(truth, chi_tkd, m), qm.evaluate(truth, chi_medi, m)
    assert e_medi["nrmse"] <= 0.8 * e_tkd["nrmse"], (e_medi["nrmse"], e_tkd["nrmse"])
    assert e_medi["hfen"] < e_tkd["hfen"] and e_medi["xsim"] > e_tkd["xsim"]
    # streaks: RMSE in a 1-6 mm shell around the haemorrhage
    lab = phantom_small.truth["labels"].data
    lesion = lab == 11
    assert lesion.any()
    dist = ndimage.distance_transform_edt(~lesion)
    shell = (dist > 1) & (dist <= 6) & m

    def shell_rmse(x):
        d = (x - x[m].mean()) - (truth - truth[m].mean())
        return float(np.sqrt(np.mean(d[shell] ** 2)))

    assert shell_rmse(chi_medi) < 0.8 * shell_rmse(chi_tkd)
    # the stage gives the same map as the pure function
    out = run_stage({}, **a)
    np.testing.assert_allclose(out["chi"].data, chi_medi, atol=1e-5)
    assert out["chi"].units == "ppm" and out["chi"].data.dtype == np.float32


def test_medi_plus0_reduces_ventricle_error(small_inputs, phantom_small):
    """Acceptance 3: with a noisy field (5x the thermal noise), the CSF term (lambda_csf 100) lowers
    the mean error of chi in the ventricles (by ~17 %) and their mean absolute error."""
    from scipy import ndimage

    a = dict(small_inputs)
    m = a["mask"].data.astype(bool)
    lab = phantom_small.truth["labels"].data
    truth = phantom_small.truth["chi"].data
    vent = (lab == 1) & (ndimage.distance_transform_edt(m) > 8)
    assert vent.sum() > 100
    rng = np.random.default_rng(1)
    nw = a["noise_weight"].data
    f = a["local_field"]
    noisy = f.data + (rng.normal(size=f.shape) * np.where(m, 5.0 / np.maximum(nw, 1e-6), 0)).astype(np.float32)
    a["local_field"] = f.like(noisy)
    a["csf_mask"] = f.like(vent, units="bool")

    def vent_errors(chi):
        d = (chi - chi[m].mean()) - (truth - truth[m].mean())
        return abs(float(d[vent].mean())), float(np.abs(d[vent]).mean())

    plain = run_stage({}, **a)["chi"].data
    lines = []
    plus0 = run_stage({"lambda_csf": 100.0}, log=lines.append, **a)["chi"].data
    bias_p, mae_p = vent_errors(plain)
    bias_0, mae_0 = vent_errors(plus0)
    assert bias_0 < 0.9 * bias_p and mae_0 < mae_p, (bias_p, bias_0, mae_p, mae_0)   # ~3.1e-3 -> 2.6e-3 ppm
    assert abs(float(plus0[vent].mean())) < 1e-5           # referenced to CSF
    assert any("CSF mask for MEDI+0" in s and "given csf_mask" in s for s in lines)


def test_automatic_csf_mask_from_r2star(phantom_small):
    # exact R2* on a mono-exponential decay
    te = np.array([0.004, 0.008, 0.012, 0.016])
    r2 = np.array([3.0, 20.0, 50.0])
    mag = np.exp(-np.outer(r2, te)).reshape(3, 1, 1, 4) * np.ones((3, 2, 2, 4))
    est = r2star_map(mag.astype(np.float32), te, np.ones((3, 2, 2), bool))
    np.testing.assert_allclose(est[:, 0, 0], r2, rtol=1e-4)
    # on the phantom: ventricular CSF only, deep inside the mask
    m = phantom_small.truth["mask"].data.astype(bool)
    lab = phantom_small.truth["labels"].data
    csf = csf_mask_from_r2star(r2star_map(phantom_small.magnitude.data, phantom_small.echo_times, m), m,
                               phantom_small.magnitude.voxel_size, field_strength=3.0)
    assert csf.sum() >= 20
    assert np.all(lab[csf] == 1)
    from scipy import ndimage
    assert ndimage.distance_transform_edt(m)[csf].min() > 10


def test_stage_finds_csf_itself_when_not_given(blob):
    """lambda_csf > 0 without csf_mask: CSF from R2* of a multi-echo magnitude (low-R2* core)."""
    chi, f, m, mag = blob
    n = m.shape[0]
    te = np.array([0.005, 0.010, 0.015, 0.020])
    r2 = np.where(mag == 1.2, 2.0, 25.0)                    # the central inclusion is 'CSF'
    mag4 = (mag[..., None] * np.exp(-r2[..., None] * te)).astype(np.float32)
    vol = Volume.from_array(f, units="ppm")
    lines = []
    out = run_stage({"lambda_csf": 100.0, "max_iter": 3}, log=lines.append, local_field=vol,
                    mask=vol.like(m, units="bool"), magnitude=vol.like(mag4), echo_times=te, field_strength=3.0)
    csf = mag == 1.2
    assert any("R2*" in s for s in lines)
    assert abs(float(out["chi"].data[csf & m].mean())) < 1e-4   # referenced to the CSF found
    assert np.isfinite(out["chi"].data).all() and n == out["chi"].data.shape[0]


# --------------------------------------------------------------------------- options
def test_merit_suppresses_an_inconsistent_region(blob):
    """A 4x4x4 block with a +0.3 ppm field error (e.g. an unwrapping error) spoils the map; MERIT
    finds it from the residual and restores the accuracy elsewhere (measured ~250 % -> ~11 %)."""
    chi, f, m, mag = blob
    rng = np.random.default_rng(0)
    fn = f + rng.normal(0, 0.002, f.shape).astype(np.float32) * m
    bad = np.zeros_like(m)
    bad[10:14, 18:22, 18:22] = True
    bad &= m
    fb = fn.copy()
    fb[bad] += 0.3
    ok = m & ~bad
    clean = demeaned_nrmse(medi(fn, m, (1, 1, 1), (0, 0, 1), mag).chi, chi, ok)
    plain = demeaned_nrmse(medi(fb, m, (1, 1, 1), (0, 0, 1), mag).chi, chi, ok)
    merit = demeaned_nrmse(medi(fb, m, (1, 1, 1), (0, 0, 1), mag, merit=True).chi, chi, ok)
    assert merit < 0.2 * plain and merit < 1.5 * clean, (clean, plain, merit)


def test_smv_preprocessing_erodes_mask_and_stays_accurate(blob):
    chi, f, m, mag = blob
    vol = Volume.from_array(f, units="ppm")
    out = run_stage({"smv_radius_mm": 3.0}, local_field=vol, mask=vol.like(m, units="bool"),
                    magnitude=vol.like(mag[..., None]), field_strength=3.0, echo_times=np.array([0.005, 0.01]))
    em = out["mask"].data
    assert em.sum() < m.sum() and not (em & ~m).any()
    # eroded by ~3 mm: the sphere's radius shrinks by 3 voxels (+-1)
    r0 = (m.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    r1 = (em.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    assert 2.0 <= r0 - r1 <= 4.0
    x = out["chi"].data
    assert not x[~em].any()
    assert demeaned_nrmse(x, chi, em) < 40.0


def test_tilted_b0_and_anisotropic_voxels():
    vs = (1.0, 1.0, 1.5)
    b0 = np.array([0.3, 0.0, 1.0]) / np.linalg.norm([0.3, 0.0, 1.0])
    chi, f, m, mag = blob_phantom(36, b0=b0, vs=vs)
    from qsmkit_tkd import tkd

    r = medi(f, m, vs, b0, mag)
    e_medi = demeaned_nrmse(r.chi, chi, m)
    e_tkd = demeaned_nrmse(tkd(f, m, vs, b0), chi, m)
    assert e_medi < 0.8 * e_tkd, (e_medi, e_tkd)


# --------------------------------------------------------------------------- user errors
def _blob_vols(blob):
    chi, f, m, mag = blob
    vol = Volume.from_array(f, units="ppm")
    return vol, vol.like(m, units="bool"), vol.like(mag[..., None])


def test_missing_magnitude_is_a_clear_error(blob):
    f, m, _ = _blob_vols(blob)
    with pytest.raises(MissingArtifactError, match="magnitude.*edge_percentage: 0"):
        run_stage({}, local_field=f, mask=m)


def test_missing_noise_weight_falls_back_to_uniform_with_warning(blob):
    f, m, mag = _blob_vols(blob)
    lines = []
    out = run_stage({"max_iter": 3}, log=lines.append, local_field=f, mask=m, magnitude=mag)
    assert any(s.startswith("warning") and "noise_weight" in s and "uniform" in s for s in lines)
    gn = [s for s in lines if s.startswith("GN ")]           # one progress line per Gauss-Newton iteration
    assert len(gn) == 3 and all("cost" in s and "data" in s and "update" in s for s in gn)
    ref = medi(f.data, m.data, f.voxel_size, f.b0_direction, mag.data, None, max_iter=3)
    np.testing.assert_allclose(out["chi"].data, ref.chi, atol=1e-6)
    # uniform weights equal a constant noise map
    const = medi(f.data, m.data, f.voxel_size, f.b0_direction, mag.data, np.full(f.shape, 7.0, np.float32),
                 max_iter=3)
    np.testing.assert_allclose(const.chi, ref.chi, atol=1e-5)


def test_plain_tv_needs_no_magnitude(blob):
    f, m, _ = _blob_vols(blob)
    out = run_stage({"edge_percentage": 0.0, "max_iter": 3}, local_field=f, mask=m)
    assert np.isfinite(out["chi"].data).all() and out["chi"].data[m.data].std() > 0


def test_empty_mask_is_a_stage_error(blob):
    f, m, mag = _blob_vols(blob)
    with pytest.raises(StageError, match="mask is empty"):
        run_stage({}, local_field=f, mask=m.like(np.zeros(m.shape, bool)), magnitude=mag)
    with pytest.raises(StageError, match="mask is empty"):
        medi(f.data, np.zeros(m.shape, bool), (1, 1, 1), (0, 0, 1), mag.data)


def test_csf_term_without_csf_source_is_a_clear_error(blob):
    f, m, mag = _blob_vols(blob)   # single-echo magnitude, no csf_mask
    with pytest.raises(MissingArtifactError, match="csf_mask.*lambda_csf: 0"):
        run_stage({"lambda_csf": 100.0}, local_field=f, mask=m, magnitude=mag)


def test_bad_parameters_and_grids(blob):
    with pytest.raises(ParameterError, match="out of range"):
        MEDI.validate_params({"lambda": -1.0}, where="stages.4")
    with pytest.raises(ParameterError, match="unknown parameter"):
        MEDI.validate_params({"lamda": 100.0}, where="stages.4")
    f, m, mag = _blob_vols(blob)
    with pytest.raises(InputDataError):
        medi(f.data, m.data, (1, 1, 1), (0, 0, 1), mag.data[:-1])
    bad = f.data.copy()
    bad[m.data.nonzero()[0][0], m.data.nonzero()[1][0], m.data.nonzero()[2][0]] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        medi(bad, m.data, (1, 1, 1), (0, 0, 1), mag.data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu(blob):
    chi, f, m, mag = blob
    a = medi(f, m, (1, 1, 1), (0, 0, 1), mag, max_iter=3, device="cpu").chi
    b = medi(f, m, (1, 1, 1), (0, 0, 1), mag, max_iter=3, device="cuda").chi
    np.testing.assert_allclose(a, b, atol=2e-4)
