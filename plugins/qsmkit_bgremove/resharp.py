"""RESHARP: Tikhonov-regularised SHARP (Sun & Wilman, MRM 71:1151, 2014).

Instead of a truncated deconvolution, the local field ``x`` is the minimiser of

    || M (delta - S) (f - x) ||^2 + lam ||x||^2

over the padded bounding-box grid, with ``M`` the mask eroded by the ball radius, ``S`` the
spherical mean value and ``f`` the total field: ``x`` explains the high-passed field where it is
valid, and the Tikhonov term picks the smallest such field (it replaces the TSVD). The normal
equations ``(C M C + lam I) x = C M C f`` (``C = delta - S``, self-adjoint) are solved with the
core conjugate gradients; the result is kept on the eroded mask.

Defaults: ``lam = 1e-3`` (the example value of Sun's reference ``resharp.m``) and CG ``tol = 1e-3``.
On the simulator's default phantom (true total field) they give a local-field NRMSE of 39.8 % on
the eroded mask (56.6 % over the whole mask) in 41 CG iterations, against 51.5 % (63.8 %) in 34
iterations with the former ``lam = 1e-2, tol = 1e-4``; the harmonic limit of that eroded mask is
42.3 % (``benchmarks/bench_background.py``). Smaller ``lam`` (1e-4) gains 3-4 points more for
three times the iterations.

Known limit (not a solver defect): with Tikhonov's minimum-norm choice, RESHARP removes the
least-squares projection of the local field onto the fields that are harmonic in the eroded mask,
not only the part fixed by the boundary values as LBV does. For a sphere's field ``r^-3 Y20`` at
the centre of a ball of radius ``R`` this removes the ``r^2 Y20`` component, a relative error
``sqrt(21/4) (a/R)^1.5`` (PDF's projection, see ``tests/plugins/test_bgremove.py``): 29 % for the
5 mm sphere in the 20 mm eroded test mask with ``lam`` 1e-2; smaller ``lam`` lets the unknown in
the eroded rim absorb part of it (18 % at 1e-3, 17 % at 1e-4).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.operators import Diagonal, Identity, cg

from ._grid import empty_result, prepare


def resharp(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], *, radius_mm: float = 4.0,
            lam: float = 1e-3, tol: float = 1e-3, max_iter: int = 200, return_info: bool = False):
    """Local field by RESHARP (Tikhonov-regularised SHARP, CG on the normal equations).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (the method is linear: any unit works); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    radius_mm : float
        Radius of the SMV ball in mm (default 4 mm).
    lam : float
        Tikhonov weight on ``||x||^2`` relative to the high-pass residual (1e-3, the value of Sun's
        reference code; see the module notes).
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
    pp = prepare(field, mask, voxel_size, radius_mm)
    if pp is None or not pp.eroded.any():
        out = empty_result(np.shape(mask))
        return (*out, None) if return_info else out
    hp = pp.smv.complement()
    data = Diagonal(pp.eroded) @ hp
    A = data.N + float(lam) * Identity(pp.field.shape)
    b = data.adjoint(data.apply(pp.field))
    x, info = cg(A, b, tol=float(tol), max_iter=int(max_iter))
    x = np.asarray(x, dtype=np.float32)
    x *= pp.eroded
    out = (pp.uncrop(x), pp.uncrop(pp.eroded, bool))
    return (*out, info) if return_info else out
