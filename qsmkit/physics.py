"""Physics shared by every plugin: constants, unit conversions, B0 direction, dipole and SMV kernels.

Conventions (see DESIGN.md §3): phase in rad, field in ppm of B0, susceptibility in ppm (SI),
time in s, field strength in T, lengths in mm. ``phase(TE) = phi0 + 2*pi*GAMMA_BAR*B0*1e-6*f*TE``
with ``f`` the field in ppm. Kernels are returned in unshifted FFT order (DC at index 0), float32,
for use with :mod:`qsmkit.fft` (numpy) or ``torch.from_numpy`` (torch).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import fft as _fft
from .errors import InputDataError

#: gyromagnetic ratio of 1H over 2*pi, Hz/T
GAMMA_BAR = 42.577478e6
#: gyromagnetic ratio of 1H, rad/s/T
GAMMA = 2.0 * np.pi * GAMMA_BAR


# --------------------------------------------------------------------------- units
def ppm_to_rad_per_s(field_ppm, b0: float):
    """Convert a field in ppm of B0 to angular frequency offset in rad/s (``B0`` in T)."""
    return np.asarray(field_ppm) * (GAMMA * b0 * 1e-6)


def rad_per_s_to_ppm(omega, b0: float):
    """Convert an angular frequency offset in rad/s to field in ppm of B0 (``B0`` in T)."""
    return np.asarray(omega) / (GAMMA * b0 * 1e-6)


def ppm_to_phase(field_ppm, te: float, b0: float):
    """Phase in rad accrued at echo time ``te`` (s) by a field of ``field_ppm`` at ``b0`` (T)."""
    return ppm_to_rad_per_s(field_ppm, b0) * te


def phase_to_ppm(phase, te: float, b0: float):
    """Field in ppm of B0 from (unwrapped, offset-free) phase in rad at echo time ``te`` (s)."""
    return rad_per_s_to_ppm(phase, b0) / te


def hz_to_ppm(hz, b0: float):
    """Frequency offset in Hz to ppm of B0 (``b0`` in T)."""
    return np.asarray(hz) / (GAMMA_BAR * b0 * 1e-6)


def ppm_to_hz(field_ppm, b0: float):
    """Field in ppm of B0 to frequency offset in Hz (``b0`` in T)."""
    return np.asarray(field_ppm) * (GAMMA_BAR * b0 * 1e-6)


#: field strength (T) and echo spacing (s) that :func:`phase_scale` assumes when none is given
REFERENCE_FIELD_T = 3.0
REFERENCE_DELTA_TE_S = 5e-3


def phase_scale(field_strength: float | None = None, echo_times: Sequence[float] | None = None) -> tuple[float, str]:
    """Radians of phase per ppm of field accrued over the echo spacing, and where it came from.

    ``s_p = 2 pi * GAMMA_BAR * B0 * 1e-6 * dTE`` with ``dTE`` the median echo spacing (multi-echo;
    the MEDI toolbox's ``delta_TE``) or the echo time (single echo): the scale of the complex
    (nonlinear) data terms of MEDI and TFI. Missing values fall back to :data:`REFERENCE_FIELD_T`
    and :data:`REFERENCE_DELTA_TE_S` (the note says so).

    Returns
    -------
    scale : float
        rad/ppm.
    note : str
        e.g. ``"3.21 rad/ppm (3 T, echo spacing 4 ms)"``, for the stage log.
    """
    te = None if echo_times is None else np.sort(np.asarray(echo_times, dtype=np.float64).ravel())
    if te is not None and te.size >= 2:
        dte, src = float(np.median(np.diff(te))), "echo spacing"
    elif te is not None and te.size == 1:
        dte, src = float(te[0]), "echo time"
    else:
        dte, src = REFERENCE_DELTA_TE_S, "reference dTE"
    if not dte > 0:
        raise InputDataError(f"echo times {te.tolist()} give a non-positive echo spacing; give increasing "
                             f"echo_times in s")
    b0 = float(field_strength) if field_strength is not None and float(field_strength) > 0 else None
    if b0 is None:
        b0, src = REFERENCE_FIELD_T, src + ", reference 3 T"
    s = float(ppm_to_phase(1.0, dte, b0))
    return s, f"{s:.3g} rad/ppm ({b0:g} T, {src} {dte * 1e3:.3g} ms)"

# --------------------------------------------------------------------------- geometry
def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm: the column norms of ``affine[:3, :3]``."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def b0_direction_from_affine(affine: np.ndarray, b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Unit B0 direction in the voxel frame.

    ``R = A[:3, :3] / voxel_sizes(A)`` maps voxel axes to world (scanner) axes, so the world
    direction ``b0_world`` expressed along the voxel axes is ``R.T @ b0_world``. (``inv(A) @ z``
    is wrong for anisotropic voxels.) Returns a float64 unit vector.
    """
    a = np.asarray(affine, dtype=np.float64)
    rot = a[:3, :3] / voxel_sizes(a)[None, :]
    b = rot.T @ np.asarray(b0_world, dtype=np.float64)
    n = np.linalg.norm(b)
    if not np.isfinite(n) or n == 0:
        raise InputDataError("B0 direction must be a non-zero finite 3-vector")
    return b / n


# --------------------------------------------------------------------------- kernels
def kspace_grid(shape: Sequence[int], voxel_size: Sequence[float], rfft: bool = False):
    """Spatial-frequency coordinates (cycles/mm) of an FFT grid, broadcastable, float32.

    With ``rfft`` the last axis holds only the non-negative frequencies of a real-to-complex FFT.
    """
    shape = tuple(int(s) for s in shape)
    ks = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size)):
        last = rfft and axis == len(shape) - 1
        k = (np.fft.rfftfreq if last else np.fft.fftfreq)(n, d=float(v)).astype(np.float32)
        view = [1] * len(shape)
        view[axis] = k.size
        ks.append(k.reshape(view))
    return ks


