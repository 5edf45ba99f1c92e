"""QSMnet inversion of a local field: training frame, closed-form prior, normalisation, 64^3 patches.

:func:`invert_aligned` works on data already in the training frame (B0 along axis 3, training
voxel size); :func:`invert` resamples other data into that frame and back (:mod:`.frame`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from .frame import from_frame, to_frame, training_frame
from .patches import infer_patches
from .prior import closed_form_prior

__all__ = ["invert_aligned", "invert", "network_fn"]


def network_fn(net, channels_last: bool = False) -> Callable:
    """``t -> net(t)`` in eval mode without gradients (float32, optional channels-last layout)."""
    import torch

    def run(t):
        with torch.inference_mode():
            if channels_last and t.device.type == "cpu":
                t = t.contiguous(memory_format=torch.channels_last_3d)
            return net(t)

    return run


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def invert_aligned(fn: Callable, field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                   normalisation: Mapping, residual: bool, patch: int = 64, overlap: float = 0.5,
                   blend: str = "cosine", batch: int = 2, device=None, margin: int = 4,
                   progress: Callable | None = None) -> np.ndarray:
    """chi (ppm) from a local field (ppm) in the training frame.

    The field is zeroed outside the mask, cropped to the mask's bounding box (+ ``margin``
    voxels), divided by ``normalisation["field_scale"]`` (the prior, with ``residual``, by
    ``chi_scale``), run through ``fn`` tile by tile (:func:`~.patches.infer_patches`) and the
    output multiplied by ``normalisation["chi_scale"]``; zero outside the mask.
    """
    m = np.asarray(mask) > 0
    out = np.zeros(m.shape, np.float32)
    if not m.any():
        return out
    box = _bbox(m, margin)
    mb = m[box]
    f = np.where(mb, np.asarray(field, np.float32)[box], np.float32(0))
    fsc, csc = float(normalisation["field_scale"]), float(normalisation["chi_scale"])
    chans = [f / np.float32(fsc)]
    if residual:
        prior = closed_form_prior(f, mb, voxel_size, (0.0, 0.0, 1.0), float(normalisation.get("prior_threshold", 0.15)))
        chans.append(prior / np.float32(csc))
    y = infer_patches(fn, np.stack(chans), patch, overlap, blend, batch, mb, device, progress)
    out[box] = np.where(mb, y * np.float32(csc), np.float32(0))
    return out


def invert(fn: Callable, field: np.ndarray, mask: np.ndarray, affine: np.ndarray, b0_voxel: Sequence[float],
           normalisation: Mapping, residual: bool, train_voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
           log: Callable[[str], None] | None = None, interpolation: str = "linear", **kw) -> np.ndarray:
    """chi (ppm) from a local field on any grid: resampled into the B0-aligned training frame when the
    B0 direction or voxel size differ (reported through ``log``), inverted, and resampled back
    (``interpolation``: ``linear`` or ``bspline``); ``kw`` go to :func:`invert_aligned`."""
    from qsmkit.physics import voxel_sizes

    fr = training_frame(mask, affine, b0_voxel, train_voxel_size)
    if log is not None:
        log(f"qsmnet: {fr.describe(tuple(float(v) for v in voxel_sizes(affine)))}")
    ff, mf = to_frame(field, mask, affine, fr, interpolation)
    chi_f = invert_aligned(fn, ff, mf, fr.voxel_size, normalisation, residual, **kw)
    return from_frame(chi_f, mf, fr, affine, mask, interpolation)
