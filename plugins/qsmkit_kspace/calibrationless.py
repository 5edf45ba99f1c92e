"""Calibrationless multi-coil compressed sensing: group-sparse wavelet regularisation without coil maps.

The coil images ``x_c`` of a slice are reconstructed jointly from their own k-space (``A`` is
block diagonal over coils: ``y_c = P F x_c``) with a regulariser that couples the coils through
the sparsity pattern of their wavelet coefficients ``w = Psi x`` (an orthogonal 2D wavelet per
coil, :class:`WaveletOp`):

- ``group_lasso``: ``lambda sum_k ||w_{:, k}||_2``: l2 across coils, l1 across coefficients
  (El Gueddari et al., "Calibrationless parallel MRI using group-sparsity", IEEE SAM 2018);
- ``owl``: the ordered weighted l1 norm ``sum_i omega_i |w|_[i]`` (Bogdan et al. 2015; Zeng &
  Figueiredo 2014) with the OSCAR weights ``omega_i = alpha + beta (n - i)`` applied to all
  coefficients of all coils of each wavelet band (``band_based``, as pysap-mri's ``OWL``; El
  Gueddari et al., "Calibration-less multi-coil compressed sensing MRI using OSCAR", ISBI 2019).
  ``beta = 0`` is the plain (coil-wise) l1 norm.

The coarsest approximation band is not penalised (as :mod:`.cs`). Both proximal operators are
exact: the group soft threshold ``w * max(0, 1 - t / ||w||)``, and for OWL the magnitudes sorted,
shifted by the weights, projected on the non-increasing cone (pool adjacent violators,
:func:`scipy.optimize.isotonic_regression`) and clipped at zero, phases kept.

Formulations (same minimiser, since ``Psi`` is orthogonal):

- ``synthesis``: ``min_w 1/2 ||A Psi^H w - y||^2 + g(w)``, solved by FISTA or POGM
  (:func:`qsmkit.operators.proximal_gradient`), the prox acting on the coefficients directly;
- ``analysis``: ``min_x 1/2 ||A x - y||^2 + g(Psi x)``, solved by the Condat-Vu primal-dual method
  (:func:`qsmkit.operators.condat_vu`).

The step is ``1 / L`` with ``L = ||A^H A||`` estimated by power iteration
(:func:`qsmkit.operators.power_iteration`) on one coil (``A`` is the same for every coil).
When the sampling mask is constant along an image axis (fastMRI column masks), the Fourier
transform along that axis is applied once to the data and the iterations only transform along
the other axis, with unshifted FFTs (:meth:`CoilFourierOp.for_data`): the problem is the same,
the cost smaller.

Wavelets come from :class:`.cs.Wavelet2D` (the periodic DWT in torch, PyWavelets'
``periodization`` coefficients, on every device; or ptwt's boundary-wavelet matrices); FFTs are
torch's orthonormal ones (the core centred ones in :class:`CoilFourierOp`'s centred form). The
synthesis operator ``A Psi^H`` (:class:`SynthesisOp`) keeps its intermediate images in work
arrays, so an iteration allocates only the arrays the solver keeps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qsmkit.errors import InputDataError, ParameterError
from qsmkit.operators import Linop, condat_vu, is_torch, power_iteration, proximal_gradient

from .cs import Wavelet2D
from .transforms import fft2c, ifft2c

__all__ = ["WaveletOp", "CoilFourierOp", "SynthesisOp", "prox_group_lasso", "group_lasso_norm", "oscar_weights", "prox_owl",
           "owl_norm", "lipschitz", "calibrationless", "REGULARIZERS", "FORMULATIONS", "SOLVERS"]

REGULARIZERS = ("group_lasso", "owl")
FORMULATIONS = ("synthesis", "analysis")
SOLVERS = ("fista", "pogm", "condat_vu")


def _tensor(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


# ============================================================================ operators
class WaveletOp(Linop):
    """Orthogonal 2D wavelet transform of every coil image: ``(S, C, H, W)`` complex -> packed coefficients.

    The coefficients of each image are packed into an ``(H, W)`` array in the usual pyramid
    layout (approximation at the top left; at each level the three detail bands at
    ``[:h, w:2w]``, ``[h:2h, :w]`` and ``[h:2h, w:2w]``, as ``pywt.coeffs_to_array``). ``apply``
    is the analysis ``Psi``, ``adjoint`` the synthesis ``Psi^H = Psi^-1``. The transform is
    :class:`.cs.Wavelet2D` (its ``torch`` periodization backend on every device, or ptwt's
    boundary wavelets); the real filters act on real and imaginary parts alike.

    Parameters
    ----------
    shape : (S, C, H, W)
        Shape of the coil images (``None`` entries for S and C: any).
    wavelet, levels, backend, device
        As :class:`.cs.Wavelet2D`; sizes must allow an orthogonal transform (``torch``: ``H`` and
        ``W`` divisible by ``2**levels``, levels are lowered until they are).

    Attributes
    ----------
    approx : (slice, slice)
        Region of the (unpenalised) approximation band.
    bands : list of (slice, slice)
        Regions of the detail bands, coarsest first.
    """

    def __init__(self, shape: Sequence[int], wavelet: str = "sym8", levels: int = 4, backend: str = "auto",
                 device="cpu"):
        shape = tuple(shape)
        H, W = int(shape[-2]), int(shape[-1])
        super().__init__(shape, shape, np.complex64)
        self.wt = Wavelet2D((H, W), wavelet, levels, backend, device)
        L = self.wt.levels
        if self.wt.backend == "torch" and (H % (2 ** L) or W % (2 ** L)):
            raise InputDataError(f"image size {H}x{W} is not divisible by 2**{L}; use other levels")
        self.approx = self.wt.approx
        self.bands: list[tuple[slice, slice]] = list(self.wt.bands)

    # -------------------------------------------------------------- ptwt backend
    def _ptwt_forward(self, xr):
        import torch

        c = self.wt._fwd(xr)
        out = torch.empty_like(xr)
        out[(Ellipsis,) + self.approx] = c[0]
        i = 0
        for det in c[1:]:
            for band in det:
                out[(Ellipsis,) + self.bands[i]] = band
                i += 1
        return out

    def _ptwt_inverse(self, cr):
        coeffs = [cr[(Ellipsis,) + self.approx]]
        L = self.wt.levels
        for lev in range(L):
            coeffs.append(_detail_tuple(*(cr[(Ellipsis,) + self.bands[3 * lev + j]] for j in range(3))))
        return self.wt._inv(coeffs)

    # -------------------------------------------------------------- Linop
    def _run(self, x, inverse: bool, out=None):
        import torch

        if not is_torch(x):
            return self._run(_tensor(x), inverse).numpy()
        if self.wt.backend == "torch":
            return self.wt.inverse(x, out) if inverse else self.wt.forward(x, out)
        shp = x.shape
        H, W = shp[-2:]
        xc = x.to(torch.complex64).reshape((-1, H, W))
        xr = torch.view_as_real(xc).permute(3, 0, 1, 2).reshape(-1, H, W).contiguous().float()  # (2N, H, W)
        res = (self._ptwt_inverse(xr) if inverse else self._ptwt_forward(xr)).reshape(-1, H, W)
        n = res.shape[0] // 2
        res = torch.complex(res[:n], res[n:]).reshape(shp)
        return res if out is None else out.copy_(res)

    def apply(self, x, out=None):
        """Analysis ``Psi x``: coil images -> packed coefficients (complex, same shape; into ``out`` if given)."""
        return self._run(x, inverse=False, out=out)

    def adjoint(self, y, out=None):
        """Synthesis ``Psi^H w = Psi^-1 w`` (into ``out`` if given)."""
        return self._run(y, inverse=True, out=out)

    def normal(self, x):
        return x  # orthogonal

    def penalised_mask(self, like):
        """1 on the detail bands, 0 on the approximation band: ``(H, W)`` real, as ``like``'s backend."""
        import torch

        H, W = self.ishape[-2:]
        m = torch.ones((H, W), dtype=torch.float32, device=like.device)
        m[self.approx] = 0
        return m

    @classmethod
    def examples(cls):
        return [cls((2, 3, 16, 8), "db2", 2, "torch"), cls((1, 2, 16, 16), "sym4", 1, "torch"),
                cls((1, 2, 64, 32), "sym8", 2, "torch"), cls((1, 2, 16, 12), "db2", 2, "ptwt")]