def dipole_kernel(shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float],
                  rfft: bool = False) -> np.ndarray:
    """Unit dipole kernel ``D(k) = 1/3 - (k.b)^2/|k|^2`` with ``D(0) = 0``, float32, unshifted.

    Parameters
    ----------
    shape : 3 ints
        Grid shape (after any zero padding; padding is the caller's choice).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame (normalised here).
    rfft : bool
        Return only the half spectrum ``shape[:-1] + (shape[-1] // 2 + 1,)`` matching
        ``rfftn``; D is real and even, so ``irfftn(D * rfftn(chi))`` is the same convolution.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``; ``field_ppm = real(ifftn(D * fftn(chi_ppm)))``.
    """
    b = np.asarray(b0_dir, dtype=np.float64)
    b = (b / np.linalg.norm(b)).astype(np.float32)
    ks = kspace_grid(shape, voxel_size, rfft)
    # Hermitian symmetry at the Nyquist planes of even axes: index N/2 stands for both +N/2 and
    # -N/2, so average (k.b)^2 over k and k with its Nyquist components negated. Without this the
    # kernel of an oblique B0 is not real-preserving and full- and half-spectrum FFTs disagree.
    flipped = []
    for axis, k in enumerate(ks):
        n = int(shape[axis])
        if n % 2 == 0:
            k = k.reshape(-1)
            if rfft and axis == 2:  # rfftfreq ends at +N/2; use fftfreq's -N/2 as the base
                k = k.copy()
                k[n // 2] *= -1
                ks[axis] = k.reshape(ks[axis].shape)
            k = k.copy()
            k[n // 2] *= -1
            k = k.reshape(ks[axis].shape)
        flipped.append(k)
    k2 = ks[0] * ks[0] + ks[1] * ks[1] + ks[2] * ks[2]
    kb = ks[0] * b[0] + ks[1] * b[1] + ks[2] * b[2]
    kb_flip = flipped[0] * b[0] + flipped[1] * b[1] + flipped[2] * b[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.float32(1.0 / 3.0) - np.float32(0.5) * (kb * kb + kb_flip * kb_flip) / k2
    d[(0,) * 3] = 0.0
    return d.astype(np.float32, copy=False)


def sphere_mask(shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float) -> np.ndarray:
    """Boolean ball of ``radius_mm`` centred at voxel index 0 with periodic wrap (FFT origin)."""
    coords = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size)):
        i = np.arange(n)
        i = np.where(i > n // 2, i - n, i).astype(np.float32) * float(v)
        view = [1] * len(shape)
        view[axis] = n
        coords.append(i.reshape(view))
    r2 = sum(c * c for c in coords)
    return r2 <= np.float32(radius_mm) ** 2


def smv_kernel(shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float,
               rfft: bool = False, return_count: bool = False):
    """FFT of the normalised spherical mean value (SMV) kernel of ``radius_mm``, float32, unshifted.

    The kernel is a ball of radius ``radius_mm`` (mm) in image space with unit sum, centred at the
    FFT origin; its FFT is real. ``S * f = real(ifftn(smv_kernel * fftn(f)))``; with ``rfft`` the
    half spectrum for ``irfftn(S * rfftn(f), shape)``. With ``return_count`` also returns the
    number of voxels in the ball. Applied as an operator by :class:`qsmkit.operators.SMV`.
    """
    ball = sphere_mask(shape, voxel_size, radius_mm).astype(np.float32)
    n_ball = float(ball.sum())
    ball /= np.float32(n_ball)
    spec = _fft.rfftn(ball) if rfft else _fft.fftn(ball)
    spec = np.ascontiguousarray(spec.real.astype(np.float32))
    return (spec, int(n_ball)) if return_count else spec


def dipole_convolve(chi: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
                    padding: float = 1.5) -> np.ndarray:
    """Field in ppm of a susceptibility map ``chi`` (ppm), by FFT on a zero-padded grid.

    ``padding`` is the minimum factor by which each axis is enlarged (even sizes); 1 means none.
    A shortcut for :class:`qsmkit.operators.Dipole` ``(chi.shape, voxel_size, b0_dir, padding)(chi)``.
    """
    from .operators import Dipole

    return Dipole(np.shape(chi), voxel_size, b0_dir, padding=padding).apply(chi)
