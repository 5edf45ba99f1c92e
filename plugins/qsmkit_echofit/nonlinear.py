"""Nonlinear complex fit of the multi-echo signal for the field and the phase offset.

Model (Liu et al. 2013, MRM 69:467, "Nonlinear formulation of the magnetic field to source
relationship", as in the MEDI toolbox's ``Fit_ppm_complex``): per voxel

    S_e  ~  |S_e| exp(i (phi0 + omega TE_e)),      e = 1..E,

fitted to the complex data ``S_e = magnitude_e exp(i phase_e)`` by least squares over the
complex residual, i.e. minimising ``sum_e |S_e|^2 (1 - cos(phase_e - phi0 - omega TE_e))``.
Unlike the linear fit of unwrapped phase this needs no temporal unwrapping and is not biased by
unwrapping errors or by the harmonic residue of a Laplacian unwrapper: the data are the wrapped
phase; the unwrapped phase only gives the starting point (the cost is periodic in ``omega``
with period ``2 pi / dTE``, so the start picks the branch).

Solver: Gauss-Newton with Levenberg-Marquardt damping, vectorised over voxels. With the
Jacobian ``J_e = i S^_e (1, t_e)`` the Gauss-Newton matrix ``Re(J^H J)`` is the 2x2 matrix
``sum_e |S_e|^2 (1, t_e)^T (1, t_e)`` of the magnitude-squared weighted linear fit and the
gradient is ``sum_e |S_e|^2 sin(d_e) (1, t_e)``, ``d_e`` the wrapped phase residual: each step is
the weighted linear fit of ``sin(d_e)``. The damping ``lambda`` of each voxel is divided by 10
after a step that lowers its cost and multiplied by 10 (step rejected) otherwise.

Branch (``branch: spatial``, the stage's default). A start from a Laplacian unwrapping carries
a smooth (harmonic) error that can exceed the main lobe of the cost (~ pi / (E dTE)), and the fit
would fall into another lobe there: a field with jumps. So the fit starts from the data's own
echo-to-echo estimate ``angle(sum_e w_e S_{e+1} conj(S_e)) / dTE``, which is right modulo the alias
``2 pi / dTE``; the wrapped difference to the start, ``dTE (omega - omega_start)``, is then the
start's smooth error modulo 2 pi: it is unwrapped spatially inside the mask (Laplacian with
snapping, :mod:`qsmkit_unwrap.laplacian`; weighted median put in [-pi, pi)) and added to the
start, which puts the data's fit on the start's branch, and a last Levenberg-Marquardt pass
polishes it. The unwrapped phase so decides only the 2 pi / dTE branch, and only through a
smooth map. ``branch: start`` runs Levenberg-Marquardt from the start directly.

Noise: the residual's component across the signal, ``|S_e| sin(d_e)``, is the noise per channel
``sigma``, so ``q = sum_e |S_e|^2 sin^2(d_e) / (E - 2)`` estimates ``sigma^2`` per voxel
(magnitude units). ``noise: pooled`` takes the median over the mask scaled by the chi-square
median (as the linear fit: robust to mixed-tissue voxels); ``noise: local`` a Gaussian average of
``q`` inside the mask (``noise_sigma_mm``; values above 10 x the pooled level clipped) for
spatially varying noise (parallel imaging); ``noise: voxel`` (the stage's default) each voxel's
own ``q`` floored at a quarter of the pooled level, ``max(q, sigma_pooled^2 / 4)`` (per-voxel
noise as MEDI's ``Fit_ppm_complex``; the floor bounds the weight of voxels whose residual is
small by chance, ~14 % of voxels at 5 echoes): voxels the model does not fit (short-T2*
haemorrhage and veins, whose late echoes are noise and whose mixed-field signal is not one
frequency) get a low weight in the inversion. Measured on the default phantom (ROMEO, V-SHARP,
MEDI): chi NRMSE 56.5 % (pooled), 55.2 % (voxel). The field's noise std is then
``sigma sqrt(S0 / det) / (gamma B0)`` (the Cramer-Rao bound of the fit) and ``noise_weight`` is
its inverse (1/ppm), the meaning of the ``weighted_fit`` output.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmkit.errors import InputDataError, ParameterError
from qsmkit.physics import GAMMA

from .wls import _chi2_median, weighted_fit

__all__ = ["nonlinear_fit", "linear_start", "NOISE_MODES"]

#: how the noise level is taken from the residuals
NOISE_MODES = ("pooled", "local", "voxel")


def _gn_system(w: np.ndarray, t: np.ndarray):
    """Sums ``S0, S1, S2`` of the weights (n, E) against ``1, t, t^2`` and the determinant."""
    s0 = w.sum(axis=1)
    s1 = w @ t
    s2 = w @ (t * t)
    return s0, s1, s2, s0 * s2 - s1 * s1


def _residual(sig: np.ndarray, a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Wrapped phase residual ``d_e = angle(S_e exp(-i (a + b t_e)))`` (n, E), float32."""
    model = a[:, None] + b[:, None] * t[None, :]
    rot = np.empty(model.shape, np.complex64)
    np.cos(model, out=rot.real)
    np.sin(-model, out=rot.imag)
    return np.angle(sig * rot).astype(np.float32)


