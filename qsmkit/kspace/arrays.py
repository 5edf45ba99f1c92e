"""Array helpers of the k-space methods (numpy or torch): RSS, image-space centre crop, masks, normalisation.

Part of the public :mod:`qsmkit.kspace` module (import from there). Crops are done in image space
only: a centre crop of k-space would lower the resolution (DESIGN.md §3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import fft as qfft

__all__ = ["rss", "center_crop", "mask_to_2d", "mask_tensor", "normalization_scale"]


def rss(x, dim: int = 1):
    """Root sum of squares over the coil axis (numpy or torch, complex or real)."""
    if isinstance(x, np.ndarray):
        return np.sqrt(np.sum(np.abs(x) ** 2, axis=dim))
    import torch

    return torch.sqrt(torch.sum(torch.abs(x) ** 2, dim=dim))


def center_crop(x, shape: Sequence[int] | None):
    """Centre crop of the last two axes to ``shape`` (as fastMRI's ``center_crop``; numpy or torch).

    ``None`` or a size larger than the data along an axis leaves that axis unchanged.
    """
    if shape is None:
        return x
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ch, cw = min(int(shape[0]), h), min(int(shape[1]), w)
    h0, w0 = (h - ch) // 2, (w - cw) // 2
    return x[..., h0:h0 + ch, w0:w0 + cw]


def mask_to_2d(mask: np.ndarray | None, image_shape: Sequence[int]) -> np.ndarray:
    """A sampling mask as float32 ``(H or 1, W or 1)`` or ``(S, H or 1, W or 1)``; ``None`` -> ones."""
    if mask is None:
        return np.ones((1, 1), dtype=np.float32)
    m = np.asarray(mask)
    if m.ndim == 1:
        m = m[None, :]
    return (m != 0).astype(np.float32)


def mask_tensor(mask: np.ndarray | None, n_slices: int, image_shape, device):
    """Sampling mask as a float32 tensor broadcastable to ``(S, C, H, W)``: ``(S|1, 1, H|1, W|1)``."""
    import torch

    if mask is None:
        return torch.ones((1, 1, 1, 1), device=device)
    m = np.asarray(mask) != 0
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim == 2:
        m = m[None]
    # collapse axes along which the mask is constant (cheaper broadcasting and FFTs)
    if m.shape[1] > 1 and (m == m[:, :1, :]).all():
        m = m[:, :1, :]
    if m.shape[2] > 1 and (m == m[:, :, :1]).all():
        m = m[:, :, :1]
    if m.shape[0] > 1 and (m == m[:1]).all():
        m = m[:1]
    return torch.from_numpy(m.astype(np.float32)[:, None]).to(device)


def normalization_scale(kspace: np.ndarray, mask: np.ndarray | None = None, maps: np.ndarray | None = None) -> float:
    """Maximum of the coil-combined zero-filled image of the whole volume (DESIGN.md §4).

    Dividing the multi-coil k-space by this number (never each coil on its own) puts the image
    maximum near 1, which makes regularisation weights independent of the scanner's scale.

    Parameters
    ----------
    kspace : ndarray, (S, C, H, W)
        Multi-coil k-space (undersampled samples already zero).
    mask : ndarray or None
        Sampling mask broadcastable to ``(S, 1, H, W)`` after :func:`mask_to_2d`; applied first.
    maps : ndarray or None, (S, M, C, H, W)
        Coil maps: combine with ``sum_c conj(S_c) x_c`` (RSS over maps) instead of RSS over coils.
    """
    k = np.asarray(kspace)
    m = None
    if mask is not None:
        m = mask_to_2d(mask, k.shape[-2:])
    scale = 0.0
    for s in range(k.shape[0]):  # slice by slice: bounded memory for whole volumes
        ks = k[s:s + 1]
        if m is not None:
            ks = ks * (m[s:s + 1, None] if m.ndim == 3 and m.shape[0] > 1 else (m[:, None] if m.ndim == 3 else m))
        ks = ks.astype(np.complex64, copy=False)
        img = qfft.ifftnc(ks, axes=(-2, -1)).astype(np.result_type(ks.dtype, np.complex64), copy=False)
        if maps is not None:
            comb = np.einsum("smchw,schw->smhw", np.conj(maps[s:s + 1]), img)
            mag = rss(comb, dim=1)
        else:
            mag = rss(img, dim=1)
        if mag.size:
            scale = max(scale, float(np.max(mag)))
    return scale if scale > 0 and np.isfinite(scale) else 1.0
