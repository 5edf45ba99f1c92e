"""The MEDI solver on the work grid: operators, objective, Gauss-Newton matrix and iterations.

Used by :func:`qsmkit_medi.medi.medi` (see its module docstring for the method). The work grid
is the mask's bounding box, zero-padded (:class:`_WorkGrid`); :class:`_MediModel` holds the
objective in torch (costs, gradient, IRLS weights, Jacobi diagonal); :class:`MediSystem` is the
Gauss-Newton matrix as a core :class:`~qsmkit.operators.Linop`, solved by the core
:func:`~qsmkit.operators.cg` in :func:`_newton_step`; :func:`_gauss_newton` runs the outer loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError, StageError
from qsmkit.progress import progress
from qsmkit.operators import (SMV, Diagonal, Dipole, FourierMultiplier, Gradient, Linop, backtrack, bounding_box,
                              cg, gradient_mask, line_warm_start)


#: MERIT: residuals beyond this many standard deviations are down-weighted, with this power
MERIT_FACTOR = 6.0
MERIT_POWER = 2.0


# --------------------------------------------------------------------------- helpers
def _fft_shape(box_shape, padding: float) -> tuple[int, ...]:
    """Each axis enlarged to ``ceil(n * padding)``, then to the next even 5-smooth size (fast FFTs)."""
    out = []
    for n in box_shape:
        k = sfft.next_fast_len(max(int(math.ceil(n * max(float(padding), 1.0) - 1e-9)), 2), real=True)
        while k % 2:
            k = sfft.next_fast_len(k + 1, real=True)
        out.append(k)
    return tuple(out)


def _normalised_weight(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = np.where(mask & np.isfinite(weight) & (weight > 0), weight, 0).astype(np.float32)
    mean = float(w[mask].mean()) if mask.any() else 0.0
    if not mean > 0:
        raise InputDataError("the data weights are zero everywhere in the mask; "
                             "check noise_weight (echo_combine output) or drop it")
    return w / np.float32(mean)


class _Ops:
    """The work-grid operators as one bundle: unscaled forward differences and the dipole convolution.

    Thin layer over the core :class:`~qsmkit.operators.Gradient` (``diff`` / ``diff_t``, into a
    reused buffer) and :class:`~qsmkit.operators.FourierMultiplier` (``dconv``; the kernel is the
    real half spectrum ``dh``).
    """

    def __init__(self, shape, dh, device):
        import torch

        self.shape = tuple(shape)
        self.dh = dh
        self.grad = Gradient(self.shape)
        self.dipole = dh if isinstance(dh, FourierMultiplier) else FourierMultiplier(self.shape, dh)
        self.g = torch.zeros((3,) + self.shape, dtype=torch.float32, device=device)

    def diff(self, x, out=None):
        """Unscaled forward differences into ``out`` (3, ...) (a reused buffer by default); last slices 0."""
        return self.grad.apply(x, out=self.g if out is None else out)

    def diff_t(self, y, out):
        """Adjoint of :meth:`diff` applied to ``y`` (3, ...), into ``out``."""
        return self.grad.adjoint(y, out=out)

    def dconv(self, x, kernel=None):
        """``real(ifft(K * fft(x)))`` with the dipole kernel (or ``kernel``, a half spectrum)."""
        return self.dipole.apply(x) if kernel is None else self.dipole.filter(x, kernel)


# --------------------------------------------------------------------------- work grid and problem
class _WorkGrid:
    """The work grid: the mask's bounding box, zero-padded (centred) to an FFT-friendly shape."""

    def __init__(self, m_full: np.ndarray, padding: float):
        self.full_shape = m_full.shape
        self.box = bounding_box(m_full)
        self.box_shape = tuple(s.stop - s.start for s in self.box)
        self.shape = _fft_shape(self.box_shape, padding)
        self.mask_w = self.to_work(m_full, bool)

    def to_work(self, a: np.ndarray | None, dtype=np.float32):
        if a is None:
            return None
        return qfft.pad_center(np.ascontiguousarray(np.asarray(a)[self.box]).astype(dtype, copy=False), self.shape)

    def to_full(self, a: np.ndarray, cropped: bool = False, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.full_shape, dtype)
        out[self.box] = a if cropped else qfft.crop_center(a, self.box_shape)
        return out


