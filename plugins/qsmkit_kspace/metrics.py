"""fastMRI evaluation metrics, computed exactly as ``fastmri/evaluate.py``: thin wrappers on
:mod:`qsmkit.metrics` (the one metrics module; same argument order, truth first: ``(gt, pred)``).

- ``nmse = ||gt - pred||^2 / ||gt||^2`` over the volume;
- ``psnr``: scikit-image's ``peak_signal_noise_ratio`` with ``data_range = gt.max()``
  (the volume maximum): ``10 log10(max^2 / mean((gt - pred)^2))``;
- ``ssim``: mean over slices of scikit-image's ``structural_similarity`` with its defaults
  (7 x 7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, 3-pixel border left out)
  and ``data_range = gt.max()`` of the volume.

The core functions run with ``precision="input"`` (float32 images stay float32, as in
scikit-image), so the numbers agree with fastMRI's to float rounding without depending on it.
Volumes are ``(slices, H, W)`` magnitude images, already centre-cropped in image space.
"""

from __future__ import annotations

import numpy as np

from qsmkit import metrics as _core
from qsmkit.errors import GeometryError

__all__ = ["nmse", "psnr", "ssim", "evaluate_volume"]


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ``||gt - pred||^2 / ||gt||^2`` (fastMRI ``evaluate.nmse``)."""
    return _core.nmse(np.asarray(gt), np.asarray(pred), precision="input")


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB with ``data_range = gt.max()`` (fastMRI ``evaluate.psnr``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    return _core.psnr(gt, pred, data_range=gt.max() if maxval is None else maxval, precision="input")


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
        total = total + _core.ssim(gt[i], pred[i], data_range=maxval, win_size=7, precision="input")
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
