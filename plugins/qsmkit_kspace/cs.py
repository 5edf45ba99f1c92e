"""L1-wavelet compressed sensing with FISTA or POGM, batched over slices.

Solves ``min_x 1/2 ||A x - y||^2 + lambda ||Psi x||_1`` per slice, with ``A`` the SENSE operator
(:class:`~qsmkit_kspace.sense.SenseOp`) and ``Psi`` an orthogonal 2D wavelet transform of real
and imaginary parts (the coarsest approximation band is not penalised). Because ``Psi`` is
orthogonal, the proximal step is exact: ``Psi^T soft(Psi z, c lambda)`` with the complex soft
threshold ``w * max(0, 1 - t / |w|)``.

Wavelets come from maintained libraries:

- ``pywt`` (PyWavelets, CPU): ``mode="periodization"``, orthogonal when each size is divisible
  by ``2**levels`` (levels are lowered until it is);
- ``ptwt`` (PyTorch wavelet toolbox, CPU/GPU): ``MatrixWavedec2`` boundary wavelets
  (orthogonalised with QR), orthogonal for even sizes.

``backend="auto"`` uses pywt on CPU and ptwt on CUDA. The step is ``1 / L`` with
``L = max_x sum_c |S_c(x)|^2`` (an upper bound of ``||A^H A||``; 1 for ESPIRiT maps).

FISTA: Beck & Teboulle, SIAM J Imaging Sci 2:183 (2009). POGM: Taylor, Hendrickx & Glineur
(2017) / Kim & Fessler (2018), as in MIRT's ``pogm_restart``; both with the gradient restart of
O'Donoghue & Candes (2015) per slice (``restart``).
"""

from __future__ import annotations

from typing import Callable

from qsmkit.device import resolve_device
from qsmkit.errors import InputDataError, ParameterError

from .sense import SenseOp

__all__ = ["Wavelet2D", "cs_wavelet", "fista", "pogm"]


