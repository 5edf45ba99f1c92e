"""PDF: projection onto dipole fields (Liu et al., NMR Biomed 24:1129, 2011).

The background field is the field of susceptibility sources OUTSIDE the mask. PDF finds the
source distribution ``x`` outside the mask whose dipole field best matches the total field
inside it, in the noise-weighted least-squares sense,

    x = argmin || W (f - D Mo x) ||^2 ,

with ``D`` the unit dipole convolution, ``Mo`` the indicator of the voxels outside the mask (the
unknowns) and ``W`` the data weights (inverse noise standard deviation), zero outside the mask.
The normal equations ``Mo D W^2 D Mo x = Mo D W^2 f`` are solved by the core conjugate gradients;
the local field is ``f - D Mo x`` on the whole mask (no erosion).

Grid (as the MEDI toolbox's ``PDF.m``): the mask's bounding box, zero-padded by ``pad`` voxels
per side (the toolbox's ``n_pad = 40`` in total), then to FFT-friendly sizes; the dipole
convolution is periodic on that box. The sources are the box's voxels outside the mask. A source
and all its periodic images lie outside the mask, so the fitted field is always the field of
outside sources (harmonic in the mask). The toolbox stops after ``n_CG = 30`` iterations; its
tolerance (0.1 of the noise level) is replaced here by the core rule ``||r|| / ||b|| <= tol``.

PDF does not remove the whole harmonic part of the local field: only the part that outside dipole
sources can explain, which is why it can come closer to the true local field than SHARP/LBV-type
methods (see :func:`qsmkit_bgremove.harmonic_limit`). Its known error is near the mask boundary,
where local sources and nearby outside sources have similar fields.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.operators import CGInfo, Diagonal, Dipole, cg, padded_box

from ._grid import check_inputs

#: the MEDI toolbox's defaults (PDF.m): n_CG = 30 iterations, n_pad = 40 voxels in total
PDF_MAX_ITER = 30
PDF_PAD_VOXELS = 20


def pdf(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
        b0_dir: Sequence[float] = (0.0, 0.0, 1.0), noise_weight: np.ndarray | None = None, *,
        pad: int = PDF_PAD_VOXELS, tol: float = 1e-3, max_iter: int = PDF_MAX_ITER,
        device: Any = None, return_info: bool = False):
    """Local field by PDF (weighted least-squares fit of outside dipole sources, CG).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (the method is linear: any unit works); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    noise_weight : ndarray, (x, y, z), optional
        Data weights, the inverse noise standard deviation of the field (any scale: normalised to
        mean 1 in the mask); ``None`` gives uniform weights.
    pad : int
        Zero padding of the mask's bounding box per side, in voxels (the toolbox pads 40 in total).
    tol : float
        CG stopping tolerance ``||r|| / ||b||``.
    max_iter : int
        Maximum CG iterations (Liu et al. / the toolbox: 30).
    device : torch device or str, optional
        Run in torch on this device (e.g. ``"cuda"``); ``None`` runs numpy/scipy.fft on the CPU.
    return_info : bool
        Also return the :class:`qsmkit.operators.CGInfo`.

    Returns
    -------
    local : ndarray, float32, (x, y, z)
        Local field (unit of ``field``) on the whole mask, 0 outside it.
    mask : ndarray of bool, (x, y, z)
        The input mask (PDF keeps every voxel).
    """
    f_in, m, vs = check_inputs(field, mask, voxel_size)
    b = np.asarray(b0_dir, dtype=np.float64).ravel()
    if b.size != 3 or not np.linalg.norm(b) > 0:
        raise InputDataError(f"b0_dir must be 3 numbers, not all zero; got {b0_dir}")
    if int(pad) < 0:
        raise InputDataError(f"pad must be >= 0 voxels, got {pad}")
    w_in = None
    if noise_weight is not None:
        w_in = np.asarray(noise_weight, dtype=np.float32)
        if w_in.shape != m.shape:
            raise InputDataError(f"noise_weight {w_in.shape} and mask {m.shape} must be the same 3D grid")
    if not m.any():
        out = (np.zeros(m.shape, np.float32), m.copy())
        return (*out, CGInfo()) if return_info else out

    # 1. the padded bounding box, the data on it and the weights W^2 (mean 1 in the mask)
    pb = padded_box(m, [int(pad)] * 3)
    mw = pb.embed(m, bool)
    fw = pb.embed(f_in)
    fw *= mw
    w2 = _weights_squared(pb.embed(w_in) if w_in is not None else None, mw)
    outside = (~mw).astype(np.float32)

    # 2. the normal equations  Mo D W^2 D Mo x = Mo D W^2 f
    dip = Dipole(pb.shape, vs, b / np.linalg.norm(b), padding=1.0)  # periodic on the padded box
    arrays = [fw, w2, outside]
    if device is not None:
        import torch

        arrays = [torch.from_numpy(a).to(device) for a in arrays]
    fw_, w2_, outside_ = arrays
    Mo, W2 = Diagonal(outside_), Diagonal(w2_)
    A = Mo @ dip @ W2 @ dip @ Mo
    rhs = Mo.apply(dip.apply(W2.apply(fw_)))

    # 3. CG, then the local field = total - field of the fitted outside sources, on the mask
    x, info = cg(A, rhs, tol=float(tol), max_iter=int(max_iter))
    bg = dip.apply(Mo.apply(x))
    loc = fw_ - bg
    if device is not None:
        loc = loc.detach().cpu().numpy()
    loc = np.asarray(loc, dtype=np.float32) * mw
    out = (pb.uncrop(loc), m.copy())
    return (*out, info) if return_info else out


def _weights_squared(w: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """``W^2`` on the padded grid: the weights normalised to mean 1 in the mask, 0 outside."""
    if w is None:
        return mask.astype(np.float32)
    w = np.where(mask & np.isfinite(w), np.abs(w), 0).astype(np.float32)
    mean = float(w[mask].mean())
    if not mean > 0:
        raise InputDataError("noise_weight is zero everywhere in the mask; give positive weights or none")
    w /= np.float32(mean)
    return w * w
