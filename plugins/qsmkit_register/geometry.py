"""Geometry shared by registration and resampling: SimpleITK images of arrays, rotations, B0 composition.

World coordinates are the NIfTI (nibabel, RAS) scanner coordinates of each acquisition, in mm.
The images are handed to SimpleITK with origin, spacing and direction taken from the affine as it
is (SimpleITK only needs one consistent physical frame), so every transform of this plugin maps
**reference world coordinates to moving-acquisition world coordinates**, as ITK transforms map
fixed-image points to moving-image points:

``y_moving = M[:3, :3] @ x_ref + M[:3, 3]``  with ``M`` the 4x4 world matrix.

B0 is the world z axis of each acquisition's scanner frame (or whatever direction that
acquisition's ``Volume.b0_direction`` says). In the reference world frame it is
``M[:3, :3].T @ b_world_moving``; in the reference voxel frame it then follows
:func:`qsmkit.physics.b0_direction_from_affine` of the reference affine. SimpleITK is imported
inside the functions that need it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.errors import GeometryError
from qsmkit.physics import b0_direction_from_affine, voxel_sizes

__all__ = ["to_sitk", "euler_matrix", "rotation_angle_deg", "b0_in_reference_frame", "b0_world_from_voxel"]


def _direction(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    return a[:3, :3] / voxel_sizes(a)[None, :]


def to_sitk(data: np.ndarray, affine: np.ndarray, pixel: str = "float32"):
    """A ``SimpleITK.Image`` of a 3D array ``data`` (x, y, z) on the grid of ``affine``.

    Index ``(i, j, k)`` of the image is ``data[i, j, k]`` and its physical point is
    ``affine @ (i, j, k, 1)`` (mm).
    """
    import SimpleITK as sitk

    arr = np.asarray(data)
    if arr.ndim != 3:
        raise GeometryError(f"to_sitk: needs a 3D array (x, y, z), got shape {arr.shape}; pass one echo / volume")
    arr = arr.astype(np.uint8 if pixel == "uint8" else np.float32, copy=False)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    a = np.asarray(affine, dtype=np.float64)
    img.SetSpacing(tuple(float(v) for v in voxel_sizes(a)))
    img.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    img.SetDirection(tuple(float(v) for v in _direction(a).ravel()))
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def euler_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation matrix of ITK's ``Euler3DTransform`` angles (x, y, z) in rad: ``Rz @ Rx @ Ry``."""
    ax, ay, az = (float(a) for a in angles_rad)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def rotation_angle_deg(rot: np.ndarray) -> float:
    """Total rotation angle (deg) of a 3x3 rotation matrix (axis-angle magnitude)."""
    c = (np.trace(np.asarray(rot, dtype=np.float64)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def b0_world_from_voxel(affine: np.ndarray, b0_voxel: Sequence[float]) -> np.ndarray:
    """World direction whose voxel-frame expression (per :func:`b0_direction_from_affine`) is ``b0_voxel``."""
    rot = _direction(affine)
    b = np.linalg.solve(rot.T, np.asarray(b0_voxel, dtype=np.float64))
    return b / np.linalg.norm(b)


def b0_in_reference_frame(ref_affine: np.ndarray, matrix: np.ndarray,
                          b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """B0 of a moving acquisition expressed in the reference voxel frame.

    Parameters
    ----------
    ref_affine : (4, 4)
        Reference voxel -> reference world (mm) affine; may be oblique with anisotropic voxels.
    matrix : (4, 4)
        Rigid world transform reference world -> moving world (mm), e.g. :attr:`RigidResult.matrix`.
    b0_world : 3 floats
        B0 direction in the moving acquisition's world (scanner) frame; ``(0, 0, 1)`` normally.

    Returns
    -------
    ndarray (3,)
        Unit vector in the reference voxel frame: ``b0_direction_from_affine(ref_affine, Q.T @ b0_world)``
        with ``Q = matrix[:3, :3]``.
    """
    q = np.asarray(matrix, dtype=np.float64)[:3, :3]
    b_ref_world = q.T @ np.asarray(b0_world, dtype=np.float64)
    return b0_direction_from_affine(ref_affine, b_ref_world)
