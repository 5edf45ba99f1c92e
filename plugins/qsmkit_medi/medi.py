"""Morphology enabled dipole inversion, MEDI-L1 with the nonlinear data term (Liu et al.).

References: J. Liu et al., NeuroImage 59 (2012) 2560 (MEDI, edge mask); T. Liu et al., MRM 69
(2013) 467 (nonlinear data term, MERIT); Z. Liu et al., MRM 79 (2018) 2795 (MEDI+0, CSF term);
the Cornell MEDI toolbox ``MEDI_L1.m``. The code is written from the method, in torch.

Problem (in ppm; ``chi`` susceptibility, ``f`` local field, ``D`` unit dipole convolution)::

    E(chi) = (Lam / s^2) * sum_i m_i^2 (1 - cos(s (D chi - f)_i))          data, ~ Lam/2 ||m (D chi - f)||^2
           + sum_k sum_i sqrt((G_k d_k chi)_i^2 + eps^2) - eps              ~ ||M_G grad chi||_1
           + (mu / 2) || C (chi - mean_C chi) ||^2                          MEDI+0 (optional)

``m`` is the data weight (noise weight normalised to mean 1 in the mask), ``G_k`` the binary edge
mask per gradient axis, ``d_k`` forward differences in mm, ``C`` the CSF mask.

Scaling (the toolbox's, so its lambda means the same here). The toolbox solves in radians of
phase accrued over the echo spacing ``dTE``: ``phi = s_p * chi`` with
``s_p = 2 pi * GAMMA_BAR * B0 * 1e-6 * dTE`` (rad/ppm), and minimises
``lambda ||m (exp(i D phi) - exp(i s_p f))||^2 + ||M_G grad phi||_1``. Divided by ``s_p`` and
written in ppm this is the problem above with ``Lam = 2 * lambda * s_p`` and ``mu = lambda_csf * s_p``.
So ``lambda`` is dimensionless and tied to the phase noise at ``dTE``: for a fixed phase SNR the
field noise in ppm falls as ``1 / (B0 dTE)`` and the data weight in ppm rises as ``B0 dTE``,
which is the scaling a TV-regularised inversion needs (optimal ``Lam ~ 1 / sigma_ppm``). One
default therefore serves 1.5, 3 and 7 T; ``lambda`` itself need not change with B0 or TE. Without
``field_strength``/``echo_times`` the reference 3 T and dTE = 5 ms are assumed (``s_p`` = 4.01).

The exponent itself uses ``s = min(s_p, pi/2 / q)``, ``q`` the 99.9th percentile of ``|f|`` in
the mask, so that the starting residual never wraps (a residual beyond pi would pull the fit
onto the wrong phase branch, e.g. next to haemorrhages). ``s`` changes only the curvature of the
data term at large residuals, not its small-residual weight, which is set by ``Lam``.

Solver: Gauss-Newton on the data term with iteratively reweighted L1 (IRLS weights
``1/sqrt((G d chi)^2 + eps^2)`` frozen per outer iteration, a majoriser of the smoothed L1). Each
step solves ``A dchi = -grad E`` with ``A = sum_k d_k^T W_k d_k + Lam D^T m^2 D (+ mu P)`` by
Jacobi-preconditioned conjugate gradients (the core :func:`qsmkit.operators.cg`; ``diag(D^T m^2 D)
= d^2 * m^2`` with ``d`` the spatial kernel), started at the minimiser of the quadratic model along the previous step (a one-vector
warm start). A backtracking safeguard halves the step if the cost would rise (not needed on the
phantoms: the IRLS model majorises the regulariser). Stop when ``||dchi|| / ||chi|| < tol`` or
after ``max_iter``. FFTs are real-to-complex (``rfftn``, 4 per CG iteration) on the mask's bounding
box, zero-padded by ``padding``; small grids (< 2^20 voxels) run with one CPU thread, which is
faster than two there (thread barriers dominate, badly so on a loaded machine). The operators are
the core ones (:class:`~qsmkit.operators.Dipole`, :class:`~qsmkit.operators.SMV`,
:class:`~qsmkit.operators.Gradient`); :class:`MediSystem` is the Gauss-Newton matrix ``A``.

Defaults (from lambda sweeps over 250-4000 on the simulator, 64^3 at 1 mm and 112x128x96 at
1.5 mm, true local field with 0x, 1x, 3x and 10x the thermal field noise, and at 1.5 / 3 / 7 T):
``lambda = 1000`` (the toolbox's) is the best or within ~12 % of the best NRMSE for 0-3x noise at
every field strength; noisier fields (10x, or the quickstart pipeline's local field) prefer 250-500.
``max_iter = 15``, ``cg_max_iter = 10``, ``tol = 0.02``: many cheap IRLS steps do as well as or
better than few accurate ones (for ~100 CG iterations on the 64^3 phantom: 10 x 10 and 5 x 20
give 24.5 % NRMSE, 3 x 30 26.9 %, and 10 x 50 no better than 10 x 10); the map is within ~1 %
NRMSE of its converged value after 10-12 steps. ``epsilon = 1e-3 ppm/mm``
(about the toolbox's ``sqrt(1e-6) rad/mm`` at 3 T). ``padding = 1``: a larger grid changes the
NRMSE by < 1 % on the phantoms and costs 1.5-2.5x the time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable, Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError, StageError
from qsmkit.operators import bounding_box
from qsmkit.physics import phase_scale
from qsmkit.threads import limited

from .solver import (MERIT_FACTOR, MERIT_POWER, MediSystem, _edge_mask, _gauss_newton, _MediModel,  # noqa: F401
                     _Ops, _WorkGrid, _work_problem)

#: largest starting residual phase (rad) in the exponent (99.9th percentile of |f| maps to this)
MAX_START_PHASE = math.pi / 2
#: grids (voxels) under this size run with one torch CPU thread
SINGLE_THREAD_VOXELS = 1 << 20


@dataclass
class MediResult:
    """Output of :func:`medi`: the map and the solver's history (index 0 of costs = start)."""

    chi: np.ndarray
    mask: np.ndarray
    cost: list = dc_field(default_factory=list)
    data_cost: list = dc_field(default_factory=list)
    reg_cost: list = dc_field(default_factory=list)
    update: list = dc_field(default_factory=list)
    cg_iters: list = dc_field(default_factory=list)
    steps: list = dc_field(default_factory=list)
    cg_residual: list = dc_field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    phase_scale: float = 0.0
    exponent_scale: float = 0.0
    work_shape: tuple = ()
    csf_mask: np.ndarray | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- main function
