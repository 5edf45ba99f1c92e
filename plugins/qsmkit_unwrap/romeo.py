"""Quality-guided region-growing phase unwrapping in the spirit of ROMEO (Dymerska et al. 2021).

Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid opensource minimum
spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.

The algorithm, as steps:

1. **Edge weights** (:func:`romeo_weights`): every pair of 6-neighbours ``(i, j)`` gets a weight
   in ``[0, 1]`` (1 = a reliable path), the product of factors ``0.1 + 0.9 f`` of

   * phase coherence ``f = 1 - |W(phi_j - phi_i)| / pi`` (``W`` wraps to ``[-pi, pi)``);
   * gradient coherence with a second echo ``f = max(0, 1 - |W(d phi) - W(d phi2) TE / TE2|)``
     (the spatial phase step must scale with the echo time);
   * phase linearity ``f = l_i l_j`` with ``l_v = max(0, 1 - |W(phi_{v-1} - 2 phi_v + phi_{v+1})| / 2)``
     along the edge's axis (0.9 at the grid ends);
   * magnitude coherence ``f = (min(m_i, m_j) / max(m_i, m_j))^2``;
   * optionally a magnitude weight ``f = min(1, min(m_i, m_j) / (0.5 m_95))`` (``m_95``: the 95th
     percentile of the magnitude in the mask).

   Edges with a voxel outside the mask (or the grid) have weight 0: they do not exist.
2. **Voxel quality** (:func:`voxel_quality`): the mean of a voxel's six edge weights (missing
   edges count 0), float32 in ``[0, 1]``, 0 outside the mask. It is written as the ``quality``
   artifact (useful for masking: noise and the mask border score low).
3. **Seeds** (:func:`seed_order`): the voxel of highest quality in the mask seeds the growth;
   every further region that no valid edge joins (a disconnected part of the mask) is seeded at
   its own best voxel.
4. **Growth** (:func:`grow`, the compiled bucket queue of :mod:`qsmkit_unwrap._grow`): weights
   are binned into 255 integer levels and the best edge on the frontier is taken each time; the
   voxel it reaches is unwrapped relative to its already unwrapped neighbour,
   ``phi_new + 2 pi round((phi_old - phi_new) / 2 pi)``. This is a maximum spanning tree of the
   weights (Prim's algorithm): unwrapping errors are pushed to the least reliable edges.

Multi-echo modes (``(x, y, z, echo)`` input):

* ``"temporal"`` (ROMEO's default): the template echo is unwrapped spatially, the others voxel by
  voxel in time. ``temporal_reference="fit"`` (default): the echo next to the template is
  reached through the phase *difference* of the two echoes (unwrapped spatially from the same
  seeds; it is free of the phase offset phi0 and smoother than either echo), every further echo
  by rounding to the line ``phi0 + omega TE`` fitted (weights magnitude^2) through the echoes
  unwrapped so far. This is ROMEO's echo-time scaling made insensitive to a phase offset: a 2 pi
  error of the template then shifts the whole line (phi0) of that voxel, not its slope.
  ``temporal_reference="ratio"`` is ROMEO's rule, reference ``phi_adjacent * TE / TE_adjacent``
  after ROMEO's seed correction (the template's 2 pi k at the seed that best matches the adjacent
  echo's frequency); it needs offset-free phase (e.g. after MCPC-3D-S).
* ``"spatial"``: every echo is unwrapped spatially with its own weights, all from the template's
  seeds; each seed takes the ``2 pi k`` nearest to the line through the echoes unwrapped before
  (for the first, the template plus the wrapped echo difference), so the echoes agree in time.
* ``"individual"``: every echo on its own (own weights and seeds); then each is moved by the
  ``2 pi k`` (median over the mask) that puts it on that line.

Beyond ROMEO, in ``temporal`` mode (``temporal_reference="fit"``):

* **multi-echo edge steps** (:func:`multi_echo_edge_wraps`, ``multi_echo_steps``): an edge whose
  template step is really ``d +- 2 pi`` (next to strong sources at 7 T) is recognised from the
  steps of all echoes together, where an echo time is not a multiple of the template's (30 ms
  against 4 ms); the growth then follows that step (:func:`grow`'s ``koff``);
* **uncertain voxels** (:func:`_redecide_uncertain`, ``uncertain_ratio``): where the adjacent
  echo is in a signal null, the 2 pi of the echo difference is re-decided from the neighbours'
  field, in the spirit of ROMEO.jl's ``temporal_uncertain_unwrapping``.

``correct_global`` subtracts from all echoes the ``2 pi k`` that puts the template echo's mean
over the mask nearest 0 (ROMEO's global correction, shared by the echoes so that their 2 pi
offsets stay consistent).

Exactness: the output is the data plus ``2 pi k`` in every voxel; it is the true phase (up to one
``2 pi k``) wherever the growth reaches a voxel over steps below pi, which region growing
guarantees on a smooth field and, in practice, wherever neighbouring voxels differ by less than
about pi/2 at the template echo (above that, the weights cannot tell a step from a wrapped one).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmkit.errors import InputDataError, ParameterError
from qsmkit.operators import bounding_box

from ._grow import NBINS, edge_wraps, grow_unwrap

TWO_PI = np.float32(2.0 * np.pi)
PI = np.float32(np.pi)

#: the edge-weight factors :func:`romeo_weights` knows
WEIGHT_NAMES = ("phase_coherence", "gradient_coherence", "phase_linearity", "magnitude_coherence", "magnitude")
#: ROMEO's default set (its ``:romeo`` weights)
DEFAULT_WEIGHTS = ("phase_coherence", "gradient_coherence", "phase_linearity", "magnitude_coherence")
MODES = ("temporal", "spatial", "individual")
TEMPORAL_REFERENCES = ("fit", "ratio")
#: chi^2 decrease (noise-variance units) that the per-voxel echo decision needs to change counts
DECISION_THRESHOLD = 16.0


def _wrap(x: np.ndarray) -> np.ndarray:
    """Wrap to ``[-pi, pi]`` in place (float32; ties at +-pi go either way)."""
    k = x * np.float32(1.0 / (2.0 * np.pi))
    np.rint(k, out=k)
    k *= TWO_PI
    x -= k
    return x


def _sl(axis: int, s: slice, ndim: int = 3) -> tuple:
    idx = [slice(None)] * ndim
    idx[axis] = s
    return tuple(idx)


def _factor(f: np.ndarray) -> np.ndarray:
    """ROMEO's ``0.1 + 0.9 f`` in place: a poor factor lowers an edge's weight without vetoing it."""
    f *= np.float32(0.9)
    f += np.float32(0.1)
    return f


def romeo_weights(phase: np.ndarray, phase2: np.ndarray | None = None, te_ratio: float | None = None,
                  magnitude: np.ndarray | None = None, mask: np.ndarray | None = None,
                  weights: Sequence[str] = DEFAULT_WEIGHTS) -> np.ndarray:
    """Edge weights in ``[0, 1]`` between 6-neighbours (ROMEO, Dymerska et al. 2021, Eq. 2-6).

    Parameters
    ----------
    phase : ndarray (x, y, z)
        Wrapped phase in rad.
    phase2 : ndarray (x, y, z), optional
        Wrapped phase of a second echo, for the gradient coherence (skipped without it).
    te_ratio : float, optional
        ``TE(phase) / TE(phase2)``: the factor that scales ``phase2``'s spatial steps to ``phase``'s.
    magnitude : ndarray (x, y, z), optional
        Magnitude (any unit) of ``phase``'s echo; the magnitude factors are skipped without it.
    mask : ndarray of bool (x, y, z), optional
        Edges with a voxel outside the mask get weight 0.
    weights : sequence of str
        Factors to multiply, from :data:`WEIGHT_NAMES` (see the module docstring); those whose
        input is missing are left out.

    Returns
    -------
    ndarray, float32, (3, x, y, z)
        ``w[a, i, j, k]``: weight of the edge from voxel ``(i, j, k)`` to its forward neighbour
        along axis ``a``; 0 for edges leaving the grid or the mask, otherwise in ``[1e-4, 1]``.
    """
    p = np.asarray(phase, dtype=np.float32)
    if p.ndim != 3:
        raise InputDataError(f"romeo_weights: phase must be 3D, got shape {p.shape}")
    unknown = [w for w in weights if w not in WEIGHT_NAMES]
    if unknown:
        raise ParameterError(f"unknown ROMEO weight(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(WEIGHT_NAMES)}")
    use = set(weights)
    p2 = None if phase2 is None or te_ratio is None or "gradient_coherence" not in use else \
        np.asarray(phase2, dtype=np.float32)
    mag = None if magnitude is None else np.asarray(magnitude, dtype=np.float32)
    m = None if mask is None else np.asarray(mask, dtype=bool)
    for name, arr in (("phase2", p2), ("magnitude", mag), ("mask", m)):
        if arr is not None and arr.shape != p.shape:
            raise InputDataError(f"romeo_weights: {name} shape {arr.shape} differs from the phase grid {p.shape}")
    mag_ref = None
    if mag is not None and "magnitude" in use:
        vals = mag[m] if m is not None else mag.ravel()
        vals = vals[np.isfinite(vals)]
        mag_ref = np.float32(0.5 * np.percentile(vals, 95)) if vals.size else np.float32(0)
    # each factor 0.1 + 0.9 f is formed in place; fewer passes over the volume is what costs here
    finite = bool(np.isfinite(p).all() and (p2 is None or np.isfinite(p2).all())
                  and (mag is None or np.isfinite(mag).all()))
    out = np.zeros((3,) + p.shape, dtype=np.float32)
    for a in range(3):
        n = p.shape[a]
        if n < 2:
            continue
        d = _wrap(np.diff(p, axis=a))  # wrapped step along each edge
        w = None
        factors = []
        if "phase_coherence" in use:  # 0.1 + 0.9 (1 - |d| / pi)
            f = np.abs(d)
            f *= np.float32(-0.9 / np.pi)
            f += np.float32(1.0)
            factors.append(f)
        if p2 is not None:  # 0.1 + 0.9 max(0, 1 - |d - r d2|) = max(0.1, 1 - 0.9 |d - r d2|)
            f = _wrap(np.diff(p2, axis=a))
            f *= np.float32(-te_ratio)
            f += d
            np.abs(f, out=f)
            f *= np.float32(-0.9)
            f += np.float32(1.0)
            np.maximum(f, np.float32(0.1), out=f)
            factors.append(f)
        if "phase_linearity" in use:  # 0.1 + 0.9 l_i l_j (0.1 + 0.9 * 0.9 at the grid ends)
            lin = np.full(d.shape, np.float32(0.91), dtype=np.float32)
            if n >= 4:  # edges with both ends interior
                sd = _wrap(np.diff(d, axis=a))  # second difference at voxels 1 .. n-2
                np.abs(sd, out=sd)
                sd *= np.float32(-0.5)
                sd += np.float32(1.0)
                np.maximum(sd, 0, out=sd)
                inner = lin[_sl(a, slice(1, n - 2))]
                np.multiply(sd[_sl(a, slice(None, -1))], sd[_sl(a, slice(1, None))], out=inner)
                inner *= np.float32(0.9)
                inner += np.float32(0.1)
                del sd
            factors.append(lin)
        if mag is not None and ("magnitude_coherence" in use or mag_ref is not None):
            lo, hi = mag[_sl(a, slice(None, -1))], mag[_sl(a, slice(1, None))]
            small, big = np.minimum(lo, hi), np.maximum(lo, hi)
            if "magnitude_coherence" in use:  # 0.1 + 0.9 (small / big)^2
                f = np.divide(small, big, out=np.zeros_like(small), where=big > 0)
                f *= f
                factors.append(_factor(f))
            if mag_ref is not None:  # 0.1 + 0.9 min(1, small / (0.5 m_95))
                if mag_ref > 0:
                    f = small * np.float32(1.0 / mag_ref)
                    np.minimum(f, np.float32(1.0), out=f)
                else:
                    f = np.zeros_like(small)
                factors.append(_factor(f))
            del small, big
        for f in factors:
            if w is None:
                w = f
            else:
                w *= f
        del factors
        if w is None:
            w = np.ones_like(d)
        if m is not None:
            w *= m[_sl(a, slice(None, -1))] & m[_sl(a, slice(1, None))]
        if not finite:
            w[~np.isfinite(w)] = 0
        out[(a,) + _sl(a, slice(None, -1))] = w
        del w, d
    return out


def weight_bins(w: np.ndarray) -> np.ndarray:
    """Edge weights (3, x, y, z) -> uint8 bins laid out as ``3 * voxel + axis`` (C order) for the
    growth: ``max(1, round((1 - w) (NBINS - 1)))`` for an edge (1 best, 255 worst), 0 for none."""
    b = np.empty(w.shape[1:] + (3,), dtype=np.uint8)
    for a in range(3):
        x = np.float32(1.0) - w[a]
        x *= np.float32(NBINS - 1)
        np.rint(x, out=x)
        np.clip(x, 1, NBINS - 1, out=x)
        x[w[a] <= 0] = 0
        b[..., a] = x
    return b.reshape(-1)


def voxel_quality(w: np.ndarray) -> np.ndarray:
    """Voxel quality map: the mean of each voxel's six edge weights (ROMEO's ``voxelquality``).

    Parameters
    ----------
    w : ndarray (3, x, y, z)
        Edge weights from :func:`romeo_weights`.

    Returns
    -------
    ndarray, float32, (x, y, z), in ``[0, 1]``
        1 = every neighbour agrees perfectly; edges that do not exist (grid or mask edge) count 0,
        so voxels outside the mask are 0 and the mask border scores lower.
    """
    q = w.sum(axis=0, dtype=np.float32)
    for a in range(3):
        q[_sl(a, slice(1, None))] += w[(a,) + _sl(a, slice(None, -1))]
    q *= np.float32(1.0 / 6.0)
    return q


def seed_order(quality: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Flat (C order) indices of the voxels in ``mask`` by decreasing quality (the seed candidates).

    The quality is compared to 1/65535 (a 16-bit key, so that the sort is a linear-time radix
    sort); ties go to the lower index. The first entry is the seed of the growth.
    """
    q = np.asarray(quality, dtype=np.float32).ravel()
    idx = np.arange(q.size, dtype=np.int64) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
    key = np.clip(q[idx], 0, 1)
    key = (np.float32(65535) - np.rint(key * np.float32(65535))).astype(np.uint16)
    return idx[np.argsort(key, kind="stable")]


