"""Rapid two-step dipole inversion (RTS), Kames et al. 2018 (QSMxT's default inverter).

Reference
---------
Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for susceptibility mapping
with sparsity priors. NeuroImage 2018;167:276-283.

Step 1 (the spectrum on the well-conditioned cone ``M = |D| > delta``): the least-squares fit of
the field in the mask by a susceptibility supported in the mask, ``W D W chi = W f`` (``D`` the
whole dipole kernel, ``W`` the mask), a symmetric indefinite system solved by a few preconditioned
MINRES iterations (core :func:`qsmkit.operators.minres`, preconditioner ``1 / max(|D|,
precond_floor)``; early stopping regularises, as LSMR's does in Kames 2018); only ``M F(W chi_1)``
is kept. This grid is zero-padded by ``step1_padding_mm`` per axis so that the periodic copies
of the brain's field do not reach the mask.

Step 2 (ill-conditioned cone), on the mask's bounding box: TV-regularised ADMM that holds the
well-conditioned spectrum::

    min_chi  mu/2 || M (F chi - F chi_1) ||^2 + || grad chi ||_1

with penalty ``rho``; the chi-update is diagonal in k-space,
``X = (mu M X_1 + rho F(grad^H (z - u))) / (mu M + rho |E|^2)``, the z-update a soft threshold
at ``1 / rho``.

Why this step 1 (measured, simulated heads with the default oversampling, from the TRUE local
field, chi NRMSE over the brain mask; MEDI 15.4 % at 1.5 mm and 15.1 % at 1 mm). The published
step 1 fits the masked field with the cone of ``D`` alone and chi free outside the mask (here: 4
CG iterations from the closed-form division, which takes the field outside the mask as zero).
The sub-voxel (oversampled) head's field differs from the grid convolution of its block-averaged
chi by 9 % (mostly at strong gradients), and that fit amplifies the difference: 23.9 % at 1.5 mm
and 21.1 % at 1 mm (the cone of
the TRUE chi instead: 13.8 % and 12.8 %). QSM.jl's step 1 (Krylov on the unmasked ``D``): 35.4 % /
33.0 %. Fitting ``chi`` supported in the mask with the whole kernel removes the out-of-mask
assumption: 19.8 % at 1.5 mm and 17.8 % at 1 mm with the defaults (2.2-2.5 s at 1 mm on 2 cores,
MEDI 7.0-10.2 s). Without the step-1 padding: 22.2 % at 1 mm; 20 iterations with floor 0.05 and
64 mm of padding: 17.2 % in 4x the time; unpreconditioned, 40 MINRES or 20 CG iterations on the
normal equations reach 18-19 %. Step 2 converged (100 iterations) or with QSM.jl's adaptive
penalty changes the result by < 1 point. The defaults were chosen on those two heads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.fft import padded_shape
from qsmkit.operators import Dipole, FourierMultiplier, Gradient, laplacian_kernel, minres

from .tv import WorkGrid, shrink

__all__ = ["rts"]


def rts(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float], *,
        delta: float = 0.15, mu: float = 1e5, rho: float = 10.0, tol: float = 1e-2, max_iter: int = 20,
        minres_iter: int = 8, precond_floor: float = 0.03, step1_padding_mm: float = 40.0,
        padding: float = 1.0, margin: int = 4, device: Any = "cpu", return_info: bool = False):
    """Susceptibility by rapid two-step inversion (Kames et al. 2018).

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
    delta : float
        Threshold of the well-conditioned cone ``|D| > delta`` (0.15, Kames 2018).
    mu : float
        Weight of the well-conditioned data in step 2 (1e5: held practically fixed).
    rho : float
        ADMM penalty of step 2 (10); the TV threshold is ``1 / rho``.
    tol : float
        Step 2 stops when ``||chi_k - chi_{k-1}|| / ||chi_k|| < tol``.
    max_iter : int
        Maximum ADMM iterations of step 2 (20).
    minres_iter : int
        Step-1 MINRES iterations (8); each applies ``D`` and the preconditioner once.
    precond_floor : float
        The step-1 preconditioner is ``1 / max(|D|, precond_floor)`` (0.03).
    step1_padding_mm : float
        Zeros appended per axis to the step-1 grid, mm (40).
    padding : float
        Minimum zero-padding factor of the bounding box per axis.
    margin : int
        Voxels added around the mask's bounding box.
    device : str or torch.device
        Torch device.
    return_info : bool
        Also return a dict (``n_iter``, ``minres_iter``, ``converged``, ``fft_shape``, ``step1_shape``).

    Returns
    -------
    ndarray, float32, (x, y, z)
        Susceptibility in ppm (zero mean over the working grid).
    """
    import torch

    from qsmkit.device import resolve_device

    if not 0.0 < delta < 2.0 / 3.0:
        raise InputDataError(f"rts: delta must be in (0, 2/3), got {delta}")
    if mu <= 0 or rho <= 0 or precond_floor <= 0 or step1_padding_mm < 0:
        raise InputDataError(f"rts: mu, rho, precond_floor must be > 0 and step1_padding_mm >= 0, got mu={mu}, "
                             f"rho={rho}, precond_floor={precond_floor}, step1_padding_mm={step1_padding_mm}")
    dev = resolve_device(device)
    grid = WorkGrid.make(field, mask, voxel_size, b0_dir, padding, margin, "rts")
    x1, n_minres, step1_shape = _step1(grid, field, voxel_size, b0_dir, minres_iter, precond_floor,
                                       step1_padding_mm, dev)
    fs = grid.fft_shape
    dip = Dipole(fs, voxel_size, b0_dir, padding=1.0, device=dev)
    cone = (dip.kernel.abs() > delta).to(torch.float32)          # M: the well-conditioned cone
    x1_hat = torch.fft.rfftn(x1, dim=(-3, -2, -1)) * cone    # M F(chi_1)
    del x1

    # ---- step 2: TV on the ill-conditioned cone, the well-conditioned spectrum held
    e2 = torch.from_numpy(laplacian_kernel(fs, voxel_size)).to(dev)
    denom = mu * cone + rho * e2
    denom[0, 0, 0] = 1.0
    inv = 1.0 / denom
    del denom, e2
    b = x1_hat * (mu * inv)                  # mu M X_1 / denom
    rinv = rho * inv
    del x1_hat, inv
    grad = Gradient(fs, voxel_size)
    x = dip.from_spectrum(b.clone())
    gx = grad.apply(x)
    z = shrink(gx, 1.0 / rho)
    u = gx - z
    v = torch.empty_like(z)
    n_iter, converged = 0, False

    def update(spec):
        spec *= rinv
        spec += b
        return spec

    for k in range(int(max_iter)):
        n_iter = k + 1
        torch.sub(z, u, out=v)
        x_new = dip.filter(grad.adjoint(v), update)
        dx = torch.linalg.vector_norm(x_new - x) / torch.clamp(torch.linalg.vector_norm(x_new), min=1e-12)
        x = x_new
        grad.apply(x, out=gx)
        u += gx
        shrink(u, 1.0 / rho, out=z)
        u -= z
        if float(dx) < tol:
            converged = True
            break
    chi = grid.from_work(x)
    if return_info:
        return chi, {"n_iter": n_iter, "minres_iter": n_minres, "converged": converged,
                     "fft_shape": fs, "step1_shape": step1_shape}
    return chi


def _step1(grid: WorkGrid, field, voxel_size, b0_dir, n_iter: int, floor: float, pad_mm: float, dev):
    """Step 1: ``W D W chi = W f`` by preconditioned MINRES on the padded grid; ``W chi_1`` on ``grid``.

    Returns the masked solution on ``grid``'s FFT grid, the iterations run and the step-1 grid.
    """
    import torch

    sub = grid.sub_shape
    extra = [int(np.ceil(pad_mm / float(v))) for v in voxel_size]
    fs1 = padded_shape(tuple(n + max(e, f - n) for n, e, f in zip(sub, extra, grid.fft_shape)), 1.0 + 1e-9)
    big = replace(grid, fft_shape=fs1)
    f = big.to_work(field, dev)
    w = big.to_work(np.ones(grid.shape, np.float32), dev)
    dip = Dipole(fs1, voxel_size, b0_dir, padding=1.0, device=dev)
    precond = FourierMultiplier(fs1, 1.0 / torch.clamp(dip.kernel.abs(), min=float(floor)), rfft=True)
    x, info = minres(lambda v: w * dip.apply(w * v), w * f, M=precond, tol=0.0, max_iter=int(n_iter))
    x *= w
    out = torch.zeros(grid.fft_shape, dtype=torch.float32, device=dev)
    sx, sy, sz = sub
    out[:sx, :sy, :sz] = x[:sx, :sy, :sz]
    return out, info.iterations, fs1
