"""Preconditioned total field inversion (TFI): susceptibility of brain and background from the total field.

References: Z. Liu, Y. Kee, D. Zhou, Y. Wang, P. Spincemaille, "Preconditioned total field
inversion (TFI) method for quantitative susceptibility mapping", MRM 78 (2017) 303 and the
Cornell MEDI toolbox's ``TFI_L1.m``; Z. Liu et al., MRM 79 (2018) 2795 for the data weighting
conventions shared with MEDI. The code is written from the method, in torch.

Why: the two-step approach (background removal, then local field inversion) loses the part of
the brain's own field that is harmonic inside the mask (no background method can tell it from a
background field) and is biased next to strong sources outside the mask (air sinuses, bone).
TFI fits ONE susceptibility map, brain and background together, to the total field.

Problem (in ppm; ``f`` total field, ``D`` unit dipole convolution, ``chi = P y``, tissue = 0)::

    E(y, c) = (Lam / s^2) sum_i w_i^2 (1 - cos(s (D P y + f_air - f - c)_i))   ~ Lam/2 ||w (D chi + f_air - f - c)||^2
            + sum_k sum_i sqrt((G_k d_k P y)_i^2 + eps^2) - eps                   ~ ||M_G grad chi||_1

on the work grid: the bounding box of the support (head) mask plus ``margin_mm`` of air. Three
physical pieces:

* the air around the head is known: ``chi_air`` (9.4 ppm) relative to tissue outside the support.
  Its field ``f_air = -chi_air D 1_support`` (a uniform head in air) is computed once, zero-padded
  (:data:`AIR_PADDING`); so the fit starts from the bulk air/tissue field and does not have to
  build a 9.4 ppm region from nothing;
* ``y`` is free on the whole work grid: brain, scalp, skull and air sinuses inside the support,
  and a correction outside it (neck and body beyond the field of view, errors of the support mask);
* ``c`` is the field offset (B0 frequency offset, the constant that unwrapping leaves), solved in
  closed form after every step (the weighted circular mean of the residual) and projected out of
  the Gauss-Newton matrix.

``w`` is the data weight (the noise weight, normalised to mean 1 in the brain; zero where the
total field has no data: outside the support and where the noise weight is 0), ``G_k`` the binary
edge mask of the magnitude inside the support (:func:`qsmkit.operators.gradient_mask`, the
MEDI toolbox's convention), ``d_k`` forward differences in mm.

Preconditioner (the paper's point): ``P = 1`` in the brain mask and ``P = P_b`` (the paper's
fixed 30) everywhere else. ``chi = P y`` makes the large background susceptibilities (air +9.4
ppm, bone about -2 ppm relative to tissue) as cheap for conjugate gradients as the small brain
ones, so the CG iterations per Gauss-Newton step move both. ``p_background = 0`` chooses
``P_b`` from the total field (:func:`auto_preconditioner`). The Gauss-Newton matrix
``P (sum_k d_k^T W_k d_k + Lam D^T Pi^T w^2 Pi D) P`` (``Pi`` removes the weighted mean: the
offset) is solved by plain CG (a Jacobi preconditioner on top would undo ``P``; it also diverged
on the phantoms).

Scaling as MEDI (the toolbox's ``lambda`` means the same here): ``Lam = 2 lambda s_p`` with
``s_p = 2 pi GAMMA_BAR B0 1e-6 dTE`` (rad/ppm) the phase per ppm over the echo spacing (3 T and
5 ms when not given). The exponent uses ``s = min(s_p, pi/2 / q)``, ``q`` the 99.9th percentile
of ``|f|`` where there are data, so the starting residual never wraps: total fields reach
several ppm next to the sinuses, and the data term is then close to its quadratic form.

Solver: Gauss-Newton with IRLS weights ``W_k = G_k / (h_k^2 sqrt((G_k d_k chi / h_k)^2 + eps^2))``
frozen per step, CG warm-started along the previous step, a backtracking safeguard, stop when
``||dy|| / ||y|| < tol`` or after ``max_iter``. Output: ``chi = P y`` on the support, minus its mean
over the brain mask, zero outside the support.

Measured (true total field, chi NRMSE over the brain mask, both demeaned there; the simulator's
head with ``oversample=1``; ``benchmarks/bench_inversion.py``):

==========================  ==========  ====================  ===========  =====================
phantom                     MEDI (true  harmonic-free local   PDF + MEDI   TFI (defaults)
                            local)      field + MEDI
==========================  ==========  ====================  ===========  =====================
64^3 at 2.5 mm              8.5 %       44.1 %                47.0 %       17.0 % (78 s, 1 core)
112x128x96 at 1.5 mm        9.6 %       45.1 %                46.3 %       23.4 % (105 s, 630 MB)
180x216x180 at 1 mm         15.5 %      76.9 %                34.8 %       41.6 % (767 s, 2.1 GB)
==========================  ==========  ====================  ===========  =====================

(seconds on 2 cores shared with other jobs; ``cpu s`` in the benchmark's table is less load
sensitive.) On the two-compartment phantom of ``tests/plugins/test_tfi.py`` (40^3 at 3 mm):
PDF + MEDI 41 %, TFI 57 / 39 / 31 % after 9 / 20 / 30 Gauss-Newton steps of 30 CG iterations.
The map keeps improving with the total CG count (60 x 15 and 30 x 30 both reach 17 % on the 64^3
head: the CG residual stays at 0.5-0.9, the background's IRLS weights make the system badly
conditioned), hence the defaults 30 x 30 and a small ``tol``; that count is what TFI costs, and
at 1 mm it is not enough. Early stopping matters too: on the 64^3 head the error is lowest near
35 x 30 (12.5 %) and rises after (17.5 % at 40 x 30). ``P_b``: 15 / 30 / 45 / 60 give 37 / 17 /
29 / 37 % there. Tried and dropped: a Jacobi preconditioner (diverges: 96 %), ``epsilon = 1e-2``
(40 %), a coarse-to-fine start (2x block means, chi upsampled by repetition: 75 % against 23 % on
the 1.5 mm head; the upsampled background values at the brain edge would need a better
prolongation). The data must cover the head: with the field inside the brain only (as an echo
fit restricted to the brain mask gives) TFI fails (210 % on a 48^3 head at 3.5 mm, 24 % with the
field of the whole head).

These figures are on heads sampled on the inversion's own grid (``oversample=1``, which flatters
TFI); at the simulator's default oversampling 2 this solver gives 55.8 % (2 mm) and 47.2 % (1.5 mm,
48 s). The same model solved to convergence by ADMM is :mod:`qsmkit_tfi.admm` (``solver: admm``,
the stage's default since this solver is ``solver: gauss-newton``): 37.3 / 26.9 / 14.6 % on the
oversampled 2 / 1.5 / 1 mm heads (1 mm: 59 s, coarse to fine).

Building blocks are the core operators (:class:`~qsmkit.operators.Dipole`,
:class:`~qsmkit.operators.Gradient`, :func:`~qsmkit.operators.cg`,
:func:`~qsmkit.operators.padded_box`); :class:`TfiSystem` is the Gauss-Newton matrix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable, Sequence

import numpy as np

from qsmkit.errors import GeometryError, InputDataError, StageError
from qsmkit.operators import (Dipole, Gradient, Linop, backtrack, cg, combine_magnitude, gradient_mask,
                              line_warm_start, padded_box)
from qsmkit.physics import phase_scale
from qsmkit.threads import limited

#: largest starting residual phase (rad) in the exponent (the 99.9th percentile of |f| maps to this)
MAX_START_PHASE = math.pi / 2
#: susceptibility of air relative to tissue (water), ppm SI: the head is an object in air
CHI_AIR = 9.4
#: zero-padding factor of the one-off convolution that gives the field of the air around the head
AIR_PADDING = 1.5
#: the paper's fixed preconditioner value outside the brain
PAPER_P_BACKGROUND = 30.0
#: the automatic background preconditioner: scale of the field-amplitude ratio, and its bounds
AUTO_P_SCALE = 4.6
AUTO_P_RANGE = (10.0, 60.0)
#: grids (voxels) under this size run with one torch CPU thread (thread barriers cost more there)
SINGLE_THREAD_VOXELS = 1 << 20


@dataclass
class TfiResult:
    """Output of :func:`tfi`: the map and the solver's history (index 0 of ``cost`` = start)."""

    chi: np.ndarray
    support: np.ndarray
    p_background: float = 0.0
    cost: list = dc_field(default_factory=list)
    update: list = dc_field(default_factory=list)
    cg_iters: list = dc_field(default_factory=list)
    #: ADMM solver: the field offset (ppm) every 10 iterations
    offsets: list = dc_field(default_factory=list)
    #: ADMM ``offset: search``: the (offset ppm, brain TV) pairs tried
    offset_search: list = dc_field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    phase_scale: float = 0.0
    exponent_scale: float = 0.0
    work_shape: tuple = ()
    seconds: float = 0.0
    #: ``chi = P y`` on the input grid before masking and referencing (the work box; 0 beyond it)
    chi_unmasked: np.ndarray | None = None