def select_seed(quality: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """The voxel (index tuple) of highest quality inside ``mask``: where the growth starts."""
    order = seed_order(quality, mask)
    if order.size == 0:
        raise InputDataError("romeo: the mask is empty; there is no voxel to start unwrapping from")
    return tuple(int(i) for i in np.unravel_index(order[0], np.shape(quality)))


def grow(phase: np.ndarray, bins: np.ndarray, order: np.ndarray, ref: np.ndarray | None = None,
         extrapolate: float = 0.0, koff: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Quality-guided growth of one 3D volume (see :func:`qsmkit_unwrap._grow.grow_unwrap`).

    ``koff`` (int8, ``3 * voxel + axis``, optional): extra whole turns of each edge's step, from
    :func:`multi_echo_edge_wraps`. Returns the unwrapped phase (float32, 0 where no seed reached)
    and the number of regions.
    """
    shape = np.asarray(phase.shape, dtype=np.int64)
    u = np.array(phase, dtype=np.float32).ravel()
    visited = np.zeros(u.size, dtype=np.uint8)
    r = np.zeros(1, np.float32) if ref is None else np.ascontiguousarray(ref, dtype=np.float32).ravel()
    nxt = np.empty(3 * u.size, dtype=np.int64 if 3 * u.size >= 2 ** 31 else np.int32)
    ko = np.zeros(1, np.int8) if koff is None else koff
    regions = grow_unwrap(u, bins, order, r, ref is not None, shape, visited, nxt, np.float32(extrapolate),
                          ko, koff is not None)
    u[visited == 0] = 0
    return u.reshape(phase.shape), int(regions)


def multi_echo_edge_wraps(phase: np.ndarray, magnitude: np.ndarray | None, echo_times: Sequence[float], t: int,
                          s: int, bins: np.ndarray, accept: float = 0.25, min_cost: float = 0.1,
                          return_costs: bool = False):
    """Edge steps of the template echo beyond +-pi that all echoes together resolve.

    Spatial unwrapping assumes that neighbouring voxels differ by less than pi; next to strong
    sources at 7 T the template echo's true step can reach 2 pi and more (a wrapped step ``d``
    then stands for ``d +- 2 pi``). Across an edge the step of echo ``e`` is ``omega_step TE_e``
    (plus the step of the phase offset phi0, which is smooth and neglected), so the candidates
    ``d + 2 pi k`` (``k`` in -1, 0, 1) predict different steps for every echo whose ``TE_e / TE_t``
    is not an integer (at 7 T, 30 ms against 4 ms: a pi difference). For each candidate the echoes'
    wrapped steps are unwrapped in time one after the other (nearest to the running weighted
    line through the origin, echo weights ``min(m_i, m_j)^2``) and the weighted mean squared
    residual of that line is its cost. A candidate ``k != 0`` is accepted when its cost is below
    ``accept`` times the cost of ``k = 0`` and the cost of ``k = 0`` is at least ``min_cost``
    rad^2 (a misfit well above the noise of a reliable edge). With echo times that are all
    multiples of ``TE_t`` no candidate is ever better and nothing changes. This is the
    multi-echo extension of ROMEO's gradient coherence (Dymerska et al. 2021, Eq. 3), which
    compares two echoes and so cannot tell ``d`` from ``d + 2 pi`` when ``TE_2 = 2 TE_1``.

    Parameters
    ----------
    phase : ndarray (echo, x, y, z)
        Wrapped phase in rad, all echoes, C-contiguous float32.
    magnitude : ndarray (echo, x, y, z), optional
        Magnitude of every echo (weights); equal weights without it.
    echo_times : sequence of float
        One per echo (any unit).
    t, s : int
        The template echo and the echo next to it (0-based).
    bins : ndarray uint8 (3 N)
        Edge bins of the growth (:func:`weight_bins`): only existing edges are estimated.
    accept, min_cost : float
        Acceptance rule above (dimensionless, rad^2).
    return_costs : bool
        Also return the costs ``c0`` and ``cb`` (float32 (3 N)) and the best candidates.

    Returns
    -------
    kt, kd : ndarray int8 (3 N)
        Extra whole turns of each edge's step (``3 * voxel + axis``) in the template echo and in
        the wrapped difference ``phase[s] - phase[t]``, 0 where not accepted.
    """
    ph = np.ascontiguousarray(phase, dtype=np.float32)
    n_e = ph.shape[0]
    te = np.asarray(echo_times, dtype=np.float64)
    ratios = te / te[t]
    order = np.array([t] + sorted((e for e in range(n_e) if e != t), key=lambda e: (abs(te[e] - te[t]), e)),
                     dtype=np.int64)
    use_mag = magnitude is not None
    mag = np.ascontiguousarray(magnitude, dtype=np.float32).reshape(n_e, -1) if use_mag else \
        np.zeros((1, 1), np.float32)
    shape = np.asarray(ph.shape[1:], dtype=np.int64)
    n3 = bins.size
    kt, kd = np.zeros(n3, np.int8), np.zeros(n3, np.int8)
    c0, cb = np.zeros(n3, np.float32), np.zeros(n3, np.float32)
    if np.all(np.abs(ratios - np.rint(ratios)) < 1e-6) and abs(ratios[s] - 1.0) <= 1.0 + 1e-6:
        # every echo time a multiple of the template's: no candidate can fit better, and the
        # difference has the template's steps
        return (kt, kd, c0, cb, kt.copy(), kd.copy()) if return_costs else (kt, kd)
    edge_wraps(ph.reshape(n_e, -1), mag, use_mag, ratios, order, int(t), int(s), bins, shape, float(min_cost),
               kt, kd, c0, cb)
    ok = (kt != 0) & (cb < np.float32(accept) * c0) & (c0 >= np.float32(min_cost))
    # the difference's extra turns also where no extra template turn is needed and the fit is good
    ok_d = ok | ((kt == 0) & (c0 < np.float32(min_cost)))
    kt_raw, kd_raw = kt.copy(), kd.copy()
    kt[~ok] = 0
    kd[~ok_d] = 0
    if return_costs:
        return kt, kd, c0, cb, kt_raw, kd_raw
    return kt, kd


def echo_fit_cost(unwrapped: np.ndarray, magnitude: np.ndarray | None, tau: np.ndarray, sigma2: float,
                  amplitude: np.ndarray | None = None, echo_times: Sequence[float] | None = None) -> np.ndarray:
    """Per voxel, the misfit of the weighted least-squares line through the unwrapped echoes, in
    units of the noise variance (see :func:`decide_echo_counts`).

    The line ``a + b tau`` (``tau``: the echo times in any unit) is fitted to ``unwrapped`` (echo, n)
    with the weights ``A_e^2`` (the noise-robust amplitude ``A``, :func:`_amplitude`, from
    ``magnitude``, ``sigma2`` and ``echo_times``, unless given); the misfit is the complex-domain
    ``sum_e 2 A_e m_e (1 - cos(unwrapped_e - a - b tau_e)) / sigma^2`` (magnitude ``m``), i.e. the
    increase of ``-2 log`` of the complex Gaussian likelihood over the line's phase-exact fit: for
    small residuals ``r`` it is the familiar ``sum_e A_e m_e r_e^2 / sigma^2``, and an echo at noise
    level (``A ~ 0``) adds nothing however its phase lies. Without magnitude, ``A = m = 1``.
    """
    y = np.asarray(unwrapped, dtype=np.float32)
    if amplitude is None:
        amplitude = _amplitude(magnitude, sigma2, y.shape, echo_times)
    m = amplitude if magnitude is None else np.asarray(magnitude, dtype=np.float32)
    w = np.maximum(np.square(amplitude), _WEIGHT_FLOOR)
    s0, s1, s2, det = _sums(w, tau)
    a, b = _line_fit(y, w, tau, s0, s1, det)
    return _cost(y, a, b, tau, amplitude * m, sigma2)


_WEIGHT_FLOOR = np.float32(1e-30)


def _amplitude(magnitude: np.ndarray | None, sigma2: float, shape: tuple, te: np.ndarray | None = None) -> np.ndarray:
    """Signal amplitude per echo, robust to noise: ``min(sqrt(max(m^2 - 2 sigma^2, 0)), A0 exp(-R2* TE))``.

    The first term removes the Rician bias (``E[m^2] = A^2 + 2 sigma^2`` for complex Gaussian noise
    of ``sigma`` per channel; Gudbjartsson & Patz 1995); the second is the mono-exponential decay
    fitted to ``log m`` with the weights ``A^2`` (so the strong early echoes decide), which keeps an
    echo whose magnitude is noise (a Rayleigh value of 2-3 sigma after a fast T2* decay) from
    counting as signal. 1 without magnitude."""
    if magnitude is None:
        return np.ones(shape, np.float32)
    m = np.asarray(magnitude, dtype=np.float32)
    a = np.sqrt(np.maximum(np.square(m) - np.float32(2 * sigma2), 0))
    if te is None:
        return a
    t = np.asarray(te, dtype=np.float32)
    w = np.square(a)
    logm = np.log(np.maximum(m, np.float32(1e-30)))
    s0, s1, s2, det = _sums(w, t)
    c, d = _line_fit(logm, w, t, s0, s1, det)
    d = np.minimum(d, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(s0 > 0, (np.einsum("en,en->n", w, logm) - d * s1) / s0, 0)
    model = np.exp(np.minimum(c + d * t[:, None], np.float32(80)))
    return np.minimum(a, model).astype(np.float32)


def _sums(w: np.ndarray, tau: np.ndarray) -> tuple:
    s0 = w.sum(axis=0)
    s1 = np.einsum("en,e->n", w, tau)
    s2 = np.einsum("en,e->n", w, tau * tau)
    return s0, s1, s2, s0 * s2 - s1 * s1


def _line_fit(y: np.ndarray, w: np.ndarray, tau: np.ndarray, s0: np.ndarray, s1: np.ndarray,
              det: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares line ``y = a + b tau`` per voxel (``y``, ``w``: (echo, n)); 0 slope where
    fewer than two echoes carry weight."""
    sy = np.einsum("en,en->n", w, y)
    sty = np.einsum("en,en->n", w * tau[:, None], y)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(det > 0, (s0 * sty - s1 * sy) / det, 0).astype(np.float32)
        a = ((sy - b * s1) / s0).astype(np.float32)
    return a, b


def _cost(y, a, b, tau, am, sigma2) -> np.ndarray:
    r = y - a - b * tau[:, None]
    return np.einsum("en,en->n", am, 1 - np.cos(r)) * np.float32(2 / sigma2)


def _round_to_line(y: np.ndarray, a: np.ndarray, b: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Every echo moved by the ``2 pi k`` that puts it nearest to the line ``a + b tau``."""
    line = a + b * tau[:, None]
    return y + TWO_PI * np.rint((line - y) / TWO_PI)


def decide_echo_counts(unwrapped: np.ndarray, magnitude: np.ndarray | None, echo_times: Sequence[float],
                       template: int = 0, threshold: float = DECISION_THRESHOLD,
                       sigma: float | None = None) -> tuple[np.ndarray, dict]:
    """Per-voxel decision of the echoes' 2 pi counts by the best line fit through all echoes.

    The model is multi-echo GRE without intravoxel dephasing: per voxel the complex signal of echo
    ``e`` is ``A_e exp(i (phi0 + omega TE_e))`` plus complex Gaussian noise of standard deviation
    ``sigma`` per channel. For given counts the line ``phi0 + omega TE`` is the weighted
    least-squares fit to the unwrapped echoes (weights ``A_e^2``, the inverse phase-noise
    variance), and its misfit (:func:`echo_fit_cost`) is ``C = sum_e 2 A_e m_e (1 - cos r_e) /
    sigma^2``: twice the negative log-likelihood of the complex data relative to a phase-exact fit
    (``~ sum_e A_e^2 r_e^2 / sigma^2``, a chi^2 with ``n_echo - 2`` degrees of freedom, for small
    residuals; bounded by ``4 A_e m_e / sigma^2`` for an echo whose phase is noise, so that echoes
    near the noise floor cannot decide). ``A_e = sqrt(max(m_e^2 - 2 sigma^2, 0))`` removes the
    Rician bias of the magnitude (Gudbjartsson & Patz 1995). Wrong counts (the echo difference off by
    2 pi so that the later echoes followed a wrong line, or one echo off by 2 pi) raise ``C``; the
    counts that fit best are searched among candidates:

    * the current counts re-rounded to their own line, and to the lines whose slope differs by
      ``+-2 pi`` and ``+-4 pi`` per unit of ``tau = (TE - TE_t) / (TE_adj - TE_t)`` (a 2 pi error of
      the echo difference), pivoting at the template echo and at the weighted mean echo time; each
      refitted and re-rounded twice;
    * then, on every candidate, up to two single-echo moves by +-2 pi, where they lower the
      weighted squared residual most (the change of one echo by ``delta`` changes it by
      ``2 delta w_e r_e + delta^2 w_e (1 - h_ee)``, ``h_ee`` the leverage of that echo).

    Candidates are taken in that order and one replaces an earlier one only when its ``C`` is lower
    by at least 1 (aliased slopes, invisible at all echo times, are never taken). The best
    candidate replaces the current counts only where it lowers ``C`` by more than
    ``threshold``: with the right counts, noise alone lowers ``C`` by more than ``T`` at most with
    probability about ``Phi(-sqrt(T))`` (3e-5 at the default 16, in the worst case of a voxel whose
    decisive echo has a phase noise near 1.6 rad; much less at higher SNR; 16 rather than 9 because
    magnitudes at the noise floor make the tails heavier than Gaussian: at 9 one voxel of the 7 T
    phantom flipped to a wrong count), so noise-level voxels keep
    the counts of the spatial and temporal unwrapping. ``C >= 0``, so only voxels whose current
    ``C`` exceeds ``threshold`` can change, and only they are searched. The counts are normalised so
    that the template echo keeps its value (a 2 pi k common to all echoes is the phase offset's).
    Without ``sigma`` it is estimated robustly from the data: ``sigma^2 = median_voxels(sum_e m_e^2
    r_e^2) / median(chi^2_{n-2})`` with the ``m^2``-weighted line of the current counts (model errors
    make it larger and the decision more conservative). Needs 3 or more echoes.

    Parameters
    ----------
    unwrapped : ndarray (echo, n)
        Unwrapped phase in rad of ``n`` voxels (wrapped phase + 2 pi k).
    magnitude : ndarray (echo, n), optional
        Magnitude; equal amplitudes without it (then ``sigma`` is the phase noise in rad).
    echo_times : sequence of float
        One per echo, any unit.
    template : int
        The echo whose value is kept (0-based).
    threshold : float
        Decrease of ``C`` (dimensionless, noise-variance units) needed to change a voxel's counts.
    sigma : float, optional
        Noise standard deviation per channel, in magnitude units (rad without magnitude).

    Returns
    -------
    unwrapped : ndarray (echo, n), float32
        The decided phase (a new array).
    info : dict
        ``sigma`` (used), ``searched`` (voxels with ``C > threshold``) and ``changed`` (voxels whose
        counts changed).
    """
    from scipy.stats import chi2 as chi2_dist

    y0 = np.asarray(unwrapped, dtype=np.float32)
    n_e, n = y0.shape
    te = np.asarray(echo_times, dtype=np.float64)
    if n_e < 3 or te.size != n_e:
        raise ParameterError(f"romeo: the per-voxel echo decision needs 3 or more echoes with one echo time each, "
                             f"got {n_e} echo(es) and {te.size} echo time(s)")
    if not threshold > 0:
        raise ParameterError(f"romeo: decision threshold = {threshold} must be > 0 (chi^2 units; 16 is the default)")
    adj = template + 1 if template + 1 < n_e else template - 1
    tau = ((te - te[template]) / (te[adj] - te[template])).astype(np.float32)
    mag = None if magnitude is None else np.asarray(magnitude, dtype=np.float32)
    out = y0.copy()
    info = {"sigma": 0.0, "searched": 0, "changed": 0}
    if sigma is None:
        w = np.ones_like(y0) if mag is None else np.maximum(np.square(mag), _WEIGHT_FLOOR)
        s0, s1, s2, det = _sums(w, tau)
        a, b = _line_fit(y0, w, tau, s0, s1, det)
        raw = np.einsum("en,en->n", w, np.square(y0 - a - b * tau[:, None]))
        good = np.isfinite(raw) & (det > 0)
        del w, s0, s1, s2, det, a, b
        sigma2 = float(np.median(raw[good])) / float(chi2_dist.ppf(0.5, n_e - 2)) if good.any() else 0.0
    else:
        sigma2 = float(sigma) ** 2
    # floor: a phase noise of 1e-3 rad at the median template amplitude (noise-free data would
    # otherwise give sigma ~ float32 rounding, and rounding errors would decide)
    m_ref = 1.0 if mag is None else float(np.median(mag[template]))
    sigma2 = max(sigma2, (1e-3 * m_ref) ** 2)
    info["sigma"] = float(np.sqrt(sigma2))
    if not sigma2 > 0:
        return out, info
    amp = _amplitude(mag, sigma2, y0.shape, te)
    c0 = echo_fit_cost(y0, mag, tau, sigma2, amp)
    idx = np.flatnonzero(np.isfinite(c0) & (c0 > np.float32(threshold)))
    info["searched"] = int(idx.size)
    if idx.size == 0:
        return out, info
    y, am = y0[:, idx], amp[:, idx]
    ma = am * (am if mag is None else mag[:, idx])
    wv = np.maximum(np.square(am), _WEIGHT_FLOOR)
    s0, s1, s2, det = _sums(wv, tau)
    a, b = _line_fit(y, wv, tau, s0, s1, det)
    c_cur = c0[idx]
    tbar = s1 / s0
    lev = wv * (s2 - 2 * tau[:, None] * s1 + (tau * tau)[:, None] * s0) / np.where(det > 0, det, np.inf)
    best, c_best = y, c_cur
    for m in (0.0, -1.0, 1.0, -2.0, 2.0):
        for pivot in ((0.0,) if m == 0 else (0.0, 1.0)):
            bb = b + np.float32(m) * TWO_PI
            aa = a - np.float32(m) * TWO_PI * tbar * np.float32(pivot)
            cand = _round_to_line(y, aa, bb, tau)
            for _ in range(2):
                aa, bb = _line_fit(cand, wv, tau, s0, s1, det)
                cand = _round_to_line(cand, aa, bb, tau)
            for _ in range(2):  # single-echo moves by +-2 pi where they lower the squared residual most
                r = cand - aa - bb * tau[:, None]
                gain = TWO_PI * TWO_PI * wv * (1 - lev) - 2 * TWO_PI * wv * np.abs(r)
                e_best = np.argmin(gain, axis=0)
                g = np.take_along_axis(gain, e_best[None], axis=0)[0]
                mv = np.flatnonzero(g < 0)
                if mv.size == 0:
                    break
                cand[e_best[mv], mv] -= np.sign(r[e_best[mv], mv]) * TWO_PI
                aa, bb = _line_fit(cand, wv, tau, s0, s1, det)
            c = _cost(cand, aa, bb, tau, ma, sigma2)
            # a later (farther) candidate must fit better by one noise-variance unit: with echo times
            # on a common grid (4, 8, ..., 20, 30 ms: 2 ms) some slopes are aliases that fit exactly
            # as well, and the nearest counts are kept among those
            better = c < c_best - np.float32(1.0)
            best = np.where(better[None], cand, best)
            c_best = np.where(better, c, c_best)
    change = c_cur - c_best > np.float32(threshold)
    k_t = np.rint((best[template] - y[template]) / TWO_PI)
    best = best - TWO_PI * k_t[None]
    sel = idx[change]
    out[:, sel] = best[:, change]
    info["changed"] = int(np.count_nonzero(np.any(np.abs(out[:, sel] - y0[:, sel]) > 1.0, axis=0)))
    return out, info


def _unwrap_to(wrapped: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``wrapped + 2 pi k`` nearest to ``ref``, voxel by voxel (float32)."""
    k = ref - wrapped
    k /= TWO_PI
    np.rint(k, out=k)
    k *= TWO_PI
    k += wrapped
    return k


def romeo_unwrap(phase: np.ndarray, magnitude: np.ndarray | None = None, mask: np.ndarray | None = None,
                 echo_times: Sequence[float] | None = None, mode: str = "temporal", template_echo: int = 1,
                 weights: Sequence[str] = DEFAULT_WEIGHTS, return_quality: bool = False, *,
                 correct_global: bool = True, temporal_reference: str = "fit", wrap_addition: float = 0.0,
                 multi_echo_steps: bool = True, uncertain_ratio: float = 0.25,
                 decision_threshold: float | None = None, return_info: bool = False):
    """ROMEO-like quality-guided unwrapping of 3D or multi-echo 4D phase (Dymerska et al. 2021).

    Parameters
    ----------
    phase : ndarray, (x, y, z) or (x, y, z, echo)
        Wrapped phase in rad. A 3D volume is unwrapped spatially (``mode`` does not apply).
    magnitude : ndarray, (x, y, z) or like ``phase``, optional
        Magnitude for the magnitude weights and (temporal fit) the echo weights ``m^2``.
    mask : ndarray of bool (x, y, z), optional
        Region to unwrap; the output is 0 outside it. Without a mask the whole grid is unwrapped
        (noise outside the head last, as its quality is low).
    echo_times : sequence of float, optional
        Echo times in s (any unit works: only ratios and differences are used). Needed for
        ``temporal`` and ``spatial``; without them ``individual`` skips the gradient coherence.
    mode : {"temporal", "spatial", "individual"}
        Multi-echo strategy (module docstring).
    template_echo : int
        The echo unwrapped spatially and used for seeds and the quality map, counted from 1.
    weights : sequence of str
        Edge-weight factors (:data:`WEIGHT_NAMES`); default ROMEO's four.
    return_quality : bool
        Also return the voxel quality map (float32 (x, y, z) in [0, 1], 0 outside the mask) of
        the template echo.
    correct_global : bool
        Remove the 2 pi k that puts the template echo's mask mean nearest 0, from every echo.
    temporal_reference : {"fit", "ratio"}
        ``temporal`` mode's reference for the echoes after the template (module docstring):
        ``fit`` is insensitive to a phase offset, ``ratio`` is ROMEO's and needs offset-free phase.
    wrap_addition : float
        rad in ``[0, pi]``; ROMEO's option of the same name: a new voxel is unwrapped relative to
        its neighbour plus the step from the voxel behind that neighbour (clipped to
        ``+-wrap_addition``), so that steady steps of up to ``pi + wrap_addition`` are followed.
        0 (default) is plain neighbour-to-neighbour unwrapping.
    multi_echo_steps : bool
        ``temporal`` mode with 3 or more echoes: steps of the template echo (and of the echo
        difference) between neighbours that exceed pi are recognised from all echoes together and
        followed (:func:`multi_echo_edge_wraps`); this needs an echo whose time is not a multiple
        of the template's (e.g. 30 ms against 4 ms) and otherwise changes nothing.
    uncertain_ratio : float
        ``temporal`` mode (fit reference, magnitude given): voxels whose adjacent-echo magnitude is
        below this fraction of the template's get the wrap of the echo difference re-decided from
        their neighbours' field (:func:`_redecide_uncertain`, ROMEO's temporal uncertain
        unwrapping); 0 turns it off.
    decision_threshold : float
        ``temporal`` mode with 3 or more echoes and echo times: after the temporal unwrapping the
        echoes' 2 pi counts of every voxel are re-decided by the best weighted line fit through all
        echoes (:func:`decide_echo_counts`); counts change only where the fit's ``chi^2`` (in units
        of the noise variance, estimated from the data) drops by more than this. 0 turns it off.
        None (default): :data:`DECISION_THRESHOLD` with ``temporal_reference="ratio"``, whose counts
        it repairs when there is a phase offset, and off with ``"fit"``: there it changed no voxel
        of the 3 T and 7 T benchmark heads (``benchmarks/bench_unwrap.py``) and cost 0.5 s per echo.
    return_info : bool
        Also return a dict (seed index, number of regions, mode).

    Returns
    -------
    unwrapped : ndarray, float32, same shape as ``phase``
        Unwrapped phase in rad: ``phase + 2 pi k`` in every voxel of the mask, 0 outside.
    quality : ndarray, float32 (x, y, z)
        Only with ``return_quality``.
    info : dict
        Only with ``return_info``.
    """
    phi = np.asarray(phase, dtype=np.float32)
    if phi.ndim not in (3, 4):
        raise InputDataError(f"romeo: phase must be 3D or 4D (x, y, z, echo), got shape {phi.shape}")
    squeeze = phi.ndim == 3
    pe = phi[..., None] if squeeze else phi
    grid, n_e = pe.shape[:3], pe.shape[3]
    if mode not in MODES:
        raise ParameterError(f"romeo: mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    if not 0.0 <= float(uncertain_ratio) <= 1.0:
        raise ParameterError(f"romeo: uncertain_ratio = {uncertain_ratio} is outside [0, 1]; 0.25 is the default, 0 = off")
    if decision_threshold is None:
        decision_threshold = DECISION_THRESHOLD if temporal_reference == "ratio" else 0.0
    if not float(decision_threshold) >= 0.0:
        raise ParameterError(f"romeo: decision_threshold = {decision_threshold} must be >= 0 (chi^2 units; "
                             f"{DECISION_THRESHOLD:g} is the default with the ratio reference, 0 = off)")
    if not 0.0 <= float(wrap_addition) <= np.pi:
        raise ParameterError(f"romeo: wrap_addition = {wrap_addition} rad is outside [0, pi]")
    if temporal_reference not in TEMPORAL_REFERENCES:
        raise ParameterError(f"romeo: temporal_reference {temporal_reference!r} is unknown; choose fit or ratio")
    if not squeeze and mode == "temporal" and n_e < 2:
        raise ParameterError("romeo: mode temporal needs at least 2 echoes, got 1; use mode: individual "
                             "(or spatial) for single-echo phase, or give more echoes")
    if not 1 <= int(template_echo) <= n_e:
        raise ParameterError(f"romeo: template_echo = {template_echo} but there are {n_e} echo(es); "
                             f"choose 1..{n_e}")
    te = None
    if echo_times is not None:
        te = np.atleast_1d(np.asarray(echo_times, dtype=np.float64))
        if te.size != n_e:
            raise InputDataError(f"romeo: {te.size} echo times for {n_e} echoes; give one echo time per echo")
        if not np.all(np.isfinite(te)) or np.any(te <= 0) or (n_e > 1 and np.unique(te).size != n_e):
            raise InputDataError(f"romeo: echo times must be positive and distinct, got {te.tolist()}")
    if n_e > 1 and mode in ("temporal", "spatial") and te is None:
        raise ParameterError(f"romeo: mode {mode} needs the echo times; give echo_times or use mode: individual")
    mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        if mag.ndim == 3:
            mag = mag[..., None]
        if mag.shape[:3] != grid or mag.shape[3] not in (1, n_e):
            raise InputDataError(f"romeo: magnitude shape {np.shape(magnitude)} does not match the phase {phi.shape}")
    m = None
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != grid:
            raise InputDataError(f"romeo: mask shape {m.shape} differs from the phase grid {grid}")

    # work on the mask's bounding box (+1 voxel for the linearity), echo-first contiguous volumes
    if m is not None and not m.any():
        raise InputDataError("romeo: the mask is empty; there is no voxel to start unwrapping from")
    box = bounding_box(m, margin=1) if m is not None else (slice(None),) * 3
    kb = None if m is None else np.ascontiguousarray(m[box])
    sub = pe[box].shape[:3]
    sel = kb if kb is not None else np.ones(sub, dtype=bool)
    t = int(template_echo) - 1
    ub, qb, info = _unwrap_box(_Echoes(pe, box, sel), None if mag is None else _Echoes(mag, box, sel), kb, sel, te,
                               mode, t, tuple(weights), temporal_reference, float(wrap_addition),
                               bool(multi_echo_steps), float(uncertain_ratio), float(decision_threshold))
    info["seed"] = tuple(int(i) + (b.start or 0) for i, b in zip(info["seed"], box))
    info["mode"] = "spatial (3D)" if squeeze else mode
    if correct_global:
        k = float(np.round(ub[t].mean(dtype=np.float64) / (2 * np.pi)))
        info["global_2pi"] = int(k)
        if k:
            ub -= np.float32(k) * TWO_PI
    out = np.zeros(pe.shape, dtype=np.float32)
    for e in range(n_e):
        vol = np.zeros(sub, dtype=np.float32)
        vol[sel] = ub[e]
        out[box + (e,)] = vol
    quality = np.zeros(grid, dtype=np.float32)
    quality[box] = qb
    result = out[..., 0] if squeeze else out
    extra = ((quality,) if return_quality else ()) + ((info,) if return_info else ())
    return (result,) + extra if extra else result


class _Echoes:
    """The echoes of a 4D array inside the working box: ``vol(e)`` (a contiguous 3D copy, made
    when first needed) and ``at_sel(e)`` (the selected voxels, gathered once for all echoes)."""

    def __init__(self, data: np.ndarray, box: tuple, sel: np.ndarray):
        self.data, self.box, self.sel = data, box, sel
        self.n = data.shape[3]
        self._vols: dict[int, np.ndarray] = {}
        self._sel: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def vol(self, e: int) -> np.ndarray:
        e = e if self.n > 1 else 0
        if e not in self._vols:
            self._vols[e] = np.ascontiguousarray(self.data[self.box + (e,)])
        return self._vols[e]

    def at_sel(self, e: int) -> np.ndarray:
        if self._sel is None:
            self._sel = np.ascontiguousarray(self.data[self.box][self.sel].T)
        return self._sel[e if self.n > 1 else 0]


class _LineFit:
    """Per voxel, the weighted least-squares line ``phase = a + b tau`` through the echoes added so
    far (weights magnitude^2, or 1): the reference for the next echo in time."""

    def __init__(self, tau: np.ndarray, mag_sel: list | None, n: int):
        self.tau, self.mag, self.n = tau, mag_sel, n
        self.sums = [np.zeros(n, np.float32) for _ in range(5)]  # S0, S1, S2, Sy, Sty
        self.count = 0
        self.floor = np.float32(1e-30)
        if mag_sel is not None:
            self.floor = np.float32(max(max(float(x.max(initial=0)) for x in mag_sel) ** 2 * 1e-10, 1e-30))

    def add(self, e: int, values: np.ndarray) -> None:
        if self.mag is None:
            we = np.ones(self.n, np.float32)
        else:
            we = np.maximum(np.square(self.mag[e if len(self.mag) > 1 else 0]), self.floor)
        tt = np.float32(self.tau[e])
        s = self.sums
        s[0] += we
        s[1] += we * tt
        s[2] += we * (tt * tt)
        wy = we * values
        s[3] += wy
        wy *= tt
        s[4] += wy
        self.count += 1

    def predict(self, e: int) -> np.ndarray:
        s0, s1, s2, sy, sty = self.sums
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (s0 * sty - s1 * sy) / (s0 * s2 - s1 * s1)
            ref = (sy - slope * s1) / s0
        slope *= np.float32(self.tau[e])
        ref += slope
        ref[~np.isfinite(ref)] = 0
        return ref


def _slope(sums: list) -> np.ndarray:
    """The slope (rad per unit of ``tau``) of :class:`_LineFit`'s weighted line, 0 where undefined."""
    s0, s1, s2, sy, sty = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        b = (s0 * sty - s1 * sy) / (s0 * s2 - s1 * s1)
    b[~np.isfinite(b)] = 0
    return b


def _redecide_uncertain(out: np.ndarray, wrapped, mb: "_Echoes", tau: np.ndarray, t: int, s: int,
                        sequence: list, sel: np.ndarray, line: "_LineFit", ratio: float) -> int:
    """Temporal uncertain unwrapping (after ROMEO's ``temporal_uncertain_unwrapping``): re-decide
    the wrap of the echo difference where it is unreliable, from the neighbours' field.

    Where the adjacent echo's magnitude is below ``ratio`` times the template's (a signal null
    next to air or a vein), the echo difference phase is unreliable and its 2 pi decides the slope
    of the whole voxel (every later echo follows that line). With echo times that are multiples
    of the echo spacing all three candidates (the difference +-2 pi, later echoes re-rounded to
    their lines) fit the echoes equally, so the data of the voxel alone do not decide. The
    candidate is chosen whose fitted slope (field) lies nearest to the median slope of the
    reliable voxels among the 26 neighbours, among the candidates whose weighted line residual
    is not clearly worse (at most twice the best + 0.05 rad^2). This uses only slopes, so a
    residual per-voxel phase offset (e.g. after MCPC-3D-S) does not change the decision.
    Voxels without a reliable neighbour keep their value. ``out`` is changed in place; returns
    the number of voxels changed.
    """
    n_e = out.shape[0]
    m_t, m_s = mb.at_sel(t), mb.at_sel(s)
    unc = m_s < np.float32(ratio) * m_t
    if not unc.any():
        return 0
    slope = _slope(line.sums)
    # neighbour look-up in the box: flat box index of every selected voxel
    box_idx = np.flatnonzero(sel.ravel())
    pos = np.full(sel.size, -1, np.int64)
    pos[box_idx] = np.arange(box_idx.size)
    reliable = ~unc
    ui = np.flatnonzero(unc)
    coords = np.array(np.unravel_index(box_idx[ui], sel.shape)).T
    offs = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)])
    nb = coords[:, None, :] + offs[None, :, :]
    inside = np.all((nb >= 0) & (nb < np.asarray(sel.shape)), axis=2)
    nb = np.where(inside[..., None], nb, 0)
    j = pos[np.ravel_multi_index((nb[..., 0], nb[..., 1], nb[..., 2]), sel.shape)]
    ok = inside & (j >= 0)
    ok[ok] = reliable[j[ok]]
    vals = np.where(ok, slope[np.where(j >= 0, j, 0)], np.nan)
    has = ok.any(axis=1)
    if not has.any():
        return 0
    ui, vals = ui[has], vals[has]
    with np.errstate(all="ignore"):
        target = np.nanmedian(vals, axis=1).astype(np.float32)
    mags = [mb.at_sel(e)[ui] for e in range(len(mb))]
    cands, costs, slopes = [], [], []
    for k in (0, -1, 1):
        v = np.zeros((n_e, ui.size), np.float32)
        v[t] = out[t][ui]
        v[s] = out[s][ui] + np.float32(k) * TWO_PI
        lf = _LineFit(tau, mags, ui.size)
        lf.add(t, v[t])
        lf.add(s, v[s])
        for e in sequence:
            if e != s:
                v[e] = _unwrap_to(wrapped(e)[ui], lf.predict(e))
                lf.add(e, v[e])
        b = _slope(lf.sums)
        a = (lf.sums[3] - b * lf.sums[1]) / np.maximum(lf.sums[0], np.float32(1e-30))
        res = np.zeros(ui.size, np.float32)
        for e in range(n_e):
            we = np.square(mags[e if len(mags) > 1 else 0])
            res += we * np.square(v[e] - a - b * np.float32(tau[e]))
        res /= np.maximum(lf.sums[0], np.float32(1e-30))
        cands.append(v)
        costs.append(res)
        slopes.append(b)
    costs, slopes = np.array(costs), np.array(slopes)
    admissible = costs <= 2 * costs.min(axis=0) + np.float32(0.05)
    dist = np.where(admissible, np.abs(slopes - target), np.inf)
    pick = np.argmin(dist, axis=0)
    changed = pick != 0
    for c in (1, 2):
        w = pick == c
        if w.any():
            out[:, ui[w]] = cands[c][:, w]
    return int(np.count_nonzero(changed))


def _unwrap_box(pb: _Echoes, mb: _Echoes | None, kb: np.ndarray | None, sel: np.ndarray,
                te: np.ndarray | None, mode: str, t: int, weights: tuple, temporal_reference: str,
                wrap_addition: float, multi_echo_steps: bool = True,
                uncertain_ratio: float = 0.25,
                decision_threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """The unwrapping steps on the echoes ``pb`` (phase) and ``mb`` (magnitude) of the working box.

    ``kb`` is the mask (or None), ``sel`` the voxels to return (the mask, or all). Returns the
    unwrapped phase at ``sel`` per echo (echo, n_sel), the voxel quality map of the box and info.
    """
    n_e = len(pb)

    def mag_of(e: int):
        return None if mb is None else mb.vol(e)

    def weights_of(e: int, other: int | None):
        ratio = None if other is None or te is None else float(te[e] / te[other])
        return romeo_weights(pb.vol(e), None if ratio is None else pb.vol(other), ratio, mag_of(e), kb, weights)

    adj = (t + 1 if t + 1 < n_e else t - 1) if n_e > 1 else None
    # echoes after the template, nearest first in time (or in index without echo times)
    dist = (lambda e: (abs(te[e] - te[t]), e)) if te is not None else (lambda e: (abs(e - t), e))
    sequence = sorted((e for e in range(n_e) if e != t), key=dist)

    def neighbour(e: int) -> int:  # the adjacent echo on the template's side (already unwrapped)
        return e - 1 if e > t else e + 1

    def wrapped(e: int) -> np.ndarray:  # echo e at the selected voxels
        return pb.at_sel(e)

    w_t = weights_of(t, adj)
    quality = voxel_quality(w_t)
    order = seed_order(quality, kb)
    bins_t = weight_bins(w_t)
    del w_t
    kt = kd = None
    if multi_echo_steps and mode == "temporal" and n_e >= 3 and te is not None:
        kt, kd = multi_echo_edge_wraps(np.stack([pb.vol(e) for e in range(n_e)]),
                                       None if mb is None else np.stack([mb.vol(e) for e in range(n_e)]),
                                       te, t, adj, bins_t)
    u_t, regions = grow(pb.vol(t), bins_t, order, None, wrap_addition, kt)
    del bins_t, kt
    info = {"seed": tuple(int(i) for i in np.unravel_index(order[0], quality.shape)), "regions": regions}
    out = np.zeros((n_e, int(np.count_nonzero(sel))), dtype=np.float32)
    out[t] = u_t[sel]
    del u_t

    if n_e == 1:
        return out, quality, info
    # dimensionless time axis of the line fits: template 0, adjacent echo +-1 (index without TEs)
    tau = (te - te[t]) / float(te[adj] - te[t]) if te is not None else (np.arange(n_e) - t) / float(adj - t)
    line = _LineFit(tau, None if mb is None else [mb.at_sel(e) for e in range(len(mb))], out.shape[1])
    line.add(t, out[t])

    def reference(e: int) -> np.ndarray:
        """Where echo e should lie: on the line through the echoes so far, or, with the template
        alone, the template plus the wrapped echo-to-echo difference."""
        if line.count >= 2:
            return line.predict(e)
        a = neighbour(e)
        return out[a] + _wrap(wrapped(e) - wrapped(a))

    if mode == "temporal" and temporal_reference == "fit":
        # the adjacent echo through the offset-free phase difference, unwrapped from the same seeds
        s = adj
        d = _wrap(pb.vol(s) - pb.vol(t))
        ms = None if mb is None else np.minimum(mag_of(s), mag_of(t))
        w_d = romeo_weights(d, pb.vol(t), float((te[s] - te[t]) / te[t]), ms, kb, weights)
        u_d, _ = grow(d, weight_bins(w_d), order, None, wrap_addition, kd)
        del w_d, d
        out[s] = _unwrap_to(wrapped(s), out[t] + u_d[sel])
        del u_d
        line.add(s, out[s])
        # every further echo: rounded to the weighted line phi0 + omega TE through the echoes so far
        for e in sequence:
            if e != s:
                out[e] = _unwrap_to(wrapped(e), line.predict(e))
                line.add(e, out[e])
        if mb is not None and uncertain_ratio > 0:
            info["uncertain_redecided"] = _redecide_uncertain(out, wrapped, mb, tau, t, s, sequence, sel,
                                                              line, uncertain_ratio)
    elif mode == "temporal":  # ROMEO's echo-time ratio to the adjacent unwrapped echo
        # ROMEO's seed correction: the template's 2 pi k at the seed that best matches the
        # adjacent echo in frequency (phase / TE), assuming no phase offset
        j = int(np.count_nonzero(sel.ravel()[:order[0]]))  # the seed among the selected voxels
        p1, p2 = float(wrapped(t)[j]), float(wrapped(adj)[j])
        cost = {(k1, k2): abs((p1 + 2 * np.pi * k1) / te[t] - (p2 + 2 * np.pi * k2) / te[adj]) * te[t]
                + (abs(k1) + abs(k2)) / 100.0 for k1 in range(-2, 3) for k2 in range(-1, 2)}
        k1 = min(cost, key=cost.get)[0]
        info["seed_2pi"] = int(k1)
        out[t] += np.float32(k1) * TWO_PI
        for e in sequence:
            a = neighbour(e)
            out[e] = _unwrap_to(wrapped(e), out[a] * np.float32(te[e] / te[a]))
    elif mode == "spatial":  # every echo spatially, from the template's seeds
        for e in sequence:
            a = neighbour(e)
            ref = np.zeros(sel.shape, dtype=np.float32)
            ref[sel] = reference(e)  # used at the seeds only
            u_e, _ = grow(pb.vol(e), weight_bins(weights_of(e, a)), order, ref, wrap_addition)
            out[e] = u_e[sel]
            line.add(e, out[e])
    else:  # individual: own weights and seeds, then the 2 pi k (median) that puts it on the line
        for e in sequence:
            a = neighbour(e)
            w_e = weights_of(e, a if te is not None else None)
            u_e, _ = grow(pb.vol(e), weight_bins(w_e), seed_order(voxel_quality(w_e), kb), None, wrap_addition)
            del w_e
            out[e] = u_e[sel]
            k = float(np.round(np.median((reference(e) - out[e]) / TWO_PI)))
            if k:
                out[e] += np.float32(k) * TWO_PI
            line.add(e, out[e])
    if mode == "temporal" and decision_threshold > 0 and n_e >= 3 and te is not None:
        out, dec = decide_echo_counts(out, None if mb is None else np.stack([mb.at_sel(e) for e in range(n_e)]),
                                      te, t, decision_threshold)
        info["decision"] = dec
    return out, quality, info
