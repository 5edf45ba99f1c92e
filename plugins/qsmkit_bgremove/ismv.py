"""iSMV: iterative spherical mean value background removal (Wen et al., MRM 72:1065, 2014).

The background field ``b`` is harmonic in the brain, so in the mask ``M_e`` eroded by the ball
radius it satisfies the mean value property ``b = S b``. On the boundary shell ``B = M \\ M_e``
the background is taken to be the total field there (the boundary correction). The iteration of
Wen et al., ``b <- M_e S b + B f``, converges to the fixed point

    (I - M_e S M_e) b_e = M_e S (B f),

a discrete Dirichlet problem for ``b`` in ``M_e``. This symmetric positive definite system is
solved here with the core conjugate gradients (the same fixed point as the plain iteration,
reached in far fewer steps). The local field is ``f - b`` on ``M_e``; with a small ball (two
voxels by default) the mask loses only a thin rim and there is no deconvolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.operators import Diagonal, Identity, cg

from ._grid import empty_result, prepare


def ismv(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], *, radius_mm: float | None = None,
         tol: float = 1e-4, max_iter: int = 500, return_info: bool = False):
    """Local field by iSMV (harmonic background with the total field as boundary value).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (the method is linear: any unit works); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    radius_mm : float, optional
        SMV ball radius in mm; default twice the largest voxel edge (2 mm at 1 mm).
    tol : float
        CG stopping tolerance ``||r|| / ||b||``.
    max_iter : int
        Maximum CG iterations.
    return_info : bool
        Also return the :class:`qsmkit.operators.CGInfo`.

    Returns
    -------
    local : ndarray, float32, (x, y, z)
        Local field (unit of ``field``), 0 outside ``eroded``.
    eroded : ndarray of bool, (x, y, z)
        The mask eroded by ``radius_mm``.
    """
    r = 2.0 * float(max(voxel_size)) if radius_mm is None else float(radius_mm)
    pp = prepare(field, mask, voxel_size, r)
    if pp is None or not pp.eroded.any():
        out = empty_result(np.shape(mask))
        return (*out, None) if return_info else out
    e = Diagonal(pp.eroded)
    s = pp.smv
    A = Identity(pp.field.shape) - e @ s @ e
    shell = pp.field * (pp.mask & ~pp.eroded)
    rhs = e.apply(s.apply(shell))
    bg, info = cg(A, rhs, tol=float(tol), max_iter=int(max_iter))
    loc = pp.field - np.asarray(bg, dtype=np.float32)
    loc *= pp.eroded
    out = (pp.uncrop(loc), pp.uncrop(pp.eroded, bool))
    return (*out, info) if return_info else out
