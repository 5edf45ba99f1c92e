"""COSMOS: susceptibility from local fields measured at several head orientations (Liu et al. 2009).

Every orientation ``i`` gives a local field ``F_i = D_i * chi`` (in k-space) on the *same*
(reference) grid, with its own dipole kernel ``D_i`` built from B0 expressed in the reference
voxel frame. The dipole kernels of different orientations vanish on different cones, so the
joint least-squares problem is well posed:

* closed form (:func:`cosmos`): ``chi(k) = sum_i D_i(k) F_i(k) / (sum_i D_i(k)^2 + eps)``;
* weighted iterative form (:func:`cosmos_cg`): minimise
  ``sum_i || W_i (A_i chi - f_i) ||^2 + eps || chi ||^2`` over ``chi`` supported in the mask,
  with ``A_i = crop . ifft . D_i . fft . pad`` and ``W_i`` each orientation's noise weight
  (zero outside its mask), by conjugate gradients on the normal equations (torch, CPU or GPU).

Dipole kernels come from :func:`qsmkit.physics.dipole_kernel` (one definition of the physics).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.fft as sfft

from qsmkit import fft as qfft
from qsmkit.physics import dipole_kernel

__all__ = ["cosmos", "cosmos_cg", "condition_map"]


def _half_kernel(shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float]) -> np.ndarray:
    """Dipole kernel on the rfft half grid (last axis ``n // 2 + 1``), float32."""
    d = dipole_kernel(shape, voxel_size, b0_dir)
    return np.ascontiguousarray(d[..., : shape[-1] // 2 + 1])


def _check(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]]) -> tuple[int, ...]:
    if len(fields) != len(b0_dirs):
        raise ValueError(f"cosmos: {len(fields)} fields but {len(b0_dirs)} B0 directions")
    if len(fields) < 1:
        raise ValueError("cosmos: needs at least one field")
    shape = tuple(np.shape(fields[0]))
    if len(shape) != 3 or any(tuple(np.shape(f)) != shape for f in fields):
        raise ValueError("cosmos: all fields must be 3D arrays on the same grid")
    return shape


def cosmos(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]], voxel_size: Sequence[float],
           mask: np.ndarray, regularization: float = 1e-3, padding: float = 1.5) -> np.ndarray:
    """Closed-form COSMOS: ``chi = ifft( sum_i D_i F_i / (sum_i D_i^2 + eps) )`` inside ``mask``.

    Parameters
    ----------
    fields : sequence of ndarray (x, y, z)
        Local fields in ppm of B0, all on the reference grid (registered).
    b0_dirs : sequence of 3-vectors
        B0 direction of each orientation in the reference voxel frame.
    voxel_size : 3 floats
        Reference voxel size in mm.
    mask : ndarray (x, y, z)
        Region where every field is valid (e.g. the intersection of the registered masks); the
        fields are zeroed outside it and so is ``chi``.
    regularization : float
        ``eps`` added to ``sum_i D_i^2`` (dimensionless; ``D`` is in [-2/3, 1/3]); keeps the
        division stable where every kernel is small.
    padding : float
        Minimum zero-padding factor per axis (1 disables padding).

    Returns
    -------
    ndarray float32 (x, y, z)
        Susceptibility in ppm, zero mean over the padded grid (``D(0) = 0``); reference it afterwards.
    """
    shape = _check(fields, b0_dirs)
    m = np.asarray(mask) > 0
    pshape = qfft.padded_shape(shape, padding)
    num = None
    den = None
    for f, b in zip(fields, b0_dirs):
        d = _half_kernel(pshape, voxel_size, b)
        x = qfft.pad_center(np.where(m, np.asarray(f, dtype=np.float32), np.float32(0)), pshape)
        spec = sfft.rfftn(x, workers=-1)
        del x
        spec *= d
        if num is None:
            num, den = spec, d * d
        else:
            num += spec
            den += d * d
        del d, spec
    den += np.float32(regularization)
    den[den == 0] = 1.0  # only where every D_i = 0 (k = 0), where the numerator is 0 too
    num /= den
    del den
    chi = sfft.irfftn(num, s=pshape, workers=-1)
    chi = np.ascontiguousarray(qfft.crop_center(chi, shape)).astype(np.float32, copy=False)
    chi[~m] = 0
    return chi


