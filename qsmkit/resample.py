"""Resampling of a 3D array from one affine grid onto another (SimpleITK), in world coordinates.

Generic core helper (the same world frame on both sides: no registration transform); used where a
method must work in a fixed frame, e.g. QSMnet's B0-aligned grid at its training resolution.
``affine`` maps voxel indices ``(i, j, k, 1)`` to world mm, as in NIfTI; the images are handed to
SimpleITK with origin, spacing and direction taken from the affines (any consistent frame works).
SimpleITK is imported inside the functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import GeometryError
from .physics import voxel_sizes

__all__ = ["to_sitk", "from_sitk", "resample", "resample_masked", "INTERPOLATIONS"]

#: interpolation names :func:`resample` knows
INTERPOLATIONS = ("linear", "bspline", "nearest")


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """A float32 ``SimpleITK.Image`` of the 3D array ``data`` (x, y, z) on the grid of ``affine``."""
    import SimpleITK as sitk

    arr = np.asarray(data)
    if arr.ndim != 3:
        raise GeometryError(f"resample: needs a 3D array (x, y, z), got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.float32, copy=False).transpose(2, 1, 0)))
    a = np.asarray(affine, dtype=np.float64)
    vs = voxel_sizes(a)
    img.SetSpacing(tuple(float(v) for v in vs))
    img.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    img.SetDirection(tuple(float(v) for v in (a[:3, :3] / vs[None, :]).ravel()))
    return img


def from_sitk(img) -> np.ndarray:
    """The (x, y, z) float32 array of a SimpleITK image."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0)).astype(np.float32, copy=False)


def resample(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], ref_affine: np.ndarray,
             interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
    """``data`` (on ``affine``) interpolated at the voxel centres of the grid ``(shape, ref_affine)``.

    Parameters
    ----------
    data : ndarray (x, y, z)
    affine : (4, 4)
        Voxel -> world (mm) of ``data``.
    shape : 3 ints
        Output grid.
    ref_affine : (4, 4)
        Voxel -> world (mm) of the output grid.
    interpolation : {"linear", "bspline", "nearest"}
        ``bspline`` is cubic.
    default : float
        Value outside the input grid.

    Returns
    -------
    ndarray float32 of ``shape``
    """
    import SimpleITK as sitk

    if interpolation not in INTERPOLATIONS:
        raise GeometryError(f"resample: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    interp = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    ref = to_sitk(np.zeros(tuple(int(s) for s in shape), np.float32), ref_affine)
    out = sitk.Resample(to_sitk(data, affine), ref, sitk.Transform(), interp, float(default), sitk.sitkFloat32)
    return from_sitk(out)


def resample_masked(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                    ref_affine: np.ndarray, interpolation: str = "linear",
                    threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Resample values defined only inside ``mask`` without mixing in the zeros outside it.

    Normalised interpolation ``resample(data * mask) / resample(mask)`` (both with ``interpolation``)
    where the linearly interpolated mask is at least ``threshold`` (0 elsewhere). Returns
    ``(values float32, new mask bool)``.
    """
    m = (np.asarray(mask) > 0).astype(np.float32)
    den = resample(m, affine, shape, ref_affine, "linear")
    keep = den >= float(threshold)
    den_i = den if interpolation == "linear" else resample(m, affine, shape, ref_affine, interpolation)
    num = resample(np.where(m > 0, np.asarray(data, np.float32), np.float32(0)), affine, shape, ref_affine,
                   interpolation)
    out = np.zeros(keep.shape, np.float32)
    out[keep] = num[keep] / np.maximum(den_i[keep], np.float32(1e-3))
    return out, keep
