"""Tests of Laplacian unwrapping (qsmkit_unwrap), including issue 3 acceptance 3."""

import numpy as np
import pytest
import scipy.fft as sfft
from scipy import ndimage

from qsmkit.errors import GeometryError, InputDataError, ParameterError, StageError
from qsmkit.physics import ppm_to_phase, smv_kernel
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_unwrap import LaplacianUnwrap, laplacian_unwrap, phase_laplacian, solve_poisson_neumann

TWO_PI = 2 * np.pi


def _wrap(x):
    return (x + np.pi) % TWO_PI - np.pi


def _smooth_phase(shape=(40, 44, 36), scale=1.0):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    phi = scale * (18 * np.exp(-2 * ((x - 0.2) ** 2 + y ** 2 + z ** 2)) + 7 * x * y + 5 * z - 3 * y ** 2)
    return phi.astype(np.float32), (x, y, z)


def _ellipsoid_mask(xyz):
    x, y, z = xyz
    m = (x / 0.85) ** 2 + (y / 0.7) ** 2 + (z / 0.8) ** 2 < 1
    return m & ~(((x + 0.4) ** 2 + y ** 2 + (z - 0.3) ** 2) < 0.05)  # with an internal hole


def test_smooth_phase_is_recovered_exactly_up_to_a_constant():
    phi, _ = _smooth_phase()
    assert np.abs(np.diff(phi, axis=0)).max() < np.pi  # many wraps, but no aliasing
    wrapped = _wrap(phi)
    assert (phi.max() - phi.min()) / TWO_PI > 4
    for vs in [(1.0, 1.0, 1.0), (0.8, 1.0, 2.0)]:
        u = laplacian_unwrap(wrapped, vs)
        err = u - phi
        # no mask: Neumann problem on the grid, exact for gradients below pi per voxel
        assert np.abs(err - err.mean()).max() < 1e-3
        assert abs(u.mean()) < 1e-3  # the free constant is chosen as zero mean


def test_sincos_laplacian_underestimates_steep_gradients():
    phi, _ = _smooth_phase()
    wrapped = _wrap(phi)
    exact = phase_laplacian(wrapped, (1, 1, 1), None, "wrapped")
    sc = phase_laplacian(wrapped, (1, 1, 1), None, "sincos")
    # discrete identity: cos(phi) L sin(phi) - sin(phi) L cos(phi) = sum_j sin(phi_j - phi_i)
    ref = np.zeros_like(phi)
    for axis in range(3):
        d = np.diff(phi, axis=axis)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        ref[tuple(lo)] += np.sin(d)
        ref[tuple(hi)] -= np.sin(d)
    np.testing.assert_allclose(sc, ref, atol=2e-4)
    u_sc = laplacian_unwrap(wrapped, (1, 1, 1), method="sincos")
    u_ex = laplacian_unwrap(wrapped, (1, 1, 1), method="wrapped")
    e_sc, e_ex = u_sc - phi, u_ex - phi
    assert np.std(e_sc) > 100 * np.std(e_ex)
    assert np.abs(exact).max() > 0


def test_poisson_solver_inverts_the_neumann_laplacian():
    rng = np.random.default_rng(0)
    u = ndimage.gaussian_filter(rng.normal(size=(20, 18, 16, 2)), (2, 2, 2, 0)).astype(np.float32)
    u -= u.mean(axis=(0, 1, 2), keepdims=True)
    vs = (1.0, 1.5, 2.0)
    lap = np.zeros_like(u)
    for axis in range(3):
        d = np.diff(u, axis=axis) / vs[axis] ** 2
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lap[tuple(lo)] += d
        lap[tuple(hi)] -= d
    np.testing.assert_allclose(solve_poisson_neumann(lap, vs), u, atol=1e-4 * np.abs(u).max())