# --------------------------------------------------------------------------- masks and weights
def head_mask(magnitude: np.ndarray, brain: np.ndarray, voxel_size: Sequence[float],
              threshold: float = 0.1, close_mm: float = 3.0) -> np.ndarray:
    """Support (head) mask from the magnitude: threshold, join, fill; always contains the brain.

    Voxels above ``threshold`` times the 99th percentile of the (echo-combined) magnitude, together
    with the brain mask, are closed morphologically by a ball of ``close_mm`` (joins scalp and brain
    across the dark skull), then enclosed holes are filled in 3D (skull, air sinuses, dark vessels).
    Components that do not touch the brain are dropped.

    Parameters
    ----------
    magnitude : ndarray, (x, y, z) or (x, y, z, echo)
        Magnitude (a.u.).
    brain : ndarray, (x, y, z)
        Brain mask (bool or 0/1).
    voxel_size : 3 floats
        Voxel size in mm.
    threshold : float
        Fraction of the magnitude's 99th percentile.
    close_mm : float
        Radius (mm) of the closing.

    Returns
    -------
    ndarray of bool
    """
    from scipy import ndimage

    mag = combine_magnitude(magnitude)
    b = np.asarray(brain) > 0
    if mag.shape != b.shape:
        raise GeometryError(f"magnitude grid {mag.shape} differs from the mask grid {b.shape}")
    sample = mag[::2, ::2, ::2]
    p99 = float(np.percentile(sample[sample > 0], 99)) if (sample > 0).any() else 0.0
    m = (mag > threshold * p99) | b
    r = [max(int(round(close_mm / float(v))), 0) for v in voxel_size]
    if max(r) > 0:
        zz = np.indices([2 * k + 1 for k in r], dtype=np.float32)
        ball = sum(((zz[a] - r[a]) * float(voxel_size[a])) ** 2 for a in range(3)) <= close_mm ** 2 + 1e-6
        pad = [(k + 1, k + 1) for k in r]
        m = ndimage.binary_closing(np.pad(m, pad), structure=ball)[tuple(slice(k + 1, -(k + 1)) for k in r)]
    m = ndimage.binary_fill_holes(m)
    lab, n = ndimage.label(m)
    if n > 1:
        keep = np.unique(lab[b & (lab > 0)])
        m = np.isin(lab, keep[keep > 0])
    return m | b


