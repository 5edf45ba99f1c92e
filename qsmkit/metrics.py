"""Image-quality metrics: the one metrics module of qsmkit (QSM maps and k-space reconstructions).

**Argument order: ``(truth, estimate)``** -- the reference first, then the image being judged,
as fastMRI's ``(gt, pred)`` -- in every function here and in its thin fastMRI wrappers
(:mod:`qsmkit_kspace.metrics`). Ranges (PSNR, SSIM) default to the truth's.

All functions take numpy arrays or :class:`qsmkit.volume.Volume` objects of equal shape, and an
optional boolean ``mask`` restricting the evaluation. Computations are in float64, except with
``precision="input"`` (:func:`nmse`, :func:`psnr`, :func:`ssim`), which keeps the inputs' float
type as scikit-image and fastMRI's ``evaluate.py`` do (float32 images stay float32), so that
the k-space numbers agree with fastMRI's to the last bit.

* :func:`rmse`, :func:`nrmse` (percent, ``100 * ||e - t|| / ||t||``), :func:`psnr`,
  :func:`pearson`: over the mask voxels.
* :func:`hfen` (percent): NRMSE of Laplacian-of-Gaussian filtered images (sigma 1.5 voxels,
  15^3-voxel kernel as in the 2016 QSM reconstruction challenge), images zeroed outside the mask
  before filtering, the norm taken over the mask.
* :func:`ssim`: Wang et al. 2004 SSIM, identical to :func:`skimage.metrics.structural_similarity`
  with the same settings when ``mask`` is None (mean over the interior, the borders of
  half-window width cropped); with a mask, the mean of the same SSIM map over the mask voxels.
* :func:`ssim_torch`: the same SSIM (uniform window, no mask) for torch image batches,
  differentiable (a training loss, as fastMRI's ``SSIMLoss``); equals :func:`ssim` per image.
* :func:`xsim`: the QSM reconstruction challenge 2.0 "XSIM" (Milovic et al.; Marques et al.,
  MRM 2021): SSIM on the maps in native ppm (no rescaling, no clipping) with ``L = 1 ppm``,
  ``K1 = 0.01``, ``K2 = 0.001``, a Gaussian window (sigma 1.5 voxels, 7^3 voxels: MATLAB
  ``imgaussfilt3(x, 1.5, 'FilterSize', 7)`` with replicate padding), population (biased)
  variances, averaged over the mask.
* :func:`evaluate`: all of the above after demeaning truth and estimate over the mask (and
  zeroing them outside it), plus ROI means when a label map is given.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .errors import GeometryError, InputDataError

__all__ = ["rmse", "nrmse", "hfen", "ssim", "ssim_torch", "xsim", "psnr", "pearson", "nmse", "roi_means", "evaluate"]


# --------------------------------------------------------------------------- helpers
def _arr(x: Any) -> np.ndarray:
    return np.asarray(getattr(x, "data", x))


def _pair(truth: Any, estimate: Any, mask: Any = None):
    """``(truth, estimate, mask)`` as float64 arrays (mask bool or None), shapes checked."""
    t = _arr(truth).astype(np.float64)
    e = _arr(estimate).astype(np.float64)
    if e.shape != t.shape:
        raise GeometryError(f"metrics: estimate shape {e.shape} differs from truth shape {t.shape}; resample one onto the other's grid")
    m = None
    if mask is not None:
        m = _arr(mask).astype(bool)
        if m.shape != t.shape:
            raise GeometryError(f"metrics: mask shape {m.shape} differs from image shape {t.shape}")
        if not m.any():
            raise InputDataError("metrics: the mask is empty; give a mask with at least one voxel")
    return t, e, m


def _input_float_type(*arrays: np.ndarray):
    """scikit-image's float type for ``precision="input"``: float16/float32 -> float32, else float64."""
    dt = np.result_type(*[a.dtype for a in arrays])
    if dt.kind == "f" and dt.itemsize <= 2:
        return np.float32
    if dt == np.float32:
        return np.float32
    if dt.kind == "c":
        raise GeometryError("metrics take magnitude (real) images; take np.abs() first")
    return np.float64


