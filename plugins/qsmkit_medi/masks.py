"""The CSF mask that MEDI derives from the data (MEDI+0), from an R2* map.

It follows the Cornell MEDI toolbox (``extract_CSF.m``) in intent; the code here is written from
the published method, with numpy/scipy only. The magnitude edge mask ``M_G`` (``gradient_mask.m``)
is shared with TFI and lives in the core: :func:`qsmkit.operators.gradient_mask`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError

#: R2* (1/s) under which a voxel counts as CSF at 3 T; scaled linearly with field strength
CSF_R2STAR_3T = 5.0
#: the brain mask is eroded by this distance (mm) before CSF is searched (keeps out cortical CSF,
#: sinuses and the noisy brain edge), as the toolbox does
CSF_ERODE_MM = 10.0
#: at most this many connected CSF regions are kept (lateral ventricles and third ventricle)
CSF_MAX_REGIONS = 3
#: smallest CSF region kept, mm^3
CSF_MIN_REGION_MM3 = 20.0


def r2star_map(magnitude: np.ndarray, echo_times: Sequence[float], mask: np.ndarray) -> np.ndarray:
    """R2* (1/s) by a magnitude-weighted log-linear fit of ``|S(TE)| = S0 exp(-R2* TE)``, inside ``mask``.

    Parameters
    ----------
    magnitude : ndarray, (x, y, z, echo)
        Multi-echo magnitude (a.u.), at least two echoes.
    echo_times : sequence of float
        Echo times in s.
    mask : ndarray, (x, y, z)
        Voxels to fit; R2* is 0 elsewhere.

    Returns
    -------
    ndarray, float32, (x, y, z)
        R2* in 1/s (clipped at 0).
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    te = np.asarray(echo_times, dtype=np.float64).ravel()
    if mag.ndim != 4 or mag.shape[3] < 2 or mag.shape[3] != te.size:
        raise InputDataError("r2star_map needs a 4D magnitude with one echo time per echo (at least 2 echoes)")
    m = np.asarray(mask) > 0
    s = np.maximum(mag[m].astype(np.float64), 1e-12)          # (n, e)
    y = np.log(s)
    w = s * s                                                 # var(log S) ~ 1/S^2
    sw = w.sum(1)
    tm = (w * te).sum(1) / sw
    ym = (w * y).sum(1) / sw
    slope = (w * (te - tm[:, None]) * (y - ym[:, None])).sum(1) / np.maximum(
        (w * (te - tm[:, None]) ** 2).sum(1), 1e-30)
    out = np.zeros(m.shape, dtype=np.float32)
    out[m] = np.maximum(-slope, 0.0).astype(np.float32)
    return out


def erode_mm(mask: np.ndarray, voxel_size: Sequence[float], distance_mm: float) -> np.ndarray:
    """Voxels of ``mask`` farther than ``distance_mm`` (mm) from its outside (Euclidean, anisotropic-aware)."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if distance_mm <= 0:
        return m
    dist = ndimage.distance_transform_edt(np.pad(m, 1), sampling=tuple(float(v) for v in voxel_size))
    return dist[1:-1, 1:-1, 1:-1] > distance_mm


def csf_mask_from_r2star(r2star: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                         field_strength: float = 3.0, threshold: float | None = None,
                         erode_distance_mm: float = CSF_ERODE_MM) -> np.ndarray:
    """Ventricular CSF for MEDI+0: low-R2* voxels deep inside the brain mask.

    The brain mask is eroded by ``erode_distance_mm``; voxels with ``R2* < threshold`` (default
    ``5 1/s * B0 / 3 T``) are grouped into 6-connected regions and the ``CSF_MAX_REGIONS`` largest
    of at least ``CSF_MIN_REGION_MM3`` are kept (the toolbox's ``extract_CSF`` does the same on its
    R2* map).

    Parameters
    ----------
    r2star : ndarray, (x, y, z)
        R2* in 1/s.
    mask : ndarray, (x, y, z)
        Brain mask.
    voxel_size : 3 floats
        Voxel size in mm.
    field_strength : float
        B0 in T (scales the default threshold).
    threshold : float or None
        R2* threshold in 1/s.
    erode_distance_mm : float
        Erosion of the brain mask before the search, mm.

    Returns
    -------
    ndarray, bool
        The CSF mask (may be empty when no low-R2* region is found).
    """
    from scipy import ndimage

    thr = CSF_R2STAR_3T * float(field_strength) / 3.0 if threshold is None else float(threshold)
    inner = erode_mm(mask, voxel_size, erode_distance_mm)
    cand = inner & (np.asarray(r2star) < thr)
    labels, n = ndimage.label(cand)
    if n == 0:
        return cand
    sizes = np.bincount(labels.ravel())[1:]
    min_vox = CSF_MIN_REGION_MM3 / float(np.prod(voxel_size))
    order = [i for i in np.argsort(sizes)[::-1][:CSF_MAX_REGIONS] if sizes[i] >= min_vox]
    return np.isin(labels, np.asarray(order, dtype=np.int64) + 1)