@dataclass
class _WorkProblem:
    """Field, mask, noise std and operators on the work grid (numpy), after any SMV preprocessing."""

    vs: tuple
    f: np.ndarray
    mask_w: np.ndarray
    sigma: np.ndarray
    dipole: FourierMultiplier        # D, or (1 - S) D with SMV preprocessing
    smv: SMV | None

    def data_weight(self, sig: np.ndarray) -> np.ndarray:
        """Normalised data weight ``m = 1 / sigma`` (SMV-propagated noise with preprocessing)."""
        if self.smv is not None:
            sig = np.sqrt(np.maximum(self.smv.apply(sig * sig), 0) + sig * sig)
        w = np.zeros(sig.shape, np.float32)
        ok = self.mask_w & (sig > 0)
        w[ok] = 1.0 / sig[ok]
        return _normalised_weight(w, self.mask_w)


def _work_problem(grid: _WorkGrid, f_full, voxel_size, b0_dir, noise_weight, smv_radius_mm) -> _WorkProblem:
    shape = grid.shape
    vs = tuple(float(v) for v in voxel_size)
    mask_w = grid.mask_w
    f = np.where(mask_w, grid.to_work(f_full), np.float32(0))
    if noise_weight is not None:
        nw = np.asarray(noise_weight, dtype=np.float32)
        if nw.shape != grid.full_shape:
            raise InputDataError(f"noise_weight grid {nw.shape} differs from the field grid {grid.full_shape}")
        sigma = np.zeros(shape, np.float32)
        w0 = grid.to_work(nw)
        good = mask_w & np.isfinite(w0) & (w0 > 0)
        if not good.any():
            raise InputDataError("noise_weight is zero everywhere in the mask; "
                                 "check the echo_combine output or drop it")
        sigma[good] = 1.0 / w0[good]
        sigma[mask_w & ~good] = np.float32(sigma[good].max() * 1e3)  # unusable voxels: almost no weight
    else:
        sigma = mask_w.astype(np.float32)
    dipole = Dipole(shape, vs, b0_dir, padding=1.0)
    smv = None
    if smv_radius_mm > 0:   # SMV preprocessing: D <- (1 - S) D, f <- f - S f, mask eroded
        smv = SMV(shape, vs, smv_radius_mm)
        mask_w = smv.apply(mask_w.astype(np.float32)) > 0.999
        if not mask_w.any():
            raise StageError(f"smv_radius_mm = {smv_radius_mm:g} erodes the whole mask; use a smaller radius or 0")
        f = np.where(mask_w, f - smv.apply(f), np.float32(0))
        dipole = smv.complement() @ dipole
    return _WorkProblem(vs, f, mask_w, sigma, dipole, smv)


