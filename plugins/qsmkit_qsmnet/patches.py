"""Patch-wise inference with smooth blending (QSMnet works on 64^3 patches; Yoon et al. 2018).

The volume is tiled with cubes of ``size`` voxels whose starts are ``0, s, 2s, ...`` with the stride
``s = round(size * (1 - overlap))`` and a last tile flush with the far edge, so that every voxel
is covered, for any volume size (a volume smaller than a tile is zero-padded). Each prediction is
weighted by a window that is positive everywhere (cosine: ``eps + (1 - eps) sin^2(pi (i + 1/2) / size)``
per axis, or Gaussian with ``sigma = size / 4``) and the weighted sum is divided by the summed
weights in float64: an identity network gives the input back exactly. Tiles are run ``batch`` at
a time, so the network's memory is fixed whatever the volume size; the float64 accumulators are
the only volume-sized buffers. Tiles holding no mask voxel are skipped (their voxels lie outside
the mask and come out 0).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = ["tile_starts", "window", "tiles", "infer_patches", "BLENDS"]

#: blending windows :func:`window` knows
BLENDS = ("cosine", "gaussian")


def tile_starts(n: int, size: int, overlap: float) -> list[int]:
    """Start indices of the tiles along an axis of length ``n`` (``n >= size``)."""
    if n <= size:
        return [0]
    stride = max(1, int(round(size * (1.0 - float(overlap)))))
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


def window(size: int, blend: str = "cosine") -> np.ndarray:
    """Separable 3D blending window (float64, positive everywhere, maximum 1)."""
    i = np.arange(size, dtype=np.float64) + 0.5
    if blend == "cosine":
        w1 = 1e-3 + (1 - 1e-3) * np.sin(np.pi * i / size) ** 2
    elif blend == "gaussian":
        w1 = np.exp(-0.5 * ((i - size / 2.0) / (size / 4.0)) ** 2)
    else:
        raise ValueError(f"unknown blend {blend!r}; use one of {', '.join(BLENDS)}")
    return w1[:, None, None] * w1[None, :, None] * w1[None, None, :]


def tiles(shape: Sequence[int], size: int, overlap: float) -> Iterator[tuple[slice, slice, slice]]:
    """All tiles (slices) of a grid of ``shape`` (each axis at least ``size``)."""
    s0, s1, s2 = (tile_starts(int(n), size, overlap) for n in shape)
    for a in s0:
        for b in s1:
            for c in s2:
                yield slice(a, a + size), slice(b, b + size), slice(c, c + size)


def infer_patches(net: Callable, x: np.ndarray, size: int = 64, overlap: float = 0.5, blend: str = "cosine",
                  batch: int = 4, mask: np.ndarray | None = None, device=None,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Apply a fully convolutional network to a volume tile by tile and blend the tiles.

    Parameters
    ----------
    net : callable
        ``net(t)`` with ``t`` a torch tensor ``(B, C, size, size, size)`` -> ``(B, 1, size, size, size)``.
    x : ndarray (C, X, Y, Z) or (X, Y, Z)
        Input channels (float32).
    size : int
        Tile edge in voxels (64 for QSMnet).
    overlap : float
        Fraction of a tile shared with its neighbour, in [0, 1).
    blend : {"cosine", "gaussian"}
        Blending window (:func:`window`).
    batch : int
        Tiles per network call.
    mask : ndarray (X, Y, Z), optional
        Tiles without any mask voxel are skipped.
    device : torch device, optional
        Where the network runs (tiles are moved there batch by batch).
    progress : callable, optional
        ``progress(done, total)`` after every batch.

    Returns
    -------
    ndarray float32 (X, Y, Z)
    """
    import torch

    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    shape = x.shape[1:]
    padded = tuple(max(int(n), size) for n in shape)
    if padded != tuple(shape):
        xp = np.zeros((x.shape[0],) + padded, np.float32)
        xp[:, :shape[0], :shape[1], :shape[2]] = x
        x = xp
        if mask is not None:
            mp = np.zeros(padded, bool)
            mp[:shape[0], :shape[1], :shape[2]] = np.asarray(mask) > 0
            mask = mp
    m = None if mask is None else np.asarray(mask) > 0
    todo = [t for t in tiles(padded, size, overlap) if m is None or m[t].any()]
    w = window(size, blend)
    acc = np.zeros(padded, np.float64)
    wsum = np.zeros(padded, np.float64)
    for i in range(0, len(todo), max(1, int(batch))):
        group = todo[i:i + max(1, int(batch))]
        t = torch.from_numpy(np.stack([x[(slice(None),) + sl] for sl in group]))
        if device is not None:
            t = t.to(device)
        y = net(t)
        y = y.detach().to("cpu", torch.float64).numpy()[:, 0]
        for sl, yi in zip(group, y):
            acc[sl] += w * yi
            wsum[sl] += w
        if progress is not None:
            progress(min(i + len(group), len(todo)), len(todo))
    out = np.zeros(padded, np.float64)
    np.divide(acc, wsum, out=out, where=wsum > 0)
    return np.ascontiguousarray(out[:shape[0], :shape[1], :shape[2]], dtype=np.float32)
