"""Resampling of a moving acquisition's arrays onto the reference grid (SimpleITK), and FOV overlap.

Transforms map reference world to moving world coordinates (mm), as in :mod:`.geometry`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .geometry import _from_sitk, to_sitk

__all__ = ["resample_to_reference", "resample_masked", "resample_masked_many", "fov_fraction"]


def _interp(name: str):
    import SimpleITK as sitk

    return {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}[name]


def resample_to_reference(data: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int], ref_affine: np.ndarray,
                          matrix: np.ndarray, interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
    """Resample a 3D array of a moving grid onto the reference grid (float32).

    The value at reference voxel ``v`` is ``data`` interpolated at moving world point
    ``matrix @ ref_affine @ v``; points outside the moving grid get ``default``.
    ``interpolation`` is ``linear``, ``bspline`` (cubic) or ``nearest``.
    """
    import SimpleITK as sitk

    src = to_sitk(data, affine)
    ref = to_sitk(np.zeros(tuple(int(s) for s in ref_shape), dtype=np.uint8), ref_affine, "uint8")
    t = sitk.AffineTransform(3)
    m = np.asarray(matrix, dtype=np.float64)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    out = sitk.Resample(src, ref, t, _interp(interpolation), float(default), sitk.sitkFloat32)
    return _from_sitk(out).astype(np.float32, copy=False)


def resample_masked(field: np.ndarray, mask: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int],
                    ref_affine: np.ndarray, matrix: np.ndarray, interpolation: str = "linear",
                    threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Resample a field defined only inside ``mask`` without mixing in the zeros outside it.

    Normalised interpolation: ``resample(field * mask) / resample(mask)``, kept where the
    interpolated mask is at least ``threshold``. Returns ``(field_ref float32, mask_ref bool)``.
    """
    (out,), keep = resample_masked_many([field], mask, affine, ref_shape, ref_affine, matrix, interpolation, threshold)
    return out, keep


def resample_masked_many(fields: Sequence[np.ndarray], mask: np.ndarray, affine: np.ndarray,
                         ref_shape: Sequence[int], ref_affine: np.ndarray, matrix: np.ndarray,
                         interpolation: str = "linear", threshold: float = 0.5) -> tuple[list, np.ndarray]:
    """:func:`resample_masked` for several fields sharing one mask (the mask is resampled once)."""
    m = (np.asarray(mask) > 0).astype(np.float32)
    den = resample_to_reference(m, affine, ref_shape, ref_affine, matrix, "linear")
    den_b = resample_to_reference(m, affine, ref_shape, ref_affine, matrix, "bspline") \
        if interpolation == "bspline" else den
    keep = den >= threshold
    den_k = np.maximum(den_b[keep], 1e-3)
    outs = []
    for field in fields:
        num = resample_to_reference(np.where(m > 0, field, 0).astype(np.float32), affine, ref_shape, ref_affine,
                                    matrix, interpolation)
        out = np.zeros(keep.shape, dtype=np.float32)
        out[keep] = num[keep] / den_k
        outs.append(out)
    return outs, keep


def fov_fraction(mask: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int], ref_affine: np.ndarray,
                 matrix: np.ndarray) -> float:
    """Fraction of the moving mask's voxels that land inside the reference grid.

    A moving voxel at world point ``y`` lands at reference world ``inv(matrix) @ y`` and
    reference voxel ``inv(ref_affine) @ inv(matrix) @ y``; it is inside when every index is
    within ``[-0.5, n - 0.5]``.
    """
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        return 0.0
    full = (np.linalg.inv(np.asarray(ref_affine, dtype=np.float64))
            @ np.linalg.inv(np.asarray(matrix, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64))
    v = idx @ full[:3, :3].T + full[:3, 3]
    n = np.asarray(ref_shape[:3], dtype=np.float64)
    inside = np.all((v >= -0.5) & (v <= n - 0.5), axis=1)
    return float(inside.mean())
