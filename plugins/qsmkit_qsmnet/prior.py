"""Closed-form chi estimate the residual QSMnet variant refines (``residual: true``).

Truncated k-space division (Shmueli et al., MRM 62:1510, 2009): the core
:meth:`~qsmkit.operators.Dipole.truncated_inverse`, *without* TKD's underestimation correction
(the network learns the scale). The residual network (:class:`qsmkit_qsmnet.network.QSMnet` with ``residual=True``) gets it as its second input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.operators import Dipole

__all__ = ["closed_form_prior"]


def closed_form_prior(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
                      threshold: float = 0.15, padding: float = 1.5) -> np.ndarray:
    """Truncated k-space division of a local field.

    Parameters
    ----------
    field : ndarray (x, y, z)
        Local field, ppm of B0 (zeroed outside ``mask``).
    mask : ndarray (x, y, z)
        Region of valid field.
    voxel_size : 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    threshold : float
        Kernel truncation level: ``|D| < threshold`` is replaced by ``sign(D) * threshold``.
    padding : float
        Minimum zero-padding factor of the FFT grid.

    Returns
    -------
    ndarray float32
        chi estimate in ppm, zero outside the mask.
    """
    m = np.asarray(mask) > 0
    f = np.where(m, np.asarray(field, dtype=np.float32), np.float32(0))
    chi = Dipole(f.shape, voxel_size, b0_dir, padding=padding).truncated_inverse(f, threshold)
    chi[~m] = 0
    return chi