def auto_preconditioner(total_field: np.ndarray, brain: np.ndarray, data: np.ndarray) -> float:
    """``P_b`` from the data: the field's robust amplitude outside the brain over that inside it, scaled.

    The field of a susceptibility distribution scales with its amplitude; the total field next to
    air and bone (in the support, outside the brain) is larger than inside the brain by about the
    ratio of the susceptibilities there. The ratio ``a`` of the 95th percentiles of
    ``|f - median_brain(f)|`` over the data voxels outside and inside the brain gives
    ``P_b = AUTO_P_SCALE * a``, clipped to :data:`AUTO_P_RANGE`. The scale is calibrated on the
    simulator's head (``a`` = 6.5 there) to give the paper's 30, which is the best of 15 / 30 / 45 /
    60 on that phantom (chi NRMSE 37 / 17 / 29 / 37 % at 64^3, 2.5 mm): a heuristic, not the paper's.
    """
    f = np.asarray(total_field, np.float32)
    inside = f[brain]
    outside = f[data & ~brain]
    if inside.size == 0 or outside.size < 10:
        return PAPER_P_BACKGROUND
    off = float(np.median(inside))
    a_in = float(np.percentile(np.abs(inside - off), 95))
    a_out = float(np.percentile(np.abs(outside - off), 95))
    if not a_in > 0:
        return AUTO_P_RANGE[1]
    return float(np.clip(AUTO_P_SCALE * a_out / a_in, *AUTO_P_RANGE))


