"""MCPC-3D-S phase-offset correction of multi-echo phase (Eckstein et al. 2018, MRM 79:2996).

The phase of echo ``e`` is ``phi_e = phi0 + omega * TE_e`` (+ a bipolar term, below): ``phi0`` is
the receive/transmit phase offset, which can vary by many radians across the head (coil
combination without a reference). MCPC-3D-S ("multi-channel phase combination, 3D, smoothed")
estimates ``phi0`` from two echoes ``a < b`` with ``dTE = TE_b - TE_a``:

1. the Hermitian inner product ``H = S_b conj(S_a)`` has phase ``omega dTE`` (``phi0`` cancels);
   it is unwrapped spatially (ROMEO or Laplacian, inside the mask) to ``U``;
2. ``U TE_a / dTE`` is the field phase at ``TE_a``, so ``phi0 = angle(S_a) - U TE_a / dTE``
   voxel by voxel;
3. ``phi0`` is smoothed as a complex exponential weighted by the magnitude,
   ``angle(G_sigma * (|S_a| exp(i phi0)))`` with a Gaussian of ``sigma_mm`` (the "S"; the
   paper and MriResearchTools smooth with sigma of several voxels): this averages the noise,
   and the low-signal voxels (veins, haemorrhage) get the offset of their neighbours. Here the
   smoothing is first order (:func:`smooth_phase`): the bias of a weighted average of a sloped
   phase next to the mask edge is removed with the local phase gradient (measured on the coil
   phantom: 0.10 -> 0.016 rad RMS at sigma 4 mm on a small head);
4. every echo is corrected: ``angle(S_e exp(-i phi0))``.

The corrected phase is then ``omega TE_e`` up to one constant per volume, so the echoes can be
combined or unwrapped without a per-voxel offset (Eckstein 2018, and the ``unwrap`` /
``echo_combine`` stages that follow).

Bipolar readout (``bipolar=True``, Eckstein 2018 section "bipolar acquisitions"): odd and even
echoes differ by a phase ``delta(x)`` (gradient delays: a constant and a linear ramp along the
readout), ``phi_e = phi0 + omega TE_e + delta [e even]``. With three equally spaced echoes,
``angle(S_1 S_3 conj(S_2)^2) = -2 delta`` whatever ``phi0`` and ``omega``; this is smoothed like
``phi0`` (``delta`` is smooth), unwrapped spatially and halved, and ``delta`` is removed from the
even echoes *before* the MCPC-3D-S steps above (else it would leak into ``phi0``).

Global constants. The spatial unwrapping leaves one 2 pi multiple per volume, and halving
``2 delta`` one multiple of pi; both amount to a uniform field offset (``2 pi / dTE`` and
``pi / dTE_13`` rad/s), which background removal takes out. They are fixed by the convention that
the field's magnitude-weighted circular mean over the mask lies within (-pi, pi] of the
unwrapped Hermitian phase (``|field| < pi / (omega dTE)``, 0.98 ppm at 3 T and dTE = 4 ms), and
for ``delta`` that the corrected echo 1 -> 2 phase has a circular mean within (-pi/2, pi/2].
Where ``TE_a / dTE`` is not an integer, a local 2 pi error of the unwrapped ``U`` changes
``phi0`` by ``2 pi TE_a / dTE`` there; with ``TE_a = dTE`` (echoes 1 and 2 of an evenly spaced
acquisition starting at one spacing) such errors cancel.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmkit import Param, Stage
from qsmkit.errors import GeometryError, InputDataError, ParameterError
from qsmkit.params import CPU_DEVICE

__all__ = ["MCPC3DS", "mcpc3ds", "estimate_bipolar", "smooth_phase", "UNWRAPPERS"]

TWO_PI = 2.0 * np.pi

#: spatial unwrappers the phase differences can use
UNWRAPPERS = ("romeo", "laplacian")


def _wrap(x: np.ndarray) -> np.ndarray:
    """Wrap to [-pi, pi) (float32)."""
    x = np.asarray(x, np.float32)
    return (x - np.float32(TWO_PI) * np.floor(x / np.float32(TWO_PI) + np.float32(0.5))).astype(np.float32)


def _cis(ph: np.ndarray) -> np.ndarray:
    z = np.empty(ph.shape, np.complex64)
    np.cos(ph, out=z.real)
    np.sin(ph, out=z.imag)
    return z


def smooth_phase(phase: np.ndarray, weight: np.ndarray, voxel_size: Sequence[float], sigma_mm: float,
                 first_order: bool = True) -> np.ndarray:
    """Weighted Gaussian smoothing of a wrapped phase as a complex exponential.

    ``angle(G * (w exp(i phase)))`` is the phase at the *weighted centroid* ``c(x) = G*(w x) /
    G*(w)`` of the kernel rather than at ``x``: next to the mask edge (and across magnitude
    steps) it is biased by ``grad(phase) . (c - x)``, about ``0.8 sigma |grad phase|`` at the edge.
    With ``first_order`` that term is removed, using the local phase gradient from the smoothed
    neighbour products ``G * (w_j w_i)^(1/2) exp(i (phase_j - phase_i))`` along each axis (a
    first-order normalised convolution); the remaining bias is the curvature term
    ``~ sigma^2 laplacian(phase) / 2``.

    Parameters
    ----------
    phase : ndarray (x, y, z)
        Phase in rad (wrapped or not).
    weight : ndarray (x, y, z)
        Non-negative weights (e.g. the magnitude, 0 outside the mask).
    voxel_size : 3 floats
        mm.
    sigma_mm : float
        Standard deviation of the Gaussian in mm (0 = no smoothing).
    first_order : bool
        Correct the centroid (edge) bias as above.

    Returns
    -------
    ndarray, float32
        The smoothed phase in [-pi, pi); 0 where the smoothed weight is 0 (farther than 4 sigma
        from any weighted voxel).
    """
    ph = np.asarray(phase, np.float32)
    w = np.asarray(weight, np.float32)
    e = _cis(ph)
    if sigma_mm <= 0:
        return _wrap(np.where(w > 0, ph, 0.0))
    sig = [float(sigma_mm) / float(v) for v in voxel_size]

    def g(a):
        return ndi.gaussian_filter(a, sig, mode="nearest", truncate=4.0)

    def gc(z):
        return g(z.real) + 1j * g(z.imag)

    out = np.angle(gc(w * e)).astype(np.float32)
    if first_order:
        wsum = g(w)
        valid = wsum > 1e-6 * float(wsum.max()) if wsum.size else wsum > 0
        for k in range(3):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[k], hi[k] = slice(0, -1), slice(1, None)
            lo, hi = tuple(lo), tuple(hi)
            h = np.zeros(ph.shape, np.complex64)
            h[lo] = np.sqrt(w[lo] * w[hi]) * e[hi] * np.conj(e[lo])
            grad = np.angle(gc(h)).astype(np.float32)            # rad per voxel along k
            shape = [1, 1, 1]
            shape[k] = ph.shape[k]
            xk = np.arange(ph.shape[k], dtype=np.float32).reshape(shape)
            off = np.where(valid, g(w * xk) / np.where(valid, wsum, 1.0) - xk, 0.0)   # centroid - x, voxels
            out -= grad * off.astype(np.float32)
    return _wrap(out)


def _unwrap3d(phase: np.ndarray, magnitude: np.ndarray, mask: np.ndarray, voxel_size, unwrapper: str) -> np.ndarray:
    """Spatially unwrapped ``phase`` inside ``mask`` (0 outside), congruent to it modulo 2 pi."""
    if unwrapper == "romeo":
        try:
            from .romeo import romeo_unwrap
        except ImportError as exc:
            raise ParameterError(f"phase_offset/mcpc3ds: unwrapper 'romeo' is not available ({exc}); "
                                 f"set unwrapper: laplacian") from None
        u = np.asarray(romeo_unwrap(phase, magnitude, mask), np.float32)
    elif unwrapper == "laplacian":
        from .laplacian import laplacian_unwrap

        # CG on the mask + snapping: the data + 2 pi k, no harmonic residue (see laplacian.py)
        u = laplacian_unwrap(phase, voxel_size, mask, "wrapped", 30, 1e-4, True)
    else:
        raise ParameterError(f"phase_offset/mcpc3ds: unknown unwrapper {unwrapper!r}; use {' or '.join(UNWRAPPERS)}")
    u = np.where(mask, u, 0.0).astype(np.float32)
    return u


def _global_2pi(u: np.ndarray, weight: np.ndarray, mask: np.ndarray, period: float) -> np.ndarray:
    """Shift ``u`` by the multiple of ``period`` that brings its weighted median over ``mask`` into
    [-period/2, period/2)."""
    v, w = u[mask].astype(np.float64), weight[mask].astype(np.float64)
    if v.size == 0:
        return u
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    med = float(v[order][np.searchsorted(cw, 0.5 * cw[-1])]) if cw[-1] > 0 else float(np.median(v))
    n = np.floor(med / period + 0.5)
    return np.where(mask, u - np.float32(n * period), 0.0).astype(np.float32)


def estimate_bipolar(signal: np.ndarray, echo_times: Sequence[float], mask: np.ndarray,
                     voxel_size: Sequence[float], sigma_mm: float, unwrapper: str = "romeo") -> np.ndarray:
    """Odd/even-echo phase difference ``delta`` (rad) of a bipolar readout from echoes 1-3.

    Parameters
    ----------
    signal : complex ndarray (x, y, z, echo)
        Complex multi-echo signal ``magnitude * exp(i phase)``, at least 3 echoes.
    echo_times : floats
        Echo times in s; echoes 1-3 must be equally spaced.
    mask : bool ndarray (x, y, z)
    voxel_size : 3 floats
        mm.
    sigma_mm : float
        Gaussian smoothing of ``exp(-2 i delta)`` (mm).
    unwrapper : {"romeo", "laplacian"}

    Returns
    -------
    ndarray float32 (x, y, z)
        ``delta`` inside the mask (0 outside), such that the even echoes times ``exp(-i delta)``
        follow ``phi0 + omega TE`` with the odd ones. Model: Eckstein et al. 2018 (bipolar
        section): ``angle(S1 S3 conj(S2)^2) = -2 delta`` for equally spaced echoes.
    """
    te = np.asarray(echo_times, np.float64)
    if signal.shape[-1] < 3:
        raise InputDataError(f"phase_offset/mcpc3ds: the bipolar correction needs at least 3 echoes, got "
                             f"{signal.shape[-1]}; set bipolar: false")
    d1, d2 = te[1] - te[0], te[2] - te[1]
    if abs(d1 - d2) > 1e-3 * max(abs(d1), abs(d2)):
        raise InputDataError(f"phase_offset/mcpc3ds: the bipolar correction needs equally spaced echoes 1-3, got "
                             f"TE {[round(t * 1e3, 3) for t in te[:3]]} ms; set bipolar: false")
    s1, s2, s3 = signal[..., 0], signal[..., 1], signal[..., 2]
    z = s1 * s3 * np.conj(s2) ** 2
    w = np.abs(s1) * mask
    psi = smooth_phase(np.angle(z), w, voxel_size, sigma_mm)          # -2 delta, wrapped
    psi_u = _unwrap3d(psi, np.abs(s1), mask, voxel_size, unwrapper)
    psi_u = _global_2pi(psi_u, w, mask, TWO_PI)
    delta = (-0.5 * psi_u).astype(np.float32)
    # delta is known modulo pi: pick the branch whose echo 1 -> 2 phase has a circular mean
    # within (-pi/2, pi/2] (uniform field offset convention, module docstring)
    h = s2 * np.conj(s1) * _cis(-delta)
    if float(np.sum((h[mask] / np.maximum(np.abs(h[mask]), 1e-30)).real * w[mask])) < 0:
        delta = np.where(mask, delta + np.float32(np.pi), 0.0).astype(np.float32)
    return delta


def mcpc3ds(phase: np.ndarray, magnitude: np.ndarray, echo_times: Sequence[float], voxel_size: Sequence[float],
            mask: np.ndarray | None = None, echoes: Sequence[int] = (1, 2), sigma_mm: float = 4.0,
            bipolar: bool = False, unwrapper: str = "romeo") -> dict:
    """MCPC-3D-S phase-offset removal (Eckstein et al. 2018, MRM 79:2996), optionally bipolar.

    Parameters
    ----------
    phase : ndarray (x, y, z, echo)
        Wrapped phase in rad.
    magnitude : ndarray (x, y, z, echo)
        Magnitude (any scale).
    echo_times : floats
        Echo times in s, one per echo.
    voxel_size : 3 floats
        mm.
    mask : bool ndarray (x, y, z), optional
        Region whose phase is meaningful (the brain or the head): the Hermitian phase is unwrapped
        and ``phi0`` estimated there. Default: echo-1 magnitude above 15 % of its 99th percentile.
    echoes : 2 ints
        The pair ``a < b`` (1-based) of the Hermitian product; ``(1, 2)`` as in the paper.
    sigma_mm : float
        Gaussian smoothing of ``phi0`` (and of the bipolar term), mm.
    bipolar : bool
        Estimate and remove the odd/even echo phase difference first (>= 3 equally spaced echoes).
    unwrapper : {"romeo", "laplacian"}
        Spatial unwrapper of the Hermitian phase.

    Returns
    -------
    dict
        ``phase`` (float32 (x, y, z, echo), corrected wrapped phase in [-pi, pi)),
        ``phase_offset`` (float32 (x, y, z), the smoothed ``phi0`` in rad, wrapped),
        ``bipolar_phase`` (float32 (x, y, z) ``delta`` in rad, or ``None``), ``mask`` used.

    Steps: :func:`estimate_bipolar` (optional), Hermitian product and :func:`_unwrap3d`, raw
    ``phi0``, :func:`smooth_phase`, correction of every echo.
    """
    ph = np.asarray(phase, np.float32)
    mag = np.asarray(magnitude, np.float32)
    if ph.ndim == 3:
        ph, mag = ph[..., None], (mag[..., None] if mag.ndim == 3 else mag)
    te = np.asarray(echo_times, np.float64).ravel()
    n_e = ph.shape[-1]
    if mag.shape != ph.shape:
        raise InputDataError(f"phase_offset/mcpc3ds: magnitude shape {mag.shape} differs from phase {ph.shape}; "
                             f"give magnitude and phase with the same grid and echoes")
    if te.size != n_e:
        raise InputDataError(f"phase_offset/mcpc3ds: {te.size} echo times for {n_e} echoes; give one echo time per echo")
    a, b = (int(e) - 1 for e in echoes)
    if not (0 <= a < b < n_e):
        raise ParameterError(f"phase_offset/mcpc3ds: echoes {list(echoes)} must be two 1-based echo numbers "
                             f"a < b <= {n_e}")
    if n_e < 2:
        raise InputDataError("phase_offset/mcpc3ds: MCPC-3D-S needs at least 2 echoes")
    if mask is None:
        m1 = mag[..., 0]
        mask = m1 > 0.15 * float(np.percentile(m1, 99))
    mask = np.asarray(mask, bool)
    sig = mag * _cis(ph)

    delta = None
    if bipolar:
        delta = estimate_bipolar(sig, te, mask, voxel_size, sigma_mm, unwrapper)
        sig[..., 1::2] *= _cis(-delta)[..., None]

    d_te = te[b] - te[a]
    hip = sig[..., b] * np.conj(sig[..., a])
    w = np.abs(sig[..., a]) * mask
    u = _unwrap3d(np.angle(hip).astype(np.float32), np.sqrt(np.abs(hip)), mask, voxel_size, unwrapper)
    u = _global_2pi(u, w, mask, TWO_PI)
    phi0_raw = np.angle(sig[..., a]) - np.float32(te[a] / d_te) * u
    phi0 = smooth_phase(phi0_raw, w, voxel_size, sigma_mm)
    corrected = _wrap(np.angle(sig * _cis(-phi0)[..., None]))
    return {"phase": corrected, "phase_offset": phi0, "bipolar_phase": delta, "mask": mask}


# ============================================================================ stage
class MCPC3DS(Stage):
    """MCPC-3D-S: remove the spatially varying phase offset (and a bipolar odd/even term) from every echo."""

    kind, name = "phase_offset", "mcpc3ds"
    reads = ("phase", "magnitude", "echo_times")
    optional_reads = ("mask",)
    writes = ("phase", "phase_offset")
    optional_writes = ("bipolar_phase",)
    description = ("MCPC-3D-S (Eckstein et al. 2018): phi0 from the unwrapped Hermitian product of two echoes, "
                   "smoothed, removed from every echo; optional bipolar odd/even correction")
    params = (
        Param("echoes", list, [1, 2], item_type=int, range=(1, 64),
              doc="the two echoes (1-based, a < b) whose Hermitian product gives the field phase"),
        Param("sigma_mm", float, 4.0, unit="mm", range=(0.0, 30.0),
              doc="Gaussian smoothing of phi0 (first-order, magnitude-weighted); 0 = none"),
        Param("bipolar", bool, False,
              doc="estimate and remove the odd/even echo phase difference of a bipolar readout "
                  "(>= 3 equally spaced echoes)"),
        Param("unwrapper", str, "romeo", choices=UNWRAPPERS,
              doc="spatial unwrapper of the Hermitian phase (and of the bipolar term)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        ph, mv = ctx["phase"], ctx["magnitude"]
        phase, mag = np.asarray(ph.data), np.asarray(mv.data)
        if phase.ndim != 4 or phase.shape[3] < 2:
            raise InputDataError(f"phase_offset/mcpc3ds needs multi-echo phase (x, y, z, echo) with >= 2 echoes, "
                                 f"got shape {phase.shape}; for single-echo data leave this stage out")
        if mag.ndim == 3:
            mag = mag[..., None]
        if mag.shape != phase.shape:
            raise GeometryError(f"magnitude shape {mag.shape} differs from phase {phase.shape}; give magnitude and "
                                f"phase on the same grid with the same echoes")
        if not np.all(np.isfinite(phase)) or not np.all(np.isfinite(mag)):
            raise InputDataError("phase_offset/mcpc3ds: phase or magnitude contains NaN or infinite values")
        te = ctx.echo_times(phase.shape[3])
        if len(p.echoes) != 2:
            raise ParameterError(f"phase_offset/mcpc3ds: echoes must be two echo numbers, e.g. [1, 2], got {p.echoes}")
        mask = ctx.optional_mask(phase.shape[:3])
        if not np.any(mag[..., int(p.echoes[0]) - 1] > 0):
            raise InputDataError("phase_offset/mcpc3ds: the magnitude is zero everywhere; check the magnitude input")
        res = mcpc3ds(phase, mag, te, ph.voxel_size, mask, tuple(p.echoes), p.sigma_mm, p.bipolar, p.unwrapper)
        m = res["mask"]
        ctx.log(f"MCPC-3D-S from echoes {p.echoes[0]} and {p.echoes[1]} ({p.unwrapper}), sigma {p.sigma_mm:g} mm, "
                f"{int(m.sum())} voxels" + (" (mask from the echo-1 magnitude)" if mask is None else "")
                + (f"; bipolar term median {float(np.median(res['bipolar_phase'][m])):.3f} rad" if p.bipolar else ""))
        out = {"phase": ph.like(res["phase"], units="rad"), "phase_offset": ph.like(res["phase_offset"], units="rad")}
        if res["bipolar_phase"] is not None:
            out["bipolar_phase"] = ph.like(res["bipolar_phase"], units="rad")
        return out
