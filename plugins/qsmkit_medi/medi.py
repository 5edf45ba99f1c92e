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
Jacobi-preconditioned conjugate gradients (``diag(D^T m^2 D) = d^2 * m^2`` with ``d`` the spatial
kernel), started at the minimiser of the quadratic model along the previous step (a one-vector
warm start). A backtracking safeguard halves the step if the cost would rise (not needed on the
phantoms: the IRLS model majorises the regulariser). Stop when ``||dchi|| / ||chi|| < tol`` or
after ``max_iter``. FFTs are real-to-complex (``rfftn``, 4 per CG iteration) on the mask's bounding
box, zero-padded by ``padding``; small grids (< 2^20 voxels) run with one CPU thread, which is
faster than two there (thread barriers dominate, badly so on a loaded machine).

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
import scipy.fft as sfft

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError, StageError
from qsmkit.physics import GAMMA_BAR, dipole_kernel, smv_kernel

from .masks import gradient_mask

#: field strength (T) and echo spacing (s) assumed when the data do not say
REFERENCE_FIELD_T = 3.0
REFERENCE_DELTA_TE_S = 5e-3
#: largest starting residual phase (rad) in the exponent (99.9th percentile of |f| maps to this)
MAX_START_PHASE = math.pi / 2
#: MERIT: residuals beyond this many standard deviations are down-weighted, with this power
MERIT_FACTOR = 6.0
MERIT_POWER = 2.0
#: grids (voxels) under this size run with one torch CPU thread
SINGLE_THREAD_VOXELS = 1 << 20


def phase_scale(field_strength: float | None = None, echo_times: Sequence[float] | None = None) -> tuple[float, str]:
    """Radians of phase per ppm of field accrued over the echo spacing, and where it came from.

    ``s_p = 2 pi * GAMMA_BAR * B0 * 1e-6 * dTE`` with ``dTE`` the echo spacing (multi-echo; the
    toolbox's ``delta_TE``) or the echo time (single echo). Missing values fall back to 3 T and 5 ms.
    """
    b0 = float(field_strength) if field_strength is not None else None
    te = None if echo_times is None else np.asarray(echo_times, dtype=np.float64).ravel()
    if te is not None and te.size >= 2:
        dte, src = float(np.median(np.diff(np.sort(te)))), "echo spacing"
    elif te is not None and te.size == 1:
        dte, src = float(te[0]), "echo time"
    else:
        dte, src = REFERENCE_DELTA_TE_S, "reference dTE"
    if not (dte > 0):
        raise InputDataError(f"echo times {te.tolist()} give a non-positive echo spacing; "
                             f"give echo_times in s, increasing")
    if b0 is None or not (b0 > 0):
        b0, src = REFERENCE_FIELD_T, src + ", reference 3 T"
    s = 2.0 * math.pi * GAMMA_BAR * b0 * 1e-6 * dte
    return s, f"{s:.3g} rad/ppm ({b0:g} T, {src} {dte * 1e3:.3g} ms)"


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


# --------------------------------------------------------------------------- helpers
def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    sl = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


def _fft_shape(box_shape, padding: float) -> tuple[int, ...]:
    """Each axis enlarged to ``ceil(n * padding)``, then to the next even 5-smooth size (fast FFTs)."""
    out = []
    for n in box_shape:
        k = sfft.next_fast_len(max(int(math.ceil(n * max(float(padding), 1.0) - 1e-9)), 2), real=True)
        while k % 2:
            k = sfft.next_fast_len(k + 1, real=True)
        out.append(k)
    return tuple(out)


def _rfft(x: np.ndarray) -> np.ndarray:
    return sfft.rfftn(x, workers=-1)


def _irfft(x: np.ndarray, shape) -> np.ndarray:
    return sfft.irfftn(x, s=shape, workers=-1).astype(np.float32)


