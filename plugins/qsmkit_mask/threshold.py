"""Brain-ish masks from a magnitude image: threshold, largest component, hole filling, erosion.

Steps (each optional except the threshold):

1. threshold the magnitude: automatic (Otsu 1979, between-class variance on a 256-bin histogram
   of the magnitude clipped at its 99.9th percentile) or a given fraction of the 99th percentile
   (both from a regular subsample of at most ~2 M voxels on large volumes);
2. keep the largest 6-connected component;
3. erode by ``erode`` mm (a voxel stays when no voxel outside the mask lies within that distance:
   the exact Euclidean erosion by a ball, anisotropic voxels respected), then keep the largest
   component again: this cuts thin bridges, e.g. between scalp and brain, and drops the scalp;
4. dilate by ``dilate`` mm (``dilate = erode`` restores the size of what was kept);
5. fill enclosed holes in 3D (dark veins, haemorrhage, calcification inside the brain). Filling
   comes last so that a scalp shell joined to the brain cannot fill the skull in before the
   erosion had a chance to cut it off.

On a head image a magnitude threshold gives the head, not the brain: where the skull is dark and
fully separates the scalp (as in the simulator), the largest component is the intracranial
cavity; where an opening in the skull joins brain and neck (real heads), it leaks into the neck.
On real data use ``mask/bet`` (:mod:`.brain`) or ``mask/phase_quality``, give a brain-extraction
mask as ``inputs.mask``, or peel the scalp with ``erode_mm``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from qsmkit.errors import InputDataError
from qsmkit.operators import dilate_mm, erode_mm


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: maximises the between-class variance of a histogram."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputDataError("otsu_threshold: no finite values to threshold; check the magnitude for NaN/inf or an empty selection")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.where(w0 > 0, w0, 1)
    mu1 = (s0[-1] - s0) / np.where(w1 > 0, w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    k = int(np.argmax(between))
    return float(edges[k + 1])  # values above the upper edge of bin k form the foreground


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (empty stays empty)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return lab > 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fill_enclosed_holes(mask: np.ndarray, max_size: int | None = None) -> np.ndarray:
    """Fill enclosed 3D holes: background components that do not touch the grid edge.

    Same result as :func:`scipy.ndimage.binary_fill_holes` (6-connected background), computed by
    labelling the background once, which is several times faster on large volumes. With
    ``max_size`` only holes of at most that many voxels are filled.
    """
    m = np.asarray(mask, dtype=bool)
    lab, n = ndimage.label(~m)
    if n == 0:
        return m.copy()
    edge = np.zeros(n + 1, dtype=bool)
    for axis in range(3):
        for idx in (0, -1):
            edge[np.unique(np.take(lab, idx, axis=axis))] = True
    edge[0] = True  # label 0 is the mask itself
    if max_size is not None:
        edge |= np.bincount(lab.ravel(), minlength=n + 1) > max_size
    return ~edge[lab] | m


def _sample(x: np.ndarray, max_size: int = 2_000_000) -> np.ndarray:
    """A regular subsample (every k-th voxel per axis) of at most about ``max_size`` values."""
    k = 1
    while x.size / k ** 3 > max_size:
        k += 1
    return x[::k, ::k, ::k] if k > 1 else x


def threshold_mask(magnitude: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                   threshold: float | None = None, keep_largest: bool = True,
                   fill_holes: bool = True, erode: float = 0.0, dilate: float = 0.0,
                   return_info: bool = False):
    """Mask of the object in a 3D magnitude image.

    Parameters
    ----------
    magnitude : ndarray, (x, y, z)
        Magnitude image (any scale), e.g. the first echo.
    voxel_size : 3 floats
        Voxel size in mm (for ``erode`` and ``dilate``).
    threshold : float, optional
        Threshold as a fraction of the 99th percentile of ``magnitude``; ``None`` uses Otsu's
        method on the magnitude clipped at its 99.9th percentile.
    keep_largest : bool
        Keep only the largest 6-connected component (after thresholding and after erosion).
    fill_holes : bool
        Fill enclosed 3D holes (last step).
    erode, dilate : float
        Erosion and dilation radii in mm (0 = none), applied in that order before hole filling.
    return_info : bool
        Also return a dict with the absolute threshold used.

    Returns
    -------
    ndarray of bool, (x, y, z)
    """
    m = np.asarray(magnitude, dtype=np.float32)
    if m.ndim != 3:
        raise InputDataError(f"threshold_mask: magnitude must be 3D (x, y, z), got shape {m.shape}; pass one echo")
    sample = _sample(m)  # statistics from a regular subsample on large volumes
    if threshold is None:
        cap = float(np.percentile(sample, 99.9))
        t = otsu_threshold(np.minimum(sample, cap))
        how = "otsu"
    else:
        t = float(threshold) * float(np.percentile(sample, 99))
        how = f"{threshold:g} x p99"
    b = m > t
    if keep_largest:
        b = largest_component(b)
    if erode > 0:
        b = erode_mm(b, erode, voxel_size)
        if keep_largest:
            b = largest_component(b)
    if dilate > 0:
        b = dilate_mm(b, dilate, voxel_size)
    if fill_holes:
        b = fill_enclosed_holes(b)
    b = np.asarray(b, dtype=bool)
    info = {"threshold": t, "method": how}
    return (b, info) if return_info else b
