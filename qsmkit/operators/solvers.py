"""Solvers shared by every method: :func:`cg` (one stopping rule), :func:`minres` (symmetric
indefinite systems, the same stopping rule), :func:`power_iteration`, the
Gauss-Newton helpers :func:`line_warm_start` and :func:`backtrack` (MEDI, TFI), and the proximal
splitting methods :func:`proximal_gradient` (FISTA, POGM) and :func:`condat_vu` (primal-dual)."""

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


# =========================================================================== MINRES
def minres(A, b, *, M=None, tol: float = 1e-6, max_iter: int = 100):
    """Solve ``A x = b`` (``A`` real symmetric, possibly indefinite) by preconditioned MINRES.

    Paige & Saunders 1975 (the recurrences of scipy's ``minres``), from ``x0 = 0``: iterate ``k``
    minimises ``||b - A x||_{M}`` over the Krylov space ``K_k(M A, M b)``. One application of
    ``A`` (and of ``M``) per iteration, where conjugate gradients on the normal equations of an
    indefinite ``A`` need two (and converge with the squared condition number). Stopping rule as
    :func:`cg`: ``||r||_M / ||b||_M <= tol`` (the recurrence's estimate) or ``max_iter``.

    Parameters
    ----------
    A : Linop or callable
        The symmetric operator.
    b : ndarray or torch.Tensor
        Right-hand side (real).
    M : Linop or callable, optional
        Preconditioner, an approximation of ``|A|^-1`` (symmetric positive definite).
    tol : float
        Relative (preconditioned) residual at which to stop (0: run ``max_iter``).
    max_iter : int
        Maximum number of iterations.

    Returns
    -------
    x : like ``b``
        The solution.
    info : CGInfo
        Iterations, the residual estimates ``||r||_M / ||b||_M``, ``converged``; ``breakdown``
        when ``M`` was found not positive definite.
    """
    ops = _CGScalars(b, 0)
    x = _zeros_like(b)
    r1 = r2 = b               # the Lanczos vectors are only read: no copies
    y = r2 if M is None else _apply(M, r2)
    yr = _vdot(r1, y)
    info = CGInfo(residuals=[1.0 if yr > 0 else 0.0])
    if yr <= 0:
        info.converged, info.breakdown = yr == 0, yr < 0
        return x, info
    beta1 = beta = math.sqrt(yr)
    oldb = dbar = epsln = sn = 0.0
    cs, phibar = -1.0, beta1
    v, w, w2 = _zeros_like(b), _zeros_like(b), _zeros_like(b)
    k = 0
    while k < int(max_iter) and phibar > tol * beta1:
        k += 1
        v[...] = y
        v *= 1.0 / beta
        y = _copy(_apply(A, v))
        if k > 1:
            ops.axpy(y, -beta / oldb, r1)
        alfa = _vdot(v, y)
        ops.axpy(y, -alfa / beta, r2)
        r1, r2 = r2, y
        y = r2 if M is None else _apply(M, r2)
        yr = _vdot(r2, y)
        if yr < 0:
            info.breakdown = True
            break
        oldb, beta = beta, math.sqrt(yr)
        # the next plane rotation of the tridiagonal QR factorisation
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-30)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w          # w = (v - oldeps w1 - delta w2) / gamma, in w1's buffer
        w1 *= -oldeps
        ops.axpy(w1, -delta, w2)
        w1 += v
        w1 *= 1.0 / gamma
        w = w1
        ops.axpy(x, phi, w)
        info.residuals.append(phibar / beta1)
        if beta == 0.0:       # invariant Krylov space: x is exact
            break
    info.iterations = k
    info.converged = bool(info.residuals[-1] <= tol)
    return x, info


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


# =========================================================================== proximal splitting
@dataclass
class ProxInfo:
    """What :func:`proximal_gradient` and :func:`condat_vu` did.

    Attributes
    ----------
    iterations : int
        Iterations run.
    cost : list
        Objective ``1/2 ||A x - y||^2 + g(.)`` at each iterate (a float, or a numpy array over
        the batch), computed without extra operator applications (``A x`` is tracked).
    restarts : int
        Momentum restarts (summed over the batch).
    """

    iterations: int = 0
    cost: list = dc_field(default_factory=list)
    restarts: int = 0

    @property
    def cost_array(self) -> np.ndarray:
        """Costs as an array ``(iterations,)`` or ``(iterations, batch)``."""
        return np.asarray(self.cost, dtype=np.float64)


