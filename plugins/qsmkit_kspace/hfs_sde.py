"""HFS-SDE: score-based diffusion in high-frequency k-space (Cao et al., IEEE TMI 43(5), 2024).

The diffusion variable is the coil-combined complex image ``x`` (``H x W``); ``F`` is the centred
orthonormal 2D FFT and ``L`` a fixed low-frequency k-space mask (:func:`low_frequency_mask`:
``low_frequency`` = the ``acs`` central columns, ``center`` = the central ``acs x acs`` box).
With ``Mh = F^H (1 - L) F`` (the projection onto the high frequencies) the forward SDE is

    dx = -1/2 beta(t) Mh x dt + sqrt(beta(t)) Mh dw,      beta(t) = beta_min + t (beta_max - beta_min)

(``kind="vp"``, the authors' ``HFS_SDE`` with beta_min 0.1, beta_max 20), so that

    x_t = x_0 + (m(t) - 1) Mh x_0 + s(t) Mh z,   m(t) = exp(-t^2 (b1 - b0) / 4 - t b0 / 2),  s = sqrt(1 - m^2).

``kind="ve"`` is the variance-exploding variant ``dx = sqrt(d s^2/dt) Mh dw`` with
``s(t) = sigma_min (sigma_max / sigma_min)^t`` (m = 1). Either way noise is added *only* outside
``L``: the low-frequency k-space never changes, which is why reverse sampling needs fewer steps
than image-space diffusion. The implementation keeps the state in k-space and multiplies every
update by ``1 - L``, so the samples in ``L`` stay bit-for-bit what they were.

Training (:func:`dsm_loss`): denoising score matching on the high frequencies, as the authors'
``losses.py``: the network ``eps(x_t, t)`` predicts the standardised noise, the score is
``-Mh eps / s(t)``, and the loss is ``mean |Mh (eps(x_t, t) - z)|^2 / 2`` (the mean square over the
real and imaginary components; 1 - |L| / (H W) for eps = 0).

Reconstruction (:func:`hfs_sde_reconstruct`) from multi-coil k-space ``y`` sampled on ``M``
(``L`` must lie inside ``M``) with SENSE maps ``S`` (``A = M F S``):

1. ``x_low = A^H (L y)`` (the coil-combined image of the measured low-frequency data) fixes the
   low frequencies ``L F x = L F x_low``; data are scaled by ``normalize_coeff * rms(x_low)``
   per slice (the authors' "std" normalisation, computed from data every undersampling keeps);
2. the high frequencies start from the prior (``N(0, I)``, or ``N(0, sigma_max^2)`` for VE);
3. ``N`` predictor-corrector iterations from ``t = 1`` to ``eps``: a Langevin corrector (step
   ``2 alpha_i (snr ||z|| / ||score||)^2``, noise ``Mh z``) then an Euler-Maruyama predictor
   (authors' default) or score_sde's reverse-diffusion predictor; both move along the score minus
   the authors' measurement gradient ``Mh A^H (A x - y)`` rescaled to ``mse * ||score||``
   (``corrector_mse`` in the corrector);
4. optionally (``hard_dc``, default) data consistency after every iteration on the acquired
   samples outside ``L``: ``x <- x + Mh A^H (y - A x)``, which for one coil with unit maps
   replaces the k-space samples by the measured ones, and for maps with ``sum_c |S_c|^2 = 1`` is
   the usual coil-wise k-space replacement followed by SENSE combination;
5. noise removal (``denoise``): instead of the last iteration, Tweedie's estimate
   ``x_0 = (x_h - s Mh eps) / m`` at ``t = eps`` (score_sde returns the last predictor mean, which
   is this estimate at N = 1000 but overshoots it with accelerated sampling), rescaled.

``n_steps`` 1000 is the authors' default; with accelerated sampling (``n_steps`` >= 100) they
use ``snr`` 0.32 instead of 0.16. Everything runs batched over slices on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from qsmkit.errors import GeometryError, ParameterError

__all__ = ["HFSSDE", "low_frequency_mask", "perturb", "dsm_loss", "pc_step", "denoise_step", "data_consistency",
           "hfs_sde_reconstruct", "EpsModel", "LOW_FREQUENCY_KINDS", "PREDICTORS", "CORRECTORS"]

LOW_FREQUENCY_KINDS = ("low_frequency", "center")
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "none")
CORRECTORS = ("langevin", "none")

#: ``eps_model(x, t)``: complex image batch ``(B, H, W)`` and times ``(B,)`` -> predicted noise ``(B, H, W)``
EpsModel = Callable


@dataclass(frozen=True)
class HFSSDE:
    """Noise schedule of the high-frequency SDE (``kind`` ``"vp"``: the authors'; ``"ve"``: variance exploding).

    Parameters
    ----------
    kind : {"vp", "ve"}
    beta_min, beta_max : float
        VP: ``beta(t) = beta_min + t (beta_max - beta_min)`` (authors: 0.1, 20).
    sigma_min, sigma_max : float
        VE: ``s(t) = sigma_min (sigma_max / sigma_min)^t`` (in units of the normalised image).
    """

    kind: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 20.0

    def __post_init__(self):
        if self.kind not in ("vp", "ve"):
            raise ParameterError(f"sde kind {self.kind!r}: choose vp (the authors') or ve")
        if not 0 < self.beta_min < self.beta_max:
            raise ParameterError(f"sde: need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ParameterError(f"sde: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @classmethod
    def from_dict(cls, d: dict) -> "HFSSDE":
        return cls(**{k: d[k] for k in ("kind", "beta_min", "beta_max", "sigma_min", "sigma_max") if k in d})

    def as_dict(self) -> dict:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def mean_coeff(self, t):
        """``m(t)``: the factor of the high frequencies of ``x_0`` in ``x_t``."""
        import torch

        if self.kind == "ve":
            return torch.ones_like(t)
        return torch.exp(-0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)

    def std(self, t):
        """``s(t)``: the standard deviation of the (high-frequency) noise in ``x_t``."""
        import torch

        if self.kind == "ve":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return torch.sqrt(1.0 - self.mean_coeff(t) ** 2)

    def g2(self, t):
        """Squared diffusion coefficient ``g(t)^2``."""
        if self.kind == "ve":
            return self.std(t) ** 2 * 2.0 * math.log(self.sigma_max / self.sigma_min)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift_coeff(self, t):
        """``f(x, t) = drift_coeff(t) * Mh x``."""
        return 0.0 * t if self.kind == "ve" else -0.5 * self.g2(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max if self.kind == "ve" else 1.0

    def discrete(self, i: int, n: int):
        """Discretisation of step ``i`` of ``n`` (score_sde's): ``(a, G^2, alpha)``.

        The reverse-diffusion predictor is ``x <- x - a Mh x + G^2 score + G Mh z``; ``alpha`` scales
        the Langevin step (VP: ``1 - beta_i``, VE: 1).
        """
        if self.kind == "ve":
            sig = np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), n))
            prev = sig[i - 1] if i > 0 else 0.0
            return 0.0, float(sig[i] ** 2 - prev ** 2), 1.0
        betas = np.linspace(self.beta_min / n, self.beta_max / n, n)
        b = min(float(betas[i]), 0.999)  # beta_max / n > 1 below 20 steps: keep the step defined
        return math.sqrt(1.0 - b) - 1.0, b, 1.0 - b


def low_frequency_mask(shape, kind: str = "low_frequency", acs: int = 16) -> np.ndarray:
    """The fixed low-frequency region ``L`` of HFS-SDE (float32, 1 = low frequency).

    Parameters
    ----------
    shape : (H, W)
        k-space grid.
    kind : {"low_frequency", "center"}
        ``low_frequency``: the ``acs`` central phase-encoding columns (last axis), returned as
        ``(1, W)``; ``center``: the central ``acs x acs`` box, ``(H, W)``. Centred on the DC sample
        ``(H // 2, W // 2)`` and starting at ``N // 2 - acs // 2`` (as ESPIRiT's calibration box).
    acs : int
        Width in samples.
    """
    H, W = int(shape[0]), int(shape[1])
    if kind not in LOW_FREQUENCY_KINDS:
        raise ParameterError(f"low-frequency mask {kind!r}: choose one of {', '.join(LOW_FREQUENCY_KINDS)}")
    acs = int(acs)
    if acs < 1 or acs > W or (kind == "center" and acs > H):
        raise ParameterError(f"acs = {acs} does not fit a {H} x {W} k-space; give 1 <= acs <= {min(H, W) if kind == 'center' else W}")
    cols = np.zeros(W, np.float32)
    cols[W // 2 - acs // 2: W // 2 - acs // 2 + acs] = 1
    if kind == "low_frequency":
        return cols[None]
    rows = np.zeros(H, np.float32)
    rows[H // 2 - acs // 2: H // 2 - acs // 2 + acs] = 1
    return rows[:, None] * cols[None]


def _fft(x):
    from qsmkit.fft import fftnc_torch

    return fftnc_torch(x, dim=(-2, -1))


def _ifft(k):
    from qsmkit.fft import ifftnc_torch

    return ifftnc_torch(k, dim=(-2, -1))


def _crandn(shape, device, generator=None):
    """Complex noise with real and imaginary parts N(0, 1) (the network's two real channels)."""
    import torch

    z = torch.randn((2,) + tuple(shape), device=device, generator=generator)
    return torch.complex(z[0], z[1])


def _as_low(L, device):
    import torch

    L = torch.as_tensor(np.asarray(L, np.float32) if not isinstance(L, torch.Tensor) else L,
                        dtype=torch.float32, device=device)
    return L


def perturb(x0, t, L, sde: HFSSDE, generator=None):
    """Forward perturbation ``x_t = x_0 + (m - 1) Mh x_0 + s Mh z`` (computed in k-space).

    Parameters
    ----------
    x0 : torch.Tensor, complex64, (B, H, W)
        Clean (normalised) images.
    t : torch.Tensor, float32, (B,)
        Diffusion times in ``(0, 1]``.
    L : array or tensor broadcastable to (H, W)
        Low-frequency mask (:func:`low_frequency_mask`).

    Returns
    -------
    (x_t, z_high) : the perturbed images and the high-frequency noise ``Mh z`` (both (B, H, W)).
        ``L F x_t`` equals ``L F x_0`` up to one FFT round trip.
    """
    L = _as_low(L, x0.device)
    H = 1.0 - L
    K0 = _fft(x0)
    Z = _crandn(x0.shape, x0.device, generator)  # white: F z has the same law as z
    m = sde.mean_coeff(t)[:, None, None]
    s = sde.std(t)[:, None, None]
    Kt = K0 + H * ((m - 1.0) * K0 + s * Z)
    return _ifft(Kt), _ifft(H * Z)


def dsm_loss(eps_model: EpsModel, x0, L, sde: HFSSDE, t_eps: float = 1e-5, generator=None):
    """Denoising score matching on the high frequencies (the authors' ``get_sde_loss_fn`` for HFS-SDE).

    ``mean over slices of mean |Mh (eps(x_t, t) - z)|^2`` over the real and imaginary parts, with
    ``t ~ U(t_eps, 1)``; equal to ``s(t)^2 |score + Mh z / s(t)|^2`` on the high frequencies.
    """
    import torch

    B = x0.shape[0]
    t = torch.rand(B, device=x0.device, generator=generator) * (1.0 - t_eps) + t_eps
    xt, zh = perturb(x0, t, L, sde, generator)
    eps = eps_model(xt, t)
    L = _as_low(L, x0.device)
    r = _ifft((1.0 - L) * _fft(eps)) - zh
    return (r.real ** 2 + r.imag ** 2).mean(dim=(-2, -1)).mean() / 2.0


def _norm(x):
    return x.abs().pow(2).sum(dim=(-2, -1)).sqrt()[:, None, None]


def _weighted_meas(meas, score, weight, ref):
    """The authors' measurement gradient: ``meas`` rescaled per slice to ``weight * ||score||``.

    A gradient at round-off level (below ``1e-5 ||ref||``: no acquired sample outside ``L``, or
    data already matched) is zero, not round-off noise blown up to ``weight * ||score||``.
    """
    import torch

    nm = _norm(meas)
    ok = nm > 1e-5 * _norm(ref)
    return torch.where(ok, meas * (weight * _norm(score) / torch.where(ok, nm, torch.ones_like(nm))),
                       torch.zeros_like(meas))


def data_consistency(K, L, op, y):
    """Hard data consistency outside ``L``: ``x <- x + Mh A^H (y - A x)`` on the k-space state ``K``.

    Parameters
    ----------
    K : torch.Tensor, complex64, (S, H, W)
        k-space of the (normalised) combined image.
    op : qsmkit_kspace.sense.SenseOp
        ``A = M F S`` with one set of maps ``(S, 1, C, H, W)``.
    y : torch.Tensor, (S, C, H, W)
        Normalised measured k-space.
    """
    x = _ifft(K)[:, None]
    r = op.adjoint(y - op.apply(x))[:, 0]
    return K + (1.0 - L) * _fft(r)


class _Sampler:
    """State shared by the predictor-corrector iterations of one batch (see :func:`hfs_sde_reconstruct`)."""

    def __init__(self, eps_model, sde, L, op, y, mse, corrector_mse, snr, generator):
        self.eps_model, self.sde, self.L, self.op, self.y = eps_model, sde, L, op, y
        self.H = 1.0 - L
        self.mse, self.corrector_mse, self.snr, self.generator = mse, corrector_mse, snr, generator

    def hp(self, x):
        return _ifft(self.H * _fft(x))

    def score(self, x, t):
        """Projected score ``-Mh eps(x, t) / s(t)``."""
        import torch

        tt = torch.full((x.shape[0],), float(t), device=x.device)
        eps = self.eps_model(x, tt)
        return -self.hp(eps) / self.sde.std(tt)[:, None, None]

    def meas_grad(self, x):
        """``Mh A^H (A x - y)`` (zero without data)."""
        if self.op is None:
            return None
        return self.hp(self.op.adjoint(self.op.apply(x[:, None]) - self.y)[:, 0])

    def noise(self, shape, device):
        return _crandn(shape, device, self.generator)


def pc_step(state: _Sampler, K, i: int, n: int, t: float, dt: float, predictor: str = "euler_maruyama",
            corrector: str = "langevin", hard_dc: bool = True, noise: bool = True):
    """One predictor-corrector iteration on the k-space state ``K`` at time ``t`` (step ``i`` of ``n``).

    Returns ``(K, K_mean)``: the new state and its noise-free mean. With a zero score the
    corrector does not move and the predictor is the score-free reverse SDE step (VE: the identity,
    VP: ``x + 1/2 beta dt Mh x``) followed by :func:`data_consistency`; ``noise=False`` drops the
    random terms (for tests).
    """
    import torch

    sde, Hm = state.sde, state.H
    dev = K.device
    Km = K
    x = _ifft(K)
    if corrector == "langevin":
        s = state.score(x, t)
        g = s
        mg = state.meas_grad(x)
        if mg is not None and state.corrector_mse:
            g = s - _weighted_meas(mg, s, state.corrector_mse, x)
        z = state.noise(x.shape, dev) if noise else torch.zeros_like(x)
        sn = _norm(s)
        zn = math.sqrt(2.0 * x.shape[-1] * x.shape[-2]) if not noise else _norm(z)
        _, _, alpha = sde.discrete(i, n)
        step = torch.where(sn > 0, 2.0 * alpha * (state.snr * zn / torch.where(sn > 0, sn, torch.ones_like(sn))) ** 2,
                           torch.zeros_like(sn))
        Km = K + Hm * _fft(step * g)
        K = Km + Hm * (torch.sqrt(2.0 * step) * _fft(z))
        x = _ifft(K)
    if predictor != "none":
        s = state.score(x, t)
        g = s
        mg = state.meas_grad(x)
        if mg is not None and state.mse:
            g = s - _weighted_meas(mg, s, state.mse, x)
        tt = torch.full((1,), float(t), device=dev)
        Z = state.noise(x.shape, dev) if noise else None
        if predictor == "euler_maruyama":
            g2 = float(sde.g2(tt))
            f = float(sde.drift_coeff(tt))
            # reverse time: x(t - dt) = x - [f Mh x - g^2 score] dt + g sqrt(dt) Mh z
            Km = K + Hm * _fft(-f * dt * x + g2 * dt * g)
            K = Km if Z is None else Km + Hm * (math.sqrt(g2 * dt) * _fft(Z))
        else:  # reverse_diffusion (score_sde's discretisation, on the high frequencies)
            a, G2, _ = sde.discrete(i, n)
            Km = K + Hm * _fft(-a * x + G2 * g)
            K = Km if Z is None else Km + Hm * (math.sqrt(G2) * _fft(Z))
    if hard_dc and state.op is not None:
        K = data_consistency(K, state.L, state.op, state.y)
        Km = data_consistency(Km, state.L, state.op, state.y)
    return K, Km


def check_low_frequency_sampled(L, mask, shape, label: str = "recon/hfs_sde") -> None:
    """Refuse a sampling mask (broadcastable to ``(S, 1, H, W)``) that misses part of the region ``L``."""
    import torch

    H, W = int(shape[0]), int(shape[1])
    Lb = torch.broadcast_to(torch.as_tensor(L) > 0, (H, W))
    m = torch.as_tensor(mask)
    while m.ndim < 4:
        m = m[None]
    acquired = torch.broadcast_to(m[:, 0] >= 0.5, (m.shape[0], H, W))
    if not bool(acquired[:, Lb].all()):
        raise GeometryError(f"{label}: the sampling mask does not acquire the whole low-frequency region of the "
                            f"model ({int(Lb.sum())} central samples); sample at least those (a larger centre "
                            f"fraction) or lower 'acs'")


def hfs_sde_reconstruct(eps_model: EpsModel, y, maps, mask, L, sde: HFSSDE, n_steps: int = 1000,
                        snr: float = 0.16, mse: float = 2.5, corrector_mse: float = 0.1,
                        predictor: str = "euler_maruyama", corrector: str = "langevin", hard_dc: bool = True,
                        denoise: bool = True, t_eps: float = 1e-3, normalize_coeff: float = 1.5,
                        generator=None, tick: Callable[[int], None] | None = None, support: bool = False):
    """HFS-SDE reconstruction of a batch of slices (see the module docstring).

    Parameters
    ----------
    eps_model : callable
        ``eps_model(x, t)``: complex ``(S, H, W)`` and ``(S,)`` -> predicted noise ``(S, H, W)``.
    y : torch.Tensor, complex64, (S, C, H, W)
        Measured k-space (zero where not sampled), any scale.
    maps : torch.Tensor, complex64, (S, M, C, H, W)
        SENSE maps (the first set is used; ``sum_c |S_c|^2 = 1`` inside the object).
    mask : torch.Tensor, float32, broadcastable to (S, 1, H, W)
        Sampling mask ``M``; it must contain ``L``.
    L : array (1, W) or (H, W)
        Low-frequency region (:func:`low_frequency_mask`).
    sde : HFSSDE
        The schedule the network was trained with.
    n_steps : int
        Predictor-corrector iterations ``N`` (authors: 1000; accelerated sampling: >= 100).
    snr : float
        Langevin signal-to-noise ratio (authors: 0.16; 0.32 with accelerated sampling).
    mse, corrector_mse : float
        Weights of the measurement gradient in the predictor and the corrector (authors: 2.5, 0.1).
    predictor, corrector : str
        ``euler_maruyama`` | ``reverse_diffusion`` | ``none``; ``langevin`` | ``none``.
    hard_dc : bool
        Data consistency on the acquired samples after every iteration.
    denoise : bool
        Finish with Tweedie's estimate at ``t_eps`` (:func:`denoise_step`, score_sde's ``noise_removal``).
    t_eps : float
        Last diffusion time (score_sde's ``eps``).
    normalize_coeff : float
        Images are divided by ``normalize_coeff * rms(x_low)`` per slice (must match training).
    generator : torch.Generator, optional
        Source of the sampling noise (seed).
    tick : callable, optional
        Called with the iteration number (progress bars).
    support : bool
        Zero the final image where every map is zero (our addition). Those pixels are in the null
        space of ``A`` (``S_c = 0``: the coil data ``A x`` do not depend on them), so the sampler
        fills them from the prior alone (generated background texture), and the SENSE combination
        of fully sampled data is zero there. On validation slices (``bench_hfs_sde.py --seed 7``,
        SENSE reference) this raised SSIM from 0.785 to 0.919. The low frequencies of the combined
        image then differ from the measured ones by those of the removed background; inside the
        support the image is the sampler's.

    Returns
    -------
    torch.Tensor, complex64, (S, H, W)
        The image on the scale of ``y``; without ``support``, ``L F x`` equals ``L F A^H (L y)``
        (the measured low-frequency data combined with the maps) to float precision.
    """
    import torch

    from .sense import SenseOp

    if int(n_steps) < 1:
        raise ParameterError(f"n_steps = {n_steps}: give at least 1 step (authors: 1000, accelerated >= 100)")
    if predictor not in PREDICTORS or corrector not in CORRECTORS:
        raise ParameterError(f"predictor {predictor!r} / corrector {corrector!r}: choose from {PREDICTORS} / {CORRECTORS}")
    dev = y.device
    S, C, Hn, Wn = y.shape
    Lt = _as_low(L, dev)
    if Lt.shape[-1] != Wn or (Lt.shape[-2] not in (1, Hn)):
        raise GeometryError(f"low-frequency mask {tuple(Lt.shape)} does not fit the k-space {tuple(y.shape[-2:])}")
    check_low_frequency_sampled(Lt, mask, (Hn, Wn))
    op = SenseOp(maps[:, :1], mask)
    x_low = op.adjoint(Lt * y)[:, 0]  # (S, H, W)
    scale = normalize_coeff * x_low.abs().pow(2).mean(dim=(-2, -1)).sqrt()[:, None, None]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    yn = y / scale[:, None]
    K_low = Lt * _fft(x_low / scale)
    state = _Sampler(eps_model, sde, Lt, op, yn, mse, corrector_mse, snr, generator)
    K = K_low + (1.0 - Lt) * (sde.prior_std * _fft(_crandn((S, Hn, Wn), dev, generator)))
    n = int(n_steps)
    times = torch.linspace(1.0, t_eps, n, dtype=torch.float64).tolist()
    dt = 1.0 / n  # the authors' step (timesteps linspace(1, eps, N), dt = 1 / N)
    last = n - 1 if denoise and n > 1 else n
    for j, t in enumerate(times[:last]):
        i = int(t * (n - 1))  # discrete index of this time (score_sde's timestep)
        K, Km = pc_step(state, K, i, n, t, dt, predictor, corrector, hard_dc)
        if tick is not None:
            tick(j + 1)
    if denoise and n > 1:
        K = denoise_step(state, K, times[-1], hard_dc)
        if tick is not None:
            tick(n)
    Kout = K_low + (1.0 - Lt) * K  # exact low frequencies (already so; guards round-off)
    x = _ifft(Kout) * scale
    if support:
        x = x * (maps[:, 0].abs().pow(2).sum(1) > 0)
    return x.to(torch.complex64)


def denoise_step(state: _Sampler, K, t: float, hard_dc: bool = True):
    """Noise removal at the last time ``t``: Tweedie's estimate ``x_0 = (x_h - s Mh eps) / m`` on the high frequencies.

    score_sde returns the noise-free mean of the last predictor step, which is this estimate when
    ``dt = s^2 / beta`` (about the case at N = 1000) but overshoots it ``beta dt / s^2`` times with
    accelerated sampling (10x at N = 100, t = 1e-3); the estimate itself does not depend on ``dt``.
    """
    import torch

    x = _ifft(K)
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    m, sd = state.sde.mean_coeff(tt)[:, None, None], state.sde.std(tt)[:, None, None]
    eps = state.eps_model(x, tt)
    Kd = K + state.H * _fft((1.0 / m - 1.0) * x - (sd / m) * eps)
    if hard_dc and state.op is not None:
        Kd = data_consistency(Kd, state.L, state.op, state.y)
    return Kd
