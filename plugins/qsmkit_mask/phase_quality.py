"""Brain mask from a phase-quality map (e.g. ROMEO's voxel quality), as QSMxT's phase-based masking.

Steps (Stewart et al., QSMxT, MRM 87:1289 (2022); Dymerska et al., ROMEO, MRM 85:2294 (2021)):

1. threshold the quality map (1 = reliable phase): Otsu's threshold (Otsu 1979) of the map with
   its extreme tails (below the 0.05th and above the 99.5th percentile) left out of the histogram,
   as QSMxT does; the *robust* threshold of MriResearchTools' ``robustmask`` (used by ROMEO and
   QSMxT): ``max(5 * noise, high / 5)``, with ``high`` the mean of the values between the 80th and
   99th percentiles and ``noise`` the mean of the values below the 15th (or, when that is above
   ``high / 10`` because the object fills the grid, the 5th) percentile, or 0 when no noise floor
   is found; a percentile of the map; or a given value. The automatic thresholds are multiplied
   by ``factor`` (QSMxT's ``threshold_algorithm_factor``: larger gives a smaller mask);
2. optionally also require signal: the magnitude above its own robust threshold (drops voxels
   of air whose phase happens to look smooth);
3. keep the largest 6-connected component; fill its small enclosed holes (at most
   ``SMALL_HOLE_FRACTION`` of its volume: veins, haemorrhage, not the skull between a connected
   scalp and the brain), so that the erosion does not widen them; erode by ``erode`` mm and keep
   the largest component again (cuts thin bridges, e.g. through the skull to the scalp), dilate by
   ``dilate`` mm;
4. fill enclosed holes in 3D: the mask. Holes are the voxels of unreliable phase around strong
   sources (veins, haemorrhage, calcification) and dark tissue;
5. the *reliable* mask (two-pass QSM): the voxels of the mask whose quality passed the threshold,
   i.e. the mask without the filled holes. QSMxT's two-pass QSM inverts inside the reliable mask
   first, then inside the filled mask, and keeps the first result where it exists.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError, ParameterError

from .threshold import _sample, dilate_mm, erode_mm, fill_enclosed_holes, largest_component, otsu_threshold

#: the threshold rules of :func:`phase_quality_mask`
METHODS: tuple[str, ...] = ("otsu", "robust", "percentile", "value")

#: holes up to this fraction of the component's volume are filled before the erosion
SMALL_HOLE_FRACTION = 0.1


def robust_threshold(values: np.ndarray) -> float:
    """MriResearchTools' ``robustmask`` threshold of an intensity or quality image.

    ``max(5 * noise, high / 5)``: ``high`` is the mean of the values between the 80th and 99th
    percentiles; ``noise`` the mean of the values up to the 15th percentile, or up to the 5th when
    that is above ``high / 10`` (little background), or 0 when that is still above ``high / 10``
    (no background at all). Outliers above the 99th percentile do not move it.
    """
    w = np.asarray(values, dtype=np.float64).ravel()
    w = w[np.isfinite(w)]
    if w.size == 0:
        raise InputDataError("robust_threshold: no finite values to threshold; check the input for NaN/inf")
    q05, q15, q80, q99 = np.quantile(w, (0.05, 0.15, 0.80, 0.99))
    top = w[(w >= q80) & (w <= q99)]
    high = float(top.mean()) if top.size else float(q99)
    noise = float(w[w <= q15].mean())
    if noise > high / 10.0:
        noise = float(w[w <= q05].mean())
        if noise > high / 10.0:
            noise = 0.0
    return max(5.0 * noise, high / 5.0)


def qsmxt_otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` without the histogram tails (below p0.05, above p99.5), as QSMxT."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo, hi = np.percentile(v, (0.05, 99.5))
    core = v[(v > lo) & (v < hi)]
    return otsu_threshold(core if core.size else v)


def quality_threshold(quality: np.ndarray, method: str = "otsu", value: float | None = None,
                      percentile: float | None = None, factor: float = 1.0) -> float:
    """The absolute threshold of a quality map by one of :data:`METHODS` (see the module docstring)."""
    sample = _sample(np.asarray(quality, dtype=np.float32))
    if method == "otsu":
        return factor * qsmxt_otsu_threshold(sample)
    if method == "robust":
        return factor * robust_threshold(sample)
    if method == "percentile":
        if percentile is None:
            raise ParameterError("phase_quality: method percentile needs 'percentile' (0-100)")
        return float(np.percentile(sample, percentile))
    if method == "value":
        if value is None:
            raise ParameterError("phase_quality: method value needs 'value' (a quality between 0 and 1)")
        return float(value)
    raise ParameterError(f"phase_quality: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def phase_quality_mask(quality: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                       method: str = "otsu", value: float | None = None, percentile: float | None = None,
                       factor: float = 1.0, magnitude: np.ndarray | None = None, keep_largest: bool = True,
                       fill_holes: bool = True, erode: float = 0.0, dilate: float = 0.0,
                       return_info: bool = False):
    """Mask (and reliable-phase mask) from a phase-quality map.

    Parameters
    ----------
    quality : ndarray, (x, y, z)
        Phase quality, larger = more reliable (ROMEO: float in [0, 1]).
    voxel_size : 3 floats
        Voxel size in mm (for ``erode`` and ``dilate``).
    method : {"otsu", "robust", "percentile", "value"}
        Threshold rule (module docstring).
    value : float, optional
        The threshold itself, for ``method="value"``.
    percentile : float, optional
        Percentile (0-100) of the quality map used as threshold, for ``method="percentile"``.
    factor : float
        Multiplies the ``otsu`` and ``robust`` thresholds (larger: smaller mask).
    magnitude : ndarray, (x, y, z), optional
        When given, voxels must also have a magnitude above its robust threshold.
    keep_largest, fill_holes : bool
        Largest 6-connected component (after the threshold and after erosion); enclosed 3D hole
        filling (the last step).
    erode, dilate : float
        Erosion then dilation radii in mm (0 = none).
    return_info : bool
        Also return a dict: ``threshold``, ``method``, ``reliable`` (the reliable mask: the mask
        without its filled holes), ``magnitude_threshold``.

    Returns
    -------
    ndarray of bool, (x, y, z), and the info dict when ``return_info``.
    """
    q = np.asarray(quality, dtype=np.float32)
    if q.ndim != 3:
        raise InputDataError(f"phase_quality_mask: quality must be 3D (x, y, z), got shape {q.shape}")
    t = quality_threshold(q, method, value, percentile, factor)
    passed = q > t
    t_mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        if mag.shape != q.shape:
            raise InputDataError(f"phase_quality_mask: magnitude {mag.shape} and quality {q.shape} differ in shape")
        t_mag = robust_threshold(_sample(mag))
        passed &= mag > t_mag
    b = largest_component(passed) if keep_largest else passed.copy()
    if erode > 0:
        b = fill_enclosed_holes(b, max_size=int(SMALL_HOLE_FRACTION * b.sum()))
        b = erode_mm(b, erode, voxel_size)
        if keep_largest:
            b = largest_component(b)
    if dilate > 0:
        b = dilate_mm(b, dilate, voxel_size)
    mask = fill_enclosed_holes(b) if fill_holes else b
    mask = np.asarray(mask, dtype=bool)
    if not return_info:
        return mask
    return mask, {"threshold": t, "method": method, "reliable": mask & passed, "magnitude_threshold": t_mag}
