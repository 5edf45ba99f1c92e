"""Grid helper: the bounding box of a mask (the one place for it)."""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError

# =========================================================================== grid helper
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
