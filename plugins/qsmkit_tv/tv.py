"""TV-ADMM dipole inversion with closed-form updates (Bilgic et al. 2014).

References
----------
Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with
L1-regularization and automatic parameter selection. Magn Reson Med 2014;72:1444-1459.
Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with L2-regularization.
J Magn Reson Imaging 2014;40:181-191.

The problem (field ``f`` and ``chi`` in ppm, gradient in 1/mm, ``W`` the mask)::

    min_chi  1/2 || W (D chi - f) ||_2^2 + lambda || grad chi ||_1        (isotropic TV)

is split with ``z = grad chi`` and ``y = D chi`` (scaled ADMM). On the padded working grid the
dipole convolution ``D`` (the kernel of core :class:`qsmkit.operators.Dipole`, periodic on that
grid) and the periodic forward difference are both diagonal in k-space, so the chi-update is one
k-space division::

    X = [rho_d D F(y - v) + rho F(grad^H (z - u))] / (rho_d D^2 + rho |E|^2)

with ``|E(k)|^2 = sum_i 4 sin^2(pi k_i / N_i) / h_i^2`` (:func:`laplacian_kernel`, the kernel of
the periodic Laplacian). ``grad`` itself is the core :class:`qsmkit.operators.Gradient` (forward
differences, adjoint ``-div``); it differs from the periodic one only on the last slice of the
padded grid, where chi is zero. The y-update is pointwise and the z-update a soft threshold of
``grad chi + u`` at ``lambda / rho``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import GeometryError, InputDataError
from qsmkit.fft import padded_shape
from qsmkit.operators import Dipole, Gradient, bounding_box, laplacian_kernel

__all__ = ["tv_admm", "WorkGrid", "shrink"]


def shrink(w, t: float, out=None):
    """Isotropic soft threshold of a (3, ...) torch tensor: ``w * max(0, 1 - t / |w|)``."""
    import torch

    mag = torch.sqrt((w * w).sum(0))
    scale = torch.clamp(1.0 - t / torch.clamp(mag, min=1e-12), min=0.0)
    if out is None:
        return w * scale
    return torch.mul(w, scale, out=out)


@dataclass
class WorkGrid:
    """The padded working grid: the mask's bounding box (plus a margin), zero-padded.

    Data sit at the origin corner of the FFT grid (as the core torch multipliers expect).
    """

    shape: tuple          # full input grid
    box: tuple            # slices of the bounding box in the input grid
    fft_shape: tuple      # working (FFT) grid
    mask: np.ndarray      # bool mask, full grid

    @classmethod
    def make(cls, field, mask, voxel_size, b0_dir, padding: float, margin: int, name: str) -> "WorkGrid":
        f = np.asarray(field)
        if f.ndim != 3:
            raise InputDataError(f"{name}: local field must be 3D, got shape {f.shape}")
        m = np.asarray(mask)
        if m.shape != f.shape:
            raise GeometryError(f"{name}: mask {m.shape} and field {f.shape} are not one grid")
        if len(tuple(voxel_size)) != 3 or min(float(v) for v in voxel_size) <= 0:
            raise InputDataError(f"{name}: voxel_size must be 3 positive numbers (mm), got {voxel_size}")
        b = np.asarray(b0_dir, dtype=np.float64).ravel()
        if b.size != 3 or not np.isfinite(b).all() or np.linalg.norm(b) == 0:
            raise InputDataError(f"{name}: b0_dir must be a non-zero 3-vector, got {b0_dir}")
        m = m > 0
        if not m.any():
            raise InputDataError(f"{name}: the mask is empty (all zero); check the mask / background stage")
        if not np.isfinite(f[m]).all():
            raise InputDataError(f"{name}: the local field has NaN/inf values inside the mask")
        if padding < 1.0:
            raise InputDataError(f"{name}: padding must be >= 1, got {padding}")
        box = bounding_box(m, margin)
        sub = tuple(s.stop - s.start for s in box)
        fs = padded_shape(sub, padding) if padding > 1.0 else padded_shape(sub, 1.0 + 1e-9)
        return cls(tuple(f.shape), box, fs, m)

    @property
    def sub_shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.box)

    def to_work(self, x, device, dtype=None):
        """Masked ``x`` cropped to the box, zero-padded to the FFT grid, as a torch tensor."""
        import torch

        a = np.where(self.mask, np.asarray(x, dtype=np.float32), np.float32(0))[self.box]
        out = torch.zeros(self.fft_shape, dtype=torch.float32, device=device)
        sx, sy, sz = a.shape
        out[:sx, :sy, :sz] = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return out

    def from_work(self, x) -> np.ndarray:
        """The box of a working-grid tensor, back on the full grid (float32, zero outside the mask)."""
        sx, sy, sz = self.sub_shape
        out = np.zeros(self.shape, np.float32)
        out[self.box] = x[:sx, :sy, :sz].detach().cpu().numpy()
        out[~self.mask] = 0
        return out


def tv_admm(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float], *,
            lam: float = 5e-5, rho: float | None = None, rho_data: float = 0.3, max_iter: int = 15,
            tol: float = 1e-3, padding: float = 1.0, margin: int = 4, device: Any = "cpu",
            return_info: bool = False):
    """Susceptibility by TV-regularised ADMM with closed-form updates (Bilgic et al. 2014).

    Solves ``min 1/2 ||W (D chi - f)||^2 + lam ||grad chi||_1`` (isotropic TV, ``W`` the mask)
    with two splits, ``z = grad chi`` (penalty ``rho``) and ``y = D chi`` (penalty ``rho_data``):
    the chi-update is one k-space division, ``(rho_data D^2 + rho |E|^2) X = rho_data D F(y - v)
    + rho F(grad^H (z - u))``; the y-update is pointwise, ``y = (W f + rho_data (D chi + v)) /
    (W + rho_data)``; the z-update a soft threshold at ``lam / rho``. With the mask in the data
    term the field outside the mask is not forced to zero (the closed form of Bilgic's unweighted
    problem does that, and biases chi near the brain edge).

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Local field in ppm of B0.
    mask : ndarray, (x, y, z)
        Region of valid field (bool or 0/1); chi is zero outside.
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    lam : float
        TV weight (ppm mm) for a field in ppm (5e-5: best NRMSE on the simulator's 1 mm head; the
        fields of Bilgic 2014 / QSM.jl's 1e-3 are on a different scale).
    rho : float, optional
        ADMM penalty of the gradient split; default ``100 * lam`` (Bilgic 2014, QSM.jl).
    rho_data : float
        ADMM penalty of the data split ``y = D chi`` (dimensionless, data weights are 0/1; 0.3).
    max_iter : int
        Maximum ADMM iterations (15: on the 1 mm head NRMSE is 10.9 % at 15, 10.3 % at 20).
    tol : float
        Stop when ``||chi_k - chi_{k-1}|| / ||chi_k|| < tol``.
    padding : float
        Minimum zero-padding factor of the bounding box per axis (1: only ``margin``).
    margin : int
        Voxels added around the mask's bounding box before padding.
    device : str or torch.device
        Torch device (``cpu``, ``cuda``, ``auto``).
    return_info : bool
        Also return a dict with ``n_iter``, ``converged``, ``fft_shape``.

    Returns
    -------
    ndarray, float32, (x, y, z)
        Susceptibility in ppm (zero mean over the working grid; reference it afterwards).
    """
    import torch

    from qsmkit.device import resolve_device

    if lam <= 0:
        raise InputDataError(f"tv: lambda must be > 0, got {lam}")
    rho = 100.0 * lam if rho is None else float(rho)
    if rho <= 0 or rho_data <= 0:
        raise InputDataError(f"tv: rho and rho_data must be > 0, got rho={rho}, rho_data={rho_data}")
    dev = resolve_device(device)
    grid = WorkGrid.make(field, mask, voxel_size, b0_dir, padding, margin, "tv")
    fs = grid.fft_shape
    dims = (-3, -2, -1)
    dip = Dipole(fs, voxel_size, b0_dir, padding=1.0, device=dev)   # periodic on the working grid
    unit = all(float(h) == 1.0 for h in voxel_size)
    grad = Gradient(fs, None if unit else voxel_size)   # same operator at 1 mm, without the scaling copy
    d = dip.kernel
    e2 = torch.from_numpy(laplacian_kernel(fs, voxel_size)).to(dev)
    denom = rho_data * d * d + rho * e2
    denom[0, 0, 0] = 1.0                     # D(0) = E(0) = 0: the mean is free; keep it at 0
    a_grad = rho / denom                     # X = a_grad F(grad^H(z - u)) + a_data F(y - v)
    a_data = rho_data * d / denom
    del denom, e2
    w = grid.to_work(np.ones(grid.shape, np.float32), dev)
    wf = grid.to_work(field, dev)            # W f
    wdiv = 1.0 / (w + rho_data)
    del w

    x = torch.zeros(fs, device=dev)
    dx_field = torch.zeros(fs, device=dev)   # D chi
    y = wf.clone()                           # start: y = W f
    v = torch.zeros(fs, device=dev)
    gx = torch.zeros((3,) + tuple(fs), device=dev)
    z = torch.zeros_like(gx)
    u = torch.zeros_like(gx)
    t = lam / rho
    n_iter, converged = 0, False
    for k in range(int(max_iter)):
        n_iter = k + 1
        # chi-update (k-space division)
        r = grad.adjoint(z - u)
        spec = torch.fft.rfftn(r, dim=dims)
        spec *= a_grad
        spec.addcmul_(torch.fft.rfftn(y - v, dim=dims), a_data)
        x_new = torch.fft.irfftn(spec, s=fs, dim=dims)
        spec *= d
        dx_field = torch.fft.irfftn(spec, s=fs, dim=dims)
        del spec
        dx = torch.linalg.vector_norm(x_new - x) / torch.clamp(torch.linalg.vector_norm(x_new), min=1e-12)
        x = x_new
        # y-update (pointwise) and its dual
        dx_field += v                                   # D chi + v
        y = (wf + rho_data * dx_field) * wdiv
        v = dx_field - y
        # z-update (soft threshold) and its dual
        grad.apply(x, out=gx)
        u += gx
        shrink(u, t, out=z)
        u -= z
        if float(dx) < tol:
            converged = True
            break
    chi = grid.from_work(x)
    if return_info:
        return chi, {"n_iter": n_iter, "converged": converged, "fft_shape": fs}
    return chi
