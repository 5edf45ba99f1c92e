"""Solvers shared by every method: :func:`cg` (one stopping rule), :func:`power_iteration`, and the
Gauss-Newton helpers :func:`line_warm_start` and :func:`backtrack` (MEDI, TFI)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

import numpy as np

from .base import Diagonal, Linop, _copy, _vdot, _zeros_like, is_torch

# =========================================================================== conjugate gradients
@dataclass
class CGInfo:
    """What :func:`cg` did.

    Attributes
    ----------
    iterations : int
        Iterations run (of the slowest system when batched).
    residuals : list
        ``||r|| / ||b||`` at the start and after each iteration (a float, or a numpy array over
        the batch).
    converged : bool or ndarray
        ``||r|| / ||b|| <= tol`` reached (per system when batched).
    breakdown : bool
        A system met non-positive curvature ``p^H A p <= 0`` (not positive definite) and was stopped.
    """

    iterations: int = 0
    residuals: list = dc_field(default_factory=list)
    converged: Any = False
    breakdown: bool = False

    @property
    def relative_residual(self):
        """The last ``||r|| / ||b||``."""
        return self.residuals[-1] if self.residuals else float("nan")


def _bview(s, x, batch_dims: int):
    """Per-system scalars ``s`` shaped to broadcast against ``x`` (batch axes first)."""
    if batch_dims == 0:
        return s
    shape = tuple(s.shape) + (1,) * (x.ndim - batch_dims)
    if is_torch(x):
        return s.reshape(shape).to(x.real.dtype if x.is_complex() else x.dtype)
    return s.reshape(shape).astype(np.float32 if x.dtype in (np.float32, np.complex64) else np.float64)


def _apply(op, x):
    return op.apply(x) if isinstance(op, Linop) else op(x)


def _precondition(M, r, zbuf):
    return M.apply(r, out=zbuf) if zbuf is not None else _apply(M, r)


def cg(A, b, x0=None, *, M=None, tol: float = 1e-6, max_iter: int = 100, batch_dims: int = 0,
       r0=None, callback: Callable[[int, Any, Any], None] | None = None):
    """Solve ``A x = b`` (``A`` Hermitian positive (semi-)definite) by preconditioned conjugate gradients.

    Stopping rule (the only one): stop when ``||r|| / ||b|| <= tol``, ``r = b - A x`` (checked at
    the start and after every iteration), or after ``max_iter`` iterations, or when a system
    meets non-positive curvature. With ``batch_dims`` the leading axes index independent systems
    (e.g. slices) that iterate together with their own scalars; a converged system is frozen.

    Parameters
    ----------
    A : Linop or callable
        The operator (``A(x)`` or ``A.apply(x)``); it may return an internal buffer that the next
        call overwrites.
    b : ndarray or torch.Tensor
        Right-hand side.
    x0 : like ``b``, optional
        Starting point (default 0). Not modified.
    M : Linop or callable, optional
        Preconditioner, an approximation of ``A^-1`` (Hermitian positive definite).
    tol : float
        Relative residual ``||r|| / ||b||`` at which to stop (0: run ``max_iter``).
    max_iter : int
        Maximum number of iterations.
    batch_dims : int
        Number of leading batch axes (0: one system).
    r0 : like ``b``, optional
        ``b - A x0`` when the caller has it already (saves one application of ``A``).
    callback : callable, optional
        ``callback(k, x, rel)`` after iteration ``k`` (``rel``: the relative residual).

    Returns
    -------
    x : like ``b``
        The solution.
    info : CGInfo
        Iterations, residual history, convergence flags.
    """
    nb = int(batch_dims)
    batched = nb > 0
    ops = _CGScalars(b, nb)
    bb = _vdot(b, b, nb)
    if x0 is None:
        x, r = _zeros_like(b), _copy(b)
    else:
        x = _copy(x0)
        r = _copy(r0) if r0 is not None else b - _apply(A, x)
    zbuf = None
    if isinstance(M, Diagonal):  # preconditioned residual into one reused buffer (no allocation per step)
        zbuf = _zeros_like(r)
    z = r if M is None else _precondition(M, r, zbuf)
    rz = _vdot(r, z, nb)
    rr = rz if M is None else _vdot(r, r, nb)
    p = _copy(z)
    info = CGInfo(residuals=[ops.rel(rr, bb)])
    active = ops.going(rr, bb, tol, bb > 0)
    k = 0
    while k < int(max_iter) and ops.any(active):
        k += 1
        ap = _apply(A, p)
        pap = _vdot(p, ap, nb)
        if batched:
            ok = active & (pap > 0)
            info.breakdown |= bool((active & ~(pap > 0)).any())
            av = _bview(ops.where(ok, rz / ops.clamp(pap), rz * 0), x, nb)
            x += av * p
            r -= av * ap
        else:
            if not pap > 0:
                info.breakdown, k = True, k - 1
                break
            ok = True
            ops.axpy(x, rz / pap, p)
            ops.axpy(r, -rz / pap, ap)
        del ap
        rr = _vdot(r, r, nb)
        info.residuals.append(ops.rel(rr, bb))
        active = ops.going(rr, bb, tol, ok)
        if callback is not None:
            callback(k, x, info.residuals[-1])
        if not ops.any(active) or k >= int(max_iter):
            break
        z = r if M is None else _precondition(M, r, zbuf)
        rz_new = rr if M is None else _vdot(r, z, nb)
        p *= _bview(ops.where(active, rz_new / ops.clamp(rz), rz * 0), p, nb) if batched else rz_new / rz
        p += z
        rz = rz_new
    info.iterations = k
    info.converged = (np.asarray(info.residuals[-1]) <= tol) if batched else bool(info.residuals[-1] <= tol)
    return x, info


class _CGScalars:
    """The per-system scalar arithmetic of :func:`cg`: floats for one system, arrays when batched."""

    def __init__(self, b, nb: int):
        self.torch = is_torch(b)
        self.nb = nb
        if self.torch:
            import torch

            self.where = torch.where
            self.clamp = lambda t: t.clamp_min(1e-30)
        else:
            self.where = np.where
            self.clamp = lambda t: np.maximum(t, 1e-30)

    def rel(self, rr, bb):
        """``||r|| / ||b||`` as a float (numpy array over the batch)."""
        if self.nb:
            v = (rr / self.clamp(bb)) ** 0.5
            return v.detach().cpu().numpy() if self.torch else np.asarray(v)
        return math.sqrt(rr / bb) if bb > 0 else 0.0

    def going(self, rr, bb, tol, ok):
        """Systems that continue: ``||r|| / ||b|| > tol`` (and ``ok``)."""
        if self.nb:
            return ok & ((rr / self.clamp(bb)) ** 0.5 > tol)
        return bool(ok) and bb > 0 and math.sqrt(rr / bb) > tol

    def any(self, active) -> bool:
        return bool(active.any()) if self.nb else bool(active)

    def axpy(self, y, a: float, x) -> None:
        """``y += a x`` in place."""
        if self.torch:
            y.add_(x, alpha=a)
        else:
            y += a * x


# =========================================================================== power iteration
def power_iteration(A, x0=None, *, normal: bool = True, max_iter: int = 100, tol: float = 1e-6,
                    seed: int = 0):
    """Largest eigenvalue of ``A^H A`` (``normal=True``) or of a self-adjoint ``A``.

    Used for Lipschitz constants of data terms (step sizes of proximal gradient methods).

    Parameters
    ----------
    A : Linop (or callable with ``normal=False``)
    x0 : ndarray or torch.Tensor, optional
        Start vector (default: standard normal of ``A.ishape``, numpy, seeded).
    normal : bool
        Iterate with ``A.normal`` (``A^H A``); ``False`` iterates with ``A`` itself.
    max_iter : int
        Maximum iterations.
    tol : float
        Stop when the estimate changes by less than ``tol`` relative.
    seed : int
        Seed of the default start vector.

    Returns
    -------
    value : float
        The estimate (a lower bound that converges to the largest eigenvalue).
    info : dict
        ``iterations`` and ``history`` of the estimates.
    """
    if x0 is None:
        x = A.random_input(np.random.default_rng(seed))
    else:
        x = _copy(x0)
    step = (A.normal if normal else (A.apply if isinstance(A, Linop) else A))
    nrm = math.sqrt(_vdot(x, x))
    x = x / nrm
    lam, hist, it = 0.0, [], 0
    for it in range(1, int(max_iter) + 1):
        y = step(x)
        new = _vdot(x, y)                       # Rayleigh quotient, ||x|| = 1
        hist.append(new)
        ny = math.sqrt(_vdot(y, y))
        if ny == 0:
            lam = 0.0
            break
        x = y / ny
        if it > 1 and abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return float(lam), {"iterations": it, "history": hist}


# =========================================================================== Gauss-Newton helpers
def line_warm_start(A, b, direction):
    """CG start ``(x0, r0)`` at the minimiser of ``x^H A x / 2 - b^H x`` along ``direction``.

    Gauss-Newton methods (MEDI, TFI) start each inner CG at the previous step scaled to the best
    multiple for the new system; ``(None, None)`` when ``direction`` is None or has no positive
    curvature (CG then starts from zero).
    """
    if direction is None:
        return None, None
    ad = A.apply(direction)
    dad = _vdot(direction, ad)
    if not dad > 0:
        return None, None
    c = _vdot(b, direction) / dad
    return direction * c, b - ad * c


def backtrack(trial: Callable[[float], Any], cost: float, halvings: int = 8) -> tuple[float, Any]:
    """Safeguarded step: halve ``step`` from 1 until ``trial(step)[0] <= cost``.

    ``trial(step)`` returns the costs at the trial point (its first entry the total). Returns
    ``(step, costs)``, or ``(0.0, None)`` when ``halvings`` halvings gave no decrease.
    """
    step = 1.0
    for _ in range(halvings):
        costs = trial(step)
        if costs[0] <= cost:
            return step, costs
        step *= 0.5
    return 0.0, None
