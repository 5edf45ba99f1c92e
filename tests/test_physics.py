import numpy as np
import pytest

from qsmkit import physics
from qsmkit import fft as qfft
from qsmkit.errors import InputDataError
from helpers import oblique_affine


def test_dipole_kernel_dc_zero_and_values():
    d = physics.dipole_kernel((16, 12, 10), (1.0, 1.0, 2.0), (0, 0, 1))
    assert d.dtype == np.float32 and d.shape == (16, 12, 10)
    assert d[0, 0, 0] == 0.0
    assert d[1, 0, 0] == pytest.approx(1 / 3)  # k perpendicular to B0
    assert d[0, 0, 1] == pytest.approx(-2 / 3)  # k along B0
    assert d.min() >= -2 / 3 - 1e-6 and d.max() <= 1 / 3 + 1e-6


def test_dipole_kernel_magic_angle_for_tilted_b0():
    b = np.array([np.sin(np.deg2rad(30)), 0, np.cos(np.deg2rad(30))])
    d = physics.dipole_kernel((32, 32, 32), (1, 1, 1), b)
    # k along b0: D = -2/3; k perpendicular to b0 (along y): D = 1/3
    assert d[0, 5, 0] == pytest.approx(1 / 3)
    k = np.fft.fftfreq(32)
    idx = (1, 0, 0)
    kv = np.array([k[1], 0, 0])
    assert d[idx] == pytest.approx(1 / 3 - (kv @ b) ** 2 / (kv @ kv), abs=1e-6)


def test_dipole_operator_self_adjoint_and_linear():
    rng = np.random.default_rng(0)
    shape, vs, b = (20, 18, 16), (1.0, 0.8, 1.5), (0.2, 0.3, 0.93)
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    op = lambda v: physics.dipole_convolve(v.astype(np.float32), vs, b, padding=1.0).astype(np.float64)
    assert np.vdot(op(x), y) == pytest.approx(np.vdot(x, op(y)), rel=1e-4)
    assert np.allclose(op(2 * x + 3 * y), 2 * op(x) + 3 * op(y), atol=1e-4)


def test_b0_direction_oblique_anisotropic():
    a = oblique_affine((0.6, 0.6, 2.0), 20.0, "x")
    vs = np.sqrt((a[:3, :3] ** 2).sum(0))
    assert np.allclose(physics.voxel_sizes(a), [0.6, 0.6, 2.0])
    expected = (a[:3, :3] / vs).T @ np.array([0, 0, 1.0])
    b = physics.b0_direction_from_affine(a)
    assert np.allclose(b, expected / np.linalg.norm(expected), atol=1e-6)
    assert np.allclose(b, [0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))], atol=1e-6)
    # the naive inv(A) @ z is not a unit direction along the same line for anisotropic voxels
    naive = np.linalg.inv(a[:3, :3]) @ [0, 0, 1.0]
    assert not np.allclose(naive / np.linalg.norm(naive), b, atol=1e-3)


def test_unit_conversions_round_trip():
    f = np.array([0.1, -0.05])
    ph = physics.ppm_to_phase(f, 0.02, 3.0)
    assert ph[0] == pytest.approx(2 * np.pi * 42.577478e6 * 3.0 * 1e-6 * 0.1 * 0.02)
    assert np.allclose(physics.phase_to_ppm(ph, 0.02, 3.0), f)
    assert np.allclose(physics.hz_to_ppm(physics.ppm_to_hz(f, 7.0), 7.0), f)
    assert np.allclose(physics.rad_per_s_to_ppm(physics.ppm_to_rad_per_s(f, 1.5), 1.5), f)


def test_smv_kernel_is_normalised_ball():
    s = physics.smv_kernel((32, 32, 32), (1, 1, 2), 5.0)
    assert s.dtype == np.float32 and s[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    ball = physics.sphere_mask((32, 32, 32), (1, 1, 2), 5.0)
    assert ball[0, 0, 0] and ball[5, 0, 0] and not ball[6, 0, 0] and ball[0, 0, 2] and not ball[0, 0, 3]
    # mean value property: SMV of a constant is the constant
    const = np.full((32, 32, 32), 2.5, np.float32)
    out = qfft.ifftn(s * qfft.fftn(const)).real
    assert np.allclose(out, 2.5, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 14, 12), (15, 14, 13)])
def test_full_and_half_spectrum_kernels_agree_for_oblique_b0(shape):
    b = np.array([0.3, -0.4, 0.86])
    vs = (1.0, 0.9, 1.3)
    full = physics.dipole_kernel(shape, vs, b)
    half = physics.dipole_kernel(shape, vs, b, rfft=True)
    assert np.allclose(full[..., : shape[2] // 2 + 1], half, atol=1e-6)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    via_full = qfft.ifftn(full * qfft.fftn(x))
    assert np.abs(via_full.imag).max() < 1e-5  # real-preserving (Hermitian) kernel
    via_half = qfft.irfftn(half * qfft.rfftn(x), shape)
    assert np.allclose(via_full.real, via_half, atol=1e-5)


def test_phase_scale_units():
    """rad/ppm over the echo spacing (MEDI, TFI), with the reference fallbacks."""
    s, note = physics.phase_scale(3.0, [0.004, 0.008, 0.012])
    assert s == pytest.approx(2 * np.pi * physics.GAMMA_BAR * 3.0 * 1e-6 * 0.004, rel=1e-9)   # 3.21 rad/ppm
    assert physics.phase_scale(7.0, [0.01])[0] == pytest.approx(2 * np.pi * physics.GAMMA_BAR * 7.0 * 1e-6 * 0.01)
    s_ref, note = physics.phase_scale(None, None)
    assert s_ref == pytest.approx(2 * np.pi * physics.GAMMA_BAR * 3.0 * 1e-6 * 0.005) and "reference" in note
    with pytest.raises(InputDataError, match="non-positive echo spacing"):
        physics.phase_scale(3.0, [0.01, 0.01])
