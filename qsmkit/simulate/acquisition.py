"""Options of :func:`~qsmkit.simulate.simulate_phantom` checked and turned into the acquisition geometry.

:func:`_acquisition` validates the grid, echo times, field strength and B0 direction and derives
the voxel -> world affine, the B0 direction in the voxel frame, the head rotation about the FOV
centre and the head semi-axes (:class:`_Acquisition`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ParameterError
from ..physics import b0_direction_from_affine, voxel_sizes

__all__ = ["rotation_matrix", "DEFAULT_SHAPE", "DEFAULT_VOXEL_SIZE", "DEFAULT_ECHO_TIMES"]

DEFAULT_SHAPE = (112, 128, 96)
DEFAULT_VOXEL_SIZE = (1.5, 1.5, 1.5)
DEFAULT_ECHO_TIMES = (0.004, 0.008, 0.012, 0.016, 0.020)


# ============================================================================ geometry
def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about the world x, y, z axes.

    The head is first rotated about x, then about y, then about z (extrinsic, scanner frame).
    """
    ax, ay, az = (math.radians(float(a)) for a in rotation_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _check_params(shape, voxel_size, echo_times, field_strength, oversample, padding, snr) -> None:
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise ParameterError(f"simulate: shape must be 3 integers >= 8, got {tuple(shape)}")
    if len(voxel_size) != 3 or any(not (0.05 <= float(v) <= 20.0) for v in voxel_size):
        raise ParameterError(f"simulate: voxel_size must be 3 values in mm between 0.05 and 20, got {tuple(voxel_size)}")
    te = np.asarray(echo_times, dtype=np.float64)
    if te.ndim != 1 or te.size < 1 or np.any(te <= 0) or not np.all(np.isfinite(te)):
        raise ParameterError("simulate: echo_times must be a non-empty list of positive times in seconds")
    if np.any(te > 1.0):
        raise ParameterError(f"simulate: echo_times look like milliseconds ({te.tolist()}); give them in seconds, e.g. 0.004")
    if not (0.05 <= float(field_strength) <= 21.1):
        raise ParameterError(f"simulate: field_strength {field_strength} T is outside 0.05-21.1 T")
    if int(oversample) != oversample or not (1 <= int(oversample) <= 4):
        raise ParameterError(f"simulate: oversample must be an integer 1-4, got {oversample}")
    if not (1.0 <= float(padding) <= 4.0):
        raise ParameterError(f"simulate: padding must be between 1 and 4, got {padding}")
    if snr is not None and not (float(snr) > 0):
        raise ParameterError(f"simulate: snr must be positive (or None/inf for no noise), got {snr}")


def _head_semi_axes(shape, affine, fov_fraction) -> np.ndarray:
    """Head semi-axes (mm) along world x, y, z: ``fov_fraction`` of the FOV half-extent along the
    voxel axis closest to each world axis."""
    vs = voxel_sizes(affine)
    half = 0.5 * np.asarray(shape, np.float64) * vs
    R = np.asarray(affine, np.float64)[:3, :3] / vs[None, :]
    out = np.empty(3)
    for w in range(3):
        out[w] = half[int(np.argmax(np.abs(R[w])))]
    return fov_fraction * out


@dataclass
class _Acquisition:
    """Validated geometry of one simulated acquisition (see :func:`simulate_phantom`)."""

    shape: tuple
    A: np.ndarray            # voxel -> world affine (mm)
    vs: np.ndarray           # voxel size (mm)
    te: np.ndarray           # echo times (s)
    os_: int                 # oversampling factor per axis
    snr: float | None
    b0w: np.ndarray          # unit B0 direction, world frame
    b_vox: np.ndarray        # unit B0 direction, voxel frame
    R: np.ndarray            # head rotation (world frame)
    center: np.ndarray       # rotation centre (world, mm)
    S: np.ndarray            # head semi-axes (mm)


def _grid(shape, voxel_size, affine) -> tuple[tuple, np.ndarray, np.ndarray]:
    """``(shape, affine, voxel size)``: the given affine (checked) or a centred diagonal one."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"simulate: shape must be 3 integers, got {shape!r}") from None
    if affine is not None:
        A = np.asarray(affine, np.float64)
        if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-9:
            raise ParameterError("simulate: affine must be a finite, invertible 4x4 voxel-to-world matrix")
        vs = voxel_sizes(A)
    else:
        vs = np.asarray(voxel_size, np.float64)
        if len(vs) != 3:
            raise ParameterError(f"simulate: voxel_size must be 3 values in mm, got {tuple(voxel_size)}")
        A = np.diag(np.r_[vs, 1.0])
        A[:3, 3] = -vs * (np.asarray(shape) - 1) / 2.0
    return shape, A, vs


def _acquisition(shape, voxel_size, echo_times, field_strength, b0_direction, affine, rotation_deg, snr,
                 oversample, padding, fov_fraction, head_semi_axes_mm) -> _Acquisition:
    """Check the options of :func:`simulate_phantom` and derive the acquisition geometry."""
    shape, A, vs = _grid(shape, voxel_size, affine)
    snr_val = None if snr is None or not np.isfinite(float(snr)) else float(snr)
    _check_params(shape, vs, echo_times, field_strength, oversample, padding, snr_val)
    b0w = np.asarray(b0_direction, np.float64)
    if b0w.shape != (3,) or not np.isfinite(np.linalg.norm(b0w)) or np.linalg.norm(b0w) == 0:
        raise ParameterError("simulate: b0_direction must be a non-zero 3-vector in world coordinates")
    b0w = b0w / np.linalg.norm(b0w)
    S = (np.asarray(head_semi_axes_mm, np.float64) if head_semi_axes_mm is not None
         else _head_semi_axes(shape, A, fov_fraction))
    return _Acquisition(shape=shape, A=A, vs=vs, te=np.asarray(echo_times, np.float64), os_=int(oversample),
                        snr=snr_val, b0w=b0w, b_vox=b0_direction_from_affine(A, b0w),
                        R=rotation_matrix(rotation_deg),
                        center=A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + A[:3, 3], S=S)