def _normalised_weight(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = np.where(mask & np.isfinite(weight) & (weight > 0), weight, 0).astype(np.float32)
    mean = float(w[mask].mean()) if mask.any() else 0.0
    if not mean > 0:
        raise InputDataError("the data weights are zero everywhere in the mask; "
                             "check noise_weight (echo_combine output) or drop it")
    return w / np.float32(mean)


class _Ops:
    """Torch operators on the work grid: forward differences, their adjoint, dipole convolution."""

    def __init__(self, shape, dh, device):
        import torch

        self.torch = torch
        self.shape = tuple(shape)
        self.dh = dh                                   # real half-spectrum kernel (x, y, z//2+1)
        self.spec = torch.empty(dh.shape, dtype=torch.complex64, device=device)
        self.g = torch.zeros((3,) + self.shape, dtype=torch.float32, device=device)

    def diff(self, x, out=None):
        """Unscaled forward differences into ``out`` (3, ...); last slices stay 0."""
        torch = self.torch
        g = self.g if out is None else out
        torch.sub(x[1:], x[:-1], out=g[0, :-1])
        torch.sub(x[:, 1:], x[:, :-1], out=g[1, :, :-1])
        torch.sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, :-1])
        return g

    def diff_t(self, y, out):
        """Adjoint of :meth:`diff` applied to ``y`` (3, ...) whose last slices are 0; into ``out``."""
        torch = self.torch
        torch.neg(y[0], out=out)
        out[1:] += y[0, :-1]
        out -= y[1]
        out[:, 1:] += y[1, :, :-1]
        out -= y[2]
        out[:, :, 1:] += y[2, :, :, :-1]
        return out

    def dconv(self, x, kernel=None):
        """``real(ifft(K * fft(x)))`` with the dipole kernel (or ``kernel``, a half spectrum)."""
        torch = self.torch
        torch.fft.rfftn(x, out=self.spec)
        self.spec *= self.dh if kernel is None else kernel
        return torch.fft.irfftn(self.spec, s=self.shape)


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
        Edge mask size, toolbox convention (see :func:`~qsmkit_medi.masks.gradient_mask`).
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
    n_threads = torch.get_num_threads()
    m = np.asarray(mask) > 0
    work = 0.0
    if m.ndim == 3 and m.any():
        work = float(np.prod([s.stop - s.start for s in _bbox(m)])) * max(float(padding), 1.0) ** 3
    small = dev.type == "cpu" and n_threads > 1 and 0 < work < SINGLE_THREAD_VOXELS
    if small:  # thread start-up and barriers cost more than they gain on small grids
        torch.set_num_threads(1)
    try:
        return _medi(field, mask, voxel_size, b0_dir, **kw)
    finally:
        if small:
            torch.set_num_threads(n_threads)