class _Batch:
    """Per-problem scalars (float64 numpy arrays) of the splitting methods, broadcast to the iterates."""

    def __init__(self, x, batch_dims: int):
        self.nb = int(batch_dims)
        self.shape = tuple(x.shape[:self.nb])
        self.torch = is_torch(x)

    def ones(self):
        return np.ones(self.shape, dtype=np.float64)

    def dot(self, a, b) -> np.ndarray:
        if self.torch and self.nb == 1 and a.is_contiguous() and b.is_contiguous():
            import torch  # Re <a, b> per problem as a batched BLAS dot (no temporary product array)

            ar = torch.view_as_real(a) if a.is_complex() else a
            br = torch.view_as_real(b) if b.is_complex() else b
            B = ar.shape[0]
            v = torch.bmm(ar.reshape(B, 1, -1), br.reshape(B, -1, 1)).reshape(B)
            return v.detach().double().cpu().numpy()
        v = _vdot(a, b, self.nb)
        if self.nb and self.torch:
            v = v.detach().double().cpu().numpy()
        return np.asarray(v, dtype=np.float64)

    def view(self, s: np.ndarray, x):
        """``s`` (per problem) shaped and typed to multiply ``x``."""
        if not self.nb:
            return float(s)
        shape = tuple(s.shape) + (1,) * (x.ndim - self.nb)
        if self.torch:
            import torch

            rdt = x.real.dtype if x.is_complex() else x.dtype
            return torch.from_numpy(np.ascontiguousarray(s)).to(device=x.device, dtype=rdt).reshape(shape)
        return s.reshape(shape).astype(np.float32 if x.dtype in (np.float32, np.complex64) else np.float64)


def _isub(a, b):
    a -= b
    return a


def _iadd(a, b):
    a += b
    return a


def _imul(a, c):
    a *= c
    return a


def _cost_value(v, batch: _Batch) -> np.ndarray:
    if is_torch(v):
        v = v.detach().double().cpu().numpy()
    return np.asarray(v, dtype=np.float64).reshape(batch.shape) if batch.nb else np.asarray(float(v))


def proximal_gradient(A, y, prox: Callable, g: Callable, x0, step: float, max_iter: int = 100,
                      method: str = "fista", restart: bool = True, batch_dims: int = 0,
                      callback: Callable[[int, Any, Any], None] | None = None):
    """Accelerated proximal gradient for ``min_x 1/2 ||A x - y||^2 + g(x)``: FISTA or POGM.

    ``A x`` is tracked through the (linear) momentum updates, so each iteration applies ``A``
    and ``A^H`` once and the cost of every iterate comes for free.

    - FISTA: Beck & Teboulle, SIAM J Imaging Sci 2:183 (2009); returns the prox iterate.
    - POGM: Taylor, Hendrickx & Glineur (2017) / Kim & Fessler, JOTA 178:81 (2018), in the form
      of MIRT's ``pogm_restart`` (``mu = 0``); the last iteration uses the modified momentum.
    - ``restart``: the gradient-mapping restart of O'Donoghue & Candes, FoCM 15:715 (2015),
      per problem.

    Parameters
    ----------
    A : Linop
        Data operator (``apply``/``adjoint``); ``step <= 1 / ||A^H A||`` (see :func:`power_iteration`).
    y : array
        Data, in ``A``'s output space.
    prox : callable
        ``prox(z, c)`` = ``argmin_x 1/2 ||x - z||^2 + c g(x)``; ``c`` is a float (FISTA) or
        per-problem numpy array (POGM with ``batch_dims``).
    g : callable
        ``g(x)``: the regulariser's value (a float, or per problem with ``batch_dims``).
    x0 : array
        Start (not modified).
    step : float
        Gradient step ``1 / L``.
    max_iter : int
        Iterations.
    method : str
        ``fista`` or ``pogm``.
    restart : bool
        Gradient restart of the momentum.
    batch_dims : int
        0, or 1: the first axis indexes independent problems (own momentum, restarts, costs).
    callback : callable, optional
        ``callback(k, x, cost)`` after iteration ``k``.

    Returns
    -------
    x : array
    info : ProxInfo
    """
    if method not in ("fista", "pogm"):
        raise ValueError(f"method {method!r}: use fista or pogm")
    bt = _Batch(x0, batch_dims)
    info = ProxInfo()
    n = int(max_iter)
    step = float(step)

    def residual(x):
        r = A.apply(x)
        return (r - y) if r is x else _isub(r, y)

    x = _copy(x0)
    res = residual(x)                       # A x - y, tracked through the momentum
    t = bt.ones()
    if method == "fista":
        xp, resp, v, res_v = x, res, x, res
        dp, beta_p = None, 0.0
        for k in range(1, n + 1):
            z = A.adjoint(res_v)
            z = (z * -step) if (z is res_v or z is y) else _imul(z, -step)
            z += v
            x = prox(z, step)
            del z
            res = residual(x)
            info.cost.append(0.5 * bt.dot(res, res) + _cost_value(g(x), bt))
            tn = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / tn
            d = x - xp
            if restart:  # <v - x, x - xp> > 0 (the momentum points uphill); v - x = beta_p d_p - d
                vd = -bt.dot(d, d) + (beta_p * bt.dot(dp, d) if dp is not None else 0.0)
                rs = vd > 0
                info.restarts += int(np.sum(rs))
                tn = np.where(rs, 1.0, tn)
                beta = np.where(rs, 0.0, beta)
            v = _iadd(d * bt.view(beta, d), x)
            dr = res - resp
            res_v = _iadd(_imul(dr, bt.view(beta, dr)), res)
            del dr
            xp, resp, t, dp, beta_p = x, res, tn, d, beta
            info.iterations = k
            if callback is not None:
                callback(k, x, info.cost[-1])
        return x, info
    # POGM (MIRT pogm_restart with mu = 0, bsig = 1)
    sig, zeta = bt.ones(), bt.ones()
    u_old, z_old, y_old = x, x, x
    for k in range(1, n + 1):
        fgrad = A.adjoint(res)
        u = x - step * fgrad
        tn = 0.5 * (1.0 + np.sqrt(1.0 + (8.0 if k == n else 4.0) * t * t))
        beta = (t - 1.0) / tn
        gamma = sig * t / tn
        zn = (u + bt.view(beta, u) * (u - u_old) + bt.view(gamma, u) * (u - x)
              - bt.view(beta * step / zeta, u) * (x - z_old))
        zeta_n = step * (1.0 + beta + gamma)
        xn = prox(zn, zeta_n if bt.nb else float(zeta_n))
        if restart:
            fgm = fgrad - bt.view(1.0 / zeta_n, zn) * (xn - zn)     # composite gradient mapping
            yn = x - step * fgm
            rs = bt.dot(-fgm, yn - y_old) <= 0
            info.restarts += int(np.sum(rs))
            tn = np.where(rs, 1.0, tn)
            sig = np.where(rs, 1.0, sig)
            y_old = yn
            del fgm
        u_old, z_old, zeta, t, x = u, zn, zeta_n, tn, xn
        res = residual(x)
        info.cost.append(0.5 * bt.dot(res, res) + _cost_value(g(x), bt))
        info.iterations = k
        if callback is not None:
            callback(k, x, info.cost[-1])
    return x, info


