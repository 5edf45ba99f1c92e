"""Fourier multipliers on a zero-padded grid: :class:`FourierMultiplier`, :class:`Dipole`, :class:`SMV`.

:class:`Dipole` is the one dipole convolution of qsmkit (kernel :func:`qsmkit.physics.dipole_kernel`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.fft as sfft

from .. import fft as _fft
from ..errors import InputDataError
from ..physics import dipole_kernel, smv_kernel
from .base import Linop, is_torch

# =========================================================================== Fourier multipliers
class FourierMultiplier(Linop):
    """Convolution with a real spectral kernel on a zero-padded grid: ``crop(iFFT(K FFT(pad(x))))``.

    Real input gives real output (real even kernels, e.g. the dipole and SMV kernels, make the
    operator self-adjoint: ``A^H = A``). The data sit in the centre of the padded grid (numpy)
    or at its origin corner (torch, no copy; the cropped result is the same, circular
    convolution commutes with shifts). Input arrays have the last three axes equal to ``shape``
    (torch: any leading batch axes).

    Parameters
    ----------
    shape : 3 ints
        Grid of the arrays the operator acts on.
    kernel : ndarray or torch.Tensor, optional
        Real kernel in unshifted FFT order on ``fft_shape`` (half spectrum ``(..., n // 2 + 1)``
        with ``rfft``). Subclasses build it lazily in :meth:`make_kernel`.
    fft_shape : 3 ints, optional
        The padded FFT grid (default ``shape``: periodic convolution).
    rfft : bool
        Real-to-complex FFTs and a half-spectrum kernel (half the work); else full spectrum.
    device : torch device, optional
        Move the kernel to torch on this device now (default: on first torch input).
    """

    def __init__(self, shape: Sequence[int], kernel=None, fft_shape: Sequence[int] | None = None,
                 rfft: bool = True, device: Any = None):
        shape = tuple(int(s) for s in shape)
        super().__init__(shape, shape, np.float32)
        self.fft_shape = shape if fft_shape is None else tuple(int(s) for s in fft_shape)
        if any(p < s for p, s in zip(self.fft_shape, shape)):
            raise InputDataError(f"FFT grid {self.fft_shape} is smaller than the data grid {shape}")
        self.rfft = bool(rfft)
        self._kernel = kernel
        self._torch: dict = {}
        self._spec_buf: dict = {}
        self._d2: dict = {}
        if device is not None:
            import torch

            k = self.kernel
            self._kernel = (k if is_torch(k) else torch.from_numpy(np.ascontiguousarray(k))).to(device)

    # ---------------------------------------------------------------- kernel
    def make_kernel(self) -> np.ndarray:
        """Build a fresh kernel array (subclasses); the base class has no default."""
        raise NotImplementedError(f"{type(self).__name__} needs a kernel")

    @property
    def kernel(self):
        """The spectral kernel (numpy, or torch where given so), built on first use."""
        if self._kernel is None:
            self._kernel = self.make_kernel()
        return self._kernel

    @kernel.setter
    def kernel(self, value):
        self._kernel = value
        self._torch.clear()
        self._d2.clear()

    @property
    def is_padded(self) -> bool:
        """True when the FFT grid is larger than the data grid."""
        return self.fft_shape != self.ishape

    def _kernel_for(self, x, kernel=None):
        k = self.kernel if kernel is None else kernel
        if is_torch(x):
            if is_torch(k):
                return k if k.device == x.device else k.to(x.device)
            key = (id(k), str(x.device))
            kt = self._torch.get(key)
            if kt is None:
                import torch

                kt = torch.from_numpy(np.ascontiguousarray(k)).to(x.device)
                if kernel is None:
                    self._torch[key] = kt
            return kt
        return k.detach().cpu().numpy() if is_torch(k) else k

    # ---------------------------------------------------------------- transforms
    def to_spectrum(self, x):
        """``FFT(pad(x))``: the spectrum on :attr:`fft_shape` (half spectrum with ``rfft``), numpy or torch."""
        if is_torch(x):
            import torch

            fn = torch.fft.rfftn if self.rfft else torch.fft.fftn
            return fn(x, s=self.fft_shape, dim=(-3, -2, -1))
        buf = _fft.pad_center(self._checked(x), self.fft_shape)
        return sfft.rfftn(buf, workers=-1) if self.rfft else sfft.fftn(buf, workers=-1)

    def from_spectrum(self, spec):
        """``crop(iFFT(spec))``, real float32 (the inverse of :meth:`to_spectrum`; may overwrite ``spec``)."""
        fs = self.fft_shape
        if is_torch(spec):
            import torch

            dims = (-3, -2, -1)
            out = torch.fft.irfftn(spec, s=fs, dim=dims) if self.rfft else torch.fft.ifftn(spec, dim=dims).real
            if self.is_padded:
                nx, ny, nz = self.ishape
                out = out[..., :nx, :ny, :nz]
            return out
        if self.rfft:
            out = sfft.irfftn(spec, s=fs, workers=-1, overwrite_x=True)
        else:
            out = sfft.ifftn(spec, workers=-1, overwrite_x=True).real
        return np.ascontiguousarray(_fft.crop_center(out, self.ishape), dtype=np.float32)

    def _checked(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.shape != self.ishape:
            raise InputDataError(f"{type(self).__name__}: input shape {x.shape} is not {self.ishape}")
        return x

    def _numpy_filter(self, x, spectrum):
        spec = self.to_spectrum(x)
        if callable(spectrum):
            spec = spectrum(spec)
        else:
            spec *= spectrum
        return self.from_spectrum(spec)

    def _torch_filter(self, x, spectrum):
        import torch

        dims = (-3, -2, -1)
        fs = self.fft_shape
        reuse = not (torch.is_grad_enabled() and x.requires_grad) and not self.is_padded and self.rfft
        if reuse:  # one spectrum buffer per device and dtype (no allocation per application)
            key = (str(x.device), x.dtype)
            half = fs[:-1] + (fs[-1] // 2 + 1,)
            buf = self._spec_buf.get(key)
            cdt = torch.complex128 if x.dtype == torch.float64 else torch.complex64
            if buf is None or tuple(buf.shape) != tuple(x.shape[:-3]) + half:
                buf = torch.empty(tuple(x.shape[:-3]) + half, dtype=cdt, device=x.device)
                self._spec_buf[key] = buf
            spec = torch.fft.rfftn(x, dim=dims, out=buf)
        else:
            spec = self.to_spectrum(x)
        if callable(spectrum):
            spec = spectrum(spec)
        elif reuse:
            spec *= spectrum
        else:
            spec = spec * spectrum
        return self.from_spectrum(spec)

    def filter(self, x, spectrum):
        """Apply another spectral function on this operator's grid: ``crop(iFFT(S FFT(pad(x))))``.

        ``spectrum`` is an array like :attr:`kernel` (multiplied) or a callable that gets the
        spectrum (complex, FFT order; it may work in place) and returns the filtered one, e.g.
        a regularised inverse of the kernel. Real ``x`` (ppm) in, real float32 out.
        """
        if is_torch(x):
            s = spectrum if callable(spectrum) else self._kernel_for(x, spectrum)
            return self._torch_filter(x, s)
        s = spectrum if callable(spectrum) else (spectrum.detach().cpu().numpy() if is_torch(spectrum) else spectrum)
        return self._numpy_filter(x, s)

    def apply(self, x):
        """``crop(iFFT(K FFT(pad(x))))``."""
        k = self._kernel_for(x)
        return self._torch_filter(x, k) if is_torch(x) else self._numpy_filter(x, k)

    def adjoint(self, y):
        """Same as :meth:`apply` (real even kernel: self-adjoint)."""
        return self.apply(y)

    def normal(self, x):
        """``A^H A x``: one FFT pair with ``K^2`` when the grid is not padded."""
        if self.is_padded:
            return self.apply(self.apply(x))
        key = (is_torch(x), str(getattr(x, "device", "")))
        k2 = self._d2.get(("sq",) + key)
        if k2 is None:
            k = self._kernel_for(x)
            k2 = k * k
            self._d2[("sq",) + key] = k2
        return self.filter(x, k2)

    def normal_diagonal(self, weights):
        """Diagonal of ``A^H diag(weights) A`` (for Jacobi preconditioners): ``(a^2 * w)`` cropped.

        ``a`` is the spatial kernel on the FFT grid (``iFFT(K)``); ``weights`` has the data grid's
        shape. torch in, torch out (numpy likewise).
        """
        key = (is_torch(weights), str(getattr(weights, "device", "")))
        d2 = self._d2.get(key)
        if d2 is None:
            k = self._kernel_for(weights)
            fs = self.fft_shape
            if is_torch(weights):
                import torch

                ks = k.to(torch.complex64) if self.rfft else k
                a = torch.fft.irfftn(ks, s=fs) if self.rfft else torch.fft.ifftn(ks).real
                d2 = (torch.fft.rfftn(a * a) if self.rfft else torch.fft.fftn(a * a)).real.contiguous()
            else:
                a = sfft.irfftn(k, s=fs, workers=-1) if self.rfft else sfft.ifftn(k, workers=-1).real
                d2 = np.ascontiguousarray((sfft.rfftn(a * a, workers=-1) if self.rfft
                                           else sfft.fftn(a * a, workers=-1)).real.astype(np.float32))
            self._d2[key] = d2
        return self.filter(weights, d2)

    def __matmul__(self, other):
        # two multipliers on the same unpadded grid: one multiplier with the product kernel
        if (isinstance(other, FourierMultiplier) and not self.is_padded and not other.is_padded
                and other.fft_shape == self.fft_shape and other.rfft == self.rfft):
            return FourierMultiplier(self.ishape, other.kernel * self.kernel, self.fft_shape, self.rfft)
        return super().__matmul__(other)

    @classmethod
    def example(cls):
        s = (6, 5, 4)
        k = np.random.default_rng(3).standard_normal((6, 5, 4)).astype(np.float32)
        k = 0.5 * (k + np.roll(k[::-1, ::-1, ::-1], 1, axis=(0, 1, 2)))  # even: real-preserving
        return cls(s, k, rfft=False)


class Dipole(FourierMultiplier):
    """THE unit dipole convolution: field (ppm of B0) of a susceptibility map (ppm).

    ``D chi = crop(iFFT(D(k) FFT(pad(chi))))`` with ``D(k) = 1/3 - (k.b)^2 / |k|^2``, ``D(0) = 0``
    (:func:`qsmkit.physics.dipole_kernel`, DESIGN §3), on the grid enlarged by ``padding``
    (:func:`qsmkit.fft.padded_shape`). Self-adjoint.

    Parameters
    ----------
    shape : 3 ints
        Grid of the susceptibility maps.
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame (normalised).
    padding : float
        Minimum zero-padding factor per axis (1: none, periodic convolution).
    rfft : bool
        Half-spectrum (real-to-complex) FFTs; ``False`` uses full complex FFTs (same operator).
    fft_shape : 3 ints, optional
        An explicit FFT grid instead of ``padding``.
    device : torch device, optional
        Put the kernel on this torch device at once.
    """

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float],
                 padding: float = 1.5, rfft: bool = True, fft_shape: Sequence[int] | None = None,
                 device: Any = None):
        shape = tuple(int(s) for s in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_dir = tuple(float(b) for b in np.asarray(b0_dir, dtype=np.float64).ravel())
        fs = _fft.padded_shape(shape, padding) if fft_shape is None else fft_shape
        super().__init__(shape, None, fs, rfft, device)

    def make_kernel(self) -> np.ndarray:
        """A fresh dipole kernel on :attr:`fft_shape` (half spectrum with ``rfft``), float32."""
        return dipole_kernel(self.fft_shape, self.voxel_size, self.b0_dir, rfft=self.rfft)

    def truncated_inverse(self, field: np.ndarray, threshold: float) -> np.ndarray:
        """Truncated k-space division (Shmueli et al., MRM 62:1510, 2009), uncorrected.

        ``chi = iFFT(FFT(field) / D_t)`` with ``D_t = D`` where ``|D| >= threshold`` and
        ``sign(D) * threshold`` elsewhere; ``D(0) = 0`` gives a zero-mean result. The one kernel
        division under TKD and the closed-form estimates other methods start from.

        Parameters
        ----------
        field : ndarray, ``shape``
            Field in ppm of B0 (zero outside the region of valid data).
        threshold : float
            Truncation level of the kernel (0.15 is usual).

        Returns
        -------
        ndarray, float32
            Susceptibility (ppm), systematically underestimated by the truncation (TKD divides by
            its response).
        """
        d = self.make_kernel()
        t = np.float32(threshold)
        small = np.abs(d) < t
        d[small] = np.where(d[small] < 0, -t, t)
        del small

        def divide(spec):
            nonlocal d
            spec /= d
            spec[0, 0, 0] = 0  # D(0) = 0: the mean is undetermined; reference chi afterwards
            d = None           # free the kernel before the inverse FFT allocates its output
            return spec

        return self.filter(np.asarray(field, dtype=np.float32), divide)

    @classmethod
    def example(cls):
        return cls((6, 7, 5), (1.0, 0.8, 1.5), (0.2, -0.3, 0.9), padding=1.5)


class SMV(FourierMultiplier):
    """Spherical mean value filter: the mean over a ball of ``radius_mm`` (:func:`qsmkit.physics.smv_kernel`).

    Parameters
    ----------
    shape : 3 ints
        Grid of the data.
    voxel_size : 3 floats
        Voxel edge lengths in mm.
    radius_mm : float
        Ball radius in mm.
    padding : float
        Minimum zero-padding factor per axis (1: none, periodic).
    rfft : bool
        Half-spectrum FFTs.
    fft_shape : 3 ints, optional
        An explicit FFT grid instead of ``padding``.

    Attributes
    ----------
    n_ball : int
        Number of voxels in the ball.
    """

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float,
                 padding: float = 1.0, rfft: bool = True, fft_shape: Sequence[int] | None = None,
                 device: Any = None):
        shape = tuple(int(s) for s in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.radius_mm = float(radius_mm)
        self.n_ball = 0
        fs = _fft.padded_shape(shape, padding) if fft_shape is None else fft_shape
        super().__init__(shape, None, fs, rfft, device)
        self.kernel  # noqa: B018  (build now: n_ball is known from here on)

    def make_kernel(self) -> np.ndarray:
        k, self.n_ball = smv_kernel(self.fft_shape, self.voxel_size, self.radius_mm, rfft=self.rfft,
                                    return_count=True)
        return k

    def complement(self) -> FourierMultiplier:
        """``delta - S`` (the SHARP high-pass) as one multiplier on the same grid."""
        return FourierMultiplier(self.ishape, np.float32(1.0) - self.kernel, self.fft_shape, self.rfft)

    @classmethod
    def example(cls):
        return cls((8, 7, 6), (1.0, 1.0, 1.2), 2.0, padding=1.5)