def _cost(w: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (w * (1.0 - np.cos(d))).sum(axis=1)


def _gauss_newton(sig, w, t, a, b, max_iter: int, tol: float):
    """Levenberg-Marquardt iterations for ``(a, b)`` of every voxel; returns ``(a, b, d, iterations)``."""
    s0, s1, s2, _ = _gn_system(w, t)
    lam = np.full(a.shape, 1e-3, np.float32)
    d = _residual(sig, a, b, t)
    cost = _cost(w, d)
    active = np.flatnonzero(s0 > 0)
    it = 0
    for it in range(1, max_iter + 1):
        if active.size == 0:
            it -= 1
            break
        wa, da, la = w[active], d[active], lam[active]
        ws = wa * np.sin(da)
        g0, g1 = ws.sum(axis=1), ws @ t
        h00, h01, h11 = s0[active] * (1 + la), s1[active], s2[active] * (1 + la)
        det = h00 * h11 - h01 * h01
        det = np.where(det > 0, det, np.inf)
        da_ = (h11 * g0 - h01 * g1) / det
        db_ = (h00 * g1 - h01 * g0) / det
        na, nb = a[active] + da_, b[active] + db_
        nd = _residual(sig[active], na, nb, t)
        ncost = _cost(wa, nd)
        better = ncost <= cost[active]
        idx = active[better]
        a[idx], b[idx], d[idx], cost[idx] = na[better], nb[better], nd[better], ncost[better]
        lam[idx] = np.maximum(lam[idx] * 0.1, 1e-7)
        lam[active[~better]] *= 10.0
        # converged: the accepted step (in rad at the extreme echoes) is below tol, or the damping
        # has grown so large that no step can lower the cost any more
        step = np.abs(da_) + np.abs(db_) * float(np.max(np.abs(t)))
        done = (better & (step < tol)) | (lam[active] > 1e6)
        active = active[~done]
    return a, b, d, it


def _best_offset(sig: np.ndarray, w: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The optimal ``a`` for a given slope ``b``: ``angle(sum_e |S_e| S_e exp(-i b t_e))``."""
    rot = _residual(sig, np.zeros_like(b), b, t)                       # angle(S_e exp(-i b t_e))
    z = (w * np.cos(rot)).sum(axis=1) + 1j * (w * np.sin(rot)).sum(axis=1)
    return np.angle(z).astype(np.float32)


def _fix_alias_spikes(b: np.ndarray, m: np.ndarray, dt: float) -> np.ndarray:
    """Move voxels more than half an alias period (``pi / dt``) from the median of their in-mask
    26 neighbours by the alias multiple ``2 pi k / dt`` nearest that median (equally spaced echoes:
    the fit is the same). Isolated voxels where the branch map failed (a snapping error of the
    spatial unwrapping) are otherwise ~2 ppm spikes that streak in the inversion."""
    vol = np.full(m.shape, np.nan, np.float32)
    vol[m] = b
    pad = np.pad(vol, 1, constant_values=np.nan)
    idx = np.nonzero(m)
    nb = np.empty((idx[0].size, 26), np.float32)
    j = 0
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                if dx == dy == dz == 0:
                    continue
                nb[:, j] = pad[idx[0] + 1 + dx, idx[1] + 1 + dy, idx[2] + 1 + dz]
                j += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # all-NaN rows: isolated voxels
        med = np.nanmedian(nb, axis=1)
    period = 2.0 * np.pi / dt
    k = np.where(np.isfinite(med), np.round((med - b) / period), 0.0)
    return (b + k * period).astype(np.float32)


def _spatial_branch(sig, w, t, te, ts, b_start, m, voxel_size, max_iter: int, tol: float):
    """Fit from the data's echo-to-echo estimate; put it on the start's alias branch by unwrapping
    the (smooth) difference to the start spatially. Returns ``(a, b, iterations)``.

    The data estimate: ``b = angle(sum_e w S_{e+1} conj(S_e)) / dt`` (consecutive echoes, ``dt`` their
    spacing in scaled time; the first pair for uneven echoes), refined by Levenberg-Marquardt. The
    difference to the start, ``(b - b_start) dt`` wrapped, is the start's error (smooth: e.g. the
    harmonic residue of a Laplacian unwrapping) modulo 2 pi; unwrapped in the mask
    (:func:`qsmkit_unwrap.laplacian.laplacian_unwrap` with snapping) and with the 2 pi multiple
    that puts its weighted median in [-pi, pi), it moves ``b`` onto the start's branch.
    """
    dts = np.diff(t.astype(np.float64))
    uniform = bool(np.allclose(dts, dts[0], rtol=1e-3))
    dt = float(dts[0])
    if uniform and t.size > 1:
        h = sig[:, 1:] * np.conj(sig[:, :-1])
        hw = h * np.sqrt(w[:, 1:] * w[:, :-1]) / np.maximum(np.abs(h), 1e-30)
        b = (np.angle(hw.sum(axis=1)) / dt).astype(np.float32)
    else:
        b = (np.angle(sig[:, 1] * np.conj(sig[:, 0])) / dt).astype(np.float32)
    a = _best_offset(sig, w, b, t)
    a, b, _, iters = _gauss_newton(sig, w, t, a, b, max_iter, tol)
    diff = np.angle(np.exp(1j * (b - b_start).astype(np.float64) * dt)).astype(np.float32)
    try:
        from qsmkit_unwrap.laplacian import laplacian_unwrap
    except ImportError as exc:
        raise ParameterError(f"nonlinear_fit: branch spatial needs the unwrap plugin ({exc}); set branch: start") \
            from None
    # unwrap where the signal is clear (first-echo magnitude above 10 % of its 99th percentile);
    # elsewhere (noise outside the head) take the alias branch nearest the start voxel by voxel
    wm = w.sum(axis=1)
    reliable = wm > 0.01 * float(np.percentile(wm, 99)) if wm.size else wm > 0
    region = np.zeros(m.shape, bool)
    region[m] = reliable
    um = diff.copy()
    if region.sum() > 1:
        vol = np.zeros(m.shape, np.float32)
        vol[m] = diff
        ur = laplacian_unwrap(vol, voxel_size, region, "wrapped", 30, 1e-4, True)[region]
        order = np.argsort(ur)
        cw = np.cumsum(wm[reliable][order])
        med = float(ur[order][np.searchsorted(cw, 0.5 * cw[-1])]) if cw[-1] > 0 else 0.0
        um[reliable] = ur - np.float32(2 * np.pi * np.floor(med / (2 * np.pi) + 0.5))
    b_new = (b_start + (um.astype(np.float64) / dt)).astype(np.float32)
    if uniform:
        b_new = _fix_alias_spikes(b_new, m, dt)
    # on the start's branch: the same fit as b up to the alias (uniform echoes) or close to it
    return _best_offset(sig, w, b_new, t), b_new, iters


def nonlinear_fit(phase: np.ndarray, magnitude: np.ndarray, echo_times: Sequence[float], field_strength: float,
                  init_field: np.ndarray, init_phi0: np.ndarray, mask: np.ndarray | None = None,
                  max_iter: int = 20, tol: float = 1e-5, noise: str = "voxel",
                  noise_sigma_mm: float = 4.0, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                  branch: str = "spatial") -> dict:
    """Complex nonlinear fit of ``|S_e| exp(i (phi0 + omega TE_e))`` to multi-echo data (Liu et al. 2013).

    Parameters
    ----------
    phase : ndarray (x, y, z, echo)
        Wrapped (or unwrapped) phase in rad: only ``exp(i phase)`` is used.
    magnitude : ndarray (x, y, z, echo)
        Magnitude (any scale): the weights ``|S_e|^2`` and the noise unit.
    echo_times : floats
        Echo times in s.
    field_strength : float
        B0 in T.
    init_field : ndarray (x, y, z)
        Starting field in ppm (the weighted linear fit of the unwrapped phase).
    init_phi0 : ndarray (x, y, z)
        Starting phase offset at TE = 0 in rad.
    mask : ndarray of bool (x, y, z), optional
        Voxels to fit; outputs are 0 outside (whole grid when ``None``).
    max_iter : int
        Levenberg-Marquardt iterations at most.
    tol : float
        Stop a voxel when its accepted step changes the model phase by less than this (rad).
    noise : {"pooled", "local", "voxel"}
        Noise level from the residuals: one value (median over the mask), a local average, or each
        voxel's own residual with a quarter of the pooled level as floor.
    noise_sigma_mm : float
        Gaussian width (mm) of the local average for ``noise="local"``.
    voxel_size : 3 floats
        mm (for ``noise="local"`` and ``branch="spatial"``).
    branch : {"spatial", "start"}
        ``start``: Levenberg-Marquardt from the start (right when the start is within the main
        lobe of the cost, ~ +-pi / (E dTE), e.g. after exact unwrapping). ``spatial``: from the
        data's own echo-to-echo estimate, with the alias branch (multiples of ``2 pi / dTE``)
        taken from the start through a spatially unwrapped, smooth difference (module
        docstring); robust to a start with a smooth error of any size (Laplacian unwrapping).

    Returns
    -------
    dict
        ``field`` (float32 ppm), ``phi0`` (float32 rad in [-pi, pi), at TE = 0), ``noise_weight``
        (float32 1/ppm, inverse noise std of the field; 0 outside the mask or where undetermined),
        ``sigma`` (float32 map of the noise std per channel in magnitude units, the pooled value
        everywhere for ``pooled``), ``sigma_pooled`` (float), ``iterations`` (int), ``cost_ratio``
        (median final / initial cost over the fitted voxels), ``changed`` (fraction of voxels
        whose field moved by more than half the alias period ``pi / dTE`` from the start).
    """
    if noise not in NOISE_MODES:
        raise ParameterError(f"nonlinear_fit: noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    ph = np.asarray(phase, np.float32)
    mag = np.asarray(magnitude, np.float32)
    if ph.ndim == 3:
        ph = ph[..., None]
    if mag.ndim == 3:
        mag = mag[..., None]
    te = np.asarray(echo_times, np.float64).ravel()
    n_e = ph.shape[3]
    if te.size != n_e:
        raise InputDataError(f"nonlinear_fit: {te.size} echo times for {n_e} echoes; give one echo time (s) per echo")
    if mag.shape != ph.shape:
        raise InputDataError(f"nonlinear_fit: magnitude shape {mag.shape} differs from phase {ph.shape}")
    if n_e < 2:
        raise InputDataError("nonlinear_fit: fitting field and phase offset needs at least 2 echoes")
    grid = ph.shape[:3]
    m = np.ones(grid, bool) if mask is None else np.asarray(mask, bool)

    # 1. voxels of the mask: complex data, weights |S|^2 (scaled), centred/scaled echo times
    t0 = float(te.mean())
    ts = float(np.max(np.abs(te - t0))) or 1.0
    t = ((te - t0) / ts).astype(np.float32)
    mv = mag[m]
    scale = float(mv.max()) if mv.size and mv.max() > 0 else 1.0
    mv = mv / np.float32(scale)
    sig = mv * np.exp(1j * ph[m]).astype(np.complex64)
    w = (mv * mv).astype(np.float32)
    # 2. start: the linear fit, as (a, b) = (phase at t0, rad per unit t)
    k = GAMMA * float(field_strength) * 1e-6           # rad/s per ppm
    b = (np.asarray(init_field, np.float64)[m] * k * ts).astype(np.float32)
    a = (np.asarray(init_phi0, np.float64)[m] + b.astype(np.float64) * (t0 / ts)).astype(np.float32)
    b_start = b.copy()
    cost0 = _cost(w, _residual(sig, a, b, t))
    # 3. Levenberg-Marquardt (from the data's own estimate on the start's branch, or from the start)
    if branch == "spatial":
        a, b, iters0 = _spatial_branch(sig, w, t, te, ts, b, m, voxel_size, int(max_iter), float(tol))
    elif branch != "start":
        raise ParameterError(f"nonlinear_fit: branch must be spatial or start, got {branch!r}")
    else:
        iters0 = 0
    a, b, d, iters = _gauss_newton(sig, w, t, a, b, int(max_iter), float(tol))
    iters += iters0
    cost1 = _cost(w, d)
    # 4. noise from the residuals
    s0, s1, s2, det = _gn_system(w, t)
    ok = (s0 > 0) & (det > 1e-12 * np.maximum(s0 * s2, 1e-30))
    dof = n_e - 2
    sigma_map = np.zeros(grid, np.float32)
    if dof > 0 and ok.any():
        q = (w * np.sin(d) ** 2).sum(axis=1) / dof                      # sigma^2 per voxel (scaled units)
        pooled = float(np.median(q[ok])) * dof / _chi2_median(dof)
        if noise == "local" and pooled > 0:
            qv = np.zeros(grid, np.float32)
            qv[m] = np.where(ok, np.minimum(q, 10.0 * pooled), 0.0)
            wm = np.zeros(grid, np.float32)
            wm[m] = ok
            sg = [float(noise_sigma_mm) / float(v) for v in voxel_size]
            num = ndi.gaussian_filter(qv, sg, mode="nearest", truncate=3.0)
            den = ndi.gaussian_filter(wm, sg, mode="nearest", truncate=3.0)
            s2_vox = np.where(den[m] > 1e-6, num[m] / np.maximum(den[m], 1e-6), pooled)
        elif noise == "voxel":
            s2_vox = np.maximum(q, 0.25 * pooled)
        else:
            s2_vox = np.full(q.shape, pooled, np.float64)
        var_b = np.where(ok, s0 / np.where(ok, det, 1.0), np.inf) * s2_vox
        std_ppm = np.sqrt(var_b) / ts / k
        relative = False
    else:
        # no redundant echo: relative weights (median 1), as the linear fit
        pooled = float("nan")
        s2_vox = np.full(s0.shape, np.nan)
        std_ppm = np.sqrt(np.where(ok, s0 / np.where(ok, det, 1.0), np.inf)) / ts / k
        fin = np.isfinite(std_ppm)
        ref = float(np.median(std_ppm[fin])) if fin.any() else 1.0
        std_ppm = std_ppm / (ref if ref > 0 else 1.0)
        relative = True
    with np.errstate(divide="ignore"):
        nw_in = np.where(ok & np.isfinite(std_ppm) & (std_ppm > 0), 1.0 / std_ppm, 0.0)

    field = np.zeros(grid, np.float32)
    phi0 = np.zeros(grid, np.float32)
    nw = np.zeros(grid, np.float32)
    field[m] = np.where(ok, b / ts / k, 0.0)
    p0 = a.astype(np.float64) - b.astype(np.float64) * (t0 / ts)
    phi0[m] = np.where(ok, np.angle(np.exp(1j * p0)), 0.0)
    nw[m] = nw_in
    if not relative:
        sigma_map[m] = np.sqrt(np.maximum(s2_vox, 0.0)) * scale
    alias = np.pi / (float(np.min(np.diff(np.sort(te)))) or 1.0) if n_e > 1 else np.inf
    changed = float(np.mean(np.abs(b - b_start)[ok] / ts > alias)) if ok.any() else 0.0
    fitted = ok & (cost0 > 0)
    ratio = float(np.median(cost1[fitted] / cost0[fitted])) if fitted.any() else 1.0
    return {"field": field, "phi0": phi0, "noise_weight": nw, "sigma": sigma_map,
            "sigma_pooled": float(np.sqrt(pooled) * scale) if np.isfinite(pooled) else pooled,
            "iterations": int(iters), "cost_ratio": ratio, "changed": changed, "relative": relative}


def linear_start(unwrapped_phase: np.ndarray, magnitude: np.ndarray, echo_times: Sequence[float],
                 field_strength: float, mask: np.ndarray | None) -> dict:
    """The starting point: the magnitude^2-weighted linear fit of the unwrapped phase (:func:`weighted_fit`)."""
    return weighted_fit(unwrapped_phase, magnitude, echo_times, field_strength, mask, True, "magnitude_squared", True)