def _detail_tuple(a, b, c):
    """ptwt's container of the three detail bands of one level (a tuple subclass in ptwt >= 1)."""
    try:
        from ptwt.constants import WaveletDetailTuple2d

        return WaveletDetailTuple2d(a, b, c)
    except ImportError:  # older ptwt: plain tuples
        return (a, b, c)


class CoilFourierOp(Linop):
    """Masked orthonormal FFT of every coil image: ``y_c = P F_dims x_c`` (no coil maps).

    Parameters
    ----------
    mask : torch.Tensor, float32, (S|1, 1, H|1, W|1)
        Sampling mask (:func:`qsmkit.kspace.mask_tensor`); with ``centered=False`` in FFT order
        (``ifftshift``-ed along ``dims``).
    shape : (S, C, H, W)
        Coil-image shape.
    dims : tuple of int
        Image axes the FFT runs along: ``(-2, -1)`` (the full 2D transform) or the axes along
        which the mask varies (see :meth:`for_data`; the data then must have been inverse
        transformed along the other axes).
    centered : bool
        The centred FFT (``ifftshift -> fft -> fftshift``, DC in the middle: true k-space), or the
        plain one (DC first). Both are unitary and ``fftc = S fft`` with ``S`` a permutation times
        a unimodular diagonal, so ``||P fftc x - y|| = ||ifftshift(P) fft x - fft(ifftc y)||``: the
        solver uses the plain form with data and mask mapped once (no shifts per iteration).
    """

    def __init__(self, mask, shape: Sequence[int], dims: Sequence[int] = (-2, -1), centered: bool = True):
        super().__init__(tuple(shape), tuple(shape), np.complex64)
        self.mask = mask
        self.dims = tuple(int(d) for d in dims)
        self.centered = bool(centered)

    @staticmethod
    def reduced_dims(mask) -> tuple[int, ...]:
        """Axes along which the mask varies (at least one): the only ones the iterations transform."""
        d = tuple(ax for ax in (-2, -1) if mask.shape[ax] > 1)
        return d or (-1,)

    @classmethod
    def for_data(cls, kspace, mask):
        """The operator the solver iterates with and its data, from centred k-space ``(S, C, H, W)``.

        FFTs only along the axes the mask varies on, plain (unshifted) FFTs; the returned data
        ``fft_dims(ifftc(P y))`` give the same least-squares term as ``||P fftc x - y||``.
        """
        import torch

        dims = cls.reduced_dims(mask)
        img = ifft2c(kspace * mask)                                  # zero-filled coil images
        data = torch.fft.fftn(img, dim=dims, norm="ortho")
        m = torch.fft.ifftshift(mask, dim=dims)
        return cls(m, tuple(kspace.shape), dims, centered=False), data

    def apply(self, x):
        import torch

        if not is_torch(x):
            return self.apply(_tensor(x)).numpy()
        k = fft2c(x, dim=self.dims) if self.centered else torch.fft.fftn(x, dim=self.dims, norm="ortho")
        k *= self.mask
        return k

    def adjoint(self, y):
        import torch

        if not is_torch(y):
            return self.adjoint(_tensor(y)).numpy()
        ym = y * self.mask
        return ifft2c(ym, dim=self.dims) if self.centered else torch.fft.ifftn(ym, dim=self.dims, norm="ortho")

    @classmethod
    def examples(cls):
        import torch

        from qsmkit.kspace import mask_tensor

        rng = np.random.default_rng(4)
        cols = rng.random((1, 10)) < 0.5
        m2 = rng.random((8, 10)) < 0.4
        return [cls(mask_tensor(cols, 2, (8, 10), "cpu"), (2, 3, 8, 10)),
                cls(mask_tensor(cols, 2, (8, 10), "cpu"), (2, 3, 8, 10), dims=(-1,), centered=False),
                cls(mask_tensor(m2, 1, (8, 10), "cpu"), (1, 2, 8, 10)),
                cls(torch.ones((1, 1, 1, 1)), (1, 2, 7, 9))]


