"""COSMOS: susceptibility from local fields measured at several head orientations (Liu et al. 2009).

Every orientation ``i`` gives a local field ``F_i = D_i * chi`` (in k-space) on the *same*
(reference) grid, with its own dipole kernel ``D_i`` built from B0 expressed in the reference
voxel frame. The dipole kernels of different orientations vanish on different cones, so the
joint least-squares problem is well posed:

* closed form (:func:`cosmos`): ``chi(k) = sum_i D_i(k) F_i(k) / (sum_i D_i(k)^2 + eps)``;
* weighted iterative form (:func:`cosmos_cg`): minimise
  ``sum_i || W_i (A_i chi - f_i) ||^2 + eps || chi ||^2`` over ``chi`` supported in the mask,
  with ``A_i = crop . ifft . D_i . fft . pad`` and ``W_i`` each orientation's noise weight
  (zero outside its mask), by conjugate gradients on the normal equations (torch, CPU or GPU).

Both are built on the core operators: one :class:`qsmkit.operators.Dipole` per orientation (the
one dipole convolution, :func:`qsmkit.physics.dipole_kernel`), :class:`CosmosOperator` for the
weighted multi-orientation model and :func:`qsmkit.operators.cg` for the solve.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError
from qsmkit.operators import Dipole, Identity, Linop, cg, is_torch
from qsmkit.progress import progress_callback

__all__ = ["cosmos", "cosmos_cg", "condition_map", "CosmosOperator"]


def _dipoles(shape, voxel_size, b0_dirs, padding: float) -> list[Dipole]:
    """One core dipole operator per orientation, all on the same zero-padded grid."""
    pshape = qfft.padded_shape(shape, padding)
    return [Dipole(shape, voxel_size, b, fft_shape=pshape) for b in b0_dirs]


def _check(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]]) -> tuple[int, ...]:
    if len(fields) != len(b0_dirs):
        raise InputDataError(f"cosmos: {len(fields)} fields but {len(b0_dirs)} B0 directions")
    if len(fields) < 1:
        raise InputDataError("cosmos: needs at least one field")
    shape = tuple(np.shape(fields[0]))
    if len(shape) != 3 or any(tuple(np.shape(f)) != shape for f in fields):
        raise InputDataError("cosmos: all fields must be 3D arrays on the same grid")
    return shape


def cosmos(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]], voxel_size: Sequence[float],
           mask: np.ndarray, regularization: float = 1e-3, padding: float = 1.5) -> np.ndarray:
    """Closed-form COSMOS: ``chi = ifft( sum_i D_i F_i / (sum_i D_i^2 + eps) )`` inside ``mask``.

    Parameters
    ----------
    fields : sequence of ndarray (x, y, z)
        Local fields in ppm of B0, all on the reference grid (registered).
    b0_dirs : sequence of 3-vectors
        B0 direction of each orientation in the reference voxel frame.
    voxel_size : 3 floats
        Reference voxel size in mm.
    mask : ndarray (x, y, z)
        Region where every field is valid (e.g. the intersection of the registered masks); the
        fields are zeroed outside it and so is ``chi``.
    regularization : float
        ``eps`` added to ``sum_i D_i^2`` (dimensionless; ``D`` is in [-2/3, 1/3]); keeps the
        division stable where every kernel is small.
    padding : float
        Minimum zero-padding factor per axis (1 disables padding).

    Returns
    -------
    ndarray float32 (x, y, z)
        Susceptibility in ppm, zero mean over the padded grid (``D(0) = 0``); reference it afterwards.
    """
    shape = _check(fields, b0_dirs)
    m = np.asarray(mask) > 0
    num = None
    den = None
    for f, op in zip(fields, _dipoles(shape, voxel_size, b0_dirs, padding)):
        d = op.kernel
        spec = op.to_spectrum(np.where(m, np.asarray(f, dtype=np.float32), np.float32(0)))
        spec *= d
        if num is None:
            num, den, ref = spec, d * d, op
        else:
            num += spec
            den += d * d
        del d, spec, op
    den += np.float32(regularization)
    den[den == 0] = 1.0  # only where every D_i = 0 (k = 0), where the numerator is 0 too
    num /= den
    del den
    chi = ref.from_spectrum(num)
    chi[~m] = 0
    return chi


def condition_map(b0_dirs: Sequence[Sequence[float]], shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """``sum_i D_i(k)^2`` on the rfft half grid (float32): where it is small, COSMOS is ill-conditioned."""
    out = None
    for op in _dipoles(tuple(shape), voxel_size, b0_dirs, 1.0):
        d = op.kernel
        out = d * d if out is None else out + d * d
    return out


class CosmosOperator(Linop):
    """Weighted multi-orientation dipole model: ``chi (x, y, z) -> (W_i D_i M chi)_i (n, x, y, z)``.

    ``D_i`` is orientation ``i``'s :class:`~qsmkit.operators.Dipole` (ppm -> ppm), ``W_i`` its
    data weight and ``M`` the support mask of ``chi``. numpy or torch (follows the input).

    Parameters
    ----------
    dipoles : sequence of Dipole
        One per orientation, on the same grid.
    mask : ndarray (x, y, z)
        Support of ``chi`` (bool or 0/1).
    weights : sequence of ndarray, optional
        Data weights ``W_i`` (default 1).
    """

    def __init__(self, dipoles: Sequence[Dipole], mask, weights: Sequence | None = None):
        shape = dipoles[0].ishape
        super().__init__(shape, (len(dipoles),) + shape, np.float32)
        self.dipoles = list(dipoles)
        self.mask = mask
        self.weights = list(weights) if weights is not None else None
        self.w2 = None if weights is None else [w * w for w in self.weights]

    def apply(self, x):
        x = x * self.mask
        outs = [d.apply(x) for d in self.dipoles]
        if self.weights is not None:
            outs = [w * o for w, o in zip(self.weights, outs)]
        return _stack(outs, x)

    def adjoint(self, y):
        acc = None
        for i, d in enumerate(self.dipoles):
            yi = y[i] if self.weights is None else self.weights[i] * y[i]
            t = d.adjoint(yi)
            acc = t if acc is None else acc + t
        return acc * self.mask

    def normal(self, x):
        """``M sum_i D_i W_i^2 D_i M x`` (one pass per orientation, no stacked intermediate)."""
        x = x * self.mask
        acc = None
        for i, d in enumerate(self.dipoles):
            t = d.apply(x)
            t = d.adjoint(t if self.w2 is None else self.w2[i] * t)
            acc = t if acc is None else acc + t
        return acc * self.mask

    def weighted_rhs(self, fields):
        """``A^H W f = M sum_i D_i W_i^2 f_i`` (the right-hand side of the normal equations)."""
        acc = None
        for i, (d, f) in enumerate(zip(self.dipoles, fields)):
            t = d.adjoint(f if self.w2 is None else self.w2[i] * f)
            acc = t if acc is None else acc + t
        return acc * self.mask

    @classmethod
    def example(cls):
        shape, vs = (6, 5, 4), (1.0, 1.0, 1.5)
        rng = np.random.default_rng(11)
        dips = [Dipole(shape, vs, b, padding=1.5) for b in ((0, 0, 1), (0.3, 0, 0.95), (0, -0.4, 0.9))]
        mask = rng.random(shape) > 0.3
        return cls(dips, mask.astype(np.float32), [rng.random(shape).astype(np.float32) for _ in dips])


def _stack(arrays, like):
    if is_torch(like):
        import torch

        return torch.stack(arrays)
    return np.stack(arrays)


def _relative_weights(weights, m_np: np.ndarray, n: int) -> list[np.ndarray]:
    """Per-orientation weights, zero outside the mask, scaled together to mean 1 inside it."""
    if weights is None:
        return [m_np.astype(np.float32) for _ in range(n)]
    if len(weights) != n:
        raise InputDataError(f"cosmos_cg: {n} fields but {len(weights)} weights")
    w_list = [np.where(m_np, np.clip(np.asarray(w, dtype=np.float32), 0, None), np.float32(0)) for w in weights]
    scale = float(np.mean([w[m_np].mean() for w in w_list]))
    if not np.isfinite(scale) or scale <= 0:
        raise InputDataError("cosmos_cg: the weights are zero inside the mask")
    return [w / np.float32(scale) for w in w_list]


def _backend(device: str, backend: str):
    """A converter numpy -> the solve's arrays: numpy (scipy FFTs on CPU) or torch on ``device``."""
    if backend not in ("auto", "numpy", "torch"):
        raise InputDataError(f"cosmos_cg: unknown backend {backend!r}")
    if backend == "numpy" or (backend == "auto" and str(device).startswith("cpu")):
        # scipy's multithreaded FFTs are faster than torch's on CPU
        return lambda a: np.ascontiguousarray(a, dtype=np.float32)
    import torch

    dev = torch.device(device)
    return lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)