def condition_map(b0_dirs: Sequence[Sequence[float]], shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """``sum_i D_i(k)^2`` on the rfft half grid (float32): where it is small, COSMOS is ill-conditioned."""
    out = None
    for b in b0_dirs:
        d = _half_kernel(tuple(shape), voxel_size, b)
        out = d * d if out is None else out + d * d
    return out


def cosmos_cg(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]], voxel_size: Sequence[float],
              mask: np.ndarray, weights: Sequence[np.ndarray] | None = None, regularization: float = 1e-3,
              padding: float = 1.5, max_iter: int = 50, tol: float = 1e-3, device: str = "cpu",
              x0: np.ndarray | None = None, log=None, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """Weighted COSMOS by conjugate gradients (scipy on CPU, torch on GPU).

    Solves ``(sum_i A_i^T W_i^2 A_i + eps I) chi = sum_i A_i^T W_i^2 f_i`` for ``chi`` supported
    in ``mask``, where ``A_i chi = crop(ifft(D_i fft(pad(chi))))`` is orientation ``i``'s dipole
    convolution (ppm -> ppm) and ``W_i`` its weight.

    Parameters
    ----------
    fields : sequence of ndarray (x, y, z)
        Registered local fields in ppm.
    b0_dirs : sequence of 3-vectors
        B0 of each orientation in the reference voxel frame.
    voxel_size : 3 floats
        mm.
    mask : ndarray
        Support of ``chi`` and of the data terms (e.g. intersection of the registered masks).
    weights : sequence of ndarray or None
        Per-orientation data weights (e.g. noise weights in 1/ppm, zero outside each orientation's
        mask). They are scaled together so that their mean inside ``mask`` is 1 (relative weights
        between orientations are kept). ``None``: uniform weights.
    regularization : float
        Tikhonov weight ``eps`` (same scale as in :func:`cosmos`).
    padding : float
        Minimum zero-padding factor per axis.
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when ``||r|| / ||b||`` falls below ``tol``.
    device : str
        ``"cpu"`` (scipy FFTs, multithreaded) or a torch device string such as ``"cuda"``.
    x0 : ndarray, optional
        Starting point (ppm), e.g. the closed-form solution.
    log : callable, optional
        Called with progress lines.
    backend : {"auto", "numpy", "torch"}
        ``auto``: scipy FFTs on CPU, torch on any other device.

    Returns
    -------
    chi : ndarray float32 (x, y, z)
        Susceptibility in ppm (zero outside ``mask``).
    info : dict
        ``iterations``, ``relative_residual``, ``converged``.
    """
    shape = _check(fields, b0_dirs)
    m_np = np.asarray(mask) > 0
    pshape = qfft.padded_shape(shape, padding)
    sl = tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(shape, pshape))

    if weights is None:
        w_list = [m_np.astype(np.float32) for _ in fields]
    else:
        if len(weights) != len(fields):
            raise ValueError(f"cosmos_cg: {len(fields)} fields but {len(weights)} weights")
        w_list = [np.where(m_np, np.clip(np.asarray(w, dtype=np.float32), 0, None), np.float32(0)) for w in weights]
        scale = float(np.mean([w[m_np].mean() for w in w_list]))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError("cosmos_cg: the weights are zero inside the mask")
        w_list = [w / np.float32(scale) for w in w_list]

    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"cosmos_cg: unknown backend {backend!r}")
    if backend == "numpy" or (backend == "auto" and str(device).startswith("cpu")):
        # scipy's multithreaded FFTs are faster than torch's on CPU
        def to(a):
            return np.ascontiguousarray(a, dtype=np.float32)

        def rfft(a):
            return sfft.rfftn(a, workers=-1)

        def irfft(a):
            return sfft.irfftn(a, s=pshape, workers=-1).astype(np.float32, copy=False)

        def dot(a, b) -> float:
            return float(np.vdot(a.ravel(), b.ravel()))

        def to_numpy(a):
            return np.asarray(a, dtype=np.float32)

        buf = np.zeros(pshape, dtype=np.float32)
    else:
        import torch

        dev = torch.device(device)

        def to(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)

        def rfft(a):
            return torch.fft.rfftn(a)

        def irfft(a):
            return torch.fft.irfftn(a, s=pshape)

        def dot(a, b) -> float:
            return float(torch.sum(a * b))

        def to_numpy(a):
            return a.detach().cpu().numpy().astype(np.float32)

        buf = torch.zeros(pshape, dtype=torch.float32, device=dev)

    m = to(m_np)
    w2 = [to(w * w) for w in w_list]
    del w_list
    kernels = [to(_half_kernel(pshape, voxel_size, b)) for b in b0_dirs]

    def conv(x, d):
        buf[...] = 0
        buf[sl] = x
        return irfft(rfft(buf) * d)[sl]

    eps = float(regularization)

    def normal(x):
        acc = eps * x
        for d, ww in zip(kernels, w2):
            acc = acc + conv(ww * conv(x, d), d)
        return acc * m

    b = None
    for d, ww, f in zip(kernels, w2, fields):
        term = conv(ww * to(np.where(m_np, np.asarray(f, dtype=np.float32), np.float32(0))), d)
        b = term if b is None else b + term
    b = b * m
    if x0 is not None:
        x = to(np.asarray(x0, dtype=np.float32)) * m
        r = b - normal(x)
    else:
        x = b * 0
        r = b * 1
    pdir = r * 1
    bnorm = float(np.sqrt(dot(b, b))) or 1.0
    rs = dot(r, r)
    it = 0
    rel = float(np.sqrt(rs)) / bnorm
    while it < int(max_iter) and rel > tol:
        ap = normal(pdir)
        alpha = rs / dot(pdir, ap)
        x = x + alpha * pdir
        r = r - alpha * ap
        rs_new = dot(r, r)
        pdir = r + (rs_new / rs) * pdir
        rs = rs_new
        it += 1
        rel = float(np.sqrt(rs)) / bnorm
        if log is not None and it % 10 == 0:
            log(f"CG iteration {it}: relative residual {rel:.2e}")
    chi = to_numpy(x * m)
    return chi, {"iterations": it, "relative_residual": float(rel), "converged": bool(rel <= tol)}