# --------------------------------------------------------------------------- the model
class _Model:
    """The TFI objective on the work grid (torch): costs, gradient, IRLS weights, field offset."""

    def __init__(self, f, w, gm, precond, vs, b0_dir, dev, *, s, big_lam, eps, f_air=None, padding=1.0):
        import torch

        self.torch, self.dev = torch, dev
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
        self.shape = f.shape
        self.s, self.big_lam, self.eps = s, big_lam, eps
        self.dipole = Dipole(self.shape, vs, b0_dir, padding=padding)   # zero-padded: no wrap-around
        self.grad = Gradient(self.shape)
        self.f_t, self.w2 = t(f), t(w * w)
        self.sum_w2 = float(torch.sum(self.w2, dtype=torch.float64))
        self.lam_w2 = self.w2 * big_lam
        self.p = t(precond)
        inv_h = torch.tensor([1.0 / v for v in vs], dtype=torch.float32, device=dev).view(3, 1, 1, 1)
        self.gm_t = t(gm)
        self.gm_h = self.gm_t * inv_h               # edge mask / h: |G d chi / h| in ppm/mm
        self.gm_h2 = self.gm_t * inv_h * inv_h
        self.g = torch.zeros((3,) + self.shape, dtype=torch.float32, device=dev)
        self.y = torch.zeros(self.shape, dtype=torch.float32, device=dev)
        self.field = t(f_air) if f_air is not None else torch.zeros_like(self.y)   # D P y + air field
        self.offset = 0.0
        self.tmp = torch.empty_like(self.y)

    def dconv(self, x):
        return self.dipole.apply(x)

    def wmean(self, x) -> float:
        """Mean of ``x`` weighted by ``w^2``."""
        return float(self.torch.sum(self.w2 * x, dtype=self.torch.float64)) / self.sum_w2

    def update_offset(self) -> None:
        """The field offset (B0 frequency offset, unwrapping constant) that best fits the data term:
        the ``w^2``-weighted circular mean of the residual phase, over ``s``."""
        torch, s = self.torch, self.s
        r = (self.field - self.f_t).mul_(s)
        re = float(torch.sum(self.w2 * torch.cos(r), dtype=torch.float64))
        im = float(torch.sum(self.w2 * torch.sin(r), dtype=torch.float64))
        self.offset = math.atan2(im, re) / s

    def costs(self, y, field):
        torch, s, eps = self.torch, self.s, self.eps
        r = field - self.f_t - self.offset
        data = self.big_lam / s ** 2 * 2.0 * torch.sum(self.w2 * torch.sin(r * (0.5 * s)) ** 2, dtype=torch.float64)
        u = self.grad.apply(y * self.p, out=self.g).mul_(self.gm_h)
        u2 = u.mul_(u)
        reg = torch.sum(u2 / (torch.sqrt(u2 + eps * eps) + eps), dtype=torch.float64)
        return float(data + reg), float(data), float(reg)

    def data_normal(self, u):
        """``Lam D^T Pi^T w^2 Pi D u``: the data term's Gauss-Newton matrix with the offset projected out
        (``Pi`` removes the ``w^2``-weighted mean)."""
        du = self.dconv(u)
        du -= self.wmean(du)
        return self.dconv(du.mul_(self.lam_w2))

    def linearise(self):
        """IRLS weights (frozen for this step) and the gradient of E with respect to y."""
        torch, s = self.torch, self.s
        chi = self.y * self.p
        g = self.grad.apply(chi, out=self.g)
        wgt = (g * self.gm_h).pow_(2).add_(self.eps * self.eps).rsqrt_().mul_(self.gm_h2)
        b = torch.empty_like(chi)
        self.grad.adjoint(g.mul_(wgt), out=b)
        r = (self.field - self.f_t - self.offset).mul_(s).sin_().mul_(self.w2).mul_(self.big_lam / s)
        b += self.dconv(r)
        return wgt, b.mul_(self.p)