def cosmos_cg(fields: Sequence[np.ndarray], b0_dirs: Sequence[Sequence[float]], voxel_size: Sequence[float],
              mask: np.ndarray, weights: Sequence[np.ndarray] | None = None, regularization: float = 1e-3,
              padding: float = 1.5, max_iter: int = 50, tol: float = 1e-3, device: str = "cpu",
              x0: np.ndarray | None = None, log=None, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """Weighted COSMOS by conjugate gradients (scipy on CPU, torch on GPU).

    Solves ``(sum_i A_i^T W_i^2 A_i + eps I) chi = sum_i A_i^T W_i^2 f_i`` for ``chi`` supported
    in ``mask``, where ``A_i chi = crop(ifft(D_i fft(pad(chi))))`` is orientation ``i``'s dipole
    convolution (ppm -> ppm) and ``W_i`` its weight (:class:`CosmosOperator`), with the core
    :func:`qsmkit.operators.cg`.

    Parameters
    ----------
    fields : sequence of ndarray (x, y, z)
        Registered local fields in ppm.
    b0_dirs : sequence of 3-vectors
        B0 of each orientation in the reference voxel frame.
    voxel_size : 3 floats
        mm.
    mask : ndarray
        Support of ``chi`` and of the data terms (e.g. intersection of the registered masks).
    weights : sequence of ndarray or None
        Per-orientation data weights (e.g. noise weights in 1/ppm, zero outside each orientation's
        mask). They are scaled together so that their mean inside ``mask`` is 1 (relative weights
        between orientations are kept). ``None``: uniform weights.
    regularization : float
        Tikhonov weight ``eps`` (same scale as in :func:`cosmos`).
    padding : float
        Minimum zero-padding factor per axis.
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when ``||r|| / ||b||`` falls to ``tol`` (the core CG's rule).
    device : str
        ``"cpu"`` (scipy FFTs, multithreaded) or a torch device string such as ``"cuda"``.
    x0 : ndarray, optional
        Starting point (ppm), e.g. the closed-form solution.
    log : callable, optional
        Called with progress lines.
    backend : {"auto", "numpy", "torch"}
        ``auto``: scipy FFTs on CPU, torch on any other device.

    Returns
    -------
    chi : ndarray float32 (x, y, z)
        Susceptibility in ppm (zero outside ``mask``).
    info : dict
        ``iterations``, ``relative_residual``, ``converged``.
    """
    shape = _check(fields, b0_dirs)
    m_np = np.asarray(mask) > 0
    w_list = _relative_weights(weights, m_np, len(fields))
    to = _backend(device, backend)
    m = to(m_np)
    op = CosmosOperator(_dipoles(shape, voxel_size, b0_dirs, padding), m, [to(w) for w in w_list])
    del w_list
    system = op.N + float(regularization) * Identity(shape)
    b = op.weighted_rhs([to(np.where(m_np, np.asarray(f, dtype=np.float32), np.float32(0))) for f in fields])
    x0_t = None if x0 is None else to(np.asarray(x0, dtype=np.float32)) * m

    def progress(k, x, rel):
        if log is not None and k % 10 == 0:
            log(f"CG iteration {k}: relative residual {rel:.2e}")

    with progress_callback(int(max_iter), "COSMOS CG") as tick:
        x, info = cg(system, b, x0_t, tol=float(tol), max_iter=int(max_iter),
                     callback=lambda *a: (tick(*a), progress(*a)))
    x = x * m
    chi = x.detach().cpu().numpy().astype(np.float32) if is_torch(x) else np.asarray(x, dtype=np.float32)
    rel = float(info.relative_residual)
    return chi, {"iterations": info.iterations, "relative_residual": rel, "converged": bool(rel <= tol)}
