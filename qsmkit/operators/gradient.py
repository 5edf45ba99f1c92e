"""Finite differences: :class:`Gradient` (forward / backward; adjoint = minus the divergence), and the
magnitude edge weight of the gradient-regularised methods (:func:`gradient_mask`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import GeometryError, InputDataError
from .base import Linop, _copy, is_torch

# =========================================================================== finite differences
class Gradient(Linop):
    """Finite differences along the three axes: ``(3, x, y, z)`` out of ``(x, y, z)``.

    ``forward``: ``g_k[i] = (x[i+1] - x[i]) / h_k``, 0 in the last slice (Neumann boundary);
    ``backward``: ``g_k[i] = (x[i] - x[i-1]) / h_k``, 0 in the first slice. The adjoint is minus
    the divergence (``-div``, the matching backward / forward differences). Units 1/mm with
    ``voxel_size``; unscaled differences without. numpy or torch (``out`` buffers for speed).

    Parameters
    ----------
    shape : 3 ints
        Grid.
    voxel_size : 3 floats, optional
        Voxel edge lengths ``h_k`` in mm (``None``: unscaled differences).
    mode : {"forward", "backward"}
    """

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float] | None = None, mode: str = "forward"):
        shape = tuple(int(s) for s in shape)
        super().__init__(shape, (3,) + shape, np.float32)
        if mode not in ("forward", "backward"):
            raise InputDataError(f"Gradient: mode must be forward or backward, got {mode!r}")
        self.mode = mode
        self.voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)

    @staticmethod
    def _lib(x):
        if is_torch(x):
            import torch

            return torch.sub, torch.neg, torch.empty
        return np.subtract, np.negative, np.empty

    def _scale(self, g):
        if self.voxel_size is not None:
            for k, h in enumerate(self.voxel_size):
                if h != 1.0:
                    g[k] *= 1.0 / h
        return g

    def apply(self, x, out=None):
        """Differences of ``x`` into ``out`` (3, ...) (allocated when ``None``)."""
        sub, _, empty = self._lib(x)
        g = out
        if g is None:
            g = empty((3,) + tuple(x.shape), dtype=x.dtype, **({"device": x.device} if is_torch(x) else {}))
        if self.mode == "forward":
            sub(x[1:], x[:-1], out=g[0, :-1])
            sub(x[:, 1:], x[:, :-1], out=g[1, :, :-1])
            sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, :-1])
            g[0, -1] = 0
            g[1, :, -1] = 0
            g[2, :, :, -1] = 0
        else:
            sub(x[1:], x[:-1], out=g[0, 1:])
            sub(x[:, 1:], x[:, :-1], out=g[1, :, 1:])
            sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, 1:])
            g[0, 0] = 0
            g[1, :, 0] = 0
            g[2, :, :, 0] = 0
        return self._scale(g)

    def adjoint(self, y, out=None):
        """``G^H y = -div y`` into ``out`` (allocated when ``None``)."""
        _, neg, empty = self._lib(y)
        if self.voxel_size is not None:
            y = self._scale(_copy(y))
        o = out
        if o is None:
            o = empty(tuple(y.shape[1:]), dtype=y.dtype, **({"device": y.device} if is_torch(y) else {}))
        if self.mode == "forward":   # (G^H y)_j = y_{j-1} - y_j, using y's non-boundary slices only
            neg(y[0, :-1], out=o[:-1])
            o[-1] = 0
            o[1:] += y[0, :-1]
            o[:, :-1] -= y[1, :, :-1]
            o[:, 1:] += y[1, :, :-1]
            o[:, :, :-1] -= y[2, :, :, :-1]
            o[:, :, 1:] += y[2, :, :, :-1]
        else:                        # (G^H y)_j = y_j - y_{j+1}, using y's non-boundary slices only
            neg(y[0, 1:], out=o[:-1])
            o[-1] = 0
            o[1:] += y[0, 1:]
            o[:, :-1] -= y[1, :, 1:]
            o[:, 1:] += y[1, :, 1:]
            o[:, :, :-1] -= y[2, :, :, 1:]
            o[:, :, 1:] += y[2, :, :, 1:]
        return o

    @classmethod
    def example(cls):
        return cls((5, 4, 6), (1.0, 0.5, 2.0), "forward")

    @classmethod
    def examples(cls):
        return [cls.example(), cls((4, 6, 5), None, "backward"), cls((4, 6, 5), (0.7, 1.0, 1.3), "backward")]


def laplacian_kernel(fft_shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """``|E(k)|^2``: spectrum of ``grad^H grad`` for periodic forward differences, half spectrum.

    Units 1/mm^2; shape ``(n0, n1, n2 // 2 + 1)``, unshifted FFT order, float32.
    """
    n0, n1, n2 = (int(n) for n in fft_shape)
    h = [float(v) for v in voxel_size]
    f0 = (4.0 * np.sin(np.pi * np.fft.fftfreq(n0)) ** 2 / h[0] ** 2)[:, None, None]
    f1 = (4.0 * np.sin(np.pi * np.fft.fftfreq(n1)) ** 2 / h[1] ** 2)[None, :, None]
    f2 = (4.0 * np.sin(np.pi * np.fft.rfftfreq(n2)) ** 2 / h[2] ** 2)[None, None, :]
    return (f0 + f1 + f2).astype(np.float32)


# =========================================================================== edge weights
def combine_magnitude(magnitude: np.ndarray) -> np.ndarray:
    """One magnitude image (a.u., float32): the root sum of squares over echoes of a 4D (x, y, z, echo)
    input; non-finite values become 0."""
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.sum(mag * mag, axis=3, dtype=np.float32))
    if mag.ndim != 3:
        raise InputDataError(f"magnitude must be 3D or 4D, got shape {mag.shape}")
    return np.nan_to_num(mag, nan=0.0, posinf=0.0, neginf=0.0)


def gradient_mask(magnitude: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                  edge_percentage: float = 0.9) -> np.ndarray:
    """Binary edge weight ``M_G`` (MEDI, TFI): True where a gradient component is regularised, False on
    magnitude edges.

    Convention of the Cornell MEDI toolbox's ``gradient_mask`` (its ``percentage`` argument; Liu et
    al., MRM 2012): the gradient of ``magnitude * mask`` is taken per axis (:class:`Gradient`,
    forward differences, 1/mm); the ``edge_percentage * n_mask`` largest gradient *components*
    over the grid (``n_mask`` = number of mask voxels) are edges. With the default 0.9 and three
    components per voxel, about 30 % of the gradient components of mask voxels are edges. Outside
    the mask the gradient is zero, so ``M_G`` is True there, apart from the mask boundary, which is
    an edge (for TFI's head support: the head/air jump). ``edge_percentage = 0`` gives True
    everywhere (plain total variation).

    Parameters
    ----------
    magnitude : ndarray, (x, y, z) or (x, y, z, echo)
        Magnitude (a.u.); echoes are combined by root sum of squares (:func:`combine_magnitude`).
    mask : ndarray, (x, y, z)
        Brain mask (MEDI) or head support (TFI).
    voxel_size : 3 floats
        Voxel size in mm.
    edge_percentage : float
        Number of edge components as a fraction of the number of mask voxels (0 ... 3).

    Returns
    -------
    ndarray, bool, (3, x, y, z)
    """
    m = np.asarray(mask) > 0
    if edge_percentage <= 0:
        return np.ones((3,) + m.shape, dtype=bool)
    mag = combine_magnitude(magnitude)
    if mag.shape != m.shape:
        raise GeometryError(f"magnitude grid {mag.shape} differs from mask grid {m.shape}; give both on one voxel grid")
    g = Gradient(m.shape, voxel_size).apply(np.where(m, mag, np.float32(0)))
    np.abs(g, out=g)
    n_edges = min(max(int(round(float(edge_percentage) * int(m.sum()))), 0), g.size)
    if n_edges == 0:
        return np.ones(g.shape, dtype=bool)
    flat = g.ravel()
    # threshold = the n_edges-th largest component; components strictly above it are edges
    thr = np.partition(flat, flat.size - n_edges)[flat.size - n_edges]
    edges = g > thr
    # ties at the threshold: count them as edges only if that keeps the count closest to n_edges
    n_above = int(edges.sum())
    if n_above < n_edges:
        ties = g == thr
        if thr > 0 and abs(n_above + int(ties.sum()) - n_edges) < abs(n_above - n_edges):
            edges |= ties
    return ~edges
