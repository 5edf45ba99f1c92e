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
import scipy.fft as sfft

from qsmkit.errors import InputDataError
from qsmkit.operators import SMV, bounding_box


@dataclass
class PaddedProblem:
    """A field and mask on the padded bounding-box grid, with the SMV of one radius on it."""

    box: tuple
    inner: tuple
    full_shape: tuple
    field: np.ndarray      # float32, padded grid, 0 outside the mask
    mask: np.ndarray       # bool, padded grid
    smv: SMV
    eroded: np.ndarray     # bool, padded grid

    def uncrop(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.full_shape, dtype=dtype)
        out[self.box] = arr[self.inner]
        return out


def check_inputs(field, mask, voxel_size, radius_mm):
    """float32 field, bool mask, voxel size as floats; one-line InputDataError otherwise."""
    f = np.asarray(field, dtype=np.float32)
    m = np.asarray(mask) > 0
    if f.ndim != 3 or f.shape != m.shape:
        raise InputDataError(f"field {f.shape} and mask {m.shape} must be the same 3D grid")
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0:
        raise InputDataError(f"voxel_size must be 3 positive values in mm, got {voxel_size}")
    if not float(radius_mm) > 0:
        raise InputDataError(f"radius_mm must be positive, got {radius_mm}")
    if m.any() and not np.all(np.isfinite(f[m])):
        raise InputDataError("field has NaN or infinite values inside the mask; fix the input field")
    return f, m, vs


def prepare(field, mask, voxel_size, radius_mm: float) -> PaddedProblem | None:
    """Crop/pad the inputs and erode the mask by ``radius_mm``; ``None`` for an empty mask."""
    f_in, m, vs = check_inputs(field, mask, voxel_size, radius_mm)
    if not m.any():
        return None
    box = bounding_box(m)
    pad = [int(math.ceil(float(radius_mm) / v)) + 1 for v in vs]
    shape = tuple(sfft.next_fast_len(box[a].stop - box[a].start + 2 * pad[a], real=True) for a in range(3))
    inner = tuple(slice(pad[a], pad[a] + box[a].stop - box[a].start) for a in range(3))
    mw = np.zeros(shape, dtype=bool)
    mw[inner] = m[box]
    fw = np.zeros(shape, dtype=np.float32)
    fw[inner] = f_in[box]
    fw *= mw
    smv = SMV(shape, vs, radius_mm)  # the padded box is the FFT grid (no further padding)
    cover = smv.apply(mw.astype(np.float32))
    eroded = (cover > np.float32(1.0 - 0.5 / smv.n_ball)) & mw
    return PaddedProblem(box, inner, m.shape, fw, mw, smv, eroded)


def empty_result(shape: Sequence[int]):
    return np.zeros(tuple(shape), np.float32), np.zeros(tuple(shape), bool)