def _edge_mask(grid: _WorkGrid, mask_w, vs, magnitude, edge_mask, edge_percentage) -> np.ndarray:
    """``M_G`` on the work grid (3, ...), float32, 1 = regularised; 0 in the last slices."""
    shape = grid.shape
    if edge_mask is not None:
        em = np.asarray(edge_mask)
        if em.shape != (3,) + grid.full_shape:
            raise InputDataError(f"edge_mask must have shape (3,) + {grid.full_shape}, got {em.shape}")
        gm = np.stack([grid.to_work(em[k], np.float32) for k in range(3)])
        # outside the bounding box (padding) the given mask says nothing: regularise there
        inside = qfft.pad_center(np.ones(grid.box_shape, np.float32), shape) > 0
        gm[:, ~inside] = 1.0
    elif edge_percentage > 0:
        if magnitude is None:
            raise InputDataError("MEDI needs the magnitude for its edge mask; "
                                 "give it, or use edge_percentage 0 (plain TV)")
        mag = np.asarray(magnitude)
        if mag.shape[:3] != grid.full_shape or mag.ndim not in (3, 4):
            raise InputDataError(f"magnitude grid {mag.shape[:3]} differs from the field grid {grid.full_shape}")
        if mag.ndim == 4:   # root sum of squares over echoes, on the bounding box only
            ss = np.zeros(grid.box_shape, np.float32)
            for e in range(mag.shape[3]):
                ss += np.square(mag[grid.box + (e,)], dtype=np.float32)
            mag_w = qfft.pad_center(np.sqrt(ss), shape)
            del ss
        else:
            mag_w = grid.to_work(mag)
        gm = gradient_mask(mag_w, mask_w, vs, edge_percentage).astype(np.float32)
    else:
        gm = np.ones((3,) + shape, np.float32)
    gm[0, -1] = 0.0  # forward differences are 0 in the last slice
    gm[1, :, -1] = 0.0
    gm[2, :, :, -1] = 0.0
    return gm


class _MediModel:
    """The MEDI objective on the work grid in torch: costs, gradient, IRLS weights, Jacobi diagonal."""

    def __init__(self, prob: _WorkProblem, gm: np.ndarray, csf_w, dev, *, s, big_lam, mu, eps):
        import torch

        self.torch = torch
        self.prob, self.dev = prob, dev
        self.s, self.big_lam, self.mu, self.eps = s, big_lam, mu, eps
        self.T = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
        self.shape = prob.f.shape
        self.ops = _Ops(self.shape, prob.dipole, dev)
        self.f_t = self.T(prob.f)
        inv_h2 = torch.tensor([1.0 / v ** 2 for v in prob.vs], dtype=torch.float32, device=dev).view(3, 1, 1, 1)
        self.inv_h2 = inv_h2
        self.gm_t = self.T(gm)
        self.gm_h = self.gm_t * inv_h2.sqrt()              # edge mask / h, for |G d chi / h|
        self.csf_t = self.T(csf_w) if csf_w is not None else None
        self.n_csf = float(csf_w.sum()) if csf_w is not None else 0.0
        self.mask_t = torch.from_numpy(prob.mask_w).to(dev)
        self.sigma = prob.sigma
        self.set_weights(prob.data_weight(prob.sigma))
        self.x = torch.zeros(self.shape, dtype=torch.float32, device=dev)
        self.dx_field = torch.zeros_like(self.x)
        self.tmp = torch.empty_like(self.x)

    def set_weights(self, m_w: np.ndarray) -> None:
        """Data weights ``m`` (normalised): ``Lam m^2`` and the Jacobi diagonal of ``Lam D^T m^2 D``."""
        self.m2 = self.T(m_w * m_w)
        self.lam_m2 = self.m2 * self.big_lam
        self.diag_data = self.ops.dipole.normal_diagonal(self.lam_m2)

    def csf_proj(self, x):
        mean = self.torch.sum(x * self.csf_t, dtype=self.torch.float64) / self.n_csf
        return self.csf_t * (x - mean.to(self.torch.float32))

    def costs(self, x, dx_field):
        """(total, data, reg) at chi = x with D x = dx_field."""
        torch, s, eps = self.torch, self.s, self.eps
        r = dx_field - self.f_t
        data = self.big_lam / s ** 2 * 2.0 * torch.sum(self.m2 * torch.sin(r * (0.5 * s)) ** 2, dtype=torch.float64)
        u = self.ops.diff(x).mul_(self.gm_h)
        u2 = u.mul_(u)
        reg = torch.sum(u2 / (torch.sqrt(u2 + eps * eps) + eps), dtype=torch.float64)
        tot = data + reg
        if self.csf_t is not None:
            tot = tot + 0.5 * self.mu * torch.sum(self.csf_proj(x) ** 2, dtype=torch.float64)
        return float(tot), float(data), float(reg)

    def linearise(self):
        """IRLS weights ``W_k`` (frozen for this step), the gradient ``b`` of E and the Jacobi diagonal inverse."""
        ops, s, x = self.ops, self.s, self.x
        # W_k = G_k / (h_k^2 sqrt((G_k d_k chi / h_k)^2 + eps^2))
        g = ops.diff(x)
        wgt = (g * self.gm_h).pow_(2).add_(self.eps * self.eps).rsqrt_().mul_(self.gm_t).mul_(self.inv_h2)
        # b = sum_k d_k^T W_k d_k chi + (Lam/s) D^T(m^2 sin(s r)) + mu P chi
        b = self.torch.empty_like(x)
        ops.diff_t(g.mul_(wgt), b)
        r = (self.dx_field - self.f_t).mul_(s).sin_().mul_(self.m2).mul_(self.big_lam / s)
        b += ops.dconv(r)
        del r
        if self.csf_t is not None:
            b.add_(self.csf_proj(x), alpha=self.mu)
        diag = wgt.sum(0)
        diag[1:] += wgt[0, :-1]
        diag[:, 1:] += wgt[1, :, :-1]
        diag[:, :, 1:] += wgt[2, :, :, :-1]
        diag += self.diag_data
        if self.csf_t is not None:
            diag.add_(self.csf_t, alpha=self.mu * (1.0 - 1.0 / self.n_csf))
        minv = diag.clamp_(min=float(diag.max()) * 1e-6).reciprocal_()
        return wgt, b, minv

    def merit_update(self) -> None:
        """MERIT (toolbox): down-weight voxels whose complex residual exceeds 6 standard deviations."""
        torch, s = self.torch, self.s
        mt = torch.sqrt(self.m2)
        cres = torch.polar(mt, self.dx_field * s) - torch.polar(mt, self.f_t * s)
        cres -= cres[self.mask_t].mean()
        sd = float(cres[self.mask_t].abs().std())
        if sd > 0:
            ratio = (cres.abs() / (MERIT_FACTOR * sd)).clamp_(min=1.0).cpu().numpy()
            self.sigma = np.where(self.prob.mask_w, self.sigma * ratio ** MERIT_POWER, self.sigma).astype(np.float32)
            self.set_weights(self.prob.data_weight(self.sigma))


