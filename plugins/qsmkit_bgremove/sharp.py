"""SHARP background field removal (Schweser et al., NeuroImage 54:2789, 2011).

A background field ``b`` is harmonic inside the brain, so it equals its own spherical mean value
over any ball that fits inside the mask: ``(delta - S) * b = 0`` there. SHARP high-passes the
total field with ``delta - S`` (one ball of radius ``r``), keeps it on the mask eroded by ``r``
(where the ball lies in the mask), and deconvolves with ``1 - S(k)``, truncated where
``|1 - S(k)| < threshold`` (TSVD). The result is kept on the eroded mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._grid import empty_result, prepare


def sharp(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], *, radius_mm: float = 6.0,
          threshold: float = 0.05):
    """Local field by SHARP (one SMV radius, truncated deconvolution).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (the method is linear: any unit works); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    radius_mm : float
        Radius of the SMV ball in mm (default 6 mm).
    threshold : float
        TSVD truncation: frequencies with ``|1 - S(k)| < threshold`` are zeroed (Schweser 2011: 0.05).

    Returns
    -------
    local : ndarray, float32, (x, y, z)
        Local field (unit of ``field``), 0 outside ``eroded``.
    eroded : ndarray of bool, (x, y, z)
        The mask eroded by ``radius_mm`` (voxels whose ball lies inside the mask).
    """
    pp = prepare(field, mask, voxel_size, radius_mm)
    if pp is None or not pp.eroded.any():
        return empty_result(np.shape(mask))
    hp = pp.smv.complement()
    k = hp.kernel
    inv = np.where(np.abs(k) >= np.float32(threshold), np.float32(1.0) / np.where(k == 0, 1, k), 0).astype(np.float32)
    g = hp.apply(pp.field)
    g *= pp.eroded
    loc = hp.filter(g, inv)
    loc *= pp.eroded
    return pp.uncrop(loc), pp.uncrop(pp.eroded, bool)