class Wavelet2D:
    """Orthogonal 2D wavelet transform of complex ``(..., H, W)`` torch tensors with an exact L1 prox.

    Parameters
    ----------
    shape : (H, W)
        Image size.
    wavelet : str
        Orthogonal wavelet name (``db1`` (Haar) ... ``db8``, ``sym4``, ``coif1``...).
    levels : int
        Requested decomposition levels.
    backend : str
        ``pywt``, ``ptwt`` or ``auto`` (pywt on CPU, ptwt on CUDA).
    device : torch.device or str
        Where the images live (anything :func:`qsmkit.device.resolve_device` accepts; default CPU).
    """

    def __init__(self, shape, wavelet: str = "db4", levels: int = 4, backend: str = "auto", device="cpu"):
        import pywt

        try:
            w = pywt.Wavelet(wavelet)
        except ValueError:
            raise ParameterError(f"unknown wavelet '{wavelet}'; use an orthogonal one such as db1, db4, sym4, coif1") from None
        if not w.orthogonal:
            raise ParameterError(f"wavelet '{wavelet}' is not orthogonal; use e.g. db4, sym4 or coif1")
        self.device = resolve_device(device)
        if backend == "auto":
            backend = "ptwt" if self.device.type == "cuda" else "pywt"
        if backend not in ("pywt", "ptwt"):
            raise ParameterError(f"wavelet backend '{backend}': use auto, pywt or ptwt")
        H, W = (int(s) for s in shape)
        self.backend, self.wavelet, self.shape = backend, wavelet, (H, W)
        if backend == "pywt":
            lev = min(int(levels), pywt.dwt_max_level(min(H, W), w.dec_len))
            while lev > 0 and (H % (2 ** lev) or W % (2 ** lev)):
                lev -= 1
        else:
            if H % 2 or W % 2:
                raise InputDataError(f"image size {H}x{W}: the ptwt wavelet backend needs even sizes")
            lev, h, wd = 0, H, W
            while lev < int(levels) and min(h, wd) >= w.dec_len and h % 2 == 0 and wd % 2 == 0:
                lev, h, wd = lev + 1, h // 2, wd // 2
        if lev < 1:
            raise InputDataError(f"image size {H}x{W} allows no orthogonal {wavelet} wavelet level; "
                                 f"use even sizes or a shorter wavelet (db1)")
        self.levels = lev
        if backend == "ptwt":
            import warnings

            from ptwt.matmul_transform_2 import MatrixWavedec2, MatrixWaverec2

            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            self._fwd = MatrixWavedec2(wavelet, level=lev)
            self._inv = MatrixWaverec2(wavelet)

    def prox_l1(self, z, thresh):
        """``Psi^T soft(Psi z, thresh)`` for complex ``z`` (B, ..., H, W); the approximation band is kept.

        ``thresh`` is a number or a ``(B,)`` tensor (one threshold per problem along the first axis).
        """
        import torch

        shp = z.shape
        zr = torch.stack([z.real, z.imag]).reshape((2, -1) + tuple(shp[-2:]))
        nflat = zr.shape[1]
        if torch.is_tensor(thresh) and thresh.numel() > 1:
            per = nflat // thresh.numel()
            thr_t = thresh.detach().reshape(-1).to(torch.float32).repeat_interleave(per).reshape(nflat, 1, 1)
        else:
            thr_t = torch.full((nflat, 1, 1), float(thresh), dtype=torch.float32)
        if self.backend == "pywt":
            import numpy as np
            import pywt

            arr = zr.detach().cpu().numpy()
            coeffs = pywt.wavedec2(arr, self.wavelet, mode="periodization", level=self.levels, axes=(-2, -1))
            t = thr_t.cpu().numpy()
            out = [coeffs[0]]
            for det in coeffs[1:]:
                new = []
                for c in det:
                    mag = np.sqrt(c[0] * c[0] + c[1] * c[1])
                    scale = np.maximum(1 - t / np.maximum(mag, 1e-30), 0).astype(c.dtype)
                    new.append(c * scale[None])
                out.append(tuple(new))
            rec = pywt.waverec2(out, self.wavelet, mode="periodization", axes=(-2, -1))
            rt = torch.from_numpy(np.ascontiguousarray(rec)).to(z.device)
        else:
            flat = zr.reshape((-1,) + tuple(shp[-2:])).float()
            coeffs = self._fwd(flat)
            n = zr.shape[1]
            out = [coeffs[0]]
            for det in coeffs[1:]:
                new = []
                for c in det:
                    c2 = c.reshape((2, n) + tuple(c.shape[-2:]))
                    mag = torch.sqrt(c2[0] ** 2 + c2[1] ** 2)
                    scale = torch.clamp(1 - thr_t.to(mag.device) / mag.clamp_min(1e-30), min=0)
                    new.append((c2 * scale).reshape(c.shape))
                out.append(type(det)(*new))
            rt = self._inv(out).reshape(zr.shape)
        return torch.complex(rt[0], rt[1]).reshape(shp).to(z.dtype)


def _nbatch(x) -> int:
    return int(x.shape[0]) if x.ndim > 1 else 1


def _bdot(a, b):
    """Per-problem real inner product ``Re <a, b>``: shape ``(B,)`` (B = first axis, or 1 for vectors)."""
    n = _nbatch(a)
    return (a.conj() * b).real.reshape(n, -1).sum(-1) if a.is_complex() else (a * b).reshape(n, -1).sum(-1)


def _bcast(t, x):
    """``(B,)`` coefficients shaped to broadcast against ``x``."""
    return t.reshape((-1,) + (1,) * (x.ndim - 1)) if x.ndim > 1 else t


def _gr_restart(fgrad_map, dy):
    """Gradient restart test of O'Donoghue & Candes (MIRT ``gr_restart`` with cutoff 0), per problem."""
    return _bdot(-fgrad_map, dy) <= 0


def fista(grad: Callable, prox: Callable, x0, step: float, iterations: int, restart: bool = True):
    """FISTA (fast proximal gradient), with optional gradient restart; returns the primary iterate ``y_N``.

    ``prox(z, c)`` computes ``argmin_x 1/2 ||z - x||^2 + c g(x)``; the first axis of ``x`` indexes
    independent problems (slices), each with its own momentum and restarts.
    """
    import torch

    xold = yold = ynew = x0
    told = torch.ones(_nbatch(x0), dtype=torch.float64, device=x0.device)
    for _ in range(int(iterations)):
        ynew = prox(xold - step * grad(xold), step)
        if restart:
            fgm = (xold - ynew) / step  # composite gradient mapping
            told = torch.where(_gr_restart(fgm, ynew - yold), torch.ones_like(told), told)
        tnew = 0.5 * (1 + torch.sqrt(1 + 4 * told * told))
        beta = _bcast(((told - 1) / tnew).to(x0.real.dtype), x0)
        xold = ynew + beta * (ynew - yold)
        yold, told = ynew, tnew
    return ynew


