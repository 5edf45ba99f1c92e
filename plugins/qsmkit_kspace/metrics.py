"""fastMRI evaluation metrics, computed exactly as ``fastmri/evaluate.py``.

- ``nmse = ||gt - pred||^2 / ||gt||^2`` over the volume;
- ``psnr``: scikit-image's ``peak_signal_noise_ratio`` with ``data_range = gt.max()``
  (the volume maximum): ``10 log10(max^2 / mean((gt - pred)^2))``;
- ``ssim``: mean over slices of scikit-image's ``structural_similarity`` with its defaults
  (7 x 7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, 3-pixel border left out)
  and ``data_range = gt.max()`` of the volume.

The arithmetic (dtypes, order of operations, ``scipy.ndimage.uniform_filter``) mirrors
scikit-image so that the numbers agree to float rounding without depending on it.
Volumes are ``(slices, H, W)`` magnitude images, already centre-cropped in image space.
"""

from __future__ import annotations

import numpy as np

from qsmkit.errors import GeometryError

__all__ = ["nmse", "psnr", "ssim", "evaluate_volume"]


def _float_type(*arrays: np.ndarray):
    dt = np.result_type(*[a.dtype for a in arrays])
    if dt.kind == "f" and dt.itemsize <= 2:
        return np.float32
    if dt == np.float32:
        return np.float32
    if dt.kind == "c":
        raise GeometryError("metrics take magnitude (real) images; take np.abs() first")
    return np.float64


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ``||gt - pred||^2 / ||gt||^2`` (fastMRI ``evaluate.nmse``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    return float(np.array(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2))


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB with ``data_range = gt.max()`` (fastMRI ``evaluate.psnr``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if maxval is None:
        maxval = gt.max()
    ft = _float_type(gt, pred)
    g, p = np.asarray(gt, dtype=ft), np.asarray(pred, dtype=ft)
    err = np.mean((g - p) ** 2, dtype=np.float64)
    data_range = float(maxval)
    return float(10 * np.log10((data_range ** 2) / err))


def _ssim2d(im1: np.ndarray, im2: np.ndarray, data_range: float, win_size: int = 7,
            k1: float = 0.01, k2: float = 0.03) -> float:
    from scipy.ndimage import uniform_filter

    ft = _float_type(im1, im2)
    im1 = im1.astype(ft, copy=False)
    im2 = im2.astype(ft, copy=False)
    ndim = im1.ndim
    n_p = win_size ** ndim
    cov_norm = n_p / (n_p - 1)
    ux = uniform_filter(im1, size=win_size)
    uy = uniform_filter(im2, size=win_size)
    uxx = uniform_filter(im1 * im1, size=win_size)
    uyy = uniform_filter(im2 * im2, size=win_size)
    uxy = uniform_filter(im1 * im2, size=win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    r = data_range
    c1 = (k1 * r) ** 2
    c2 = (k2 * r) ** 2
    a1, a2, b1, b2 = (2 * ux * uy + c1, 2 * vxy + c2, ux ** 2 + uy ** 2 + c1, vx + vy + c2)
    d = b1 * b2
    s = (a1 * a2) / d
    pad = (win_size - 1) // 2
    return float(s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean(dtype=np.float64))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean per-slice SSIM of ``(slices, H, W)`` volumes (fastMRI ``evaluate.ssim``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim != 3:
        raise GeometryError(f"ssim needs (slices, H, W) volumes, got {gt.ndim} axes")
    if gt.shape != pred.shape:
        raise GeometryError(f"ssim: ground truth {gt.shape} and reconstruction {pred.shape} differ in shape")
    if min(gt.shape[1:]) < 7:
        raise GeometryError(f"ssim needs slices of at least 7x7 pixels, got {gt.shape[1:]}")
    maxval = gt.max() if maxval is None else maxval
    total = np.array([0])
    for i in range(gt.shape[0]):
        total = total + _ssim2d(gt[i], pred[i], data_range=maxval)
    return float((total / gt.shape[0])[0])


def evaluate_volume(gt: np.ndarray, pred: np.ndarray, square_crop: bool = True) -> dict[str, float]:
    """fastMRI metrics of a reconstruction against its reference.

    Both are ``(slices, H, W)`` magnitudes. With ``square_crop`` (fastMRI data), both are
    centre-cropped to ``(W_gt, W_gt)`` (the target's last size) first, as ``fastmri/evaluate.py``
    does; otherwise they must have the same shape.
    """
    from .transforms import center_crop

    g, p = np.asarray(gt), np.asarray(pred)
    if g.ndim == 2:
        g, p = g[None], p[None]
    if square_crop:
        size = (min(g.shape[-1], g.shape[-2]), g.shape[-1])
        g, p = center_crop(g, size), center_crop(p, size)
    if g.shape != p.shape:
        raise GeometryError(f"reconstruction {np.shape(pred)} and target {np.shape(gt)} differ in shape after cropping")
    return {"nmse": nmse(g, p), "psnr": psnr(g, p), "ssim": ssim(g, p)}