class MediSystem(Linop):
    """The Gauss-Newton / IRLS matrix of MEDI: ``A = sum_k d_k^T W_k d_k + Lam D^T m^2 D (+ mu P)``.

    Self-adjoint positive definite on the work grid (torch); ``W_k`` the frozen IRLS weights,
    ``d_k`` unscaled forward differences (:class:`~qsmkit.operators.Gradient`), ``D`` the dipole
    convolution (:class:`~qsmkit.operators.Dipole`), ``m`` the data weight, ``P`` the CSF
    projection. ``apply`` returns an internal buffer that the next call overwrites (unless
    ``reuse_buffer`` is False); numpy input gives numpy output.
    """

    def __init__(self, model: _MediModel, wgt, reuse_buffer: bool = True):
        super().__init__(model.shape, model.shape, np.float32)
        self.model, self.wgt, self.reuse_buffer = model, wgt, reuse_buffer

    def apply(self, p):
        md = self.model
        if not md.torch.is_tensor(p):
            return self.apply(md.T(p)).cpu().numpy().copy()
        ops = md.ops
        out = md.tmp if self.reuse_buffer else md.torch.empty_like(p)
        g = ops.diff(p).mul_(self.wgt)
        ops.diff_t(g, out)
        t = ops.dconv(p).mul_(md.lam_m2)
        out += ops.dconv(t)
        if md.csf_t is not None:
            out.add_(md.csf_proj(p), alpha=md.mu)
        return out

    def adjoint(self, y):
        return self.apply(y)

    @classmethod
    def examples(cls):
        try:
            import torch
        except ImportError:  # pragma: no cover
            return []
        rng = np.random.default_rng(5)
        shape = (8, 6, 6)
        grid = _WorkGrid(np.ones(shape, bool), 1.0)
        prob = _work_problem(grid, rng.standard_normal(shape).astype(np.float32) * 0.01, (1.0, 1.0, 1.2),
                             (0.1, 0.2, 1.0), rng.random(shape).astype(np.float32) + 0.5, 0.0)
        gm = (rng.random((3,) + shape) > 0.2).astype(np.float32)
        csf = np.zeros(shape, bool)
        csf[2:5, 2:4, 1:4] = True
        out = []
        for c, mu in ((None, 0.0), (csf, 3.0)):
            model = _MediModel(prob, gm, c, torch.device("cpu"), s=2.0, big_lam=50.0, mu=mu, eps=1e-3)
            model.x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            wgt, _, _ = model.linearise()
            out.append(cls(model, wgt, reuse_buffer=False))
        return out


