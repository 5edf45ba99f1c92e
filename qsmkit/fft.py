"""FFT helpers: multithreaded scipy FFTs, centred orthonormal FFTs (numpy and torch), padding.

Centred transforms follow fastMRI's ``fftc``: ``ifftshift -> fft -> fftshift`` with
``norm="ortho"`` over the given axes. Padding helpers put the data in the centre of the larger
grid, so that ``crop_center(pad_center(x, s), x.shape) == x``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.fft as sfft


def fftn(x: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """Forward n-D FFT (unnormalised, unshifted) over ``axes`` with all CPU threads."""
    return sfft.fftn(x, axes=axes, workers=-1)


def ifftn(x: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """Inverse n-D FFT (1/N normalised, unshifted) over ``axes`` with all CPU threads."""
    return sfft.ifftn(x, axes=axes, workers=-1)


def rfftn(x: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """Real-to-complex n-D FFT (half spectrum along the last axis) with all CPU threads."""
    return sfft.rfftn(x, axes=axes, workers=-1)


def irfftn(x: np.ndarray, shape: Sequence[int], axes: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of :func:`rfftn` back to a real array of ``shape`` with all CPU threads."""
    return sfft.irfftn(x, s=shape, axes=axes, workers=-1)


def fftnc(x: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal FFT over ``axes`` (image -> k-space), as fastMRI's ``fft2c``."""
    x = sfft.ifftshift(x, axes=axes)
    x = sfft.fftn(x, axes=axes, norm="ortho", workers=-1)
    return sfft.fftshift(x, axes=axes)


def ifftnc(x: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal inverse FFT over ``axes`` (k-space -> image), as fastMRI's ``ifft2c``."""
    x = sfft.ifftshift(x, axes=axes)
    x = sfft.ifftn(x, axes=axes, norm="ortho", workers=-1)
    return sfft.fftshift(x, axes=axes)


def fftnc_torch(x, dim: Sequence[int] = (-2, -1)):
    """Centred orthonormal FFT of a complex torch tensor over ``dim``."""
    import torch

    x = torch.fft.ifftshift(x, dim=dim)
    x = torch.fft.fftn(x, dim=dim, norm="ortho")
    return torch.fft.fftshift(x, dim=dim)


def ifftnc_torch(x, dim: Sequence[int] = (-2, -1)):
    """Centred orthonormal inverse FFT of a complex torch tensor over ``dim``."""
    import torch

    x = torch.fft.ifftshift(x, dim=dim)
    x = torch.fft.ifftn(x, dim=dim, norm="ortho")
    return torch.fft.fftshift(x, dim=dim)


def padded_shape(shape: Sequence[int], factor: float = 1.5, even: bool = True) -> tuple[int, ...]:
    """Shape enlarged by at least ``factor`` per axis, rounded up to an FFT-friendly size.

    Sizes are rounded up to the next 5-smooth number (and to an even number when ``even``),
    which keeps FFTs fast. ``factor <= 1`` returns ``shape`` unchanged.
    """
    if factor <= 1.0:
        return tuple(int(s) for s in shape)
    out = []
    for s in shape:
        n = sfft.next_fast_len(int(math.ceil(s * factor)), real=False)
        while even and n % 2:
            n = sfft.next_fast_len(n + 1, real=False)
        out.append(n)
    return tuple(out)


def _center_slices(small: Sequence[int], big: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice((b - s) // 2, (b - s) // 2 + s) for s, b in zip(small, big))


def pad_center(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad the leading ``len(shape)`` axes of ``x`` to ``shape``, data in the centre."""
    shape = tuple(shape)
    if tuple(x.shape[: len(shape)]) == shape:
        return x
    out = np.zeros(shape + tuple(x.shape[len(shape):]), dtype=x.dtype)
    out[_center_slices(x.shape[: len(shape)], shape)] = x
    return out


def crop_center(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre crop of the leading ``len(shape)`` axes of ``x`` (inverse of :func:`pad_center`)."""
    shape = tuple(shape)
    if tuple(x.shape[: len(shape)]) == shape:
        return x
    return x[_center_slices(shape, x.shape[: len(shape)])]
