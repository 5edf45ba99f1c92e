"""Truncated k-space division (TKD), Shmueli et al. 2009 / Wharton et al. 2010."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.operators import Dipole


def truncation_response(threshold: float) -> float:
    """Direction average of ``D * D_tkd^-1`` (1 without truncation), closed form.

    ``D`` depends only on the angle between k and B0 (``u = cos``): ``D = 1/3 - u^2``. TKD
    passes ``|D|/t`` of the spectrum where ``|D| < t``, so a uniform isotropic structure comes
    out scaled by ``c(t) = int_0^1 min(1, |1/3 - u^2| / t) du`` (0.867 for t = 0.15). Dividing
    by ``c(t)`` is the TKD underestimation correction of Schweser et al. 2013 (MRM 69:1582).
    """
    t = float(threshold)

    def prim(u: float) -> float:  # antiderivative of (1/3 - u^2)
        return u / 3.0 - u ** 3 / 3.0

    u0 = 1.0 / np.sqrt(3.0)
    a = np.sqrt(max(0.0, 1.0 / 3.0 - t))
    b = min(1.0, np.sqrt(1.0 / 3.0 + t))
    truncated = ((prim(u0) - prim(a)) - (prim(b) - prim(u0))) / t  # int_a^b |1/3 - u^2| / t du
    return float(1.0 - (b - a) + truncated)


def tkd(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
        threshold: float = 0.15, padding: float = 1.5, correct: bool = True) -> np.ndarray:
    """Susceptibility by truncated k-space division.

    ``chi = ifft(F / D)`` where ``|D| >= threshold``, and ``F * sign(D) / threshold`` where
    ``|D| < threshold`` (``D(0) = 0`` gives a zero-mean result; reference it afterwards).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Local field in ppm of B0.
    mask : ndarray, (x, y, z)
        Region of valid field (bool or 0/1); the field is zeroed outside and so is ``chi``.
    voxel_size : 3 floats
        Voxel size in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    threshold : float
        Truncation level of the dipole kernel (0.15 is usual; larger is smoother and more biased).
    padding : float
        Minimum zero-padding factor per axis (1 disables padding).
    correct : bool
        Divide by :func:`truncation_response` to undo TKD's systematic underestimation.

    Returns
    -------
    ndarray, float32, (x, y, z)
        Susceptibility in ppm.
    """
    m = np.asarray(mask) > 0
    f = np.where(m, np.asarray(field, dtype=np.float32), np.float32(0))
    chi = Dipole(f.shape, voxel_size, b0_dir, padding=padding).truncated_inverse(f, threshold)
    if correct:
        chi /= np.float32(truncation_response(threshold))
    chi[~m] = 0
    return chi