def _medi(field, mask, voxel_size, b0_dir, *, magnitude, noise_weight, lam, edge_percentage, edge_mask,
          smv_radius_mm, merit, lambda_csf, csf_mask, field_strength, echo_times, max_iter, cg_max_iter,
          cg_tol, tol, epsilon, padding, device, log, callback) -> MediResult:
    import torch

    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f_full = np.asarray(field, dtype=np.float32)
    m_full = np.asarray(mask) > 0
    if f_full.ndim != 3 or m_full.shape != f_full.shape:
        raise InputDataError(f"field {f_full.shape} and mask {m_full.shape} must be the same 3D grid")
    if not m_full.any():
        raise StageError("the mask is empty (all zero); check the mask / background stage output")
    if not np.all(np.isfinite(f_full[m_full])):
        raise InputDataError("the local field has NaN/inf inside the mask; fix the background stage output")
    vs = tuple(float(v) for v in voxel_size)

    # ---- work grid: bounding box of the mask, zero-padded
    box = _bbox(m_full)
    box_shape = tuple(s.stop - s.start for s in box)
    shape = _fft_shape(box_shape, padding)

    def to_work(a: np.ndarray | None, dtype=np.float32):
        if a is None:
            return None
        return qfft.pad_center(np.ascontiguousarray(np.asarray(a)[box]).astype(dtype, copy=False), shape)

    mask_w = to_work(m_full, bool)
    f = np.where(mask_w, to_work(f_full), np.float32(0))
    if noise_weight is not None:
        nw = np.asarray(noise_weight, dtype=np.float32)
        if nw.shape != m_full.shape:
            raise InputDataError(f"noise_weight grid {nw.shape} differs from the field grid {m_full.shape}")
        sigma = np.zeros(shape, np.float32)
        w0 = to_work(nw)
        good = mask_w & np.isfinite(w0) & (w0 > 0)
        if not good.any():
            raise InputDataError("noise_weight is zero everywhere in the mask; "
                                 "check the echo_combine output or drop it")
        sigma[good] = 1.0 / w0[good]
        sigma[mask_w & ~good] = np.float32(sigma[good].max() * 1e3)  # unusable voxels: almost no weight
    else:
        sigma = mask_w.astype(np.float32)

    d_full = dipole_kernel(shape, vs, b0_dir)
    half = shape[2] // 2 + 1
    dh = np.ascontiguousarray(d_full[..., :half])
    del d_full

    # ---- SMV preprocessing
    sk = None
    if smv_radius_mm > 0:
        sk = np.ascontiguousarray(smv_kernel(shape, vs, smv_radius_mm)[..., :half])
        smv = lambda a: _irfft(_rfft(a) * sk, shape)  # noqa: E731
        mask_w = smv(mask_w.astype(np.float32)) > 0.999
        if not mask_w.any():
            raise StageError(f"smv_radius_mm = {smv_radius_mm:g} erodes the whole mask; use a smaller radius or 0")
        f = np.where(mask_w, f - smv(f), np.float32(0))
        dh = dh * (1.0 - sk)

    def data_weight(sig: np.ndarray) -> np.ndarray:
        if sk is not None:
            sig = np.sqrt(np.maximum(_irfft(_rfft(sig * sig) * sk, shape), 0) + sig * sig)
        w = np.zeros(shape, np.float32)
        ok = mask_w & (sig > 0)
        w[ok] = 1.0 / sig[ok]
        return _normalised_weight(w, mask_w)

    m_w = data_weight(sigma)

    # ---- edge mask M_G (1 = regularised)
    if edge_mask is not None:
        em = np.asarray(edge_mask)
        if em.shape != (3,) + m_full.shape:
            raise InputDataError(f"edge_mask must have shape (3,) + {m_full.shape}, got {em.shape}")
        gm = np.stack([qfft.pad_center(np.ascontiguousarray(em[k][box]).astype(np.float32), shape)
                       for k in range(3)])
        # outside the bounding box (padding) the given mask says nothing: regularise there
        inside = qfft.pad_center(np.ones(box_shape, np.float32), shape) > 0
        gm[:, ~inside] = 1.0
    elif edge_percentage > 0:
        if magnitude is None:
            raise InputDataError("MEDI needs the magnitude for its edge mask; "
                                 "give it, or use edge_percentage 0 (plain TV)")
        mag = np.asarray(magnitude)
        if mag.shape[:3] != m_full.shape or mag.ndim not in (3, 4):
            raise InputDataError(f"magnitude grid {mag.shape[:3]} differs from the field grid {m_full.shape}")
        if mag.ndim == 4:   # root sum of squares over echoes, on the bounding box only
            ss = np.zeros(box_shape, np.float32)
            for e in range(mag.shape[3]):
                ss += np.square(mag[box + (e,)], dtype=np.float32)
            mag_w = qfft.pad_center(np.sqrt(ss), shape)
            del ss
        else:
            mag_w = to_work(mag)
        gm = gradient_mask(mag_w, mask_w, vs, edge_percentage).astype(np.float32)
    else:
        gm = np.ones((3,) + shape, np.float32)
    gm[0, -1] = 0.0  # forward differences are 0 in the last slice
    gm[1, :, -1] = 0.0
    gm[2, :, :, -1] = 0.0

    # ---- CSF (MEDI+0)
    csf_w = None
    if lambda_csf > 0:
        if csf_mask is None:
            raise InputDataError("lambda_csf > 0 needs a CSF mask; give csf_mask or set lambda_csf 0")
        csf_w = to_work(np.asarray(csf_mask) > 0, bool) & mask_w
        if not csf_w.any():
            raise StageError("the CSF mask is empty inside the brain mask; give a csf_mask or set lambda_csf 0")

    # ---- scaling
    s_p, s_note = phase_scale(field_strength, echo_times)
    fin = np.abs(f[mask_w])
    q = float(np.quantile(fin, 0.999)) if fin.size else 0.0
    s = min(s_p, MAX_START_PHASE / q) if q > 0 else s_p
    big_lam = 2.0 * float(lam) * s_p
    mu = float(lambda_csf) * s_p
    eps = float(epsilon)
    say(f"grid {box_shape} -> FFT {shape}; phase scale {s_note}; exponent {s:.3g} rad/ppm; "
        f"data weight {'noise map' if noise_weight is not None else 'uniform'}; "
        f"edges {0 if gm.size == 0 else 100.0 * (1 - gm[:, mask_w].mean()):.0f}% of mask gradient components")

    # ---- to torch
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
    ops = _Ops(shape, T(dh), dev)
    f_t = T(f)
    m2 = T(m_w * m_w)
    inv_h2 = torch.tensor([1.0 / v ** 2 for v in vs], dtype=torch.float32, device=dev).view(3, 1, 1, 1)
    inv_h = inv_h2.sqrt()
    gm_t = T(gm)
    gm_h = gm_t * inv_h                               # edge mask / h, for |G d chi / h|
    csf_t = T(csf_w) if csf_w is not None else None
    mask_t = torch.from_numpy(mask_w).to(dev)
    n_csf = float(csf_w.sum()) if csf_w is not None else 0.0
    # spatial dipole kernel squared -> Jacobi diagonal of D^T m^2 D
    dspat = torch.fft.irfftn(ops.dh.to(torch.complex64), s=shape)
    d2h = torch.fft.rfftn(dspat * dspat).real.contiguous()
    del dspat

    def csf_proj(x):
        mean = torch.sum(x * csf_t, dtype=torch.float64) / n_csf
        return csf_t * (x - mean.to(torch.float32))

    def costs(x, dx_field):
        """(total, data, reg) at chi = x with D x = dx_field."""
        r = dx_field - f_t
        data = big_lam / s ** 2 * 2.0 * torch.sum(m2 * torch.sin(r * (0.5 * s)) ** 2, dtype=torch.float64)
        u = ops.diff(x).mul_(gm_h)
        u2 = u.mul_(u)
        reg = torch.sum(u2 / (torch.sqrt(u2 + eps * eps) + eps), dtype=torch.float64)
        tot = data + reg
        if csf_t is not None:
            tot = tot + 0.5 * mu * torch.sum(csf_proj(x) ** 2, dtype=torch.float64)
        return float(tot), float(data), float(reg)

    x = torch.zeros(shape, dtype=torch.float32, device=dev)
    prev_dx = None
    dx_field = torch.zeros_like(x)
    lam_m2 = m2 * big_lam
    diag_data = torch.fft.irfftn(torch.fft.rfftn(lam_m2) * d2h, s=shape)
    res = MediResult(chi=np.zeros(m_full.shape, np.float32), mask=np.zeros(m_full.shape, bool),
                     phase_scale=s_p, exponent_scale=s, work_shape=shape)
    e0 = costs(x, dx_field)
    res.cost.append(e0[0]), res.data_cost.append(e0[1]), res.reg_cost.append(e0[2])
    tmp = torch.empty_like(x)

    def apply_a(p, wgt, out):
        g = ops.diff(p).mul_(wgt)
        ops.diff_t(g, out)
        t = ops.dconv(p).mul_(lam_m2)
        out += ops.dconv(t)
        if csf_t is not None:
            out.add_(csf_proj(p), alpha=mu)
        return out

    for it in range(1, max_iter + 1):
        t_it = time.perf_counter()
        # IRLS weights W_k = G_k / (h_k^2 sqrt((G_k d_k chi / h_k)^2 + eps^2)), frozen for this step
        g = ops.diff(x)
        wgt = (g * gm_h).pow_(2).add_(eps * eps).rsqrt_().mul_(gm_t).mul_(inv_h2)
        # gradient b = sum_k d_k^T W_k d_k chi + (Lam/s) D^T(m^2 sin(s r)) + mu P chi
        b = torch.empty_like(x)
        ops.diff_t(g.mul_(wgt), b)
        r = (dx_field - f_t).mul_(s).sin_().mul_(m2).mul_(big_lam / s)
        b += ops.dconv(r)
        del r
        if csf_t is not None:
            b.add_(csf_proj(x), alpha=mu)
        # Jacobi preconditioner
        diag = wgt.sum(0)
        diag[1:] += wgt[0, :-1]
        diag[:, 1:] += wgt[1, :, :-1]
        diag[:, :, 1:] += wgt[2, :, :, :-1]
        diag += diag_data
        if csf_t is not None:
            diag.add_(csf_t, alpha=mu * (1.0 - 1.0 / n_csf))
        minv = diag.clamp_(min=float(diag.max()) * 1e-6).reciprocal_()
        del diag
        # PCG on A dx = -b
        rr = b.neg()
        del b
        bnorm = float(torch.linalg.vector_norm(rr))
        dx = torch.zeros_like(x)
        if prev_dx is not None:
            # start CG at the minimiser of the quadratic model along the previous step
            ad = apply_a(prev_dx, wgt, tmp)
            dad = float(torch.dot(prev_dx.ravel(), ad.ravel()))
            if dad > 0:
                c = float(torch.dot(rr.ravel(), prev_dx.ravel())) / dad
                dx.add_(prev_dx, alpha=c)
                rr.add_(ad, alpha=-c)
        z = rr * minv
        p = z.clone()
        rz = float(torch.dot(rr.ravel(), z.ravel()))
        k, rnorm = 0, bnorm
        while k < cg_max_iter and bnorm > 0:
            k += 1
            ap = apply_a(p, wgt, tmp)
            pap = float(torch.dot(p.ravel(), ap.ravel()))
            if not pap > 0:
                break
            alpha = rz / pap
            dx.add_(p, alpha=alpha)
            rr.add_(ap, alpha=-alpha)
            rnorm = float(torch.linalg.vector_norm(rr))
            if rnorm <= cg_tol * bnorm:
                break
            torch.mul(rr, minv, out=z)
            rz_new = float(torch.dot(rr.ravel(), z.ravel()))
            p.mul_(rz_new / rz).add_(z)
            rz = rz_new
        del z, p, rr, minv, wgt
        # safeguarded step
        ddx = ops.dconv(dx).clone()
        step, e_old, accepted = 1.0, res.cost[-1], None
        for _ in range(8):
            e_new = costs(x + step * dx, dx_field + step * ddx)
            if e_new[0] <= e_old:
                accepted = e_new
                break
            step *= 0.5
        if accepted is None:
            say(f"GN {it}: no decrease along the Gauss-Newton direction; stopping")
            res.converged = True
            break
        x.add_(dx, alpha=step)
        dx_field.add_(ddx, alpha=step)
        upd = step * float(torch.linalg.vector_norm(dx)) / max(float(torch.linalg.vector_norm(x)), 1e-30)
        prev_dx = dx
        del ddx
        res.cost.append(accepted[0]), res.data_cost.append(accepted[1]), res.reg_cost.append(accepted[2])
        res.update.append(upd), res.cg_iters.append(k), res.steps.append(step)
        res.cg_residual.append(rnorm / bnorm if bnorm > 0 else 0.0)
        res.n_iter = it
        say(f"GN {it}/{max_iter}: cost {accepted[0]:.6g} (data {accepted[1]:.6g}, reg {accepted[2]:.6g}) "
            f"update {upd:.3g} cg {k} (res {rnorm / max(bnorm, 1e-30):.2g}){'' if step == 1.0 else f' step {step:g}'} "
            f"({time.perf_counter() - t_it:.1f} s)")
        if merit:
            # MERIT (toolbox): complex residual w = m (e^{i s D chi} - e^{i s f}) minus its mean in the
            # mask; voxels with |w| > 6 std(|w|) get their noise std scaled by (|w| / 6 std)^2
            mt = torch.sqrt(m2)
            cres = torch.polar(mt, dx_field * s) - torch.polar(mt, f_t * s)
            cres -= cres[mask_t].mean()
            sd = float(cres[mask_t].abs().std())
            if sd > 0:
                ratio = (cres.abs() / (MERIT_FACTOR * sd)).clamp_(min=1.0).cpu().numpy()
                sigma = np.where(mask_w, sigma * ratio ** MERIT_POWER, sigma).astype(np.float32)
                m_w = data_weight(sigma)
                m2 = T(m_w * m_w)
                lam_m2 = m2 * big_lam
                diag_data = torch.fft.irfftn(torch.fft.rfftn(lam_m2) * d2h, s=shape)
                # the cost function changed with the weights: restate the current point's cost
                res.cost[-1], res.data_cost[-1], res.reg_cost[-1] = costs(x, dx_field)
            del cres, mt
        if callback is not None:
            cur = np.zeros(m_full.shape, np.float32)
            cur[box] = qfft.crop_center(x.cpu().numpy(), box_shape)
            callback(it, cur)
        if upd < tol:
            res.converged = True
            break

    chi_w = x.cpu().numpy()
    if csf_w is not None:
        chi_w = chi_w - np.float32(chi_w[csf_w].mean())
    out_mask = qfft.crop_center(mask_w, box_shape)
    chi = np.zeros(m_full.shape, np.float32)
    chi[box] = np.where(out_mask, qfft.crop_center(chi_w, box_shape), np.float32(0))
    res.chi = chi
    res.mask = np.zeros(m_full.shape, bool)
    res.mask[box] = out_mask
    if csf_w is not None:
        res.csf_mask = np.zeros(m_full.shape, bool)
        res.csf_mask[box] = qfft.crop_center(csf_w, box_shape)
    res.seconds = time.perf_counter() - t_start
    return res
