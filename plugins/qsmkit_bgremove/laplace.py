"""Discrete Laplace equation with Dirichlet boundary values in a masked domain, by multigrid-preconditioned CG.

The operator is minus the 7-point Laplacian (1/mm^2, anisotropic voxels allowed) on the unknown
voxels ``I`` of a box, every neighbour outside ``I`` held at a given value (Dirichlet):
``(A u)_i = sum_a w_a (2 u_i - u_{i+a} - u_{i-a})`` with ``w_a = 1 / v_a^2`` and ``u = 0`` outside
``I``; it is symmetric positive definite. It is stored as a variable-coefficient 7-point
stencil: a diagonal ``d`` and one link weight per axis ``c_a`` (between ``i`` and ``i + e_a``).

Preconditioner: one symmetric V-cycle of an algebraic-geometric multigrid. The coarse grids
halve each axis (blocks of 2 x 2 x 2 voxels); the coarse operator is the Galerkin product
``P^T A P`` with piecewise-constant prolongation ``P`` (again a 7-point stencil: the diagonal
collects the block's diagonal minus its internal links, the links sum the fine links between
neighbouring blocks; ``P`` copies a coarse value to the block's voxels that are unknowns), so
that coarse domains follow the mask exactly. Smoother: damped Jacobi
(``omega`` 0.8), ``nu`` sweeps before and after the coarse correction (symmetric, so the V-cycle is
a valid CG preconditioner). The coarsest grid (a few thousand unknowns) is solved exactly by a
sparse LU factorisation. The outer solver is the core :func:`qsmkit.operators.cg`.

Everything is numpy float32 on the box (the caller crops to the mask's bounding box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qsmkit.operators import CGInfo, cg

#: damping of the Jacobi smoother
OMEGA = 0.8
#: the coarsest grid has at most this many unknowns (solved by sparse LU)
COARSEST_UNKNOWNS = 4000


def _sl(axis: int, s: slice) -> tuple:
    out = [slice(None)] * 3
    out[axis] = s
    return tuple(out)


@dataclass
class Stencil:
    """A symmetric 7-point operator on a box: diagonal ``d`` and per-axis link weights ``c[a]``."""

    d: np.ndarray            # (nx, ny, nz) float32, 0 outside the domain
    c: list                  # c[a]: shape with n_a - 1 along axis a, weight of the link i <-> i + e_a

    @property
    def shape(self) -> tuple:
        return self.d.shape

    def apply(self, u: np.ndarray) -> np.ndarray:
        out = self.d * u
        for a, ca in enumerate(self.c):
            lo, hi = _sl(a, slice(None, -1)), _sl(a, slice(1, None))
            out[lo] -= ca * u[hi]
            out[hi] -= ca * u[lo]
        return out

    def coarsen(self) -> "Stencil":
        """The Galerkin coarse operator ``P^T A P`` for piecewise-constant ``P`` on 2 x 2 x 2 blocks."""
        even = tuple(n + (n % 2) for n in self.shape)
        d = _pad_to(self.d, even)
        dc = _block_sum(d, (0, 1, 2))
        cc = []
        for a, ca in enumerate(self.c):
            full = _pad_to(ca, even)                    # link array padded with zero links
            other = tuple(x for x in range(3) if x != a)
            inner = _block_sum(full[_sl(a, slice(0, None, 2))], other)   # links inside a block
            cross = _block_sum(full[_sl(a, slice(1, None, 2))], other)   # links to the next block
            dc -= 2.0 * inner
            cc.append(np.ascontiguousarray(cross[_sl(a, slice(None, -1))]))
        dc[dc < 0] = 0  # rounding
        return Stencil(dc.astype(np.float32), [x.astype(np.float32) for x in cc])

    def sparse(self, domain: np.ndarray):
        """The operator on the ``domain`` voxels as a scipy CSC matrix (for the coarsest grid)."""
        import scipy.sparse as sp

        idx = -np.ones(self.shape, np.int64)
        n = int(domain.sum())
        idx[domain] = np.arange(n)
        rows, cols, vals = [idx[domain]], [idx[domain]], [self.d[domain].astype(np.float64)]
        for a, ca in enumerate(self.c):
            i0, i1 = idx[_sl(a, slice(None, -1))], idx[_sl(a, slice(1, None))]
            sel = (i0 >= 0) & (i1 >= 0) & (ca != 0)
            for r, c in ((i0, i1), (i1, i0)):
                rows.append(r[sel])
                cols.append(c[sel])
                vals.append(-ca[sel].astype(np.float64))
        return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def _pad_to(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x
    return np.pad(x, [(0, s - n) for n, s in zip(x.shape, shape)])


def _block_sum(x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Sum over pairs of neighbours along ``axes`` (each of even length)."""
    shape, red = [], []
    for a, n in enumerate(x.shape):
        if a in axes:
            shape += [n // 2, 2]
            red.append(len(shape) - 1)
        else:
            shape.append(n)
    return x.reshape(shape).sum(axis=tuple(red), dtype=np.float32)


def _restrict(r: np.ndarray, coarse_shape: Sequence[int]) -> np.ndarray:
    """``P^T r``: block sums over 2 x 2 x 2 voxels."""
    even = tuple(2 * n for n in coarse_shape)
    return _block_sum(_pad_to(r, even), (0, 1, 2))


def _prolong(uc: np.ndarray, fine_shape: Sequence[int]) -> np.ndarray:
    """``P uc``: each coarse value copied to its 2 x 2 x 2 block, cropped to the fine grid."""
    u = uc
    for a in range(3):
        u = np.repeat(u, 2, axis=a)
    return u[: fine_shape[0], : fine_shape[1], : fine_shape[2]]


class MultigridPreconditioner:
    """One symmetric V-cycle for a :class:`Stencil` (see the module notes); ``M.apply(r) ~ A^-1 r``."""

    def __init__(self, op: Stencil, nu: int = 2, omega: float = OMEGA, coarsest: int = COARSEST_UNKNOWNS):
        self.nu, self.omega = int(nu), float(omega)
        self.levels = [op]
        while int((self.levels[-1].d > 0).sum()) > coarsest and min(self.levels[-1].shape) > 2:
            self.levels.append(self.levels[-1].coarsen())
        self.domains = [lv.d > 0 for lv in self.levels]
        self.inv_d = [np.where(lv.d > 0, np.float32(self.omega) / np.where(lv.d > 0, lv.d, 1), 0).astype(np.float32)
                      for lv in self.levels]
        last = self.levels[-1]
        self._dom = last.d > 0
        self._lu = None
        if self._dom.any():
            from scipy.sparse.linalg import splu

            self._lu = splu(last.sparse(self._dom))

    @property
    def depth(self) -> int:
        """Number of grids (the finest included)."""
        return len(self.levels)

    def _coarsest(self, r: np.ndarray) -> np.ndarray:
        u = np.zeros_like(r)
        if self._lu is not None:
            u[self._dom] = self._lu.solve(r[self._dom].astype(np.float64)).astype(np.float32)
        return u

    def _vcycle(self, k: int, r: np.ndarray) -> np.ndarray:
        if k == len(self.levels) - 1:
            return self._coarsest(r)
        op, inv_d = self.levels[k], self.inv_d[k]
        u = inv_d * r
        for _ in range(self.nu - 1):
            u += inv_d * (r - op.apply(u))
        res = r - op.apply(u)
        coarse = self.levels[k + 1]
        corr = _prolong(self._vcycle(k + 1, _restrict(res, coarse.shape)), op.shape)
        corr *= self.domains[k]   # P: copy to the block's voxels that are unknowns (P^T: block sums)
        u += corr
        for _ in range(self.nu):
            u += inv_d * (r - op.apply(u))
        return u

    def apply(self, r: np.ndarray) -> np.ndarray:
        return self._vcycle(0, np.asarray(r, dtype=np.float32))

    __call__ = apply


def dirichlet_laplacian(domain: np.ndarray, voxel_size: Sequence[float]) -> Stencil:
    """Minus the 7-point Laplacian (1/mm^2) on the ``domain`` voxels, zero Dirichlet values outside."""
    dom = np.asarray(domain, dtype=bool)
    w = [1.0 / float(v) ** 2 for v in voxel_size]
    d = (dom * np.float32(2.0 * sum(w))).astype(np.float32)
    c = [(dom[_sl(a, slice(None, -1))] & dom[_sl(a, slice(1, None))]).astype(np.float32) * np.float32(w[a])
         for a in range(3)]
    return Stencil(d, c)


def laplacian_residual(values: np.ndarray, domain: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """``-L values`` (7-point, 1/mm^2) on ``domain``, 0 elsewhere; neighbours are read wherever they are."""
    out = np.zeros(values.shape, np.float32)
    core = (slice(1, -1),) * 3
    v = values.astype(np.float32)
    acc = np.zeros(tuple(n - 2 for n in v.shape), np.float32)
    for a, vs in enumerate(voxel_size):
        w = np.float32(1.0 / float(vs) ** 2)
        lo = [slice(1, -1)] * 3
        hi = [slice(1, -1)] * 3
        lo[a], hi[a] = slice(0, -2), slice(2, None)
        acc += w * (2 * v[core] - v[tuple(lo)] - v[tuple(hi)])
    out[core] = acc
    out *= domain
    return out


def solve_dirichlet(rhs: np.ndarray, domain: np.ndarray, voxel_size: Sequence[float], *, tol: float = 1e-3,
                    max_iter: int = 200) -> tuple[np.ndarray, CGInfo, int]:
    """Solve ``A u = rhs`` on ``domain`` (``A``: :func:`dirichlet_laplacian`) by multigrid-preconditioned CG.

    ``domain`` must not touch the box's faces (pad it by one voxel). Returns the solution
    (float32, 0 outside ``domain``), the CG record and the number of multigrid levels.
    """
    op = dirichlet_laplacian(domain, voxel_size)
    mg = MultigridPreconditioner(op)
    u, info = cg(op.apply, np.asarray(rhs, np.float32) * domain, M=mg.apply, tol=float(tol), max_iter=int(max_iter))
    return np.asarray(u, np.float32), info, mg.depth
