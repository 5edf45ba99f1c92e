"""Grid helpers: the bounding box of a mask, that box zero-padded to an FFT-friendly grid, block means,
erosion and dilation of a mask by a distance in mm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputDataError

# =========================================================================== grid helper
def erode_mm(mask: np.ndarray, radius_mm: float, voxel_size: Sequence[float]) -> np.ndarray:
    """Erosion by a ball of ``radius_mm`` (mm; ``voxel_size`` in mm): keep voxels with no outside voxel
    within that distance.

    Voxels beyond the grid edge count as outside.
    """
    from scipy.ndimage import distance_transform_edt

    if radius_mm <= 0:
        return np.asarray(mask, dtype=bool).copy()
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    dist = distance_transform_edt(padded, sampling=voxel_size)[1:-1, 1:-1, 1:-1]
    return dist > radius_mm + 1e-6


def dilate_mm(mask: np.ndarray, radius_mm: float, voxel_size: Sequence[float]) -> np.ndarray:
    """Dilation by a ball of ``radius_mm``: add voxels within that distance of the mask."""
    from scipy.ndimage import distance_transform_edt

    m = np.asarray(mask, dtype=bool)
    if radius_mm <= 0 or not m.any():
        return m.copy()
    dist = distance_transform_edt(~m, sampling=voxel_size)
    return dist <= radius_mm + 1e-6


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of the non-zero voxels of ``mask``, enlarged by ``margin`` voxels.

    The box is clipped to the grid. Raises :class:`~qsmkit.errors.InputDataError` for an empty mask.
    """
    m = np.asarray(mask) != 0
    if not m.any():
        raise InputDataError("the mask is empty (all zero); no bounding box")
    out = []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        nz = np.flatnonzero(np.any(m, axis=other))
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        out.append(slice(max(lo - int(margin), 0), min(hi + int(margin), m.shape[axis])))
    return tuple(out)


def block_mean(x: np.ndarray, factor: int | Sequence[int]) -> np.ndarray:
    """Mean over non-overlapping blocks of ``factor`` voxels per axis (one int: the same on every axis).

    Partial blocks at the end of an axis are dropped. float32 (complex64 for complex input), by
    strided slice sums per axis (no float64 or reshaped copy of the whole array). Block ``i`` is
    centred on input voxel ``k i + (k - 1) / 2``.
    """
    ks = [int(factor)] * 3 if np.isscalar(factor) else [int(k) for k in factor]
    dt = np.complex64 if np.iscomplexobj(x) else np.float32
    y = np.asarray(x)
    if all(k == 1 for k in ks):
        return np.array(y, dtype=dt)
    for ax, k in enumerate(ks):
        if k == 1:
            continue
        stop = (y.shape[ax] // k) * k
        sl = [slice(None)] * y.ndim
        sl[ax] = slice(0, stop, k)
        acc = np.array(y[tuple(sl)], dtype=dt)
        for o in range(1, k):
            sl[ax] = slice(o, stop, k)
            acc += y[tuple(sl)]
        y = acc
    y *= np.float32(1.0 / float(np.prod(ks)))
    return y


@dataclass(frozen=True)
class PaddedBox:
    """A mask's bounding box, zero-padded on every side to FFT-friendly sizes (see :func:`padded_box`)."""

    box: tuple          # slices of the box in the full grid
    inner: tuple        # slices of the box in the padded grid
    shape: tuple        # the padded grid
    full_shape: tuple   # the full grid

    def embed(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``arr`` (full grid) cropped to the box and zero-padded to :attr:`shape`."""
        out = np.zeros(self.shape, dtype=dtype)
        out[self.inner] = np.asarray(arr)[self.box]
        return out

    def uncrop(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``arr`` (padded grid) back on the full grid, zero outside the box."""
        out = np.zeros(self.full_shape, dtype=dtype)
        out[self.box] = arr[self.inner]
        return out


def padded_box(mask: np.ndarray, pad: Sequence[int]) -> PaddedBox:
    """The bounding box of ``mask`` padded by ``pad[a]`` voxels per side, each size an FFT-fast length.

    Used by methods whose kernels must not wrap around the (periodic) FFT grid, e.g. SMV filters
    of radius ``r``: ``pad = ceil(r / voxel_size) + 1``.
    """
    import scipy.fft as sfft

    box = bounding_box(mask)
    ext = [b.stop - b.start for b in box]
    shape = tuple(sfft.next_fast_len(ext[a] + 2 * int(pad[a]), real=True) for a in range(len(box)))
    inner = tuple(slice(int(pad[a]), int(pad[a]) + ext[a]) for a in range(len(box)))
    return PaddedBox(box, inner, shape, tuple(np.shape(mask)))
