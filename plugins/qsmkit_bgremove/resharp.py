"""RESHARP: Tikhonov-regularised SHARP (Sun & Wilman, MRM 71:1151, 2014).

Instead of a truncated deconvolution, the local field ``x`` is the minimiser of

    || M (delta - S) (f - x) ||^2 + lam ||x||^2

over the padded bounding-box grid, with ``M`` the mask eroded by the ball radius, ``S`` the
spherical mean value and ``f`` the total field: ``x`` explains the high-passed field where it is
valid, and the Tikhonov term picks the smallest such field (it replaces the TSVD). The normal
equations ``(C M C + lam I) x = C M C f`` (``C = delta - S``, self-adjoint) are solved with the
core conjugate gradients; the result is kept on the eroded mask.

Defaults: ``lam = 1e-4`` and CG ``tol = 1e-4`` (Sun's reference ``resharp.m`` gives 1e-3 or 5e-4
as example weights and runs CGS to 1e-6). The low frequencies of the local field are where the
high-pass ``C`` is weak (``C(k) ~ (k r)^2 / 10``), so a larger ``lam``, or CG stopped at 1e-3,
removes them with the background. Measured from the true total field (``bench_background.py
--methods resharp``; the harmonic limit of the eroded mask in brackets):

=====================  =========================  ============================  =================
head                   local field, eroded/whole  chi after MEDI, whole/eroded  seconds (2 cores)
=====================  =========================  ============================  =================
1 mm, lam/tol 1e-3     44.5 / 59.9 % (41.0)       57.3 / 38.3 %                 4.9 (36 CG it.)
1 mm, defaults         36.1 / 55.2 %              57.0 / 37.4 %                 11.8 (108 it.)
1.5 mm, lam/tol 1e-3   39.8 / 56.6 % (42.3)       58.4 / 38.3 %                 1.5 (41 it.)
1.5 mm, defaults       35.7 / 54.3 %              59.0 / 39.0 %                 2.8-3.7 (118 it.)
=====================  =========================  ============================  =================

(``lam`` 1e-4 with ``tol`` 1e-5 or 1e-6 gains 0.3-0.4 point more at 2-3 times the iterations;
a Fourier preconditioner ``1 / (fill C^2 + lam)`` converges in a few iterations on an ellipsoid
but not on the head's mask, so CG runs unpreconditioned.) On a brain-sized ellipsoid the
default keeps a 6 mm sphere's field to 8.3 %, against 20 % with ``lam`` and ``tol`` 1e-3
(``tests/plugins/test_bgremove.py``).

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
            lam: float = 1e-4, tol: float = 1e-4, max_iter: int = 200, return_info: bool = False):
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
        Tikhonov weight on ``||x||^2`` relative to the high-pass residual (1e-4; Sun's reference
        code's examples are 1e-3 and 5e-4; see the module notes).
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
