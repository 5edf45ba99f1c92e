"""Finite differences: :class:`Gradient` (forward / backward; adjoint = minus the divergence)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputDataError
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