class SynthesisOp(Linop):
    """``A Psi^H``: packed wavelet coefficients -> masked k-space of the coil images (no coil maps).

    The composition of :class:`CoilFourierOp` ``A`` and the synthesis of :class:`WaveletOp`
    ``Psi``, with the image between them (and the masked data of the adjoint) in work arrays kept
    between calls: ``apply`` and ``adjoint`` allocate only their result. Same values as
    ``Compose(A, psi.H)``.

    Parameters
    ----------
    A : CoilFourierOp
    psi : WaveletOp
    """

    def __init__(self, A: CoilFourierOp, psi: WaveletOp):
        super().__init__(A.ishape, A.oshape, np.complex64)
        self.A, self.psi = A, psi
        self._work: dict = {}

    def _buf(self, name: str, like):
        import torch

        b = self._work.get(name)
        if b is None or b.shape != like.shape or b.device != like.device:
            b = self._work[name] = torch.empty(like.shape, dtype=torch.complex64, device=like.device)
        return b

    def apply(self, w):
        import torch

        if not is_torch(w):
            return self.apply(_tensor(w)).numpy()
        A = self.A
        img = self.psi.adjoint(w, out=self._buf("img", w))
        k = fft2c(img, dim=A.dims) if A.centered else torch.fft.fftn(img, dim=A.dims, norm="ortho")
        return k.mul_(A.mask)

    def adjoint(self, y):
        import torch

        if not is_torch(y):
            return self.adjoint(_tensor(y)).numpy()
        A = self.A
        ym = torch.mul(y, A.mask, out=self._buf("data", y))
        img = ifft2c(ym, dim=A.dims) if A.centered else torch.fft.ifftn(ym, dim=A.dims, norm="ortho",
                                                                       out=self._buf("img", y))
        return self.psi.apply(img)

    @classmethod
    def examples(cls):
        return [cls(a, WaveletOp(a.ishape, "db2", 1, "torch")) for a in CoilFourierOp.examples()[:3]]