class TfiSystem(Linop):
    """The Gauss-Newton / IRLS matrix of TFI: ``A = P (sum_k d_k^T W_k d_k + Lam D^T w^2 D) P``.

    Self-adjoint positive semi-definite on the work grid (torch); ``P`` the diagonal
    preconditioner, ``W_k`` frozen IRLS weights, ``d_k`` unscaled forward differences
    (:class:`~qsmkit.operators.Gradient`), ``D`` the dipole convolution
    (:class:`~qsmkit.operators.Dipole`), ``w`` the data weight. numpy input gives numpy output.
    """

    def __init__(self, model: _Model, wgt):
        super().__init__(model.shape, model.shape, np.float32)
        self.model, self.wgt = model, wgt

    def apply(self, v):
        md = self.model
        torch = md.torch
        if not torch.is_tensor(v):
            return self.apply(torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(md.dev)).cpu().numpy()
        u = v * md.p
        out = torch.empty_like(u)
        md.grad.adjoint(md.grad.apply(u, out=md.g).mul_(self.wgt), out=out)
        out += md.data_normal(u)
        return out.mul_(md.p)

    def adjoint(self, y):
        return self.apply(y)

    @classmethod
    def examples(cls):
        try:
            import torch
        except ImportError:  # pragma: no cover
            return []
        rng = np.random.default_rng(11)
        shape, vs = (8, 6, 7), (1.0, 0.9, 1.2)
        f = rng.standard_normal(shape).astype(np.float32) * 0.05
        w = rng.random(shape).astype(np.float32)
        gm = (rng.random((3,) + shape) > 0.3).astype(np.float32)
        pre = np.where(rng.random(shape) > 0.5, 1.0, 30.0).astype(np.float32)
        md = _Model(f, w, gm, pre, vs, (0.1, 0.3, 1.0), torch.device("cpu"), s=2.0, big_lam=20.0, eps=1e-3)
        md.y = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.01)
        wgt, _ = md.linearise()
        return [cls(md, wgt)]


