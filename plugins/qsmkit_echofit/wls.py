"""Weighted least-squares fit of unwrapped multi-echo phase against echo time.

Per voxel the model is ``phase_e = phi0 + omega * TE_e`` (``phi0`` in rad, ``omega`` in rad/s),
fitted with weights ``w_e`` proportional to the inverse phase-noise variance of echo ``e``. For a
complex Gaussian signal with magnitude ``M_e`` and noise std ``sigma`` the phase noise std is
``sigma / M_e``, so the default weights are ``M_e^2``. The closed-form 2x2 normal equations are
solved for all voxels at once (no per-voxel loops).

The field is ``omega`` converted to ppm of B0 (:func:`qsmkit.physics.rad_per_s_to_ppm`). Its noise
std is ``sigma * sqrt(S0 / det)`` (``sqrt(1 / S2)`` without offset) in rad/s, with ``S0, S1, S2``
the weighted sums of ``1, TE, TE^2`` and ``det = S0 S2 - S1^2``; ``sigma`` is found from the fit
residuals pooled over the mask (the median of the per-voxel weighted residual variance, scaled by
the chi-square median, so that unwrapping errors and mixed-tissue voxels do not inflate it). With
no redundant echo (2 echoes and an offset, or 1 without) the weight is relative (median 1).

Laplacian unwrapping leaves per-echo constants and harmonic parts; these are linear in TE (the
unwrapping is linear in the phase), so ``phi0`` absorbs the constants and the field keeps a
harmonic part for background removal. Isolated 2 pi errors of single echoes are repaired from
their leave-one-out residuals (``correct_wraps``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import gammaincinv

from qsmkit.errors import InputDataError, ParameterError
from qsmkit.physics import GAMMA, rad_per_s_to_ppm


def _chi2_median(dof: int) -> float:
    """Median of the chi-square distribution with ``dof`` degrees of freedom."""
    return float(2.0 * gammaincinv(dof / 2.0, 0.5))


def weighted_fit(phase: np.ndarray, magnitude: np.ndarray | None, echo_times: Sequence[float],
                 field_strength: float, mask: np.ndarray | None = None, fit_offset: bool = True,
                 weighting: str = "magnitude_squared", correct_wraps: bool = True) -> dict:
    """Field (ppm) and its inverse noise std from unwrapped multi-echo phase.

    Parameters
    ----------
    phase : ndarray, (x, y, z, echo)
        Unwrapped phase in rad.
    magnitude : ndarray, (x, y, z, echo) or None
        Magnitude (any scale); needed for ``weighting="magnitude_squared"``.
    echo_times : sequence of float
        Echo times in s, one per echo.
    field_strength : float
        B0 in T.
    mask : ndarray of bool, (x, y, z), optional
        Voxels to fit; the outputs are 0 outside (the whole grid when ``None``).
    fit_offset : bool
        Fit the phase offset ``phi0`` (needs 2 or more echoes); otherwise ``phi0 = 0``.
    weighting : {"magnitude_squared", "uniform"}
        Echo weights: ``M_e^2`` (inverse phase-noise variance) or 1.
    correct_wraps : bool
        After the fit, move the echo whose leave-one-out residual (its distance from the line
        fitted to the other echoes) exceeds pi by the nearest multiple of 2 pi, fit again, and
        repeat (at most once per echo). This repairs isolated spatial-unwrapping errors in single
        echoes (needs more echoes than fitted parameters).

    Returns
    -------
    dict
        ``field`` (float32, ppm), ``noise_weight`` (float32, 1/ppm: inverse noise std of
        ``field``, 0 outside the mask or where the fit is undetermined), ``phi0`` (float32, rad),
        ``sigma`` (float: noise std in magnitude units for ``magnitude_squared`` weighting, in rad
        for ``uniform``; NaN when it could not be estimated), ``sigma_source`` (str), ``dof``,
        ``n_corrected`` (voxels whose echoes were moved by 2 pi).

    Steps: :func:`_fit_inputs` (phase, weights and scaled echo times of the mask voxels), the
    normal equations of :class:`_LineFit`, :func:`_correct_wraps`, :func:`_noise_variance` from
    the residuals, :func:`_field_and_weight` in ppm.
    """
    ph = np.asarray(phase)
    if ph.ndim == 3:
        ph = ph[..., None]
    te = np.asarray(echo_times, dtype=np.float64).ravel()
    n_e = ph.shape[3]
    if te.size != n_e:
        raise InputDataError(f"weighted_fit: {te.size} echo times for {n_e} echoes; give one echo time (s) per echo")
    grid = ph.shape[:3]
    m = np.ones(grid, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_par = 2 if fit_offset else 1
    if fit_offset and n_e < 2:
        raise InputDataError("weighted_fit: fitting the phase offset needs at least 2 echoes; "
                             "give more echoes or set fit_offset=False (assumes phi0 = 0)")
    # centre and scale TE for conditioning (the fit is invariant to it)
    t0 = float(te.mean()) if fit_offset else 0.0
    ts = float(np.max(np.abs(te - t0))) or 1.0
    t = (te - t0) / ts
    y = ph[m].astype(np.float64)  # (n, echo)
    w, scale = _echo_weights(magnitude, m, y, weighting)

    fit = _LineFit(w, y, t, fit_offset)
    slope, icpt = fit.solve(slice(None))
    n_corrected = _correct_wraps(fit, slope, icpt) if correct_wraps and n_e > n_par else 0
    dof = n_e - n_par
    sigma2_rel, source = _noise_variance(fit, slope, icpt, dof)
    field_in, nw_in, sigma, source = _field_and_weight(fit, slope, ts, field_strength, sigma2_rel, scale, source)
    phi0 = icpt - slope * (t0 / ts)  # offset at TE = 0

    field = np.zeros(grid, dtype=np.float32)
    nw = np.zeros(grid, dtype=np.float32)
    p0 = np.zeros(grid, dtype=np.float32)
    field[m] = field_in
    nw[m] = nw_in
    p0[m] = phi0
    return {"field": field, "noise_weight": nw, "phi0": p0, "sigma": sigma, "sigma_source": source,
            "dof": dof, "n_corrected": n_corrected}


def _echo_weights(magnitude, m: np.ndarray, y: np.ndarray, weighting: str) -> tuple[np.ndarray, float]:
    """Per-voxel echo weights of the mask voxels, scaled to max 1, and that scale."""
    if weighting == "magnitude_squared":
        if magnitude is None:
            raise InputDataError("weighted_fit: magnitude_squared weighting needs the magnitude; "
                                 "give it or use weighting=\"uniform\"")
        mag = np.asarray(magnitude)
        if mag.ndim == 3:
            mag = mag[..., None]
        w = mag[m].astype(np.float64) ** 2
        scale = float(np.max(w)) if w.size else 1.0
        w /= scale if scale > 0 else 1.0
    elif weighting == "uniform":
        w = np.ones_like(y)
        scale = 1.0
    else:
        raise ParameterError(f"weighted_fit: unknown weighting {weighting!r}; use magnitude_squared or uniform")
    return w, scale


class _LineFit:
    """Weighted line fits ``y = a + b t`` of all voxels (rows) at once by the 2x2 normal equations.

    The normal-equation matrix depends on the weights only: it is computed once.
    """

    def __init__(self, w: np.ndarray, y: np.ndarray, t: np.ndarray, fit_offset: bool):
        self.w, self.y, self.t, self.fit_offset = w, y, t, fit_offset
        s0 = w.sum(axis=1)
        s1 = w @ t
        s2 = w @ (t * t)
        if fit_offset:
            det = s0 * s2 - s1 * s1
            ok = det > 1e-12 * np.maximum(s0 * s2, 1e-300)
            det = np.where(ok, det, 1.0)
            var_slope = np.where(ok, s0 / det, np.inf)  # in units of sigma^2 (scaled weights)
        else:
            det = None
            ok = s2 > 0
            s2 = np.where(ok, s2, 1.0)
            var_slope = np.where(ok, 1.0 / s2, np.inf)
        self.s0, self.s1, self.s2, self.det, self.ok, self.var_slope = s0, s1, s2, det, ok, var_slope

    def solve(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """``(slope, intercept)`` of ``rows`` (0 where the fit is undetermined)."""
        s0, s1, s2, det, t = self.s0, self.s1, self.s2, self.det, self.t
        wy = self.w[rows] * self.y[rows]
        y0 = wy.sum(axis=1)
        y1 = wy @ t
        if self.fit_offset:
            b = (s0[rows] * y1 - s1[rows] * y0) / det[rows]
            a = (s2[rows] * y0 - s1[rows] * y1) / det[rows]
        else:
            b = y1 / s2[rows]
            a = np.zeros_like(b)
        good = self.ok[rows]
        return np.where(good, b, 0.0), np.where(good, a, 0.0)


def _correct_wraps(fit: _LineFit, slope: np.ndarray, icpt: np.ndarray) -> int:
    """Move single echoes off by 2 pi k back onto the line (``fit.y``, ``slope``, ``icpt`` updated in
    place); returns the number of voxels changed.

    An echo that is off by a multiple of 2 pi (a local spatial-unwrapping error) shows in its
    leave-one-out residual r_e / (1 - h_e) (h_e: leverage), i.e. the distance of the echo
    from the line fitted to the other echoes. Move the worst echo of each voxel by the
    nearest multiple of 2 pi when that residual exceeds pi, refit, and repeat.
    """
    y, w, t = fit.y, fit.w, fit.t
    s0, s1, s2, det = fit.s0, fit.s1, fit.s2, fit.det
    fixed = np.zeros(y.shape[0], dtype=bool)
    rows = np.flatnonzero(fit.ok)
    for _ in range(y.shape[1]):
        res = y[rows] - icpt[rows, None] - slope[rows, None] * t[None, :]
        if fit.fit_offset:
            lev = w[rows] * (s2[rows, None] - 2 * t[None, :] * s1[rows, None]
                             + (t * t)[None, :] * s0[rows, None]) / det[rows, None]
        else:
            lev = w[rows] * (t * t)[None, :] / s2[rows, None]
        loo = res / np.maximum(1.0 - lev, 1e-3)
        worst = np.argmax(np.abs(loo), axis=1)
        k = np.round(np.take_along_axis(loo, worst[:, None], axis=1)[:, 0] / (2.0 * np.pi))
        move = k != 0
        if not move.any():
            break
        rows, worst, k = rows[move], worst[move], k[move]
        fixed[rows] = True
        y[rows, worst] -= (2.0 * np.pi) * k
        slope[rows], icpt[rows] = fit.solve(rows)
    return int(fixed.sum())


def _noise_variance(fit: _LineFit, slope: np.ndarray, icpt: np.ndarray, dof: int) -> tuple[float, str]:
    """Residual-based noise variance relative to the scaled weights (NaN without redundant echoes)."""
    ok = fit.ok
    if dof > 0 and ok.any():
        res = fit.y - icpt[:, None] - slope[:, None] * fit.t[None, :]
        q = (fit.w * res * res).sum(axis=1)[ok] / dof
        med = float(np.median(q))
        if med > 0:
            return med * dof / _chi2_median(dof), "fit residuals"
    return np.nan, "none"


def _field_and_weight(fit: _LineFit, slope, ts: float, field_strength: float, sigma2_rel: float, scale: float,
                      source: str):
    """``(field ppm, inverse noise std 1/ppm, sigma, sigma source)`` of the mask voxels."""
    # slope is in rad per unit of scaled time: omega = slope / ts (rad/s)
    omega = slope / ts
    field_in = rad_per_s_to_ppm(omega, field_strength)
    std_omega_rel = np.sqrt(fit.var_slope) / ts  # rad/s per unit relative sigma
    ppm_per_rad_s = 1.0 / (GAMMA * field_strength * 1e-6)
    if np.isfinite(sigma2_rel):
        std_ppm = np.sqrt(sigma2_rel) * std_omega_rel * ppm_per_rad_s
        sigma = float(np.sqrt(sigma2_rel * scale))
    else:
        # no redundancy to estimate the noise: relative weights, median 1 inside the mask
        std_ppm = std_omega_rel
        fin = np.isfinite(std_ppm)
        ref = float(np.median(std_ppm[fin])) if fin.any() else 1.0
        std_ppm = std_ppm / (ref if ref > 0 else 1.0)
        sigma = float("nan")
        source = "relative (no redundant echoes: median weight 1)"
    with np.errstate(divide="ignore"):
        nw_in = np.where(fit.ok & np.isfinite(std_ppm) & (std_ppm > 0), 1.0 / std_ppm, 0.0)
    return field_in, nw_in, sigma, source
