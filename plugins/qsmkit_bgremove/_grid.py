"""Shared set-up of the SMV-based background removers: crop, pad, erode (no kernels of their own).

The grid is cropped to the mask's bounding box and zero-padded by the ball radius (+1 voxel) on
every side to FFT-friendly sizes, so that the core :class:`qsmkit.operators.SMV` (periodic on
that padded grid) never wraps around. The eroded mask is the set of voxels whose ball lies
entirely inside the mask (the SMV of the mask is 1 there), the same convention as V-SHARP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from qsmkit.errors import InputDataError
from qsmkit.operators import SMV, PaddedBox, padded_box


@dataclass
class PaddedProblem:
    """A field and mask on the padded bounding-box grid, with the SMV of one radius on it."""

    grid: PaddedBox
    field: np.ndarray      # float32, padded grid, 0 outside the mask
    mask: np.ndarray       # bool, padded grid
    smv: SMV
    eroded: np.ndarray     # bool, padded grid

    def uncrop(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        return self.grid.uncrop(arr, dtype)


def check_inputs(field, mask, voxel_size, radius_mm=None):
    """float32 field, bool mask, voxel size as floats; one-line InputDataError otherwise."""
    f = np.asarray(field, dtype=np.float32)
    m = np.asarray(mask) > 0
    if f.ndim != 3 or f.shape != m.shape:
        raise InputDataError(f"field {f.shape} and mask {m.shape} must be the same 3D grid")
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0:
        raise InputDataError(f"voxel_size must be 3 positive values in mm, got {voxel_size}")
    if radius_mm is not None and not float(radius_mm) > 0:
        raise InputDataError(f"radius_mm must be positive, got {radius_mm}")
    if m.any() and not np.all(np.isfinite(f[m])):
        raise InputDataError("field has NaN or infinite values inside the mask; fix the input field")
    return f, m, vs


def prepare(field, mask, voxel_size, radius_mm: float) -> PaddedProblem | None:
    """Crop/pad the inputs and erode the mask by ``radius_mm``; ``None`` for an empty mask."""
    f_in, m, vs = check_inputs(field, mask, voxel_size, radius_mm)
    if not m.any():
        return None
    pb = padded_box(m, [int(math.ceil(float(radius_mm) / v)) + 1 for v in vs])
    mw = pb.embed(m, bool)
    fw = pb.embed(f_in)
    fw *= mw
    smv = SMV(pb.shape, vs, radius_mm)  # the padded box is the FFT grid (no further padding)
    cover = smv.apply(mw.astype(np.float32))
    eroded = (cover > np.float32(1.0 - 0.5 / smv.n_ball)) & mw
    return PaddedProblem(pb, fw, mw, smv, eroded)


def empty_result(shape: Sequence[int]):
    return np.zeros(tuple(shape), np.float32), np.zeros(tuple(shape), bool)
