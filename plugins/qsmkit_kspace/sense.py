"""SENSE forward model and CG-SENSE (Pruessmann et al., MRM 46:638, 2001), batched over slices.

Forward model of one slice with ``M`` sets of maps ``S_m`` (``M = 1`` usually):
``y_c = P F (sum_m S_{m,c} x_m)`` with ``F`` the centred orthonormal 2D FFT and ``P`` the
sampling mask. The normal operator ``A^H A`` only transforms along the axes on which the
mask varies: for fastMRI column masks ``F^H P F = F_W^H P F_W`` (the readout FFTs cancel), and
for full sampling ``A^H A = sum_c |S_c|^2``.

CG-SENSE solves ``(A^H A + lambda I) x = A^H y`` with the core conjugate gradients
(:func:`qsmkit.operators.cg`, batched: scalars per slice, so all slices of a batch iterate
together and converged slices are frozen). :class:`SenseOp` is a core :class:`~qsmkit.operators.Linop`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qsmkit.kspace.arrays import mask_tensor
from qsmkit.operators import Identity, Linop, cg, is_torch

from .transforms import fft2c, ifft2c

__all__ = ["SenseOp", "cg_sense", "mask_tensor"]


class SenseOp(Linop):
    """Batched multi-coil SENSE operator (a core :class:`~qsmkit.operators.Linop`).

    ``apply`` (alias ``forward``): image ``(S, M, H, W)`` -> masked k-space ``(S, C, H, W)``;
    ``adjoint``; ``normal`` with FFTs only along the axes the mask varies on.

    Parameters
    ----------
    maps : torch.Tensor, complex64, (S, M, C, H, W)
        Sensitivity maps.
    mask : torch.Tensor, float32, (S|1, 1, H|1, W|1)
        Sampling mask (see :func:`mask_tensor`).
    """

    def __init__(self, maps, mask):
        import torch

        S, M, C, H, W = maps.shape
        super().__init__((S, M, H, W), (S, C, H, W), np.complex64)
        self.maps = maps
        self.maps_conj = maps.conj()
        self.mask = mask
        H, W = maps.shape[-2:]
        full = bool((mask == 1).all())
        dims = []
        if not full:
            if mask.shape[-2] > 1:
                dims.append(-2)
            if mask.shape[-1] > 1:
                dims.append(-1)
            if not dims:  # mask constant but not one: scalar weights
                dims = [-2, -1]
        self.normal_dims = tuple(dims)
        self.fully_sampled = full
        # Along H the normal operator is pointwise when the mask is constant along H (column masks,
        # full sampling): rows where every map is zero (e.g. the empty half of fastMRI's 2x
        # oversampled readout after the ESPIRiT crop) then stay exactly zero and are skipped.
        self.rows = slice(None)
        if -2 not in self.normal_dims:
            nz = torch.nonzero(maps.abs().amax(dim=(0, 1, 2, 4)) > 0).squeeze(-1)
            if nz.numel() == 0:
                self.rows = slice(0, 0)
            elif int(nz[-1]) - int(nz[0]) + 1 < H:
                self.rows = slice(int(nz[0]), int(nz[-1]) + 1)
        maps_r = maps[..., self.rows, :]
        # Centred FFTs without shifts: for even N, fftc(x) = (-1)^(k+N/2) fft((-1)^n x), so
        # ifftc(P fftc(c)) = D ifft(P fft(D c)) with D = (-1)^n along each transformed axis; D is
        # folded into the maps once (no fftshift copies per iteration).
        if self.normal_dims and all(maps_r.shape[d] % 2 == 0 for d in self.normal_dims):
            for d in self.normal_dims:
                n = maps_r.shape[d]
                sgn = 1.0 - 2.0 * (torch.arange(n, device=maps.device) % 2).to(maps_r.real.dtype)
                shape = [1] * maps_r.ndim
                shape[d] = n
                maps_r = maps_r * sgn.reshape(shape)
            self._shifted = False
        else:
            self._shifted = True
        self._maps_r = maps_r
        self._maps_r_conj = maps_r.conj()

    def coils(self, x):
        """Image ``(S, M, H, W)`` -> coil images ``(S, C, H, W)``."""
        return (self.maps * x.unsqueeze(2)).sum(1)

    def combine(self, c):
        """Coil images ``(S, C, H, W)`` -> ``sum_c conj(S_c) c`` ``(S, M, H, W)``."""
        return (self.maps_conj * c.unsqueeze(1)).sum(2)

    def apply(self, x):
        """``A x``: image ``(S, M, H, W)`` -> masked k-space ``(S, C, H, W)``."""
        if not is_torch(x):
            return self.apply(_tensor(x).to(self.maps.device)).cpu().numpy()
        return fft2c(self.coils(x)) * self.mask

    forward = apply

    def adjoint(self, y):
        """``A^H y``: k-space ``(S, C, H, W)`` -> image ``(S, M, H, W)``."""
        if not is_torch(y):
            return self.adjoint(_tensor(y).to(self.maps.device)).cpu().numpy()
        return self.combine(ifft2c(y * self.mask))

    def normal(self, x):
        """``A^H A x`` with FFTs only along the axes the mask varies on (and only on rows with maps)."""
        import torch

        if not is_torch(x):
            return self.normal(_tensor(x).to(self.maps.device)).cpu().numpy()
        xr = x[..., self.rows, :] if self.rows != slice(None) else x
        c = (self._maps_r * xr.unsqueeze(2)).sum(1)
        if not self.fully_sampled:
            d = self.normal_dims
            if self._shifted:
                c = ifft2c(fft2c(c, dim=d) * self.mask, dim=d)
            else:
                c = torch.fft.ifftn(torch.fft.fftn(c, dim=d, norm="ortho") * self.mask, dim=d, norm="ortho")
        r = (self._maps_r_conj * c.unsqueeze(1)).sum(2)
        if self.rows == slice(None):
            return r
        out = torch.zeros_like(x)
        out[..., self.rows, :] = r
        return out

    def lipschitz_bound(self):
        """Upper bound of ``||A^H A||`` per slice: ``max_x sum_{m,c} |S_{m,c}(x)|^2`` (mask <= 1)."""
        return (self.maps.abs() ** 2).sum(dim=(1, 2)).amax(dim=(-2, -1))

    @classmethod
    def examples(cls):
        import torch

        rng = np.random.default_rng(21)
        S, M, C, H, W = 2, 1, 3, 8, 6

        def crandn(*shape):
            return torch.from_numpy((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64))

        maps = crandn(S, M, C, H, W)
        maps[..., :2, :] = 0  # empty rows: the normal operator skips them
        cols = rng.random((1, W)) < 0.5
        return [cls(maps, mask_tensor(cols, S, (H, W), "cpu")), cls(crandn(1, 2, C, 7, 5), mask_tensor(None, 1, (7, 5), "cpu")),
                cls(crandn(1, 1, 2, H, W), mask_tensor(rng.random((H, W)) < 0.4, 1, (H, W), "cpu"))]


def _tensor(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def cg_sense(kspace, maps, mask, iterations: int = 30, tol: float = 1e-6, lam: float = 0.0,
             log: Callable[[str], None] | None = None):
    """CG-SENSE reconstruction of a batch of slices.

    Parameters
    ----------
    kspace : torch.Tensor, complex64, (S, C, H, W)
        Measured k-space (zeros where not sampled).
    maps : torch.Tensor, complex64, (S, M, C, H, W)
        Sensitivity maps.
    mask : torch.Tensor, float32, broadcastable to (S, 1, H, W)
        Sampling mask.
    iterations : int
        Maximum CG iterations.
    tol : float
        Stop a slice when ``||r|| / ||A^H y|| <= tol`` (0 runs all iterations); the core CG's rule.
    lam : float
        Tikhonov weight ``lambda`` (in the units of the normalised data; 0 = plain SENSE).

    Returns
    -------
    (x, n_iter) : torch.Tensor ``(S, M, H, W)`` complex64 and the iterations run.
    """
    op = SenseOp(maps, mask)
    b = op.adjoint(kspace)
    system = op.N + float(lam) * Identity(op.ishape, np.complex64) if lam else op.N
    x, info = cg(system, b, tol=float(tol), max_iter=int(iterations), batch_dims=1)
    if log:
        log(f"CG-SENSE: {info.iterations} iterations, relative residual {float(np.max(info.relative_residual)):.2e}")
    return x, info.iterations