def medi(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
         magnitude: np.ndarray | None = None, noise_weight: np.ndarray | None = None, *,
         lam: float = 1000.0, edge_percentage: float = 0.9, edge_mask: np.ndarray | None = None,
         smv_radius_mm: float = 0.0, merit: bool = False, lambda_csf: float = 0.0,
         csf_mask: np.ndarray | None = None, field_strength: float | None = None,
         echo_times: Sequence[float] | None = None, max_iter: int = 15, cg_max_iter: int = 10,
         cg_tol: float = 0.01, tol: float = 0.02, epsilon: float = 1e-3, padding: float = 1.0,
         device=None, log: Callable[[str], None] | None = None,
         callback: Callable[[int, np.ndarray], None] | None = None) -> MediResult:
    """MEDI-L1 susceptibility from a local field (nonlinear data term, Gauss-Newton + IRLS + CG).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Local field in ppm of B0.
    mask : ndarray, (x, y, z)
        Region of valid field (bool or 0/1).
    voxel_size : 3 floats
        Voxel size in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    magnitude : ndarray, (x, y, z) or (x, y, z, echo), optional
        Magnitude (a.u.) for the edge mask; echoes combined by root sum of squares. Needed unless
        ``edge_mask`` is given or ``edge_percentage`` is 0.
    noise_weight : ndarray, (x, y, z), optional
        Inverse noise std of the field (1/ppm); normalised to mean 1 in the mask. ``None`` gives
        uniform weights.
    lam : float
        Data weight ``lambda`` (dimensionless, the toolbox's; see the module notes for scaling).
    edge_percentage : float
        Edge mask size, toolbox convention (see :func:`qsmkit.operators.gradient_mask`).
    edge_mask : ndarray, bool, (3, x, y, z), optional
        ``M_G`` given directly (1 = regularised); overrides ``magnitude``/``edge_percentage``.
    smv_radius_mm : float
        Radius (mm) of the SMV preprocessing, 0 = off: ``D <- (1 - S) D``, ``f <- f - S * f``,
        the mask eroded by the radius, noise std ``sigma <- sqrt(S * sigma^2 + sigma^2)``.
    merit : bool
        Model error reduction through iterative tuning: after each iteration voxels whose complex
        residual exceeds 6 standard deviations get their noise std scaled by (residual / 6 sd)^2.
    lambda_csf : float
        MEDI+0 weight of the CSF-uniformity term (toolbox scale; 0 = off). The result is then
        referenced to the mean susceptibility in ``csf_mask``.
    csf_mask : ndarray, bool, optional
        CSF region for MEDI+0 (required when ``lambda_csf > 0``).
    field_strength, echo_times : optional
        B0 (T) and echo times (s), for the phase scale of the data term.
    max_iter, cg_max_iter : int
        Gauss-Newton iterations and CG iterations per Gauss-Newton step.
    cg_tol : float
        CG stops when the residual norm falls below ``cg_tol`` times the right-hand side's.
    tol : float
        Gauss-Newton stops when ``||dchi|| / ||chi|| < tol``.
    epsilon : float
        Smoothing of the L1 norm, ppm/mm (IRLS weights ``1/sqrt(|G d chi|^2 + epsilon^2)``).
    padding : float
        The FFT grid is the mask's bounding box enlarged by at least this factor per axis
        (zero-padded); 1 = the bounding box itself (periodic boundary).
    device : torch.device or str, optional
        Torch device (default CPU).
    log : callable, optional
        Receives one progress line per Gauss-Newton iteration.
    callback : callable, optional
        Called after each Gauss-Newton iteration as ``callback(iteration, chi)`` with the current
        estimate on the input grid (ppm, not yet masked or referenced), e.g. to monitor convergence.

    Returns
    -------
    MediResult
        ``chi`` (float32, ppm, zero outside ``result.mask``) and the solver history.
    """
    import torch

    kw = dict(magnitude=magnitude, noise_weight=noise_weight, lam=lam, edge_percentage=edge_percentage,
              edge_mask=edge_mask, smv_radius_mm=smv_radius_mm, merit=merit, lambda_csf=lambda_csf,
              csf_mask=csf_mask, field_strength=field_strength, echo_times=echo_times, max_iter=max_iter,
              cg_max_iter=cg_max_iter, cg_tol=cg_tol, tol=tol, epsilon=epsilon, padding=padding,
              device=device, log=log, callback=callback)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # thread start-up and barriers cost more than they gain on small grids (qsmkit.threads)
    with limited(thread_limit(mask, padding) if dev.type == "cpu" else None):
        return _medi(field, mask, voxel_size, b0_dir, **kw)


