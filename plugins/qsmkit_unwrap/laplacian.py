"""Laplacian phase unwrapping (Schofield & Zhu 2003), solved with DCTs (Neumann boundary).

The unwrapped phase ``u`` solves the Poisson equation ``L u = rhs`` where ``L`` is the 7-point
finite-difference Laplacian (with physical voxel spacing) and ``rhs`` is the Laplacian of the true
phase computed from the *wrapped* phase only:

* ``"wrapped"`` (default): ``rhs_i = sum_j W(phi_j - phi_i) / v_ij^2`` over the 6 neighbours
  ``j``, with ``W`` the wrap to ``[-pi, pi)``. This is exact whenever neighbouring voxels differ
  by less than pi (Ghiglia & Romero 1994, the unweighted least-squares unwrapping).
* ``"sincos"``: Schofield & Zhu's ``cos(phi) L sin(phi) - sin(phi) L cos(phi)``; with the discrete
  Laplacian this is ``sum_j sin(phi_j - phi_i) / v_ij^2``, which underestimates steep gradients
  (``sin(d) = d - d^3/6 ...``) and so is slightly biased where the phase changes fast.

The 7-point Laplacian with reflecting (Neumann) edges is diagonalised by the type-II DCT, so the
solve is one forward and one inverse DCT over the spatial axes, batched over echoes.

With a mask, neighbour pairs that leave the mask are dropped (no phase information crosses the
mask edge, so the noise outside the head does not leak in), the grid is cropped to the mask's
bounding box (zero-padded to FFT-friendly sizes), and the output is zero outside the mask. The
direct DCT solve then gives, inside the mask, the true phase plus a harmonic function (a solution
of ``L h = 0``: the box is not the mask) and a constant. As long as neighbouring voxels differ by
less than pi the whole operation is linear in the phase, so a phase that is linear in TE stays
exactly linear in TE: the echo fit turns the harmonic parts into a harmonic field, which
background removal (V-SHARP) takes out.

Two options make the result exact instead (``iterations`` and ``snap``): a few conjugate-gradient
steps, preconditioned by the DCT solve, solve the Poisson equation on the mask itself (Neumann
condition on the mask edge), which removes the harmonic part; rounding to the measured phase plus
the nearest multiple of 2 pi then restores the exact data values (noise included), and the
2 pi offsets of the echoes are made consistent from the echo-to-echo phase differences. The
result is the true phase up to one 2 pi multiple, wherever the Laplacian estimate was within pi.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.fft as sfft

from qsmkit.errors import InputDataError
from qsmkit.operators import Linop, cg, bounding_box

TWO_PI = np.float32(2.0 * np.pi)


def _wrap(x: np.ndarray) -> np.ndarray:
    """Wrap to ``[-pi, pi)`` in place (float32)."""
    x -= TWO_PI * np.floor(x / TWO_PI + np.float32(0.5))
    return x


def phase_laplacian(phase: np.ndarray, voxel_size: Sequence[float], mask: np.ndarray | None = None,
                    method: str = "wrapped") -> np.ndarray:
    """Laplacian (rad/mm^2) of the true phase from the wrapped ``phase``, Neumann edges.

    Parameters
    ----------
    phase : ndarray, (x, y, z) or (x, y, z, echo)
        Wrapped phase in rad.
    voxel_size : 3 floats
        Voxel size in mm.
    mask : ndarray of bool, (x, y, z), optional
        Neighbour pairs with a voxel outside the mask are left out.
    method : {"wrapped", "sincos"}
        Neighbour phase difference operator (see module docstring).

    Returns
    -------
    ndarray, float32, same shape as ``phase``
    """
    phi = np.asarray(phase, dtype=np.float32)
    rhs = np.zeros_like(phi)
    m = None if mask is None else np.asarray(mask, dtype=bool)
    for axis in range(3):
        d = np.diff(phi, axis=axis)
        if method == "wrapped":
            _wrap(d)
        elif method == "sincos":
            np.sin(d, out=d)
        else:
            raise InputDataError(f"unknown Laplacian method {method!r}; use 'wrapped' or 'sincos'")
        d *= np.float32(1.0 / float(voxel_size[axis]) ** 2)
        if m is not None:
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis] = slice(None, -1)
            hi[axis] = slice(1, None)
            pair = m[tuple(lo)] & m[tuple(hi)]
            if d.ndim == 4:
                pair = pair[..., None]
            d *= pair
        lo = [slice(None)] * phi.ndim
        hi = [slice(None)] * phi.ndim
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        rhs[tuple(lo)] += d
        rhs[tuple(hi)] -= d
        del d
    return rhs


def neumann_laplacian_eigenvalues(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Eigenvalues (1/mm^2, <= 0) of the 7-point Laplacian with reflecting edges in the DCT-II basis."""
    lam = np.zeros(tuple(shape), dtype=np.float32)
    for axis, (n, v) in enumerate(zip(shape, voxel_size)):
        k = np.arange(n, dtype=np.float64)
        e = ((2.0 * np.cos(np.pi * k / n) - 2.0) / float(v) ** 2).astype(np.float32)
        view = [1] * len(shape)
        view[axis] = n
        lam = lam + e.reshape(view)
    return lam