# ============================================================================ proximal operators
def _as_thresh(c, w):
    """Threshold ``c`` (float or per-slice array) shaped to broadcast against ``w`` (S, C, H, W)."""
    import torch

    if np.ndim(c) == 0:
        return float(c)
    return torch.as_tensor(np.asarray(c, dtype=np.float32), device=w.device).reshape((-1,) + (1,) * (w.ndim - 1))


def _coil_norm(w, keepdim: bool = False):
    """``||w_{:, k}||_2`` over the coils (axis 1), as a real norm (torch's complex norm is slow on CPU)."""
    import torch

    n = torch.linalg.vector_norm(torch.view_as_real(w), dim=(1, -1)) if w.is_complex() else \
        torch.linalg.vector_norm(w, dim=1)
    return n.unsqueeze(1) if keepdim else n


def group_lasso_norm(w, penalised=None):
    """``sum_k ||w_{:, k}||_2`` per slice: l2 over coils (axis 1), l1 over coefficients; ``(S,)`` float64."""
    import torch

    n = _coil_norm(w)  # (S, H, W)
    if penalised is not None:
        n = n * penalised
    return n.reshape(n.shape[0], -1).sum(-1, dtype=torch.float64)


def prox_group_lasso(w, thresh, penalised=None, return_norm: bool = False, inplace: bool = False):
    """Proximal operator of ``thresh * sum_k ||w_{:, k}||_2`` (group soft threshold over coils, axis 1).

    Parameters
    ----------
    w : torch.Tensor, complex or real, (S, C, ...)
        Coefficients; a group is the ``C`` values at one position.
    thresh : float or array (S,)
        Threshold (``step * lambda``), per slice when an array.
    penalised : torch.Tensor, optional
        0/1 weights broadcastable to ``w[:, 0]``: 0 where coefficients are left as they are
        (the approximation band).
    return_norm : bool
        Also return the group norm of the result (``(S,)`` float64, the penalised groups only),
        computed from the norms already at hand.
    inplace : bool
        Overwrite ``w`` with the result (no new array).

    Returns
    -------
    ``w * max(0, 1 - thresh / ||w_{:, k}||)`` (and its group norm)
    """
    import torch

    n = _coil_norm(w, keepdim=True)
    t = _as_thresh(thresh, w)
    scale = torch.div(t, n.clamp_min(1e-30)).neg_().add_(1).clamp_(min=0)   # max(0, 1 - t / ||w||)
    if penalised is not None:
        p = penalised.unsqueeze(0) if penalised.ndim == w.ndim - 2 else penalised
        scale = scale.mul_(p).add_(1 - p)                                   # 1 where not penalised
    out = w.mul_(scale) if inplace else w * scale
    if not return_norm:
        return out
    nn = n * scale
    if penalised is not None:
        nn = nn * p
    return out, nn.reshape(nn.shape[0], -1).sum(-1, dtype=torch.float64)


def oscar_weights(n: int, alpha: float, beta: float) -> np.ndarray:
    """OSCAR weights ``omega_i = alpha + beta (n - 1 - i)``, ``i = 0..n-1`` (non-increasing), float64."""
    return float(alpha) + float(beta) * np.arange(n - 1, -1, -1, dtype=np.float64)