def _input_pair(name: str, truth: Any, estimate: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, estimate)`` in scikit-image's float type for ``precision="input"``, shapes checked."""
    t, e = _arr(truth), _arr(estimate)
    if t.shape != e.shape:
        raise GeometryError(f"{name}: truth shape {t.shape} differs from estimate shape {e.shape}")
    ft = _input_float_type(t, e)
    return t.astype(ft, copy=False), e.astype(ft, copy=False)


def _check_precision(precision: str) -> None:
    if precision not in ("float64", "input"):
        raise InputDataError(f"metrics: precision must be 'float64' or 'input', got {precision!r}")


def _sel(x: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    return x.ravel() if m is None else x[m]


def _data_range(t: np.ndarray, m: np.ndarray | None) -> float:
    v = _sel(t, m)
    return float(v.max() - v.min())


# --------------------------------------------------------------------------- pointwise metrics
def rmse(truth, estimate, mask=None) -> float:
    """Root-mean-square error (units of the images) over ``mask`` (all voxels if None)."""
    t, e, m = _pair(truth, estimate, mask)
    d = _sel(e, m) - _sel(t, m)
    return float(np.sqrt(np.mean(d * d)))


def nrmse(truth, estimate, mask=None) -> float:
    """Normalised RMSE in percent: ``100 * ||estimate - truth|| / ||truth||`` over ``mask``."""
    t, e, m = _pair(truth, estimate, mask)
    tv = _sel(t, m)
    den = float(np.linalg.norm(tv))
    num = float(np.linalg.norm(_sel(e, m) - tv))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return 100.0 * num / den


def nmse(truth, estimate, mask=None, precision: str = "float64") -> float:
    """Normalised MSE (fastMRI convention): ``||truth - estimate||^2 / ||truth||^2`` over ``mask``.

    ``precision="input"``: computed in the inputs' own dtype, exactly as fastMRI's
    ``evaluate.nmse(gt, pred)`` (no mask then).
    """
    _check_precision(precision)
    if precision == "input":
        if mask is not None:
            raise InputDataError("nmse: precision='input' (the fastMRI arithmetic) takes no mask")
        gt, pred = _arr(truth), _arr(estimate)
        if gt.shape != pred.shape:
            raise GeometryError(f"nmse: truth shape {gt.shape} differs from estimate shape {pred.shape}")
        return float(np.array(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2))
    return (nrmse(truth, estimate, mask) / 100.0) ** 2


def psnr(truth, estimate, mask=None, data_range: float | None = None, precision: str = "float64") -> float:
    """Peak SNR in dB: ``10 log10(data_range^2 / MSE)``; ``data_range`` defaults to the truth's
    max - min over the mask (as :func:`skimage.metrics.peak_signal_noise_ratio` over the volume).

    ``precision="input"``: the difference is taken in the inputs' float type (as scikit-image;
    fastMRI's ``evaluate.psnr`` is ``psnr(gt, pred, data_range=gt.max(), precision="input")``).
    """
    _check_precision(precision)
    if precision == "input":
        t, e = _input_pair("psnr", truth, estimate)
        if mask is not None:
            sel = _arr(mask).astype(bool)
            t, e = t[sel], e[sel]
        dr = float(t.max() - t.min()) if data_range is None else float(data_range)
        err = np.mean((t - e) ** 2, dtype=np.float64)
        return float(10 * np.log10((dr ** 2) / err))
    t, e, m = _pair(truth, estimate, mask)
    dr = _data_range(t, m) if data_range is None else float(data_range)
    d = _sel(e, m) - _sel(t, m)
    mse = float(np.mean(d * d))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(dr * dr / mse)


def pearson(truth, estimate, mask=None) -> float:
    """Pearson correlation coefficient over ``mask`` (nan when either image is constant there)."""
    t, e, m = _pair(truth, estimate, mask)
    a = _sel(e, m)
    b = _sel(t, m)
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else math.nan


def hfen(truth, estimate, mask=None, sigma: float = 1.5, kernel_size: int = 15) -> float:
    """High-frequency error norm in percent.

    ``100 * ||LoG(estimate) - LoG(truth)|| / ||LoG(truth)||`` with a Laplacian-of-Gaussian of
    ``sigma`` voxels truncated to ``kernel_size`` voxels per axis (15 = the 2016 QSM challenge's
    ``fspecial3('log', 15, 1.5)`` support), symmetric (mirror) boundaries. With a mask, both images
    are zeroed outside it before filtering and the norms are taken over the mask.
    """
    from scipy.ndimage import gaussian_laplace

    t, e, m = _pair(truth, estimate, mask)
    if m is not None:
        e = np.where(m, e, 0.0)
        t = np.where(m, t, 0.0)
    radius = (int(kernel_size) - 1) // 2
    trunc = (radius + 0.25) / float(sigma)     # scipy radius = int(truncate * sigma + 0.5) = radius
    le = gaussian_laplace(e, sigma, mode="reflect", truncate=trunc)
    lt = gaussian_laplace(t, sigma, mode="reflect", truncate=trunc)
    num = float(np.linalg.norm(_sel(le - lt, m)))
    den = float(np.linalg.norm(_sel(lt, m)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return 100.0 * num / den


# --------------------------------------------------------------------------- structural similarity
def _ssim_map(x: np.ndarray, y: np.ndarray, filt, c1: float, c2: float, cov_norm: float) -> np.ndarray:
    ux = filt(x)
    uy = filt(y)
    uxx = filt(x * x)
    uyy = filt(y * y)
    uxy = filt(x * y)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    a1 = 2.0 * ux * uy + c1
    a2 = 2.0 * vxy + c2
    b1 = ux * ux + uy * uy + c1
    b2 = vx + vy + c2
    return (a1 * a2) / (b1 * b2)


def ssim(truth, estimate, mask=None, data_range: float | None = None, win_size: int | None = None,
         gaussian_weights: bool = False, sigma: float = 1.5, K1: float = 0.01, K2: float = 0.03,
         use_sample_covariance: bool = True, full: bool = False, precision: str = "float64"):
    """Structural similarity (Wang et al. 2004), scikit-image compatible: the one SSIM of qsmkit.

    With the same arguments, equals :func:`skimage.metrics.structural_similarity(truth, estimate,
    data_range=..., win_size=..., gaussian_weights=..., sigma=..., K1=..., K2=...,
    use_sample_covariance=...)` when ``mask`` is None (the SSIM map is averaged after cropping
    ``(win_size - 1) // 2`` voxels at each border; SSIM is symmetric in its two images). With a
    mask, the same SSIM map is averaged over the mask voxels instead. Any number of dimensions
    (fastMRI's per-slice SSIM calls it on each 2D slice).

    Parameters
    ----------
    data_range : float, optional
        Dynamic range ``L``; default ``max - min`` of ``truth`` (over the mask if given).
    win_size : int, optional
        Window side (odd); default 7, or ``2*int(3.5*sigma + 0.5) + 1`` with Gaussian weights.
    full : bool
        Also return the SSIM map.
    precision : {"float64", "input"}
        ``input`` keeps float32 images in float32 and ``data_range`` as given, as scikit-image
        does (fastMRI's evaluation); default float64.
    """
    from scipy.ndimage import gaussian_filter, uniform_filter

    _check_precision(precision)
    if precision == "input":
        t, e = _input_pair("ssim", truth, estimate)
        m = None if mask is None else _pair(truth, estimate, mask)[2]
    else:
        t, e, m = _pair(truth, estimate, mask)
    truncate = 3.5
    if win_size is None:
        win_size = 2 * int(truncate * sigma + 0.5) + 1 if gaussian_weights else 7
    win_size = int(win_size)
    if win_size % 2 != 1 or win_size < 3:
        raise InputDataError(f"ssim: win_size must be an odd integer >= 3, got {win_size}")
    if any(s < win_size for s in t.shape):
        raise InputDataError(f"ssim: image shape {t.shape} is smaller than the {win_size}-voxel window; use a smaller win_size")
    if data_range is None:
        dr = _data_range(t, m)
    else:
        dr = data_range if precision == "input" else float(data_range)
    if gaussian_weights:
        def filt(a):
            return gaussian_filter(a, sigma=sigma, truncate=truncate, mode="reflect")
    else:
        def filt(a):
            return uniform_filter(a, size=win_size, mode="reflect")
    npix = win_size ** t.ndim
    cov_norm = npix / (npix - 1.0) if use_sample_covariance else 1.0
    smap = _ssim_map(t, e, filt, (K1 * dr) ** 2, (K2 * dr) ** 2, cov_norm)
    if m is None:
        pad = (win_size - 1) // 2
        val = float(smap[tuple(slice(pad, s - pad) for s in smap.shape)].mean(dtype=np.float64))
    else:
        val = float(smap[m].mean())
    return (val, smap) if full else val


def ssim_torch(truth, estimate, data_range, win_size: int = 7, K1: float = 0.01, K2: float = 0.03,
               use_sample_covariance: bool = True):
    """Per-image SSIM of torch batches, differentiable: :func:`ssim` (uniform window, no mask) in torch.

    The SSIM map of the valid (fully inside) windows is averaged per image, which is exactly
    :func:`ssim`'s mean over the interior after cropping ``(win_size - 1) // 2`` pixels at each
    border (there the reflect padding of the numpy version never enters a window).

    Parameters
    ----------
    truth, estimate : torch.Tensor, (N, C, H, W)
        Real image batches (2D images; C channels are averaged too).
    data_range : float or torch.Tensor
        Dynamic range ``L``; a tensor of shape ``(N,)`` gives one per image (fastMRI uses each
        volume's maximum).
    win_size : int
        Odd window side (7 as scikit-image / fastMRI).

    Returns
    -------
    torch.Tensor, (N,)
        SSIM of each image (``1 - ssim`` is fastMRI's ``SSIMLoss``).
    """
    import torch
    from torch.nn import functional as F

    if truth.shape != estimate.shape or truth.ndim != 4:
        raise GeometryError(f"ssim_torch needs two (N, C, H, W) batches of one shape, got {tuple(truth.shape)} "
                            f"and {tuple(estimate.shape)}")
    if win_size % 2 != 1 or win_size < 3 or min(truth.shape[-2:]) < win_size:
        raise InputDataError(f"ssim_torch: win_size {win_size} must be odd, >= 3 and fit in {tuple(truth.shape[-2:])}")
    n, c = truth.shape[:2]
    x = truth.reshape(n * c, 1, *truth.shape[-2:])
    y = estimate.reshape(n * c, 1, *estimate.shape[-2:])
    L = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1)
    L = (L.repeat_interleave(c) if L.numel() == n else L.expand(n * c)).reshape(-1, 1, 1, 1)

    def filt(a):
        return F.avg_pool2d(a, win_size, stride=1)

    npix = win_size * win_size
    cov_norm = npix / (npix - 1.0) if use_sample_covariance else 1.0
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return smap.mean(dim=(1, 2, 3)).reshape(n, c).mean(dim=1)


def xsim(truth, estimate, mask=None, full: bool = False):
    """QSM challenge 2.0 XSIM (see the module docstring): SSIM in native ppm with ``L = 1``,
    ``K1 = 0.01``, ``K2 = 0.001``, Gaussian window sigma 1.5 / 7^3 voxels with replicate padding,
    biased variances, averaged over ``mask`` (default: voxels where ``truth != 0``).

    The reference MATLAB code (``compute_xsim.m``) does not clip or rescale the maps; callers
    usually zero both maps outside the mask first (:func:`evaluate` does).
    """
    from scipy.ndimage import gaussian_filter

    t, e, m = _pair(truth, estimate, mask)
    if m is None:
        m = t != 0
        if not m.any():
            m = np.ones(t.shape, bool)
    if any(s < 7 for s in t.shape):
        raise InputDataError(f"xsim: image shape {t.shape} is smaller than the 7-voxel Gaussian window")

    def filt(a):   # FilterSize 7 = 2*3 + 1 -> radius int(truncate*1.5 + 0.5) = 3
        return gaussian_filter(a, sigma=1.5, truncate=2.0, mode="nearest")

    smap = _ssim_map(t, e, filt, (0.01 * 1.0) ** 2, (0.001 * 1.0) ** 2, 1.0)
    val = float(smap[m].mean())
    return (val, smap) if full else val


# --------------------------------------------------------------------------- ROIs and summary
def roi_means(chi, labels, names: Mapping[int, str] | None = None, mask=None) -> dict[str, float]:
    """Mean of ``chi`` in each labelled region: ``{name: mean}``.

    ``names`` maps label values to names (default :data:`qsmkit.simulate.LABELS`); label 0 and
    labels absent from the map (or from ``mask`` when given) are skipped. Unnamed labels are
    reported as ``"label_<n>"``.
    """
    c = _arr(chi).astype(np.float64)
    lab = _arr(labels)
    if lab.shape != c.shape:
        raise GeometryError(f"roi_means: label map shape {lab.shape} differs from image shape {c.shape}")
    lab = np.rint(lab).astype(np.int64) if lab.dtype.kind == "f" else lab.astype(np.int64)
    if names is None:
        from .simulate import LABELS as names  # noqa: N811
    sel = np.ones(c.shape, bool) if mask is None else _arr(mask).astype(bool)
    lv = lab[sel]
    cv = c[sel]
    if lv.size == 0:
        return {}
    lv_pos = np.clip(lv, 0, None)
    counts = np.bincount(lv_pos)
    sums = np.bincount(lv_pos, weights=cv)
    out: dict[str, float] = {}
    for k in np.nonzero(counts)[0]:
        if k == 0:
            continue
        out[str(names.get(int(k), f"label_{int(k)}"))] = float(sums[k] / counts[k])
    return out


def evaluate(truth, estimate, mask, labels=None, label_names: Mapping[int, str] | None = None,
             demean: bool = True) -> dict:
    """All metrics of ``estimate`` against ``truth`` inside ``mask`` (argument order: truth first).

    Both maps are demeaned over the mask first (when ``demean``; susceptibility is only defined up
    to a reference) and set to zero outside it. SSIM uses scikit-image's defaults (7^3 uniform
    window, K1 0.01, K2 0.03, sample covariance, L = truth range in the mask) averaged over the
    mask; XSIM follows the QSM challenge 2.0. With ``labels``, ROI means of the (demeaned)
    estimate and truth within the mask are included.

    Returns
    -------
    dict
        ``rmse`` (units of the maps, e.g. ppm), ``nrmse`` (%), ``hfen`` (%), ``ssim``, ``xsim``,
        ``psnr`` (dB), ``pearson``, ``n_voxels``, ``demeaned_over_mask``, optional ``roi_means``
        ``{"estimate": {...}, "truth": {...}, "error": {...}}``.
    """
    t, e, m = _pair(truth, estimate, mask)
    if m is None:
        raise InputDataError("evaluate: a mask is required")
    if demean:
        e = e - e[m].mean()
        t = t - t[m].mean()
    e = np.where(m, e, 0.0)
    t = np.where(m, t, 0.0)
    out: dict[str, Any] = {
        "rmse": rmse(t, e, m),
        "nrmse": nrmse(t, e, m),
        "hfen": hfen(t, e, m),
        "ssim": ssim(t, e, m) if min(t.shape) >= 7 else math.nan,
        "xsim": xsim(t, e, m) if min(t.shape) >= 7 else math.nan,
        "psnr": psnr(t, e, m),
        "pearson": pearson(t, e, m),
        "n_voxels": int(m.sum()),
        "demeaned_over_mask": bool(demean),
        "units": {"rmse": "same as maps (ppm for chi)", "nrmse": "%", "hfen": "%", "psnr": "dB"},
    }
    if labels is not None:
        re = roi_means(e, labels, label_names, mask=m)
        rt = roi_means(t, labels, label_names, mask=m)
        out["roi_means"] = {"estimate": re, "truth": rt,
                            "error": {k: re[k] - rt[k] for k in rt if k in re}}
    return out
