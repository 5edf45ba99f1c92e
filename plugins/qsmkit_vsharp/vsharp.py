"""V-SHARP background field removal (Li et al. 2011; Wu et al. 2012; after Schweser et al. 2011).

A background field is harmonic inside the brain, so it equals its own spherical mean: for a ball
``S_r`` of radius ``r`` that fits inside the mask, ``f - S_r * f`` contains only the local field
(convolved with ``delta - S_r``). V-SHARP uses, at each voxel, the largest radius (from a list,
largest first) whose ball fits inside the mask, so that deep voxels get the well-conditioned
large kernel and voxels near the edge still get a value from a small one. The combined high-passed
field is then deconvolved with the largest kernel, ``1 - S_R`` in k-space, truncated where
``|1 - S_R| < threshold`` (TSVD), and kept on the mask eroded by the smallest radius.

Edge check (``reject``, an addition to the published method): at the brain edge the measured
field is often not harmonic (voxels that mix tissue and bone, phase and fit errors), and every
small ball placed just inside the edge averages those voxels. Such voxels show a high-passed value
far outside the spread seen where the largest ball is used (with a harmonic background a smaller
ball never passes more than the largest one); they are dropped from the output mask instead of
feeding their error into the deconvolution, which spreads it over the whole brain.

Implementation: the grid is cropped to the mask's bounding box and zero-padded by the largest
radius (no circular wrap-around) to FFT-friendly sizes. For each radius, one real FFT of the ball
gives the SMV kernel, one inverse FFT of ``mask * S_r`` gives the eroded mask (the voxels where
the ball lies entirely inside the mask: mean of the mask over the ball = 1) and one inverse FFT of
``field * S_r`` the smoothed field (float32 throughout). The field and mask are transformed once.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.operators import SMV, padded_box


def default_radii(voxel_size: Sequence[float], r_max: float = 12.0, r_min: float | None = None) -> list[float]:
    """Default V-SHARP radii in mm: ``r_max`` down to ``r_min`` in steps of the coarsest voxel edge.

    The step is ``v = max(voxel_size)``, so that each smaller ball reaches one more voxel layer
    towards the mask edge along every axis. ``r_min`` defaults to ``2 v`` (and at least 1 mm):
    the 1-voxel ball (7 voxels) is a bare second difference whose high-pass at the brain edge is
    dominated by partial-volume and phase errors and whose deconvolution with the largest kernel
    returns little of the local field there (on the simulator's head it raises the local-field
    NRMSE by 2-4 points for 5-7 % more mask). 1 mm isotropic gives 12, 11, ..., 2 mm; 1.5 mm
    gives 12, 10.5, ..., 3 mm; pass ``r_min=v`` (or explicit radii) for the classic 1-voxel end.
    """
    step = float(max(voxel_size))
    lo = max(1.0, 2.0 * step) if r_min is None else float(r_min)
    radii = []
    r = float(r_max)
    while r >= lo - 1e-6:
        radii.append(round(r, 6))
        r -= step
    return radii or [round(lo, 6)]


def smv_kernel_half(shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float,
                    return_count: bool = False):
    """Real-FFT half spectrum of the normalised SMV ball (:func:`qsmkit.physics.smv_kernel`, ``rfft=True``).

    The kernel of the core :class:`qsmkit.operators.SMV` (ball of
    :func:`qsmkit.physics.sphere_mask`, symmetric, so its spectrum is real; only the real FFT's
    half is computed). With ``return_count`` also returns the number of voxels in the ball.
    """
    op = SMV(shape, voxel_size, radius_mm)
    return (op.kernel, op.n_ball) if return_count else op.kernel


def vsharp(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
           radii_mm: Sequence[float] | None = None, threshold: float = 0.05,
           reject: float = 6.0, return_info: bool = False):
    """Local field by V-SHARP.

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (or any unit: the method is linear); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel size in mm.
    radii_mm : sequence of float, optional
        SMV radii in mm (any order; used largest first). Default :func:`default_radii`.
    threshold : float
        TSVD truncation of the deconvolution: frequencies with ``|1 - S_R| < threshold`` are zeroed.
    reject : float
        Consistency check near the mask edge (0 disables): a voxel assigned to a smaller radius is
        dropped when its high-passed value exceeds ``reject`` robust standard deviations (1.4826
        MAD) of the high-passed field where the largest radius is used. With a harmonic
        background, ``f - S_r * f`` for a smaller ball is no larger than with the largest one, so
        such values mean that the ball holds unreliable field values (partial volume, unwrapping
        or fit errors at the brain edge); those voxels leave the output mask. At 6 SD a Gaussian
        spread drops essentially no valid voxel.
    return_info : bool
        Also return a dict: radii used, the radius whose eroded mask first is non-empty (used to
        deconvolve), the number of voxels assigned per radius and the number rejected.

    Returns
    -------
    local : ndarray, float32, (x, y, z)
        Local field (same unit as ``field``), 0 outside the eroded mask.
    eroded : ndarray of bool, (x, y, z)
        The mask eroded by the smallest radius (less any rejected voxels): where ``local`` is valid.
    """
    m = np.asarray(mask, dtype=bool)
    f_in = np.asarray(field, dtype=np.float32)
    if f_in.shape != m.shape or f_in.ndim != 3:
        raise InputDataError(f"field {f_in.shape} and mask {m.shape} must be the same 3D grid")
    vs = tuple(float(v) for v in voxel_size)
    radii = sorted({float(r) for r in (radii_mm or default_radii(vs))}, reverse=True)
    local_full = np.zeros(m.shape, dtype=np.float32)
    eroded_full = np.zeros(m.shape, dtype=bool)
    info = {"radii": radii, "deconvolution_radius": None, "voxels_per_radius": {}, "rejected": 0}
    if not m.any():
        return (local_full, eroded_full, info) if return_info else (local_full, eroded_full)

    # crop to the bounding box, pad by the largest radius (+1) on every side, FFT-friendly sizes
    pb = padded_box(m, [int(math.ceil(radii[0] / v)) + 1 for v in vs])
    shape = pb.shape
    mw = pb.embed(m, bool)
    f = pb.embed(f_in)
    f *= mw

    grid = SMV(shape, vs, radii[0])   # the core SMV operators' FFTs (no padding: the box is padded above)
    spec = grid.to_spectrum(f)
    mspec = grid.to_spectrum(mw.astype(np.float32))
    hp = np.zeros(shape, dtype=np.float32)
    filled = np.zeros(shape, dtype=bool)   # voxels whose ball (of some radius) fits in the mask
    valid = np.zeros(shape, dtype=bool)    # ... and whose high-passed value is kept
    s_big = None
    spread = None
    for r in radii:
        s_op = grid if r == radii[0] else SMV(shape, vs, r)
        s_r, n_ball = s_op.kernel, s_op.n_ball
        # the ball of radius r centred at a voxel lies inside the mask iff its mask mean is 1
        cover = s_op.from_spectrum(mspec * s_r)
        m_r = cover > np.float32(1.0 - 0.5 / n_ball)
        del cover
        m_r &= mw
        new = m_r & ~filled
        n_new = int(new.sum())
        info["voxels_per_radius"][r] = n_new
        if n_new == 0:
            continue
        filled |= new
        smooth = s_op.from_spectrum(spec * s_r)
        np.subtract(f, smooth, out=smooth)  # smooth now holds the high-passed field
        if s_big is None:
            s_big = s_r
            info["deconvolution_radius"] = r
            if reject > 0:
                vals = smooth[new]
                spread = float(1.4826 * np.median(np.abs(vals - np.median(vals))))
        elif spread is not None and spread > 0:
            bad = new & (np.abs(smooth) > np.float32(reject * spread))
            info["rejected"] += int(bad.sum())
            new &= ~bad
        np.copyto(hp, smooth, where=new)
        valid |= new
        del smooth
    del spec, mspec
    if s_big is None:  # mask too thin for the smallest ball
        return (local_full, eroded_full, info) if return_info else (local_full, eroded_full)
    filled = valid

    k = np.float32(1.0) - s_big
    inv = np.where(np.abs(k) >= np.float32(threshold), np.float32(1.0) / np.where(k == 0, 1, k), 0).astype(np.float32)
    del k, s_big
    loc = grid.filter(hp, inv)
    loc *= filled
    local_full[pb.box] = loc[pb.inner]
    eroded_full[pb.box] = filled[pb.inner]
    return (local_full, eroded_full, info) if return_info else (local_full, eroded_full)