def pogm(grad: Callable, prox: Callable, x0, step: float, iterations: int, restart: bool = True):
    """POGM (Taylor et al. 2017; Kim & Fessler 2018) with optional gradient restart; returns ``x_N``.

    Follows MIRT's ``pogm_restart`` (``mu = 0``, ``bsig = 1``); per-problem momentum along the
    first axis as :func:`fista`. ``prox(z, c)`` may get a per-problem ``c`` of shape ``(B,)``.
    """
    import torch

    alpha = step
    nb = _nbatch(x0)
    one = torch.ones(nb, dtype=torch.float64, device=x0.device)
    told, sig, zetaold = one.clone(), one.clone(), one.clone()
    xold = uold = zold = yold = xnew = x0
    n = int(iterations)
    rdt = x0.real.dtype
    for it in range(1, n + 1):
        fgrad = grad(xold)
        unew = xold - alpha * fgrad
        mult = 8 if it == n else 4
        tnew = 0.5 * (1 + torch.sqrt(1 + mult * told * told))
        beta = (told - 1) / tnew
        gamma = sig * told / tnew
        b_, g_ = _bcast(beta.to(rdt), x0), _bcast(gamma.to(rdt), x0)
        znew = unew + b_ * (unew - uold) + g_ * (unew - xold) - _bcast((beta * alpha / zetaold).to(rdt), x0) * (xold - zold)
        zetanew = alpha * (1 + beta + gamma)
        xnew = prox(znew, zetanew.to(rdt))
        fgm = fgrad - _bcast((1 / zetanew).to(rdt), x0) * (xnew - znew)
        ynew = xold - alpha * fgm
        if restart:
            rs = _gr_restart(fgm, ynew - yold)
            tnew = torch.where(rs, one, tnew)
            sig = torch.where(rs, one, sig)
        uold, zold, zetaold, xold, yold, told = unew, znew, zetanew, xnew, ynew, tnew
    return xnew


def cs_wavelet(kspace, maps, mask, lam: float = 0.002, iterations: int = 30, solver: str = "fista",
               wavelet: str = "db4", levels: int = 4, backend: str = "auto", restart: bool = True,
               log: Callable[[str], None] | None = None):
    """L1-wavelet SENSE reconstruction of a batch of slices.

    Parameters
    ----------
    kspace : torch.Tensor, complex64, (S, C, H, W)
        Measured (normalised) k-space.
    maps : torch.Tensor, complex64, (S, M, C, H, W)
        Sensitivity maps.
    mask : torch.Tensor, float32, broadcastable to (S, 1, H, W)
        Sampling mask.
    lam : float
        L1 weight ``lambda`` relative to the data scale (the image maximum is ~1 after
        normalisation).
    iterations : int
        Solver iterations.
    solver : str
        ``fista`` or ``pogm``.
    wavelet, levels, backend : see :class:`Wavelet2D`.
    restart : bool
        Gradient restart of the momentum (per slice).

    Returns
    -------
    torch.Tensor, complex64, (S, M, H, W)
    """
    import torch

    if solver not in ("fista", "pogm"):
        raise ParameterError(f"solver '{solver}': use fista or pogm")
    op = SenseOp(maps, mask)
    wav = Wavelet2D(kspace.shape[-2:], wavelet, levels, backend, kspace.device)
    b = op.adjoint(kspace)
    L = float(op.lipschitz_bound().max())
    if not L > 0:
        raise InputDataError("the sensitivity maps are all zero; check the coil_maps stage (crop too high?)")
    step = 1.0 / L

    def grad(x):
        return op.normal(x) - b

    def prox(z, c):
        return wav.prox_l1(z, c * lam)  # c: step (FISTA) or per-slice zeta (POGM)

    x0 = b.clone()
    algo = fista if solver == "fista" else pogm
    with torch.no_grad():
        x = algo(grad, prox, x0, step, iterations, restart)
    if log:
        log(f"CS ({solver}, {wavelet} x{wav.levels} levels, {wav.backend}): {iterations} iterations, step 1/{L:.3g}")
    return x
