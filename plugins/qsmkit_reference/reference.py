"""Susceptibility referencing: subtract the mean (or median) over a reference region."""

from __future__ import annotations

import numpy as np

from qsmkit.errors import InputDataError, ParameterError


def reference_to_region(chi: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None,
                        statistic: str = "mean") -> tuple[np.ndarray, float]:
    """``chi`` minus its mean (or median) over ``region`` (default: ``mask``), 0 outside ``mask``.

    Parameters
    ----------
    chi : ndarray, (x, y, z)
        Susceptibility in ppm.
    mask : ndarray of bool, (x, y, z)
        Where ``chi`` is valid; the output is 0 outside.
    region : ndarray of bool, (x, y, z), optional
        Reference region (e.g. CSF or whole brain); intersected with ``mask``.
    statistic : {"mean", "median"}
        How the reference value is computed.

    Returns
    -------
    (ndarray float32, float)
        Referenced susceptibility in ppm, and the subtracted value in ppm.
    """
    c = np.asarray(chi, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    r = m if region is None else (np.asarray(region, dtype=bool) & m)
    if not r.any():
        raise InputDataError("reference_to_region: the reference region (within the mask) is empty; give a "
                             "non-empty region that overlaps the mask")
    vals = c[r].astype(np.float64)
    if statistic == "mean":
        ref = float(vals.mean())
    elif statistic == "median":
        ref = float(np.median(vals))
    else:
        raise ParameterError(f"reference_to_region: unknown statistic {statistic!r}; use mean or median")
    out = np.where(m, c - np.float32(ref), np.float32(0)).astype(np.float32)
    return out, ref