# --------------------------------------------------------------------------- main function
def tfi(total_field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
        support: np.ndarray | None = None, magnitude: np.ndarray | None = None,
        noise_weight: np.ndarray | None = None, *, lam: float = 1000.0, edge_percentage: float = 0.9,
        p_background: float = PAPER_P_BACKGROUND, field_strength: float | None = None,
        echo_times: Sequence[float] | None = None, max_iter: int = 30, cg_max_iter: int = 30,
        cg_tol: float = 0.01, tol: float = 0.001, epsilon: float = 1e-3, margin_mm: float = 10.0,
        chi_air: float = CHI_AIR, padding: float = 1.0, device=None, log: Callable[[str], None] | None = None,
        callback: Callable[[int, np.ndarray], None] | None = None) -> TfiResult:
    """Preconditioned total field inversion (Liu et al. 2017): chi of brain and background from the total field.

    Parameters
    ----------
    total_field : ndarray, (x, y, z)
        Total (unwrapped, echo-combined) field in ppm of B0, no background removal.
    mask : ndarray, (x, y, z)
        Brain mask (bool or 0/1): ``P = 1`` there; chi is referenced to its mean there.
    voxel_size : 3 floats
        Voxel size in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    support : ndarray, (x, y, z), optional
        Support (head) mask, larger than the brain: where the total field has data and chi is
        returned. Default: :func:`head_mask` of the magnitude.
    magnitude : ndarray, (x, y, z) or (x, y, z, echo), optional
        Magnitude (a.u.) for the edge mask and the default support; needed unless ``support`` is
        given and ``edge_percentage`` is 0.
    noise_weight : ndarray, (x, y, z), optional
        Inverse noise std of the field (1/ppm); 0 where the field has no data. Normalised to mean
        1 in the brain. ``None``: the magnitude (field noise ~ 1 / magnitude), or uniform in the
        support without a magnitude.
    lam : float
        Data weight ``lambda`` (MEDI toolbox scale, dimensionless).
    edge_percentage : float
        Edge mask size (toolbox convention; see :func:`qsmkit.operators.gradient_mask`); 0 = plain TV.
    p_background : float
        Preconditioner value outside the brain (the paper's 30); 0 = automatic
        (:func:`auto_preconditioner`).
    field_strength, echo_times : optional
        B0 (T) and echo times (s), for the phase scale of the data term.
    max_iter, cg_max_iter : int
        Gauss-Newton iterations and CG iterations per step.
    cg_tol, tol : float
        CG relative residual tolerance; Gauss-Newton stops when ``||dy|| / ||y|| < tol``.
    epsilon : float
        Smoothing of the L1 norm, ppm/mm.
    margin_mm : float
        Air around the support's bounding box in the work grid, mm: room for the free background
        correction outside the head.
    chi_air : float
        Susceptibility (ppm) of the air around the head relative to tissue (the support's outside is
        fixed at this value; 0 = no air term, e.g. for a phantom in water).
    padding : float
        Zero-padding factor of the work grid's FFTs (1 = periodic on the work grid).
    device : torch.device or str, optional
        Torch device (default CPU).
    log : callable, optional
        Receives one progress line per Gauss-Newton iteration.
    callback : callable, optional
        ``callback(iteration, chi)`` after each Gauss-Newton iteration, with the current ``chi = P y``
        on the input grid (ppm, not yet masked or referenced), e.g. to monitor convergence.

    Returns
    -------
    TfiResult
        ``chi`` (float32, ppm, zero outside ``support``, brain mean 0) and the solver history.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    sup = None if support is None else np.asarray(support) > 0
    n_work = float(sup.sum()) * 1.6 if sup is not None else float(np.prod(np.shape(total_field)))
    small = dev.type == "cpu" and n_work < SINGLE_THREAD_VOXELS
    with limited(1 if small else None):  # small grids: one thread (qsmkit.threads)
        return _tfi(total_field, mask, voxel_size, b0_dir, support, magnitude, noise_weight, lam=lam,
                    edge_percentage=edge_percentage, p_background=p_background, field_strength=field_strength,
                    echo_times=echo_times, max_iter=max_iter, cg_max_iter=cg_max_iter, cg_tol=cg_tol, tol=tol,
                    epsilon=epsilon, margin_mm=margin_mm, chi_air=chi_air, padding=padding, dev=dev,
                    say=log or (lambda msg: None), callback=callback)


def _checked_inputs(total_field, mask, support, magnitude, noise_weight, voxel_size, edge_percentage):
    """Step 1: arrays checked and converted; the support derived when not given."""
    f = np.asarray(total_field, dtype=np.float32)
    if f.ndim == 4 and f.shape[3] == 1:
        f = f[..., 0]
    brain = np.asarray(mask) > 0
    if f.ndim != 3 or brain.shape != f.shape:
        raise GeometryError(f"total field {f.shape} and mask {brain.shape} must be one 3D grid")
    if not brain.any():
        raise StageError("the brain mask is empty (all zero); check the mask stage or mask file")
    mag = None
    if magnitude is not None:
        mag = combine_magnitude(magnitude)
        if mag.shape != f.shape:
            raise GeometryError(f"magnitude grid {np.shape(magnitude)[:3]} differs from the total field grid {f.shape}")
    if support is None:
        if mag is None:
            raise InputDataError("TFI needs a support (head) mask or a magnitude to derive one from; give "
                                 "head_mask or magnitude")
        sup, derived = head_mask(mag, brain, voxel_size), True
    else:
        sup, derived = np.asarray(support) > 0, False
        if sup.shape != f.shape:
            raise GeometryError(f"support (head) mask grid {sup.shape} differs from the total field grid {f.shape}")
        outside = int((brain & ~sup).sum())
        if outside:
            raise InputDataError(f"the support (head) mask misses {outside} voxels of the brain mask; it must "
                                 f"contain the brain (give a head mask larger than the brain, or leave it out to "
                                 f"derive it from the magnitude)")
    if edge_percentage > 0 and mag is None:
        raise InputDataError("TFI needs the magnitude for its edge mask; give it, or set edge_percentage 0 "
                             "(plain TV)")
    if noise_weight is not None:
        nw = np.asarray(noise_weight, dtype=np.float32)
        if nw.ndim == 4 and nw.shape[3] == 1:
            nw = nw[..., 0]
        if nw.shape != f.shape:
            raise GeometryError(f"noise_weight grid {nw.shape} differs from the total field grid {f.shape}")
        data = sup & np.isfinite(nw) & (nw > 0)
        w = np.where(data, nw, np.float32(0))
    elif mag is not None:
        data = sup & (mag > 0)
        w = np.where(data, mag, np.float32(0))
    else:
        data = sup.copy()
        w = data.astype(np.float32)
    data &= np.isfinite(f)
    if not np.all(np.isfinite(f[brain])):
        raise InputDataError("the total field has NaN/inf inside the brain mask; fix the echo_combine output")
    if not data[brain].any():
        raise InputDataError("the data weights are zero everywhere in the brain mask; check noise_weight")
    w = np.where(data, w, np.float32(0)).astype(np.float32)
    w /= np.float32(w[brain].mean())
    return f, brain, sup, derived, mag, w, data


def _tfi(total_field, mask, voxel_size, b0_dir, support, magnitude, noise_weight, *, lam, edge_percentage,
         p_background, field_strength, echo_times, max_iter, cg_max_iter, cg_tol, tol, epsilon, margin_mm, chi_air,
         padding, dev, say, callback) -> TfiResult:
    t0 = time.perf_counter()
    vs = tuple(float(v) for v in voxel_size)
    f, brain, sup, derived, mag, w, data = _checked_inputs(total_field, mask, support, magnitude, noise_weight,
                                                           vs, edge_percentage)
    # step 2: the work grid (support's box + air margin) and everything on it
    pb = padded_box(sup, [int(math.ceil(margin_mm / v)) for v in vs])
    f_w = pb.embed(np.where(data, f, np.float32(0)))
    w_w = pb.embed(w)
    brain_w = pb.embed(brain, bool)
    sup_w = pb.embed(sup, bool)
    gm = gradient_mask(pb.embed(mag) if mag is not None else sup_w, sup_w, vs, edge_percentage
                       if mag is not None else 0.0).astype(np.float32)
    gm[0, -1] = 0.0
    gm[1, :, -1] = 0.0
    gm[2, :, :, -1] = 0.0
    # step 3: preconditioner and scaling
    p_b = float(p_background) if p_background > 0 else auto_preconditioner(f, brain, data)
    precond = np.where(brain_w, np.float32(1.0), np.float32(p_b))
    f_air = None
    if chi_air != 0:   # the air around the head (outside the support), fixed: chi_air relative to tissue
        f_air = Dipole(pb.shape, vs, b0_dir, padding=AIR_PADDING).apply(sup_w.astype(np.float32))
        f_air *= np.float32(-chi_air)
    s_p, s_note = phase_scale(field_strength, echo_times)
    q = float(np.quantile(np.abs(f[data]), 0.999)) if data.any() else 0.0
    s = min(s_p, MAX_START_PHASE / q) if q > 0 else s_p
    say(f"work grid {pb.shape} (support {int(sup.sum())} voxels{', from the magnitude' if derived else ''}, "
        f"data {int(data.sum())}, brain {int(brain.sum())}); P_b {p_b:.3g}{' (automatic)' if p_background <= 0 else ''}; "
        f"phase scale {s_note}; exponent {s:.3g} rad/ppm")
    model = _Model(f_w, w_w, gm, precond, vs, b0_dir, dev, s=s, big_lam=2.0 * float(lam) * s_p,
                   eps=float(epsilon), f_air=f_air, padding=padding)
    del f_air, gm
    res = TfiResult(chi=np.zeros(f.shape, np.float32), support=sup, p_background=p_b, phase_scale=s_p,
                    exponent_scale=s, work_shape=pb.shape)
    # step 4: Gauss-Newton
    cb = None if callback is None else (lambda it: callback(it, pb.uncrop((model.y * model.p).cpu().numpy())))
    _gauss_newton(model, res, max_iter=max_iter, cg_max_iter=cg_max_iter, cg_tol=cg_tol, tol=tol, say=say,
                  callback=cb)
    # step 5: chi = P y on the support, referenced to the brain mean
    chi_w = (model.y * model.p).cpu().numpy()
    res.chi_unmasked = pb.uncrop(chi_w)
    chi_w -= np.float32(chi_w[brain_w].mean())
    res.chi = pb.uncrop(np.where(sup_w, chi_w, np.float32(0)))
    res.seconds = time.perf_counter() - t0
    return res


def _gauss_newton(model: _Model, res: TfiResult, *, max_iter, cg_max_iter, cg_tol, tol, say, callback=None) -> None:
    torch = model.torch
    model.update_offset()
    res.cost.append(model.costs(model.y, model.field)[0])
    prev = None
    for it in range(1, int(max_iter) + 1):
        t_it = time.perf_counter()
        wgt, b = model.linearise()
        system = TfiSystem(model, wgt)
        rhs = b.neg_()
        x0, r0 = line_warm_start(system, rhs, prev)   # the quadratic model's minimiser along the last step
        dy, info = cg(system, rhs, x0, tol=cg_tol, max_iter=cg_max_iter, r0=r0)
        del rhs, x0, r0, system, wgt
        dfield = model.dconv(dy * model.p).clone()
        step, accepted = backtrack(lambda s: model.costs(model.y + s * dy, model.field + s * dfield), res.cost[-1])
        if accepted is None:
            say(f"GN {it}: no decrease along the Gauss-Newton direction; stopping")
            res.converged = True
            break
        model.y.add_(dy, alpha=step)
        model.field.add_(dfield, alpha=step)
        model.update_offset()        # lowers the cost further: the offset is a free parameter
        accepted = model.costs(model.y, model.field)
        upd = step * float(torch.linalg.vector_norm(dy)) / max(float(torch.linalg.vector_norm(model.y)), 1e-30)
        prev = dy
        res.cost.append(accepted[0])
        res.update.append(upd)
        res.cg_iters.append(info.iterations)
        res.n_iter = it
        say(f"GN {it}/{max_iter}: cost {accepted[0]:.6g} (data {accepted[1]:.6g}, reg {accepted[2]:.6g}) "
            f"offset {model.offset:.4g} ppm update {upd:.3g} cg {info.iterations} (res {float(info.relative_residual):.2g})"
            f"{'' if step == 1.0 else f' step {step:g}'} ({time.perf_counter() - t_it:.1f} s)")
        if callback is not None:
            callback(it)
        if upd < tol:
            res.converged = True
            break