def _gauss_newton(model: _MediModel, res: MediResult, grid: _WorkGrid, *, max_iter, cg_max_iter, cg_tol, tol,
                  merit, say, callback) -> None:
    """Gauss-Newton iterations with the safeguarded step; fills ``res`` (history) and ``model.x``."""
    torch = model.torch
    e0 = model.costs(model.x, model.dx_field)
    res.cost.append(e0[0]), res.data_cost.append(e0[1]), res.reg_cost.append(e0[2])
    prev_dx = None
    for it in progress(range(1, max_iter + 1), "MEDI Gauss-Newton"):
        t_it = time.perf_counter()
        dx, cgi = _newton_step(model, prev_dx, cg_max_iter, cg_tol)
        ddx = model.ops.dconv(dx).clone()
        step, accepted = backtrack(lambda s, dx=dx, ddx=ddx: model.costs(model.x + s * dx, model.dx_field + s * ddx),
                                   res.cost[-1])
        if accepted is None:
            say(f"GN {it}: no decrease along the Gauss-Newton direction; stopping")
            res.converged = True
            break
        model.x.add_(dx, alpha=step)
        model.dx_field.add_(ddx, alpha=step)
        upd = step * float(torch.linalg.vector_norm(dx)) / max(float(torch.linalg.vector_norm(model.x)), 1e-30)
        prev_dx = dx
        del ddx
        rel = float(cgi.relative_residual)
        res.cost.append(accepted[0]), res.data_cost.append(accepted[1]), res.reg_cost.append(accepted[2])
        res.update.append(upd), res.cg_iters.append(cgi.iterations), res.steps.append(step)
        res.cg_residual.append(rel)
        res.n_iter = it
        say(f"GN {it}/{max_iter}: cost {accepted[0]:.6g} (data {accepted[1]:.6g}, reg {accepted[2]:.6g}) "
            f"update {upd:.3g} cg {cgi.iterations} (res {rel:.2g}){'' if step == 1.0 else f' step {step:g}'} "
            f"({time.perf_counter() - t_it:.1f} s)")
        if merit:
            model.merit_update()
            # the cost function changed with the weights: restate the current point's cost
            res.cost[-1], res.data_cost[-1], res.reg_cost[-1] = model.costs(model.x, model.dx_field)
        if callback is not None:
            callback(it, grid.to_full(model.x.cpu().numpy()))
        if upd < tol:
            res.converged = True
            break


def _newton_step(model: _MediModel, prev_dx, cg_max_iter: int, cg_tol: float):
    """Solve ``A dchi = -grad E`` by Jacobi-preconditioned CG (core :func:`~qsmkit.operators.cg`).

    CG starts at the minimiser of the quadratic model along the previous step (one-vector warm start).
    """
    wgt, b, minv = model.linearise()
    system = MediSystem(model, wgt)
    rhs = b.neg()
    del b
    x0, r0 = line_warm_start(system, rhs, prev_dx)
    dx, info = cg(system, rhs, x0, M=Diagonal(minv), tol=cg_tol, max_iter=cg_max_iter, r0=r0)
    return dx, info