def thread_limit(mask: np.ndarray, padding: float) -> int | None:
    """1 when the padded work grid of ``mask``'s bounding box is under :data:`SINGLE_THREAD_VOXELS`
    voxels (small FFTs do not scale over threads), else None (no limit)."""
    m = np.asarray(mask) > 0
    if m.ndim != 3 or not m.any():
        return None
    work = float(np.prod([s.stop - s.start for s in bounding_box(m)])) * max(float(padding), 1.0) ** 3
    return 1 if work < SINGLE_THREAD_VOXELS else None


def _medi(field, mask, voxel_size, b0_dir, *, magnitude, noise_weight, lam, edge_percentage, edge_mask,
          smv_radius_mm, merit, lambda_csf, csf_mask, field_strength, echo_times, max_iter, cg_max_iter,
          cg_tol, tol, epsilon, padding, device, log, callback) -> MediResult:
    import torch

    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f_full, m_full = _checked_field(field, mask)
    grid = _WorkGrid(m_full, padding)
    prob = _work_problem(grid, f_full, voxel_size, b0_dir, noise_weight, smv_radius_mm)
    gm = _edge_mask(grid, prob.mask_w, prob.vs, magnitude, edge_mask, edge_percentage)
    csf_w = None
    if lambda_csf > 0:
        if csf_mask is None:
            raise InputDataError("lambda_csf > 0 needs a CSF mask; give csf_mask or set lambda_csf 0")
        csf_w = grid.to_work(np.asarray(csf_mask) > 0, bool) & prob.mask_w
        if not csf_w.any():
            raise StageError("the CSF mask is empty inside the brain mask; give a csf_mask or set lambda_csf 0")

    # ---- scaling
    s_p, s_note = phase_scale(field_strength, echo_times)
    fin = np.abs(prob.f[prob.mask_w])
    q = float(np.quantile(fin, 0.999)) if fin.size else 0.0
    s = min(s_p, MAX_START_PHASE / q) if q > 0 else s_p
    say(f"grid {grid.box_shape} -> FFT {grid.shape}; phase scale {s_note}; exponent {s:.3g} rad/ppm; "
        f"data weight {'noise map' if noise_weight is not None else 'uniform'}; "
        f"edges {0 if gm.size == 0 else 100.0 * (1 - gm[:, prob.mask_w].mean()):.0f}% of mask gradient components")

    model = _MediModel(prob, gm, csf_w, dev, s=s, big_lam=2.0 * float(lam) * s_p, mu=float(lambda_csf) * s_p,
                       eps=float(epsilon))
    res = MediResult(chi=np.zeros(m_full.shape, np.float32), mask=np.zeros(m_full.shape, bool),
                     phase_scale=s_p, exponent_scale=s, work_shape=grid.shape)
    _gauss_newton(model, res, grid, max_iter=max_iter, cg_max_iter=cg_max_iter, cg_tol=cg_tol, tol=tol,
                  merit=merit, say=say, callback=callback)

    chi_w = model.x.cpu().numpy()
    if csf_w is not None:
        chi_w = chi_w - np.float32(chi_w[csf_w].mean())
    out_mask = qfft.crop_center(prob.mask_w, grid.box_shape)
    res.chi = grid.to_full(np.where(out_mask, qfft.crop_center(chi_w, grid.box_shape), np.float32(0)), cropped=True)
    res.mask = grid.to_full(out_mask, cropped=True, dtype=bool)
    if csf_w is not None:
        res.csf_mask = grid.to_full(qfft.crop_center(csf_w, grid.box_shape), cropped=True, dtype=bool)
    res.seconds = time.perf_counter() - t_start
    return res


def _checked_field(field, mask) -> tuple[np.ndarray, np.ndarray]:
    f_full = np.asarray(field, dtype=np.float32)
    m_full = np.asarray(mask) > 0
    if f_full.ndim != 3 or m_full.shape != f_full.shape:
        raise InputDataError(f"field {f_full.shape} and mask {m_full.shape} must be the same 3D grid")
    if not m_full.any():
        raise StageError("the mask is empty (all zero); check the mask / background stage output")
    if not np.all(np.isfinite(f_full[m_full])):
        raise InputDataError("the local field has NaN/inf inside the mask; fix the background stage output")
    return f_full, m_full