def condat_vu(A, y, K, prox_g: Callable, g: Callable, x0, tau: float, sigma: float, max_iter: int = 100,
              rho: float = 1.0, batch_dims: int = 0, callback: Callable[[int, Any, Any], None] | None = None):
    """Condat-Vu primal-dual splitting for ``min_x 1/2 ||A x - y||^2 + g(K x)`` (analysis form).

    Condat, JOTA 158:460 (2013); Vu, Adv Comput Math 38:667 (2013)::

        x+ = x - tau (A^H (A x - y) + K^H u)
        u+ = prox_{sigma g*}(u + sigma K (2 x+ - x)),   prox_{sigma g*}(w) = w - sigma prox_{g / sigma}(w / sigma)
        (x, u) <- rho (x+, u+) + (1 - rho) (x, u)

    converging when ``1 / tau - sigma ||K||^2 >= ||A^H A|| / 2`` (and ``rho`` in ``(0, 1]``). ``A x``
    and ``K x`` are tracked, so each iteration applies ``A``, ``A^H``, ``K`` and ``K^H`` once, and the
    cost ``1/2 ||A x - y||^2 + g(K x)`` of every primal iterate comes for free.

    Parameters
    ----------
    A, y : Linop and data (as :func:`proximal_gradient`).
    K : Linop
        Analysis operator (e.g. a wavelet transform).
    prox_g : callable
        ``prox_g(w, c)`` = ``argmin_v 1/2 ||v - w||^2 + c g(v)`` (``c`` a float).
    g : callable
        ``g(K x)``: the regulariser's value on analysis coefficients.
    x0 : array
        Primal start (the dual starts at 0).
    tau, sigma : float
        Primal and dual steps.
    max_iter : int
    rho : float
        Relaxation.
    batch_dims : int
        0 or 1 (per-problem costs along the first axis).
    callback : callable, optional
        ``callback(k, x, cost)``.

    Returns
    -------
    x : array
    info : ProxInfo
    """
    bt = _Batch(x0, batch_dims)
    info = ProxInfo()
    tau, sigma, rho = float(tau), float(sigma), float(rho)
    x = _copy(x0)
    ax = A.apply(x)
    kx = K.apply(x)
    u = _zeros_like(kx)
    for k in range(1, int(max_iter) + 1):
        xn = x - tau * (A.adjoint(ax - y) + K.adjoint(u))
        kxn = K.apply(xn)
        w = u + sigma * (2.0 * kxn - kx)
        un = w - sigma * prox_g(w / sigma, 1.0 / sigma)
        del w
        axn = A.apply(xn)
        if rho != 1.0:
            xn = rho * xn + (1.0 - rho) * x
            un = rho * un + (1.0 - rho) * u
            kxn = rho * kxn + (1.0 - rho) * kx
            axn = rho * axn + (1.0 - rho) * ax
        x, u, kx, ax = xn, un, kxn, axn
        r = ax - y
        info.cost.append(0.5 * bt.dot(r, r) + _cost_value(g(kx), bt))
        del r
        info.iterations = k
        if callback is not None:
            callback(k, x, info.cost[-1])
    return x, info
