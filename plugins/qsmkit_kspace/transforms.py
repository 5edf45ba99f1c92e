"""k-space transforms: centred orthonormal FFTs, RSS, image-space centre crop, normalisation.

``rss``, ``center_crop``, ``mask_to_2d`` and ``normalization_scale`` live in the public core module
:mod:`qsmkit.kspace` (for third-party k-space methods) and are re-exported here.

All FFTs are the centred orthonormal ones of :mod:`qsmkit.fft` (``ifftshift -> fft -> fftshift``,
``norm="ortho"``), as fastMRI's ``fft2c`` / ``ifft2c``. Crops are done in image space only: a
centre crop of k-space would lower the resolution (DESIGN.md §3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.kspace import center_crop, mask_to_2d, normalization_scale, rss  # re-exported

__all__ = [
    "fft2c", "ifft2c", "fft2c_np", "ifft2c_np", "rss", "center_crop", "zero_filled_rss", "zero_filled_coils",
    "normalization_scale", "as_tensor", "mask_to_2d",
]


def fft2c(x, dim: Sequence[int] = (-2, -1)):
    """Centred orthonormal FFT of a complex torch tensor (image -> k-space)."""
    return qfft.fftnc_torch(x, dim=tuple(dim))


def ifft2c(x, dim: Sequence[int] = (-2, -1)):
    """Centred orthonormal inverse FFT of a complex torch tensor (k-space -> image)."""
    return qfft.ifftnc_torch(x, dim=tuple(dim))


def fft2c_np(x: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal FFT of a numpy array (image -> k-space), complex64 in, complex64 out."""
    return qfft.fftnc(x, axes=tuple(axes)).astype(np.result_type(x.dtype, np.complex64), copy=False)


def ifft2c_np(x: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal inverse FFT of a numpy array (k-space -> image)."""
    return qfft.ifftnc(x, axes=tuple(axes)).astype(np.result_type(x.dtype, np.complex64), copy=False)


def as_tensor(x: np.ndarray, device, dtype=None):
    """numpy -> torch on ``device`` (complex64 for complex input, float32 for real)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is not None:
        t = t.to(dtype)
    elif t.is_complex():
        t = t.to(torch.complex64)
    elif t.is_floating_point() or t.dtype == torch.bool:
        t = t.to(torch.float32)
    return t.to(device)


def _crop_slice(n: int, size: int | None) -> slice:
    if size is None or size >= n:
        return slice(0, n)
    o = (n - size) // 2
    return slice(o, o + size)


def zero_filled_coils(kspace, crop: Sequence[int] | None = None, mask=None):
    """Coil images ``ifft2c(kspace)`` centre-cropped to ``crop``, computed without wasted work.

    Exactly ``center_crop(ifft2c(kspace), crop)``, but the readout (H) transform only runs on the
    sampled columns (unsampled ones stay zero) and the W transform only on the rows kept by the crop.

    Parameters
    ----------
    kspace : torch.Tensor, complex, (S, C, H, W)
    crop : (h, w) or None
    mask : torch.Tensor or None
        Sampling mask broadcastable to ``(S, 1, H, W)``; columns sampled in no row/slice are skipped
        (default: the columns holding any non-zero sample).
    """
    import torch

    S, C, H, W = kspace.shape
    rs = _crop_slice(H, None if crop is None else int(crop[0]))
    cs = _crop_slice(W, None if crop is None else int(crop[1]))
    if mask is not None:
        used = mask != 0  # any layout whose last axis is W (or 1): (1, W), (S, 1, W), (H, W), (S, 1, H, W)
        if used.shape[-1] != W:
            used = torch.broadcast_to(used, used.shape[:-1] + (W,))
        cols = torch.nonzero(used.reshape(-1, W).any(0)).squeeze(-1)
    else:
        cols = torch.nonzero((kspace != 0).reshape(-1, W).any(0)).squeeze(-1)
    if cols.numel() == W:
        img = ifft2c(kspace, dim=(-2,))[..., rs, :]
    else:
        part = ifft2c(kspace[..., cols], dim=(-2,))[..., rs, :]
        img = torch.zeros((S, C, part.shape[-2], W), dtype=part.dtype, device=part.device)
        img[..., cols] = part
    return ifft2c(img, dim=(-1,))[..., cs]


def zero_filled_rss(kspace: np.ndarray) -> np.ndarray:
    """RSS of the inverse FFT of multi-coil k-space ``(S, C, H, W)`` -> ``(S, H, W)`` float32."""
    return rss(ifft2c_np(np.asarray(kspace, dtype=np.complex64)), dim=1).astype(np.float32)
