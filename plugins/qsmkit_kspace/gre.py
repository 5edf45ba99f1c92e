"""Multi-echo multi-coil 3D GRE: per-echo SENSE recon and phase-preserving coil combination.

Pure array functions (numpy / torch in, numpy out); the stages are in :mod:`.stages_gre`.

Recon (slice by slice after the readout FFT, as skm-tea): the 3D k-space of one echo
``(coil, kx, ky, kz)`` is inverse-FFT'd along the fully sampled readout ``kx`` (core centred
FFT), which gives ``X`` independent 2D ``(ky, kz)`` problems (:func:`hybrid`).

- Coil maps: ESPIRiT (:func:`.espirit.espirit_maps`, Uecker et al., MRM 71:990, 2014) of the
  *first echo*, per readout position, shared by all echoes (:func:`espirit_3d`). ESPIRiT gives
  each voxel's map up to a phase; the plugin's per-slice reference (the first principal
  component of that slice's calibration data) differs between slices. :func:`reference_maps`
  therefore re-references every voxel to one *virtual reference coil* ``r`` of the whole volume
  (the dominant eigenvector of the signal-weighted coil covariance ``sum_x w(x) S(x) S(x)^H``,
  cf. Buehrer et al., MRM 61:1491, 2009; Parker et al., MRM 72:563, 2014): the maps then satisfy
  ``arg(r^H S(x)) = 0`` everywhere, so the combined phase is the object phase plus the smooth
  phase of the virtual coil ``r^H S_true(x)``, continuous across slices and echo-independent.
- SENSE per echo (:func:`sense_echo`): fully sampled, SENSE-1 ``x = S^H m / S^H S`` voxel by
  voxel (Roemer-like with the maps); undersampled, CG-SENSE (:func:`.sense.cg_sense`,
  Pruessmann et al., MRM 46:638, 2001) with the core CG, batched over readout positions.

Combination with the echo-independent phase removed (:func:`phase_offset_phasor`): the phase at
TE = 0 of a signal ``z(TE) = |z| exp(i (phi0 + omega TE))`` is ``phi0 = (n + 1) phi(TE1) - n
phi(TE2)`` when ``TE1 = n (TE2 - TE1)`` for an integer ``n`` (ASPIRE, Eckstein et al., MRM
79:2996, 2018), computed as the complex product ``z1^(n+1) conj(z2)^n`` so that no phase is
unwrapped; it is smoothed as a magnitude-weighted phasor (Gaussian, ``sigma_mm``).

- ``combine: sense`` with ``phase_offset: remove``: the offset of the SENSE-1 image (virtual
  coil phase + the object's own phi0) is removed from every echo;
- ``combine: aspire`` (fully sampled): each coil's offset is removed before a
  magnitude-weighted sum ``sum_c |m_c| m_c exp(-i phi0_c)`` (Eckstein et al.), which needs no
  maps: every coil has the same phase afterwards, so the sum has no phase singularities.

Magnitude: SENSE-1 with unit-norm maps gives ``|rho| ||S(x)||``, the object times the coils'
receive profile. :func:`homogenize` divides it by a smooth estimate of that profile (a
normalised Gaussian smoothing of the first echo inside the object, as MriResearchTools.jl's
``makehomogeneous``; Eckstein et al., NeuroImage 237:118175, 2021), since the QSM stages
(masks, MEDI's edge mask) expect a magnitude without a coil bias.

The echo-independent phase (coil phase + the object's phi0) cannot be told apart from coil data
alone; after removal the combined phase is ``omega TE`` (plus a global constant), the part from
which the field is estimated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError, ParameterError

__all__ = ["hybrid", "espirit_3d", "virtual_reference", "reference_maps", "sense_echo", "echo_ratio",
           "phase_offset_phasor", "aspire_combine", "remove_phase_offset", "rss_coils", "homogenize"]


def hybrid(k: np.ndarray) -> np.ndarray:
    """Readout inverse FFT: ``(coil, kx, ky, kz)`` -> hybrid ``(x, coil, ky, kz)`` complex64."""
    h = qfft.ifftnc(np.asarray(k), axes=(1,)).astype(np.complex64, copy=False)
    return np.ascontiguousarray(np.moveaxis(h, 1, 0))


def espirit_3d(hyb: np.ndarray, mask: np.ndarray | None = None, calib: Sequence[int] = (24, 24), kernel: int = 6,
               threshold: float = 0.001, crop: float = 0.8, max_iter: int = 30, device="cpu",
               silent: float = 1e-6, log: Callable[[str], None] | None = None) -> np.ndarray:
    """ESPIRiT maps of every readout position of hybrid k-space (one set of maps).

    Parameters
    ----------
    hyb : ndarray, complex, (x, coil, ky, kz)
        Hybrid k-space of the first echo (:func:`hybrid`).
    mask : ndarray bool (ky, kz) or None
        Sampling mask (the calibration box shrinks to its fully sampled centre).
    calib, kernel, threshold, crop, max_iter
        ESPIRiT settings (:func:`.espirit.espirit_maps`; BART defaults).
    silent : float
        Readout positions whose calibration energy is below ``silent`` times the largest one
        (air beyond the head) get zero maps instead of maps fitted to noise or nothing.

    Returns
    -------
    ndarray, complex64, (x, coil, ky, kz)
        Unit-norm maps (zero outside ESPIRiT's eigenvalue crop), each slice referenced to its own
        calibration data (:func:`reference_maps` makes them consistent).
    """
    from .espirit import calibration_region, espirit_maps

    X, C, Y, Z = hyb.shape
    cal = calibration_region((Y, Z), calib, mask, kernel, kspace=hyb[X // 2] if mask is None else None)
    y0, z0 = Y // 2 - cal[0] // 2, Z // 2 - cal[1] // 2
    energy = np.sum(np.abs(hyb[:, :, y0:y0 + cal[0], z0:z0 + cal[1]]) ** 2, axis=(1, 2, 3))
    if not np.any(energy > 0):
        raise InputDataError("ESPIRiT: the k-space centre of the first echo holds no signal (all zero)")
    keep = np.nonzero(energy > silent * energy.max())[0]
    maps = np.zeros((X, C, Y, Z), dtype=np.complex64)
    m, _ = espirit_maps(hyb[keep], mask=mask, calib=cal, kernel=kernel, threshold=threshold, crop=crop,
                        n_maps=1, iterations=max_iter, device=device)
    maps[keep] = m[:, 0]
    if log:
        log(f"ESPIRiT maps of the first echo: {keep.size} of {X} readout positions with signal, calibration "
            f"{cal[0]}x{cal[1]}")
    return maps


def virtual_reference(maps: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The virtual reference coil: dominant eigenvector of ``sum_x w(x) S(x) S(x)^H`` (``(coil,)`` complex).

    Parameters
    ----------
    maps : ndarray, complex, (x, coil, y, z)
        Coil maps (each voxel's phase arbitrary: ``S S^H`` does not depend on it).
    weight : ndarray, float, (x, y, z)
        Voxel weights (e.g. the first-echo magnitude).
    """
    C = maps.shape[1]
    s = np.moveaxis(maps, 1, 0).reshape(C, -1)
    w = np.asarray(weight, np.float64).reshape(-1)
    cov = (s * w[None]) @ s.conj().T
    vals, vecs = np.linalg.eigh(cov.astype(np.complex128))
    r = vecs[:, -1]
    return (r * np.exp(-1j * np.angle(r[np.argmax(np.abs(r))]))).astype(np.complex64)


def reference_maps(maps: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Maps with each voxel's phase set so that ``r^H S(x)`` is real and positive (``(x, coil, y, z)``)."""
    proj = np.einsum("c,xcyz->xyz", np.conj(r), maps)
    ph = np.where(np.abs(proj) > 0, np.conj(proj) / np.maximum(np.abs(proj), 1e-30), 0)
    return (maps * ph[:, None]).astype(np.complex64)


def sense_echo(hyb: np.ndarray, maps: np.ndarray, mask: np.ndarray | None = None, max_iter: int = 30,
               tol: float = 1e-5, lam: float = 0.0, batch: int = 16, device="cpu") -> tuple[np.ndarray, int]:
    """SENSE image of one echo from hybrid k-space.

    Parameters
    ----------
    hyb : ndarray, complex, (x, coil, ky, kz)
        Hybrid k-space (zero where not sampled).
    maps : ndarray, complex, (x, coil, y, z)
        Coil maps.
    mask : ndarray bool (ky, kz) or None
        Sampling mask; ``None`` or all true: SENSE-1 ``S^H m / S^H S`` voxel by voxel (0 where
        the maps are 0); else CG-SENSE with ``max_iter``, ``tol``, Tikhonov ``lam`` (units of the
        data normalised by their largest magnitude).
    batch : int
        Readout positions per CG batch.
    device : str or torch.device

    Returns
    -------
    (image (x, y, z) complex64, CG iterations run (0 for SENSE-1))
    """
    from .transforms import ifft2c_np

    if mask is None or bool(np.all(mask)):
        coil = ifft2c_np(hyb, axes=(-2, -1))
        num = np.einsum("xcyz,xcyz->xyz", np.conj(maps), coil)
        den = np.sum(np.abs(maps) ** 2, axis=1)
        return np.where(den > 0, num / np.maximum(den, 1e-30), 0).astype(np.complex64), 0
    import torch

    from qsmkit.device import resolve_device

    from .sense import cg_sense, mask_tensor

    dev = resolve_device(device)
    X, C, Y, Z = hyb.shape
    scale = float(np.abs(hyb).max()) or 1.0
    mk = mask_tensor(np.asarray(mask, bool), 1, (Y, Z), dev)
    out = np.empty((X, Y, Z), dtype=np.complex64)
    iters = 0
    with torch.no_grad():
        for x0 in range(0, X, int(batch)):
            sl = slice(x0, min(X, x0 + int(batch)))
            mp = torch.from_numpy(np.ascontiguousarray(maps[sl][:, None])).to(dev)
            if not bool((mp != 0).any()):
                out[sl] = 0
                continue
            y = torch.from_numpy(np.ascontiguousarray(hyb[sl])).to(dev) / scale
            img, it = cg_sense(y * mk, mp, mk, iterations=max_iter, tol=tol, lam=lam)
            out[sl] = img[:, 0].cpu().numpy() * scale
            iters = max(iters, int(it))
    return out, iters


def echo_ratio(echo_times: Sequence[float], rtol: float = 1e-3) -> int:
    """``n = TE1 / (TE2 - TE1)`` as an integer (the condition of :func:`phase_offset_phasor`)."""
    te = np.asarray(echo_times, np.float64)
    if te.size < 2:
        raise ParameterError("phase_offset: remove needs at least 2 echoes; use phase_offset: keep for one echo")
    ratio = te[0] / (te[1] - te[0])
    n = int(round(ratio))
    if n < 0 or abs(ratio - n) > rtol * max(ratio, 1.0):
        raise ParameterError(f"phase_offset: remove (and combine: aspire) need TE1 = n (TE2 - TE1) with an integer n, "
                             f"but TE1 / (TE2 - TE1) = {ratio:.4g}; use combine: sense with phase_offset: keep and a "
                             f"{{stage: phase_offset, method: mcpc3ds}} stage after it")
    return n


def _smooth_phasor(z: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit phasor of the Gaussian-smoothed complex field ``z`` (over the last 3 axes)."""
    if any(s > 0 for s in sigma_vox):
        from scipy.ndimage import gaussian_filter

        sig = (0,) * (z.ndim - 3) + tuple(float(s) for s in sigma_vox)
        z = gaussian_filter(z.real, sig, mode="nearest") + 1j * gaussian_filter(z.imag, sig, mode="nearest")
    a = np.abs(z)
    return np.where(a > 0, z / np.maximum(a, 1e-30), 0).astype(np.complex64)


def phase_offset_phasor(z1: np.ndarray, z2: np.ndarray, echo_times: Sequence[float],
                        sigma_vox: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """``exp(i phi0)``: the phase at TE = 0 from the first two echoes, smoothed (ASPIRE).

    Parameters
    ----------
    z1, z2 : ndarray, complex, (..., x, y, z)
        First and second echo (per coil with a leading coil axis, or combined).
    echo_times : floats, s
        At least the first two; ``TE1 = n (TE2 - TE1)``, ``n`` integer (:func:`echo_ratio`).
    sigma_vox : 3 floats
        Gaussian smoothing (voxels) of the magnitude-weighted phasor; 0 = none.

    Returns
    -------
    ndarray, complex64, same shape: unit phasors (0 where there is no signal).
    """
    n = echo_ratio(echo_times)
    a1, a2 = np.abs(z1), np.abs(z2)
    u1 = np.where(a1 > 0, z1 / np.maximum(a1, 1e-30), 0)
    u2 = np.where(a2 > 0, z2 / np.maximum(a2, 1e-30), 0)
    off = u1 ** (n + 1) * np.conj(u2) ** n
    return _smooth_phasor((off * a1).astype(np.complex64), sigma_vox)


def remove_phase_offset(z: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``z exp(-i phi0)`` (``offset`` a unit phasor broadcastable to ``z``)."""
    return (z * np.conj(offset)).astype(np.complex64)


def rss_coils(coil: np.ndarray, axis: int = 0) -> np.ndarray:
    """Root sum of squares over the coil axis (float32)."""
    return np.sqrt(np.sum(np.abs(coil) ** 2, axis=axis)).astype(np.float32)


def aspire_combine(coil: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``sum_c |m_c| m_c exp(-i phi0_c) / sqrt(sum_c |m_c|^2)``: phase-aligned, magnitude-weighted.

    Parameters
    ----------
    coil : ndarray, complex, (coil, x, y, z)
        Coil images of one echo.
    offset : ndarray, complex, (coil, x, y, z)
        Per-coil offset phasors (:func:`phase_offset_phasor`).

    Returns
    -------
    ndarray, complex64, (x, y, z)
        Magnitude equal to the RSS where the aligned coil phases agree, phase ``omega TE``.
    """
    a = np.abs(coil)
    s = np.sum(a * coil * np.conj(offset), axis=0)
    rss = np.sqrt(np.sum(a ** 2, axis=0))
    return np.where(rss > 0, s / np.maximum(rss, 1e-30), 0).astype(np.complex64)


def homogenize(mag: np.ndarray, sigma_vox: Sequence[float], floor: float = 0.1) -> np.ndarray:
    """Magnitude divided by a smooth receive-profile estimate (all echoes by the first echo's).

    The profile is the normalised Gaussian smoothing of the first echo over the object support
    (voxels above 10 % of the first echo's 90th percentile): ``G*(m s) / G*s``, scaled to a median
    of 1 in the support and clipped below at ``floor`` (so that the noise outside is not blown up).

    Parameters
    ----------
    mag : ndarray, float, (x, y, z[, echo])
    sigma_vox : 3 floats
        Gaussian width in voxels (about 15 mm: wider than tissue contrast, narrower than the coils).
    floor : float
        Smallest profile value (relative to its median).

    Returns
    -------
    ndarray, float32, the shape of ``mag``.
    """
    from scipy.ndimage import gaussian_filter

    m = np.asarray(mag, np.float32)
    m1 = m if m.ndim == 3 else m[..., 0]
    pos = m1[m1 > 0]
    if pos.size == 0:
        return m.copy()
    sup = (m1 > 0.1 * np.percentile(pos, 90)).astype(np.float32)
    sig = tuple(float(v) for v in sigma_vox)
    prof = gaussian_filter(m1 * sup, sig, mode="constant") / np.maximum(gaussian_filter(sup, sig, mode="constant"),
                                                                        1e-6)
    prof /= max(float(np.median(prof[sup > 0])), 1e-30)
    prof = np.maximum(prof, float(floor))
    return (m / (prof if m.ndim == 3 else prof[..., None])).astype(np.float32)