def solve_poisson_neumann(rhs: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Zero-mean solution of ``L u = rhs`` over the first three axes (batched over a 4th), by DCT."""
    r = np.asarray(rhs, dtype=np.float32)
    if r.ndim == 3:
        return _solve_batched(r[None], voxel_size)[0]
    u = _solve_batched(np.ascontiguousarray(np.moveaxis(r, -1, 0)), voxel_size)
    return np.ascontiguousarray(np.moveaxis(u, 0, -1))


def _pair_weights(mask: np.ndarray) -> list[np.ndarray]:
    """Per axis, float32 1 where both voxels of a forward neighbour pair are in ``mask``."""
    out = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        out.append((mask[tuple(lo)] & mask[tuple(hi)]).astype(np.float32))
    return out


def _masked_laplacian(u: np.ndarray, weights: list[np.ndarray], inv_v2: Sequence[float]) -> np.ndarray:
    """Graph Laplacian of a 3D ``u`` over the in-mask neighbour pairs (``weights``), 1/mm^2 scaled."""
    r = np.zeros_like(u)
    for axis in range(3):
        d = np.diff(u, axis=axis)
        d *= weights[axis]
        d *= np.float32(inv_v2[axis])
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        r[tuple(lo)] += d
        r[tuple(hi)] -= d
    return r


class MaskedLaplacian(Linop):
    """``-L_mask``: minus the graph Laplacian over in-mask neighbour pairs (1/mm^2), echo-first batches.

    Symmetric positive semi-definite on arrays ``(echo, x, y, z)`` (numpy); the Neumann condition
    on the mask edge is built in (pairs that leave the mask are dropped).

    Parameters
    ----------
    mask : ndarray of bool (x, y, z)
    voxel_size : 3 floats
        mm.
    n_echoes : int
        Size of the leading (batch) axis.
    """

    def __init__(self, mask: np.ndarray, voxel_size: Sequence[float], n_echoes: int = 1):
        shape = (int(n_echoes),) + tuple(mask.shape)
        super().__init__(shape, shape, np.float32)
        self.inv_v2 = [1.0 / float(v) ** 2 for v in voxel_size]
        self.w = _pair_weights(np.asarray(mask, dtype=bool))

    def apply(self, x):
        out = np.empty_like(x)
        for e in range(x.shape[0]):
            out[e] = _masked_laplacian(x[e], self.w, self.inv_v2)
        np.negative(out, out=out)
        return out

    def adjoint(self, y):
        return self.apply(y)

    @classmethod
    def example(cls):
        m = np.random.default_rng(4).random((6, 5, 4)) > 0.3
        return cls(m, (1.0, 0.8, 1.5), 2)


def _refine_pcg(u: np.ndarray, b: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                iterations: int, tol: float) -> tuple[np.ndarray, int]:
    """Solve the Poisson equation restricted to ``mask`` (Neumann on the mask edge) by PCG.

    ``u`` and ``b`` are echo-first (echo, x, y, z). The unknowns are the in-mask voxels, the
    operator is :class:`MaskedLaplacian` and the preconditioner is the box DCT solve; the core
    :func:`qsmkit.operators.cg` iterates all echoes together (one system per echo), from ``u``,
    until ``||r|| / ||b|| <= tol``. The solution is then the true phase up to a constant (no
    harmonic part). Returns the refined ``u`` and the number of iterations done.
    """
    mf = mask.astype(np.float32)

    def m_inv(r: np.ndarray) -> np.ndarray:  # (-L_box)^-1 restricted to the mask
        z = _solve_batched(r, voxel_size)
        np.negative(z, out=z)
        z *= mf
        return z

    a_op = MaskedLaplacian(mask, voxel_size, u.shape[0])
    u, info = cg(a_op, -b * mf, u, M=m_inv, tol=tol, max_iter=iterations, batch_dims=1)
    return u, info.iterations


def _snap(u: np.ndarray, wrapped: np.ndarray, mask: np.ndarray | None) -> list[int]:
    """Round ``u`` (echo-first, in place) to the measured phase plus a multiple of 2 pi.

    Each echo is first shifted by the circular mean of ``wrapped - u`` over the mask, so that the
    Laplacian solution (true phase + an unknown constant) lines up with the data; then every voxel
    takes ``wrapped + 2 pi round((u - wrapped) / 2 pi)``: the exact measured value wherever the
    Laplacian estimate is within pi of the true phase. The remaining integer offsets between
    echoes are fixed from the voxel-wise echo-to-echo phase differences (median over the mask),
    so that the phase evolves consistently in TE. Returns the 2 pi multiples removed per echo.
    """
    n_e = u.shape[0]
    sel = (slice(None),) * 3 if mask is None else mask
    corrections = [0]
    prev = None
    for e in range(n_e):
        w = wrapped[e]
        d = (w - u[e])[sel].astype(np.float64)
        c = np.float32(np.angle(np.mean(np.exp(1j * d))))
        u[e] += c
        k = np.round((u[e] - w) / TWO_PI)
        np.multiply(k, TWO_PI, out=u[e])
        u[e] += w
        if prev is not None:
            dw = _wrap((w - wrapped[e - 1])[sel].astype(np.float32))
            jump = (u[e][sel] - prev[sel] - dw) / TWO_PI
            kk = int(np.round(np.median(jump)))
            if kk:
                u[e] -= np.float32(kk) * TWO_PI
            corrections.append(-kk)
        prev = u[e]
    return corrections


def _solve_batched(rhs: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Zero-mean Neumann Poisson solve of an echo-first (echo, x, y, z) array, one batched DCT pair."""
    lam = neumann_laplacian_eigenvalues(rhs.shape[1:], voxel_size)
    lam[0, 0, 0] = 1.0
    c = sfft.dctn(rhs, type=2, axes=(1, 2, 3), norm="ortho", workers=-1)
    c /= lam
    c[:, 0, 0, 0] = 0
    return sfft.idctn(c, type=2, axes=(1, 2, 3), norm="ortho", workers=-1).astype(np.float32, copy=False)


def laplacian_unwrap(phase: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                     mask: np.ndarray | None = None, method: str = "wrapped",
                     iterations: int = 0, tol: float = 1e-3, snap: bool = False,
                     return_info: bool = False):
    """Unwrap phase by solving a Poisson equation with the phase Laplacian (Schofield & Zhu 2003).

    Parameters
    ----------
    phase : ndarray, (x, y, z) or (x, y, z, echo)
        Wrapped phase in rad; several echoes are unwrapped together (batched DCTs), each on its own.
    voxel_size : 3 floats
        Voxel size in mm (only the ratios matter).
    mask : ndarray of bool, (x, y, z), optional
        Region with meaningful phase. The solve is restricted to its bounding box (+1 voxel),
        differences leaving the mask are ignored and the result is 0 outside it.
    method : {"wrapped", "sincos"}
        ``"wrapped"`` uses wrapped neighbour differences (exact for gradients below pi per voxel);
        ``"sincos"`` is Schofield & Zhu's ``cos L sin - sin L cos`` formula.
    iterations : int
        With a mask, at most this many preconditioned conjugate-gradient steps (the box DCT solve
        as preconditioner) that solve the Poisson equation on the mask itself, with a Neumann
        condition on the mask edge. This removes the harmonic part that the direct box solve
        leaves inside the mask (typically 5-10 steps reach ``tol``). 0 keeps the direct solve.
    tol : float
        Relative residual ``||r|| / ||b||`` at which the iterations stop (the core CG's rule).
    snap : bool
        Round the solution to the measured phase plus 2 pi k per voxel (exact values wherever the
        Laplacian estimate is within pi of the truth), and make the 2 pi offsets consistent
        between echoes (see :func:`_snap`). Use with ``iterations`` > 0 when a mask is given:
        the harmonic part of the direct solve can exceed pi and would then leave 2 pi steps.
    return_info : bool
        Also return a dict with the number of iterations done.

    Returns
    -------
    ndarray, float32, same shape as ``phase``
        Unwrapped phase in rad, 0 outside the mask. Without ``snap``: the true phase plus a
        per-echo constant and, with a mask and ``iterations=0``, a harmonic function inside the
        mask; its mean over the mask (or the grid) is 0 per echo. With ``snap``: congruent to
        the input modulo 2 pi voxel by voxel, with one 2 pi multiple shared by all echoes.
    """
    phi = np.asarray(phase, dtype=np.float32)
    if phi.ndim not in (3, 4):
        raise InputDataError(f"phase must be 3D or 4D, got shape {phi.shape}")
    squeeze = phi.ndim == 3
    info = {"iterations": 0}
    # echo-first layout: contiguous 3D blocks for the finite differences, batched DCTs
    pe = phi[None] if squeeze else np.moveaxis(phi, -1, 0)
    n_e = pe.shape[0]
    if mask is None:
        box = (slice(None),) * 3
        mb = None
        sub = np.ascontiguousarray(pe)
    else:
        m = np.asarray(mask, dtype=bool)
        if m.shape != phi.shape[:3]:
            raise InputDataError(f"mask shape {m.shape} differs from the phase grid {phi.shape[:3]}")
        if not m.any():
            out = np.zeros_like(phi)
            return (out, info) if return_info else out
        # the mask's bounding box (+1 voxel), zero-padded at its far ends to FFT-friendly sizes:
        # with a mask the boundary of the box plays no role for the solution inside the mask
        box = bounding_box(m, margin=1)
        inner = tuple(b.stop - b.start for b in box)
        work = tuple(sfft.next_fast_len(n, real=True) for n in inner)
        core = tuple(slice(0, n) for n in inner)
        mb = np.zeros(work, dtype=bool)
        mb[core] = m[box]
        sub = np.zeros((n_e,) + work, dtype=np.float32)
        sub[(slice(None),) + core] = pe[(slice(None),) + box]
    rhs = np.empty(sub.shape, dtype=np.float32)
    for e in range(n_e):
        rhs[e] = phase_laplacian(sub[e], voxel_size, mb, method)
    u = _solve_batched(rhs, voxel_size)
    if mb is not None and iterations > 0:
        u *= mb
        u, info["iterations"] = _refine_pcg(u, rhs, mb, voxel_size, int(iterations), float(tol))
    del rhs
    if snap:
        info["echo_offsets_2pi"] = _snap(u, sub, mb)
    else:
        for e in range(n_e):
            if mb is None:
                u[e] -= np.float32(u[e].mean(dtype=np.float64))
            else:
                u[e] -= np.float32(u[e][mb].mean(dtype=np.float64))
    if mb is None:
        out = u[0] if squeeze else np.ascontiguousarray(np.moveaxis(u, 0, -1))
    else:
        u *= mb
        out = np.zeros(phi.shape, dtype=np.float32)
        uc = u[(slice(None),) + core]
        if squeeze:
            out[box] = uc[0]
        else:
            out[box + (slice(None),)] = np.moveaxis(uc, 0, -1)
    return (out, info) if return_info else out
