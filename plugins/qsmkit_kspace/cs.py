"""L1-wavelet compressed sensing with FISTA or POGM, batched over slices.

Solves ``min_x 1/2 ||A x - y||^2 + lambda ||Psi x||_1`` per slice, with ``A`` the SENSE operator
(:class:`~qsmkit_kspace.sense.SenseOp`) and ``Psi`` an orthogonal 2D wavelet transform of real
and imaginary parts (the coarsest approximation band is not penalised). Because ``Psi`` is
orthogonal, the proximal step is exact: ``Psi^T soft(Psi z, c lambda)`` with the complex soft
threshold ``w * max(0, 1 - t / |w|)``.

Wavelets:

- ``torch`` (CPU and CUDA, the default): the periodic orthogonal DWT (Mallat's pyramid with
  circular boundaries), with exactly the coefficients of PyWavelets' ``mode="periodization"``
  (``pywt.coeffs_to_array(pywt.wavedec2(...))`` layout). Each analysis step along an axis is
  written in polyphase block form: the axis is cut into blocks of ``bs`` samples and the ``bs``
  outputs of a block (``bs/2`` low-pass, ``bs/2`` high-pass) are one small matrix product with
  the block and the ``L/2 - 1`` samples at each side of it (``L`` taps; the neighbours are the
  circularly adjacent blocks), so a whole level is two batched GEMMs per axis, on complex data
  (real filters act on the interleaved real and imaginary parts alike); every size divisible by
  ``2**levels`` (levels are lowered until it is). ``pywt`` is accepted as a synonym (same
  coefficients).
- ``ptwt`` (PyTorch wavelet toolbox): ``MatrixWavedec2`` boundary wavelets (orthogonalised with
  QR), orthogonal for even sizes; other coefficients than periodization at the borders.

FISTA: Beck & Teboulle, SIAM J Imaging Sci 2:183 (2009). POGM: Taylor, Hendrickx & Glineur
(2017) / Kim & Fessler (2018), as in MIRT's ``pogm_restart``; both with the gradient restart of
O'Donoghue & Candes (2015) per slice (``restart``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qsmkit.device import resolve_device
from qsmkit.errors import InputDataError, ParameterError

from .sense import SenseOp

__all__ = ["Wavelet2D", "cs_wavelet", "fista", "pogm"]


def _block_size(n: int, e: int) -> int:
    """Block length of the polyphase products along an axis of ``n`` samples: even, dividing ``n``, ``>= e``."""
    for bs in (32, 64, 16, 8, 4, 2):
        if bs <= n and n % bs == 0 and bs >= e:
            return bs
    return n


class _Axis:
    """Block matrices of one periodic analysis step (low and high pass, decimation by 2) along an axis.

    With ``r`` the reversed decomposition filters (``L`` taps) and ``e = L/2 - 1``, PyWavelets'
    periodization is ``a_i = sum_j r_j x_{(2i - e + j) mod n}``. Output block ``q`` (``b = bs/2``
    low-pass then ``b`` high-pass values) is ``M^T`` times the window of ``bs + 2e`` samples: the
    last ``e`` of block ``q - 1``, block ``q``, the first ``e`` of block ``q + 1`` (circularly).
    ``M0`` is the part of ``M`` acting on the block, ``Me`` the part on the ``2e`` neighbours;
    ``K0``, ``Ke`` the same for interleaved (real, imaginary) samples.
    """

    def __init__(self, rlo, rhi, n: int, device):
        import torch

        L = len(rlo)
        e = L // 2 - 1
        bs = _block_size(n, e)
        b = bs // 2
        M = np.zeros((bs + 2 * e, bs))
        for t in range(b):
            M[2 * t:2 * t + L, t] = rlo
            M[2 * t:2 * t + L, b + t] = rhi
        self.e, self.bs, self.b, self.nq = e, bs, b, n // bs
        M0, Me = M[e:e + bs], np.concatenate([M[:e], M[e + bs:]])
        K0, Ke = np.kron(M0, np.eye(2)), np.kron(Me, np.eye(2))

        def t32(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

        self.M0, self.Me, self.M0T, self.MeT = t32(M0), t32(Me), t32(M0.T), t32(Me.T)
        self.K0, self.Ke, self.K0T, self.KeT = t32(K0), t32(Ke), t32(K0.T), t32(Ke.T)


def _neighbours(src, dst, e: int) -> None:
    """``dst[:, q] = [last e of src[:, q-1], first e of src[:, q+1]]`` along axis 2 (blocks on axis 1, circular)."""
    dst[:, 1:, :e] = src[:, :-1, -e:]
    dst[:, :1, :e] = src[:, -1:, -e:]
    dst[:, :-1, e:] = src[:, 1:, :e]
    dst[:, -1:, e:] = src[:, :1, :e]


def _scatter_neighbours(t, dst, e: int) -> None:
    """Adjoint of :func:`_neighbours`: add ``t[:, q, :e]`` to the tail of block ``q-1`` and ``t[:, q, e:]`` to the head of ``q+1``."""
    dst[:, :-1, -e:] += t[:, 1:, :e]
    dst[:, -1:, -e:] += t[:, :1, :e]
    dst[:, 1:, :e] += t[:, :-1, e:]
    dst[:, :1, :e] += t[:, -1:, e:]


class _PeriodicDWT:
    """Periodic orthogonal 2D DWT (PyWavelets ``periodization`` coefficients) of complex ``(B, H, W)`` tensors.

    Polyphase block GEMMs (see :class:`_Axis`); work arrays are kept between calls (one set per
    device), so a call allocates only its result.
    """

    def __init__(self, dec_lo, dec_hi, shape, levels: int, device):
        H, W = shape
        rlo, rhi = np.asarray(dec_lo, dtype=np.float64)[::-1], np.asarray(dec_hi, dtype=np.float64)[::-1]
        self.shape, self.levels = (H, W), int(levels)
        self._filters = (rlo, rhi)
        self._axes: dict = {}
        self._work: dict = {}
        self._get_axes(device)

    def _get_axes(self, device):
        key = str(device)
        if key not in self._axes:
            rlo, rhi = self._filters
            H, W = self.shape
            self._axes[key] = [(_Axis(rlo, rhi, H >> lv, device), _Axis(rlo, rhi, W >> lv, device))
                               for lv in range(self.levels)]
        return self._axes[key]

    def _buf(self, name: str, numel: int, device):
        import torch

        key = (name, str(device))
        b = self._work.get(key)
        if b is None or b.numel() < numel:
            b = self._work[key] = torch.empty(int(numel), dtype=torch.float32, device=device)
        return b[:numel]

    # ------------------------------------------------------------------ one level
    def _fwd_level(self, cur, dst, ah: _Axis, aw: _Axis) -> None:
        """Analysis of ``cur`` (B, h, w) complex contiguous into ``dst`` (B, h, w) complex (any strides)."""
        import torch

        B, h, w = cur.shape
        dev = cur.device
        R = B * h
        e, bs, b, nq = aw.e, aw.bs, aw.b, aw.nq
        xr = torch.view_as_real(cur).reshape(R * nq, 2 * bs)          # rows: blocks of bs complex samples
        t = self._buf("t", 2 * B * h * w, dev).view(R * nq, 2 * bs)
        torch.mm(xr, aw.K0, out=t)
        if e:
            E = self._buf("e", R * nq * 4 * e, dev).view(R, nq, 4 * e)
            _neighbours(xr.view(R, nq, 2 * bs), E, 2 * e)
            t.addmm_(E.view(R * nq, 4 * e), aw.Ke)
        y = self._buf("y", 2 * B * h * w, dev)
        y.view(R, 2, nq, b, 2).copy_(t.view(R, nq, 2, b, 2).transpose(1, 2))   # [low | high] along W
        e, bs, b, nq = ah.e, ah.bs, ah.b, ah.nq
        blk = y.view(B * nq, bs, 2 * w)                                  # blocks of bs rows
        t2 = t.view(B * nq, bs, 2 * w)
        torch.bmm(ah.M0T.expand(B * nq, bs, bs), blk, out=t2)
        if e:
            E = self._buf("e", B * nq * 2 * e * 2 * w, dev).view(B, nq, 2 * e, 2 * w)
            _neighbours(blk.view(B, nq, bs, 2 * w), E, e)
            t2.baddbmm_(ah.MeT.expand(B * nq, bs, 2 * e), E.view(B * nq, 2 * e, 2 * w))
        torch.view_as_real(dst).unflatten(1, (2, nq, b)).copy_(
            t2.view(B, nq, 2, b, w, 2).transpose(1, 2))                  # [low ; high] along H

    def _inv_level(self, coef, approx, dst, ah: _Axis, aw: _Axis) -> None:
        """Synthesis of the level whose coefficients are ``coef`` (B, h, w) (strided) with the
        approximation band replaced by ``approx`` (B, h/2, w/2); result into ``dst`` (B, h, w) contiguous."""
        import torch

        B, h, w = coef.shape
        dev = coef.device
        e, bs, b, nq = ah.e, ah.bs, ah.b, ah.nq
        y = self._buf("y", 2 * B * h * w, dev)
        y6 = y.view(B, nq, 2, b, w, 2)
        y6.copy_(torch.view_as_real(coef).unflatten(1, (2, nq, b)).transpose(1, 2))
        y6[:, :, 0, :, :w // 2].copy_(torch.view_as_real(approx).unflatten(1, (nq, b)))
        blk = y.view(B * nq, bs, 2 * w)
        t = self._buf("t", 2 * B * h * w, dev).view(B * nq, bs, 2 * w)
        torch.bmm(ah.M0.expand(B * nq, bs, bs), blk, out=t)
        if e:
            T = self._buf("e", B * nq * 2 * e * 2 * w, dev).view(B * nq, 2 * e, 2 * w)
            torch.bmm(ah.Me.expand(B * nq, 2 * e, bs), blk, out=T)
            _scatter_neighbours(T.view(B, nq, 2 * e, 2 * w), t.view(B, nq, bs, 2 * w), e)
        R = B * h
        e, bs, b, nq = aw.e, aw.bs, aw.b, aw.nq
        c = y.view(R * nq, 2 * bs)
        c.view(R, nq, 2, b, 2).copy_(t.view(R, 2, nq, b, 2).transpose(1, 2))
        out = torch.view_as_real(dst).view(R * nq, 2 * bs)
        torch.mm(c, aw.K0T, out=out)
        if e:
            T = self._buf("e", R * nq * 4 * e, dev).view(R * nq, 4 * e)
            torch.mm(c, aw.KeT, out=T)
            _scatter_neighbours(T.view(R, nq, 4 * e), out.view(R, nq, 2 * bs), 2 * e)

    # ------------------------------------------------------------------ all levels
    def forward(self, x, out=None):
        """Packed coefficients of complex ``x`` (B, H, W) (a new tensor, or ``out``)."""
        import torch

        x = x.contiguous()
        B, H, W = x.shape
        out = torch.empty_like(x) if out is None else out
        axes = self._get_axes(x.device)
        cur, h, w = x, H, W
        for lv, (ah, aw) in enumerate(axes):
            self._fwd_level(cur, out[:, :h, :w], ah, aw)
            h, w = h // 2, w // 2
            if lv + 1 < len(axes):
                cur = torch.view_as_complex(self._buf("c", 2 * B * h * w, x.device).view(B, h, w, 2))
                cur.copy_(out[:, :h, :w])
        return out

    def inverse(self, c, out=None):
        """Images from packed coefficients ``c`` (B, H, W) complex (a new tensor, or ``out``, contiguous)."""
        import torch

        B, H, W = c.shape
        axes = self._get_axes(c.device)
        out = torch.empty_like(c, memory_format=torch.contiguous_format) if out is None else out
        L = len(axes)
        h, w = H >> L, W >> L
        approx = c[:, :h, :w]
        for lv in range(L - 1, -1, -1):
            h, w = 2 * h, 2 * w
            if lv:
                dst = torch.view_as_complex(self._buf("c", 2 * B * h * w, c.device).view(B, h, w, 2))
            else:
                dst = out
            self._inv_level(c[:, :h, :w], approx, dst, *axes[lv])
            approx = dst
        return out


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
        ``torch`` (periodization, PyWavelets' coefficients; ``pywt`` is a synonym), ``ptwt``
        (boundary wavelets) or ``auto`` (``torch``).
    device : torch.device or str
        Where the images live (anything :func:`qsmkit.device.resolve_device` accepts; default CPU).

    Attributes
    ----------
    approx : (slice, slice)
        Region of the approximation band in the packed layout (``torch`` backend).
    bands : list of (slice, slice)
        Regions of the detail bands, coarsest first, three per level (``[:h, w:2w]``,
        ``[h:2h, :w]``, ``[h:2h, w:2w]``).
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
        if backend in ("auto", "pywt"):
            backend = "torch"
        if backend not in ("torch", "ptwt"):
            raise ParameterError(f"wavelet backend '{backend}': use auto, torch (pywt) or ptwt")
        H, W = (int(s) for s in shape)
        self.backend, self.wavelet, self.shape = backend, wavelet, (H, W)
        if backend == "torch":
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
        h, wd = H >> lev, W >> lev
        self.approx = (slice(0, h), slice(0, wd))
        self.bands: list[tuple[slice, slice]] = []
        for _ in range(lev):
            self.bands += [(slice(0, h), slice(wd, 2 * wd)), (slice(h, 2 * h), slice(0, wd)),
                           (slice(h, 2 * h), slice(wd, 2 * wd))]
            h, wd = 2 * h, 2 * wd
        if backend == "torch":
            self._dwt = _PeriodicDWT(w.dec_lo, w.dec_hi, (H, W), lev, self.device)
        else:
            import warnings

            from ptwt.matmul_transform_2 import MatrixWavedec2, MatrixWaverec2

            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            self._fwd = MatrixWavedec2(wavelet, level=lev)
            self._inv = MatrixWaverec2(wavelet)

    def forward(self, x, out=None):
        """Packed coefficients of complex ``x`` (..., H, W) (``torch`` backend; ``out``: optional result array)."""
        import torch

        shp = x.shape
        xc = x.to(torch.complex64).reshape((-1,) + tuple(shp[-2:]))
        o = None if out is None else out.view((-1,) + tuple(shp[-2:]))
        return self._dwt.forward(xc, o).view(shp)

    def inverse(self, c, out=None):
        """Images from packed coefficients ``c`` (..., H, W) (``torch`` backend)."""
        import torch

        shp = c.shape
        cc = c.to(torch.complex64).reshape((-1,) + tuple(shp[-2:]))
        o = None if out is None else out.view((-1,) + tuple(shp[-2:]))
        return self._dwt.inverse(cc, o).view(shp)

    def prox_l1(self, z, thresh):
        """``Psi^T soft(Psi z, thresh)`` for complex ``z`` (B, ..., H, W); the approximation band is kept.

        ``thresh`` is a number or a ``(B,)`` tensor (one threshold per problem along the first axis).
        """
        import torch

        shp = z.shape
        if self.backend == "torch":
            c = self.forward(z).reshape((shp[0], -1) + tuple(shp[-2:]))
            if torch.is_tensor(thresh) and thresh.numel() > 1:
                t = thresh.detach().reshape(-1, 1, 1, 1).to(device=c.device, dtype=torch.float32)
            else:
                t = float(thresh)
            keep = c[..., self.approx[0], self.approx[1]].clone()
            mag = torch.linalg.vector_norm(torch.view_as_real(c), dim=-1)
            c *= torch.clamp(1 - t / mag.clamp_min(1e-30), min=0)
            c[..., self.approx[0], self.approx[1]] = keep
            return self.inverse(c).reshape(shp).to(z.dtype)
        zr = torch.stack([z.real, z.imag]).reshape((2, -1) + tuple(shp[-2:]))
        nflat = zr.shape[1]
        if torch.is_tensor(thresh) and thresh.numel() > 1:
            per = nflat // thresh.numel()
            thr_t = thresh.detach().reshape(-1).to(torch.float32).repeat_interleave(per).reshape(nflat, 1, 1)
        else:
            thr_t = torch.full((nflat, 1, 1), float(thresh), dtype=torch.float32)
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
