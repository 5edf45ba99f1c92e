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

from ._grow import NBINS, grow_unwrap

TWO_PI = np.float32(2.0 * np.pi)
PI = np.float32(np.pi)

#: the edge-weight factors :func:`romeo_weights` knows
WEIGHT_NAMES = ("phase_coherence", "gradient_coherence", "phase_linearity", "magnitude_coherence", "magnitude")
#: ROMEO's default set (its ``:romeo`` weights)
DEFAULT_WEIGHTS = ("phase_coherence", "gradient_coherence", "phase_linearity", "magnitude_coherence")
MODES = ("temporal", "spatial", "individual")
TEMPORAL_REFERENCES = ("fit", "ratio")


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
         extrapolate: float = 0.0) -> tuple[np.ndarray, int]:
    """Quality-guided growth of one 3D volume (see :func:`qsmkit_unwrap._grow.grow_unwrap`).

    Returns the unwrapped phase (float32, 0 where no seed reached) and the number of regions.
    """
    shape = np.asarray(phase.shape, dtype=np.int64)
    u = np.array(phase, dtype=np.float32).ravel()
    visited = np.zeros(u.size, dtype=np.uint8)
    r = np.zeros(1, np.float32) if ref is None else np.ascontiguousarray(ref, dtype=np.float32).ravel()
    nxt = np.empty(3 * u.size, dtype=np.int64 if 3 * u.size >= 2 ** 31 else np.int32)
    regions = grow_unwrap(u, bins, order, r, ref is not None, shape, visited, nxt, np.float32(extrapolate))
    u[visited == 0] = 0
    return u.reshape(phase.shape), int(regions)


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
                 return_info: bool = False):
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
                               mode, t, tuple(weights), temporal_reference, float(wrap_addition))
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


def _unwrap_box(pb: _Echoes, mb: _Echoes | None, kb: np.ndarray | None, sel: np.ndarray,
                te: np.ndarray | None, mode: str, t: int, weights: tuple, temporal_reference: str,
                wrap_addition: float) -> tuple[np.ndarray, np.ndarray, dict]:
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
    u_t, regions = grow(pb.vol(t), weight_bins(w_t), order, None, wrap_addition)
    del w_t
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
        u_d, _ = grow(d, weight_bins(w_d), order, None, wrap_addition)
        del w_d, d
        out[s] = _unwrap_to(wrapped(s), out[t] + u_d[sel])
        del u_d
        line.add(s, out[s])
        # every further echo: rounded to the weighted line phi0 + omega TE through the echoes so far
        for e in sequence:
            if e != s:
                out[e] = _unwrap_to(wrapped(e), line.predict(e))
                line.add(e, out[e])
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
    return out, quality, info