def test_masked_direct_solve_differs_by_a_discrete_harmonic_function():
    phi, xyz = _smooth_phase()
    m = _ellipsoid_mask(xyz)
    u = laplacian_unwrap(_wrap(phi), (1, 1, 1), m)
    assert np.all(u[~m] == 0)
    h = np.where(m, u - phi, 0.0)
    # 7-point Laplacian of (u - phi) vanishes at voxels whose whole stencil lies in the mask
    interior = ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
    lap = ndimage.convolve(h, ndimage.generate_binary_structure(3, 1).astype(float) - 7 * np.eye(1)[0, 0]
                           * (np.arange(27).reshape(3, 3, 3) == 13), mode="constant")
    assert np.abs(lap[interior]).max() < 1e-3 * np.abs(ndimage.laplace(phi.astype(np.float64))).max() + 1e-4
    assert np.std(h[m]) > 0.05  # ...but that harmonic function is not small


def test_masked_iterative_solve_recovers_the_phase_and_snap_is_congruent():
    phi, xyz = _smooth_phase()
    m = _ellipsoid_mask(xyz)
    wrapped = _wrap(phi)
    u, info = laplacian_unwrap(np.stack([wrapped, _wrap(0.5 * phi)], -1), (1, 1, 1), m, iterations=30,
                               tol=1e-4, return_info=True)
    assert 1 <= info["iterations"] < 30
    for e, ref in enumerate([phi, 0.5 * phi]):
        err = (u[..., e] - ref)[m]
        assert np.abs(err - err.mean()).max() < 0.02
    s, info = laplacian_unwrap(wrapped, (1, 1, 1), m, iterations=30, snap=True, return_info=True)
    k = (s - wrapped)[m] / TWO_PI
    assert np.abs(k - np.round(k)).max() < 1e-3  # congruent to the data, voxel by voxel
    err = (s - phi)[m]
    assert np.abs(err - np.round(err.mean() / TWO_PI) * TWO_PI).max() < 1e-3  # exact up to 2 pi k


def test_echoes_are_batched_and_independent():
    phi, xyz = _smooth_phase((24, 28, 20))
    m = _ellipsoid_mask(xyz)
    stack = np.stack([_wrap(phi * s) for s in (0.3, 0.6, 1.0)], -1)
    u = laplacian_unwrap(stack, (1, 1, 1), m)
    for e in range(3):
        np.testing.assert_allclose(u[..., e], laplacian_unwrap(stack[..., e], (1, 1, 1), m), atol=1e-4)


def _hp(x, mask, vs, r):
    """SMV high-pass ``x - S_r * x`` of ``x`` zeroed outside ``mask`` (kills harmonic functions)."""
    xm = np.where(mask, x, 0).astype(np.float32)
    return xm - np.real(sfft.ifftn(sfft.fftn(xm) * smv_kernel(mask.shape, vs, r)))


