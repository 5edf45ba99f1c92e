"""LBV: Laplacian boundary value background removal (Zhou et al., NMR Biomed 27:312, 2014),
and the harmonic limit of every SHARP/LBV-type method.

The background field ``b`` is harmonic in the mask, ``L b = 0``. LBV takes the total field on the
mask's boundary layer ``B`` (the mask voxels with a face neighbour outside it) as the boundary
value of ``b`` and solves Laplace's equation inside, so that the local field ``l = f - b`` is the
solution of the Poisson problem

    L l = L f  in the interior I = mask \\ B,        l = 0  on B,

(7-point Laplacian, 1/mm^2). Nothing is eroded: ``l`` is returned on the whole mask (0 on its
boundary layer). ``peel`` drops that many outer layers of the mask first (the paper's "peel":
boundary voxels with unreliable field; the returned mask is the peeled one). The Poisson problem
is solved by multigrid-preconditioned conjugate gradients on the mask's bounding box
(:mod:`qsmkit_bgremove.laplace`; the paper uses full multigrid with tolerance 0.01).

Harmonic limit (:func:`harmonic_limit`): applied to the TRUE local field, the same solve removes
exactly the harmonic part of the local field in the mask (the harmonic function with the local
field's boundary values); what remains is what a perfect harmonic-removing method with this
boundary convention returns, the reference of issue 17 for SHARP/V-SHARP/RESHARP/iSMV/LBV. Methods
that keep harmonic information (PDF, total field inversion) can go below it. It is not a strict
bound for every harmonic-removing method: those that remove a different harmonic component (the
minimum-norm one of RESHARP, the truncated deconvolution of SHARP/V-SHARP) or set an eroded rim
to zero can score lower NRMSE against the truth. Measured on the simulator's default phantom
(``benchmarks/bench_background.py --default-phantom``): limit 67.1 % over the whole mask, LBV
69.7 %, PDF 44.9 % (uniform weights), SHARP 56.0 %, RESHARP 56.6 %, V-SHARP 61.6 %, iSMV 70.9 %.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.operators import CGInfo, padded_box

from ._grid import check_inputs
from .laplace import laplacian_residual, solve_dirichlet


def _boundary_layer(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one of their 6 face neighbours outside the mask."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def lbv(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], *, peel: int = 0,
        tol: float = 1e-3, max_iter: int = 200, return_info: bool = False):
    """Local field by LBV (Laplace's equation with the total field on the mask boundary).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Total field in ppm (the method is linear: any unit works); ignored outside ``mask``.
    mask : ndarray of bool, (x, y, z)
        Region where the field is valid (the brain).
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    peel : int
        Outer layers of the mask (6-connected erosions) dropped before the solve (Zhou et al.: 0;
        1-3 when the edge field is unreliable).
    tol : float
        Stopping tolerance of the multigrid-preconditioned CG, ``||r|| / ||b||``.
    max_iter : int
        Maximum CG iterations.
    return_info : bool
        Also return a dict: ``cg`` (:class:`qsmkit.operators.CGInfo`), ``levels`` (multigrid depth),
        ``peel``.

    Returns
    -------
    local : ndarray, float32, (x, y, z)
        Local field (unit of ``field``), 0 outside the returned mask and on its boundary layer.
    kept : ndarray of bool, (x, y, z)
        The mask after ``peel`` layers were dropped (the whole mask for ``peel = 0``).
    """
    f_in, m, vs = check_inputs(field, mask, voxel_size)
    if int(peel) < 0:
        raise InputDataError(f"peel must be >= 0 layers, got {peel}")
    if int(peel) > 0 and m.any():
        from scipy import ndimage

        m = ndimage.binary_erosion(m, iterations=int(peel), border_value=0)
    info = {"cg": CGInfo(), "levels": 0, "peel": int(peel)}
    if not m.any():
        out = (np.zeros(m.shape, np.float32), m)
        return (*out, info) if return_info else out

    pb = padded_box(m, [1, 1, 1])
    mw = pb.embed(m, bool)
    fw = pb.embed(f_in)
    fw *= mw
    interior = mw & ~_boundary_layer(mw)
    if not interior.any():  # a mask one voxel thick: everything is boundary
        out = (np.zeros(m.shape, np.float32), m)
        return (*out, info) if return_info else out
    rhs = laplacian_residual(fw, interior, vs)        # -L f on the interior
    loc, cg_info, levels = solve_dirichlet(rhs, interior, vs, tol=tol, max_iter=max_iter)
    info.update(cg=cg_info, levels=levels)
    out = (pb.uncrop(loc), m)
    return (*out, info) if return_info else out


def harmonic_limit(local_field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], *,
                   tol: float = 1e-5, max_iter: int = 500) -> np.ndarray:
    """The true local field minus its harmonic part in ``mask``: the harmonic-removal limit.

    The harmonic part is the harmonic function with the local field's values on the mask's
    boundary layer, found by solving Laplace's equation (:func:`lbv` applied to ``local_field``,
    solved to a tight tolerance). Report a method's local field against it
    (``qsmkit.metrics.nrmse(harmonic_limit(...), estimate, mask)``) as well as against the truth;
    ``nrmse(local_field, harmonic_limit(...), mask)`` is what a perfect LBV returns and the
    reference floor of methods that remove every harmonic field in the mask (see the module
    notes for why SHARP-type methods can still score below it).

    Parameters
    ----------
    local_field : ndarray, (x, y, z)
        The true local field (ppm), e.g. ``phantom.truth["local_field"]``.
    mask : ndarray of bool, (x, y, z)
        The mask the methods are given.
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    tol, max_iter : float, int
        CG tolerance and iteration limit of the Laplace solve.

    Returns
    -------
    ndarray, float32, (x, y, z)
        ``local_field`` minus its harmonic part, on the mask (0 outside and on its boundary layer).
    """
    return lbv(local_field, mask, voxel_size, peel=0, tol=tol, max_iter=max_iter)[0]