def _owl_magnitudes(mag: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Prox of ``sum_i omega_i |v|_[i]`` on magnitudes ``mag`` (n,) (Bogdan et al. 2015, Algorithm 3)."""
    from scipy.optimize import isotonic_regression

    order = np.argsort(-mag, kind="stable")
    d = mag[order] - weights
    if weights[0] != weights[-1]:
        d = isotonic_regression(d, increasing=False).x
    out = np.empty_like(mag)
    out[order] = np.maximum(d, 0.0)
    return out


def prox_owl(w, alpha, beta=0.0, bands: Sequence[tuple[slice, slice]] | None = None):
    """Proximal operator of the band-based ordered weighted l1 norm (OSCAR weights), per slice.

    For every slice and every band (all coils and all coefficients of the band: one vector of
    length ``n = C h w``) the prox of ``sum_i omega_i |v|_[i]`` with ``omega_i = alpha + beta
    (n - 1 - i)``. Complex coefficients keep their phase. ``beta = 0`` is the soft threshold.

    Parameters
    ----------
    w : torch.Tensor, (S, C, H, W)
        Packed coefficients.
    alpha, beta : float or array (S,)
        OSCAR parameters already multiplied by the step (``c alpha``, ``c beta``; per slice when
        arrays).
    bands : list of (slice, slice)
        Regions of the penalised bands (default: the whole image as one band).
    """
    import torch

    S = w.shape[0]
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (S,))
    b = np.broadcast_to(np.asarray(beta, dtype=np.float64), (S,))
    regions = bands if bands is not None else [(slice(None), slice(None))]
    out = w.clone()
    if not b.any():  # constant weights: the soft threshold of each magnitude
        t = _as_thresh(a if np.ndim(alpha) else float(alpha), w)
        for hs, ws in regions:
            v = w[..., hs, ws]
            mag = v.abs()
            out[..., hs, ws] = v * torch.clamp(1 - t / mag.clamp_min(1e-30), min=0)
        return out
    for hs, ws in regions:
        v = w[..., hs, ws]
        mag = v.abs().reshape(S, -1).double().cpu().numpy()
        n = mag.shape[1]
        new = np.stack([_owl_magnitudes(mag[s], oscar_weights(n, a[s], b[s])) for s in range(S)])
        scale = torch.from_numpy(new / np.maximum(mag, 1e-30)).to(device=w.device, dtype=torch.float32)
        out[..., hs, ws] = v * scale.reshape(v.shape)
    return out


def owl_norm(w, alpha: float, beta: float = 0.0, bands: Sequence[tuple[slice, slice]] | None = None):
    """``sum_bands sum_i omega_i |v|_[i]`` per slice ``(S,)`` float64 (see :func:`prox_owl`)."""
    import torch

    S = w.shape[0]
    regions = bands if bands is not None else [(slice(None), slice(None))]
    total = torch.zeros(S, dtype=torch.float64, device=w.device)
    for hs, ws in regions:
        mag = w[..., hs, ws].abs().reshape(S, -1)
        if beta == 0.0:
            total += float(alpha) * mag.sum(-1, dtype=torch.float64)
        else:
            srt = torch.sort(mag.double(), dim=-1, descending=True).values
            om = torch.from_numpy(oscar_weights(srt.shape[1], alpha, beta)).to(srt.device)
            total += (srt * om).sum(-1)
    return total


# ============================================================================ solver
def lipschitz(op: CoilFourierOp, iterations: int = 30, tol: float = 1e-4, seed: int = 0) -> float:
    """``||A^H A||`` by power iteration on one coil (the operator is the same for every coil)."""
    import torch

    S = int(op.mask.shape[0])
    shp = (S, 1) + tuple(op.ishape[-2:])
    one = CoilFourierOp(op.mask, shp, op.dims, op.centered)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.complex(torch.randn(shp, generator=g), torch.randn(shp, generator=g)).to(op.mask.device)
    lam, _ = power_iteration(one, x0, max_iter=iterations, tol=tol)
    return float(lam)


def calibrationless(kspace, mask, lam: float = 0.01, max_iter: int = 100, regularizer: str = "group_lasso",
                    formulation: str = "synthesis", solver: str = "fista", wavelet: str = "sym8", levels: int = 4,
                    backend: str = "auto", owl_beta: float = 0.0, restart: bool = True, sigma: float = 0.5,
                    log: Callable[[str], None] | None = None, callback=None):
    """Calibrationless reconstruction of the coil images of a batch of slices.

    Parameters
    ----------
    kspace : torch.Tensor, complex64, (S, C, H, W)
        Measured (normalised) k-space, zero where not sampled.
    mask : torch.Tensor, float32, (S|1, 1, H|1, W|1)
        Sampling mask (:func:`qsmkit.kspace.mask_tensor`).
    lam : float
        Regularisation weight (group-LASSO ``lambda``, or OWL ``alpha``), relative to the data
        scale (image maximum ~1 after normalisation).
    max_iter : int
        Iterations.
    regularizer : str
        ``group_lasso`` or ``owl``.
    formulation : str
        ``synthesis`` (FISTA / POGM on the coefficients) or ``analysis`` (Condat-Vu on the images).
    solver : str
        ``fista`` or ``pogm`` (synthesis); the analysis formulation always uses ``condat_vu``.
    wavelet, levels, backend : see :class:`WaveletOp`.
    owl_beta : float
        OSCAR slope ``beta`` of the OWL weights (0: l1).
    restart : bool
        Gradient restart of FISTA / POGM.
    sigma : float
        Condat-Vu dual step (the primal step is ``1 / (L / 2 + sigma)``).
    callback : callable, optional
        ``callback(k, x, cost)`` of the solver.

    Returns
    -------
    images : torch.Tensor, complex64, (S, C, H, W)
        Coil images.
    info : dict
        ``cost`` (iterations x S, float64), ``lipschitz``, ``solver``, ``restarts``.
    """
    import torch

    if regularizer not in REGULARIZERS:
        raise ParameterError(f"regularizer '{regularizer}': use " + " or ".join(REGULARIZERS))
    if formulation not in FORMULATIONS:
        raise ParameterError(f"formulation '{formulation}': use synthesis or analysis")
    if formulation == "analysis":
        solver = "condat_vu"
    elif solver not in ("fista", "pogm"):
        raise ParameterError(f"solver '{solver}': the synthesis formulation uses fista or pogm")
    if kspace.ndim != 4:
        raise InputDataError(f"calibrationless needs multi-coil k-space (slices, coils, H, W), got {tuple(kspace.shape)}")
    shape = tuple(kspace.shape)
    A, y = CoilFourierOp.for_data(kspace, mask)
    psi = WaveletOp(shape, wavelet, levels, backend, kspace.device)
    L = lipschitz(A)
    if not L > 0:
        raise InputDataError("the sampling mask samples nothing; check the undersample stage")
    L *= 1.01  # power iteration converges from below
    pen = psi.penalised_mask(kspace)
    owl_bands = psi.bands

    if regularizer == "group_lasso":
        last: dict = {}  # the prox's output and its group norm: the cost needs no second pass

        def gval(w):
            if last.get("x") is w:
                return lam * last["norm"]
            return lam * group_lasso_norm(w, pen)

        inplace = formulation == "synthesis" and solver == "fista"  # FISTA drops the prox's input (POGM keeps it)

        def prox(w, c):
            out, nrm = prox_group_lasso(w, np.asarray(c) * lam if np.ndim(c) else c * lam, pen, return_norm=True,
                                        inplace=inplace)
            last["x"], last["norm"] = out, nrm
            return out
    else:
        def gval(w):
            return owl_norm(w, lam, owl_beta, owl_bands)

        def prox(w, c):
            ca = np.asarray(c, dtype=np.float64)
            return prox_owl(w, ca * lam, ca * owl_beta, owl_bands)

    x0 = A.adjoint(y)  # zero-filled coil images
    with torch.no_grad():
        if formulation == "synthesis":
            AS = SynthesisOp(A, psi)  # A Psi^H: coefficients -> data
            w, info = proximal_gradient(AS, y, prox, gval, psi.apply(x0), 1.0 / L, max_iter, solver, restart,
                                        batch_dims=1, callback=callback)
            x = psi.adjoint(w)
        else:
            tau = 1.0 / (L / 2 + float(sigma))
            x, info = condat_vu(A, y, psi, prox, gval, x0, tau, float(sigma), max_iter, batch_dims=1,
                                callback=callback)
    if log:
        log(f"calibrationless ({regularizer}, {formulation}/{solver}, {psi.wt.wavelet} x{psi.wt.levels} levels, "
            f"{psi.wt.backend}): {info.iterations} iterations, L {L:.4g}, cost {float(np.sum(info.cost[-1])):.5g}")
    return x, {"cost": info.cost_array.reshape(info.iterations, -1), "lipschitz": L, "solver": solver,
               "restarts": info.restarts}