def test_acceptance3_phantom_wrapping_many_times_is_recovered(phantom_small, phantom_noiseless):
    """Issue 3 acceptance 3: Laplacian unwrapping + the weighted fit recover the true total field.

    Echo 5 (20 ms) of the 64^3 phantom spans ~5.5 cycles (35 rad) across the mask; echo 1 less
    than one. Tolerances and why:

    * default (direct) solve: the estimate equals the truth up to a constant and a harmonic
      function, so the SMV high-pass (r = 4 mm; it annihilates harmonic functions wherever the
      ball fits in the mask) of the difference must be small compared with the high-passed true
      local field: <= 25 % without noise (measured 18 %), <= 35 % at SNR 100 (measured 28 %;
      the rest is noise). Voxels within 2 voxels of veins / haemorrhage / calcification (3 % of
      the mask) are left out: there the true phase of the late echoes changes by more than pi per
      voxel and T2* is short, which no spatial unwrapping can follow; their error spreads as a
      slowly decaying field, which is most of the remaining difference.
    * iterative solve + snap (no harmonic part): the estimate equals the true field up to a
      constant. In the mask eroded by one voxel (the outermost voxels mix tissues in one voxel,
      so their phase is not linear in TE) the median error is below the predicted noise std and
      95 % of voxels are within 0.01 ppm of the truth (measured: median 0.0008, p95 0.0024 ppm;
      predicted noise std 0.0012 ppm).
    """
    from qsmkit_echofit import weighted_fit
    from qsmkit_mask import erode_mm, threshold_mask

    for ph, tol in ((phantom_noiseless, 0.25), (phantom_small, 0.35)):
        vs, te, b0 = ph.magnitude.voxel_size, ph.echo_times, ph.field_strength
        tot = ph.truth["total_field"].data
        loc = ph.truth["local_field"].data
        mask = threshold_mask(ph.magnitude.data[..., 0], vs)
        p5 = ppm_to_phase(tot, te[-1], b0)[mask]
        assert (p5.max() - p5.min()) / TWO_PI > 5

        lab = ph.truth["labels"].data
        near_sources = ndimage.binary_dilation(np.isin(lab, (9, 10, 11)), iterations=2)
        assert (near_sources & mask).sum() < 0.05 * mask.sum()

        u = laplacian_unwrap(ph.phase.data, vs, mask)
        f = weighted_fit(u, ph.magnitude.data, te, b0, mask)["field"]
        r = 4.0
        region = erode_mm(mask, r + 1.0, vs) & ~near_sources
        d = _hp(f - tot, mask, vs, r)[region]
        ref = _hp(loc, mask, vs, r)[region]
        assert np.linalg.norm(d) <= tol * np.linalg.norm(ref)
        # the difference itself is not small: it is a harmonic function (and a constant)
        assert np.std((f - tot)[region]) > 2 * np.std(d)

    ph = phantom_small
    u2 = laplacian_unwrap(ph.phase.data, vs, mask, iterations=30, snap=True)
    f2 = weighted_fit(u2, ph.magnitude.data, te, b0, mask)
    inner = erode_mm(mask, 1.0, vs)
    e = (f2["field"] - tot)[inner]
    e -= np.median(e)
    noise = np.median(1.0 / f2["noise_weight"][inner])
    assert np.median(np.abs(e)) < noise
    assert np.percentile(np.abs(e), 95) < 0.01


def _ctx(phase, mask=None, vs=(1.0, 1.0, 1.0)):
    art = {"phase": Volume.from_array(phase, vs, units="rad")}
    if mask is not None:
        art["mask"] = Volume.from_array(mask, vs)
    return StageContext(art, stage_label="unwrap/laplacian", log=lambda s: None)


def test_stage_output_and_errors(phantom_small):
    p = LaplacianUnwrap.validate_params({}, "stages.1")
    ph = phantom_small
    mask = ph.truth["mask"].data
    out = LaplacianUnwrap().run(_ctx(ph.phase.data, mask), p)["unwrapped_phase"]
    assert out.data.shape == ph.phase.data.shape and out.data.dtype == np.float32 and out.units == "rad"
    assert np.all(out.data[~mask] == 0)
    # a 3D phase becomes one echo
    out3 = LaplacianUnwrap().run(_ctx(ph.phase.data[..., 0], mask), p)["unwrapped_phase"]
    assert out3.data.shape == mask.shape + (1,)
    with pytest.raises(GeometryError):
        LaplacianUnwrap().run(_ctx(ph.phase.data, mask[:-1]), p)
    with pytest.raises(StageError, match="empty"):
        LaplacianUnwrap().run(_ctx(ph.phase.data, np.zeros_like(mask)), p)
    bad = ph.phase.data.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        LaplacianUnwrap().run(_ctx(bad), p)
    with pytest.raises(ParameterError, match="iterations"):
        LaplacianUnwrap().run(_ctx(ph.phase.data, mask), LaplacianUnwrap.validate_params({"snap": True}, "s"))
    exact = LaplacianUnwrap().run(_ctx(ph.phase.data, mask),
                                  LaplacianUnwrap.validate_params({"iterations": 30, "snap": True}, "s"))
    k = (exact["unwrapped_phase"].data - ph.phase.data)[mask] / TWO_PI
    assert np.abs(k - np.round(k)).max() < 1e-3
    assert load_registry().get("unwrap", "laplacian") is LaplacianUnwrap
