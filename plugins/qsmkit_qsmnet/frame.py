"""The training frame of QSMnet: B0 along the third voxel axis at the training resolution.

QSMnet learns the inversion for one B0 direction (the third axis) and one voxel size (Yoon et al.
2018 state both limits). Data in another frame are resampled (SimpleITK, :mod:`qsmkit.resample`)
onto a grid whose third axis is B0 and whose voxels have the training size, inverted there, and
resampled back. The grid's axes are the data's voxel axes turned by the smallest rotation that
takes the third one onto B0 (its angle is reported), and it covers the mask's bounding box plus a
margin. Values are interpolated inside the mask only (normalised interpolation, so the zeros
outside the mask do not leak in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.physics import voxel_sizes
from qsmkit.resample import resample_masked

__all__ = ["Frame", "training_frame", "to_frame", "from_frame"]


@dataclass(frozen=True)
class Frame:
    """A B0-aligned grid: ``shape``, ``affine`` (voxel -> world mm), the rotation from the data's
    voxel axes (deg) and whether resampling is needed at all."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    angle_deg: float
    voxel_size: tuple[float, float, float]
    resampled: bool

    def describe(self, data_voxel_size: Sequence[float]) -> str:
        """One phrase for the log line."""
        if not self.resampled:
            return "data already in the training frame (B0 along axis 3, training voxel size): no resampling"
        vs = "x".join(f"{v:g}" for v in data_voxel_size)
        vt = "x".join(f"{v:g}" for v in self.voxel_size)
        return (f"resampled into a B0-aligned grid {self.shape} at {vt} mm (rotation {self.angle_deg:.1f} deg, "
                f"voxels {vs} -> {vt} mm) and back")


def _rotation_onto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vector ``a`` onto unit vector ``b`` (Rodrigues)."""
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    s = float(np.linalg.norm(v))
    if s < 1e-12:
        if c > 0:
            return np.eye(3)
        p = np.eye(3)[np.argmin(np.abs(a))]
        k = np.cross(a, p)
        k /= np.linalg.norm(k)
        return 2.0 * np.outer(k, k) - np.eye(3)
    k = v / s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * kx + (1 - c) * (kx @ kx)


def training_frame(mask: np.ndarray, affine: np.ndarray, b0_voxel: Sequence[float],
                   voxel_size: Sequence[float] = (1.0, 1.0, 1.0), margin_mm: float = 4.0,
                   angle_tol_deg: float = 0.5, size_tol: float = 0.01) -> Frame:
    """The B0-aligned grid at ``voxel_size`` covering ``mask`` (+ ``margin_mm``).

    Parameters
    ----------
    mask : ndarray (x, y, z)
        Region to cover.
    affine : (4, 4)
        Voxel -> world (mm) of the data.
    b0_voxel : 3 floats
        B0 in the data's voxel frame.
    voxel_size : 3 floats
        Training resolution (mm).
    margin_mm : float
        Margin around the mask's bounding box.
    angle_tol_deg, size_tol : float
        Below these (angle between B0 and axis 3; relative voxel-size difference) the data are used
        as they are (``resampled = False``, the frame is the data's own grid).
    """
    a = np.asarray(affine, np.float64)
    vs = voxel_sizes(a)
    rot = a[:3, :3] / vs[None, :]
    b = np.asarray(b0_voxel, np.float64)
    if b.shape != (3,) or not np.isfinite(b).all() or np.linalg.norm(b) == 0:
        raise InputDataError(f"qsmnet: B0 direction must be a non-zero 3-vector, got {b0_voxel!r}")
    b = b / np.linalg.norm(b)
    angle = float(np.degrees(np.arccos(np.clip(b[2], -1.0, 1.0))))
    vt = np.asarray(voxel_size, np.float64)
    m = np.asarray(mask) > 0
    if angle <= angle_tol_deg and np.all(np.abs(vs - vt) <= size_tol * vt):
        return Frame(tuple(int(s) for s in m.shape), a, angle, tuple(float(v) for v in vs), False)
    if not m.any():
        raise InputDataError("qsmnet: the mask is empty; nothing to invert")
    b_world = rot @ b
    q = _rotation_onto(rot[:, 2], b_world) @ rot          # new axes (columns) in world; third = B0
    idx = np.argwhere(m)
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = corners @ a[:3, :3].T + a[:3, 3]
    local = world @ q                                     # coordinates along the new axes (mm)
    c_lo = local.min(0) - margin_mm
    c_hi = local.max(0) + margin_mm
    shape = tuple(int(np.ceil((h - l) / v)) + 1 for l, h, v in zip(c_lo, c_hi, vt))
    new = np.eye(4)
    new[:3, :3] = q * vt[None, :]
    new[:3, 3] = q @ c_lo
    return Frame(shape, new, angle, tuple(float(v) for v in vt), True)


def to_frame(field: np.ndarray, mask: np.ndarray, affine: np.ndarray, frame: Frame,
             interpolation: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """The field (values inside ``mask``) and the mask on the frame's grid."""
    if not frame.resampled:
        m = np.asarray(mask) > 0
        return np.where(m, np.asarray(field, np.float32), np.float32(0)), m
    return resample_masked(field, mask, affine, frame.shape, frame.affine, interpolation, 0.5)


def from_frame(chi: np.ndarray, frame_mask: np.ndarray, frame: Frame, affine: np.ndarray, mask: np.ndarray,
               interpolation: str = "linear") -> np.ndarray:
    """chi on the frame's grid back onto the data grid (``affine``, ``mask.shape``), zero outside ``mask``."""
    m = np.asarray(mask) > 0
    if not frame.resampled:
        return np.where(m, np.asarray(chi, np.float32), np.float32(0))
    out, _ = resample_masked(chi, frame_mask, frame.affine, m.shape, affine, interpolation, 1e-3)
    out[~m] = 0
    return out
