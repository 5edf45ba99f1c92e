"""Undersampling masks: fastMRI-compatible column masks and 2D variable-density Poisson disc.

``random_mask`` and ``equispaced_mask`` reproduce fastMRI's ``RandomMaskFunc`` and
``EquispacedMaskFractionFunc`` (``fastmri/data/subsample.py``) column for column for the same
seed: a legacy ``numpy.random.RandomState`` is (re)seeded with the seed, one
``randint(len(center_fractions))`` draw picks the (centre fraction, acceleration) pair, then

- random: ``uniform(size=num_cols) < (num_cols / acc - num_low) / (num_cols - num_low)``;
- equispaced (fraction): ``adjusted = acc * (num_low - num_cols) / (num_low * acc - num_cols)``,
  ``offset = randint(0, round(adjusted))``, columns ``around(arange(offset, num_cols - 1, adjusted))``;

and the ``num_low = round(num_cols * center_fraction)`` centre columns starting at
``(num_cols - num_low + 1) // 2`` are always sampled. fastMRI seeds validation/test masks with
``tuple(map(ord, file_name))``; :func:`fastmri_seed` makes that seed from a file name.

``poisson_disc_mask`` is a 2D variable-density Poisson-disc mask with a fully sampled
calibration box (as skm-tea / meddlr's ``PoissonDiskMaskFunc`` built on sigpy's
``mri.poisson``): the disc radius grows linearly with the distance from the calibration box,
``r = max(1, (1 + slope * d) * n / max(ny, nx))`` per axis, and ``slope`` is found by bisection
so that the acceleration (grid size / samples) is within ``tol`` of the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import ParameterError

__all__ = ["fastmri_seed", "random_mask", "equispaced_mask", "poisson_disc_mask", "apply_padding",
           "check_acceleration", "fully_sampled_center"]


def fastmri_seed(name: str | Path) -> tuple[int, ...]:
    """fastMRI's per-volume mask seed: ``tuple(map(ord, file_name))``."""
    return tuple(map(ord, Path(name).name))


def check_acceleration(acc: float, where: str = "acceleration") -> float:
    """Validate an acceleration factor (>= 1) and return it as float."""
    try:
        a = float(acc)
    except (TypeError, ValueError):
        raise ParameterError(f"{where} = {acc!r} is not a number; give an acceleration >= 1 (e.g. 4)") from None
    if not np.isfinite(a) or a < 1.0:
        raise ParameterError(f"{where} = {acc!r} is below 1; an acceleration factor must be >= 1 (1 = fully sampled)")
    return a


def _choose(rng: np.random.RandomState, center_fractions: Sequence[float], accelerations: Sequence[float]):
    if len(center_fractions) != len(accelerations):
        raise ParameterError(f"center_fractions has {len(center_fractions)} values but accelerations "
                             f"{len(accelerations)}; give one centre fraction per acceleration")
    if not center_fractions:
        raise ParameterError("give at least one centre fraction and acceleration")
    for a in accelerations:
        check_acceleration(a, "accelerations")
    for cf in center_fractions:
        if not 0.0 <= float(cf) <= 1.0:
            raise ParameterError(f"center_fractions value {cf!r} must be between 0 and 1")
    choice = rng.randint(len(center_fractions))
    return float(center_fractions[choice]), accelerations[choice]


def _center(num_cols: int, num_low: int) -> np.ndarray:
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - num_low + 1) // 2
    mask[pad:pad + num_low] = True
    return mask


def _rng(seed: Any) -> np.random.RandomState:
    rng = np.random.RandomState()
    rng.seed(seed)  # int, tuple of ints or None (fresh entropy), as fastMRI's temp_seed
    return rng


def random_mask(num_cols: int, center_fractions: Sequence[float], accelerations: Sequence[float],
                seed: Any = None) -> tuple[np.ndarray, int, float]:
    """fastMRI ``RandomMaskFunc`` columns.

    Parameters
    ----------
    num_cols : int
        Number of phase-encoding columns (fastMRI ``shape[-2]`` of the real-view k-space, i.e.
        the last axis ``W`` of complex k-space).
    center_fractions, accelerations : sequences of float
        Candidate pairs; one is drawn per call.
    seed : int, tuple of int or None
        RNG seed (``None``: not reproducible).

    Returns
    -------
    (mask, num_low_frequencies, acceleration)
        ``mask`` is bool ``(num_cols,)``.
    """
    rng = _rng(seed)
    cf, acc = _choose(rng, center_fractions, accelerations)
    num_low = round(num_cols * cf)
    if num_low >= num_cols:
        return np.ones(num_cols, dtype=bool), int(num_low), float(acc)
    prob = (num_cols / acc - num_low) / (num_cols - num_low)
    mask = rng.uniform(size=num_cols) < prob
    return mask | _center(num_cols, num_low), int(num_low), float(acc)


def equispaced_mask(num_cols: int, center_fractions: Sequence[float], accelerations: Sequence[float],
                    seed: Any = None, offset: int | None = None,
                    exact_spacing: bool = False) -> tuple[np.ndarray, int, float]:
    """fastMRI ``EquispacedMaskFractionFunc`` columns (or ``EquiSpacedMaskFunc`` with ``exact_spacing``).

    The fraction variant adjusts the spacing so that the centre plus the equispaced columns
    give ``num_cols / acceleration`` columns in total (so the spacing is not an integer and
    the columns are rounded, as in the public multi-coil data). ``exact_spacing`` samples every
    ``acceleration``-th column (integer accelerations only) in addition to the centre.

    Returns
    -------
    (mask, num_low_frequencies, acceleration)
    """
    rng = _rng(seed)
    cf, acc = _choose(rng, center_fractions, accelerations)
    num_low = round(num_cols * cf)
    mask = _center(num_cols, num_low)
    if exact_spacing:
        if float(acc) != int(acc):
            raise ParameterError(f"exact_spacing needs an integer acceleration, got {acc!r}")
        step = int(acc)
        if offset is None:
            offset = rng.randint(0, high=round(step))
        mask[int(offset)::step] = True
        return mask, int(num_low), float(acc)
    if num_low * acc >= num_cols:  # the centre alone reaches the acceleration
        return mask, int(num_low), float(acc)
    adjusted = (acc * (num_low - num_cols)) / (num_low * acc - num_cols)
    if offset is None:
        offset = rng.randint(0, high=round(adjusted))
    accel_samples = np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.uint)
    mask[accel_samples] = True
    return mask, int(num_low), float(acc)


def apply_padding(mask: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray:
    """Zero the columns outside fastMRI's ``[padding_left, padding_right)`` (last axis)."""
    if padding is None:
        return mask
    m = np.array(mask, copy=True)
    left, right = int(padding[0]), int(padding[1])
    if left > 0:
        m[..., :left] = 0
    if right < m.shape[-1]:
        m[..., max(right, 0):] = 0
    return m


def fully_sampled_center(mask: np.ndarray, shape: Sequence[int],
                         max_size: Sequence[int] | None = None) -> tuple[int, int]:
    """Largest fully sampled box ``(h, w)`` centred on the DC sample ``(H//2, W//2)``.

    The box of size ``n`` along an axis of length ``N`` covers ``[N//2 - n//2, N//2 - n//2 + n)``
    (as the calibration region of :func:`qsmkit_kspace.espirit.espirit_slice`). ``mask`` is
    broadcastable to ``shape`` (e.g. a ``(1, W)`` column mask); ``max_size`` caps the box. Of
    all boxes the one with the largest area is returned. Used by ESPIRiT to shrink its
    calibration region to what was really acquired.
    """
    H, W = int(shape[0]), int(shape[1])
    m = np.broadcast_to(np.asarray(mask) != 0, (H, W))
    mh, mw = (min(int(max_size[0]), H), min(int(max_size[1]), W)) if max_size is not None else (H, W)
    best = (0, 0)
    for w in range(mw, 0, -1):
        if w * mh <= best[0] * best[1]:
            break
        c0 = W // 2 - w // 2
        rows_full = m[:, c0:c0 + w].all(axis=1)
        h = 0
        while h < mh:  # boxes grow nested, so stop at the first failure
            n = h + 1
            r0 = H // 2 - n // 2
            if not rows_full[r0:r0 + n].all():
                break
            h = n
        if h * w > best[0] * best[1]:
            best = (h, w)
    return int(best[0]), int(best[1])


def poisson_disc_mask(shape: Sequence[int], acceleration: float, calib: Sequence[int] = (24, 24),
                      seed: int = 0, crop_corner: bool = True, tol: float = 0.1,
                      max_iter: int = 40) -> tuple[np.ndarray, float]:
    """2D variable-density Poisson-disc mask with a fully sampled calibration box.

    Parameters
    ----------
    shape : (ny, nx)
        Mask shape (e.g. skm-tea ``(ky, kz)``).
    acceleration : float
        Target ``ny * nx / samples`` (>= 1).
    calib : (int, int)
        Fully sampled centre box (rows, columns).
    seed : int
        Seed of the random visiting order (the same seed gives the same mask).
    crop_corner : bool
        Leave the k-space corners beyond the inscribed ellipse unsampled (as sigpy).
    tol : float
        Accepted ``|achieved - acceleration|``.
    max_iter : int
        Bisection steps on the density slope.

    Returns
    -------
    (mask, achieved_acceleration)
        ``mask`` bool ``(ny, nx)``.

    Notes
    -----
    Points are visited in a random order and accepted when no earlier sample's elliptical
    disc (radii ``r_y, r_x`` at that sample) contains them: random sequential dart throwing,
    which gives a maximal Poisson-disc set like Bridson's algorithm used by sigpy.
    """
    acc = check_acceleration(acceleration)
    ny, nx = (int(s) for s in shape)
    if acc == 1.0:
        return np.ones((ny, nx), dtype=bool), 1.0
    cy, cx = (min(int(c), n) for c, n in zip(calib, (ny, nx)))
    if ny * nx / max(cy * cx, 1) < acc - tol:
        raise ParameterError(f"a {cy}x{cx} calibration region alone samples more than 1/{acc:g} of a {ny}x{nx} "
                             f"grid; lower calib or the acceleration")
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    dx = np.maximum(np.abs(xx - nx / 2) - cx / 2, 0)
    dy = np.maximum(np.abs(yy - ny / 2) - cy / 2, 0)
    dx /= max(dx.max(), 1e-12)
    dy /= max(dy.max(), 1e-12)
    r = np.sqrt(dx ** 2 + dy ** 2)
    calib_mask = np.zeros((ny, nx), dtype=bool)
    calib_mask[int(ny / 2 - cy / 2):int(ny / 2 + cy / 2), int(nx / 2 - cx / 2):int(nx / 2 + cx / 2)] = True
    order = np.random.default_rng(seed).permutation(ny * nx)
    keep = (r < 1) if crop_corner else np.ones_like(calib_mask)

    def make(slope: float) -> np.ndarray:
        base = 1.0 + r * slope
        rx = np.clip(base * nx / max(nx, ny), 1.0, None)
        ry = np.clip(base * ny / max(nx, ny), 1.0, None)
        return _dart_throw(order, calib_mask, ry, rx) & (keep | calib_mask)

    def accel(m: np.ndarray) -> float:
        return ny * nx / max(int(m.sum()), 1)

    lo, hi = 0.0, float(max(nx, ny))
    best, best_err = None, np.inf
    m_hi = make(hi)
    if accel(m_hi) < acc - tol:
        raise ParameterError(f"acceleration {acc:g} cannot be reached on a {ny}x{nx} grid with a {cy}x{cx} "
                             f"calibration region; lower it")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        m = make(mid)
        a = accel(m)
        err = abs(a - acc)
        if err < best_err:
            best, best_err = m, err
        if err <= tol:
            break
        if a < acc:
            lo = mid
        else:
            hi = mid
    return best, accel(best)


def _dart_throw(order: np.ndarray, calib: np.ndarray, ry: np.ndarray, rx: np.ndarray) -> np.ndarray:
    ny, nx = calib.shape
    mask = calib.copy()
    blocked = calib.copy()
    flat_blocked = blocked.reshape(-1)
    footprints: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
    ryf, rxf = ry.reshape(-1), rx.reshape(-1)
    for idx in order:
        if flat_blocked[idx]:
            continue
        y, x = divmod(int(idx), nx)
        mask[y, x] = True
        a, b = float(ryf[idx]), float(rxf[idx])
        key = (round(a, 3), round(b, 3))
        fp = footprints.get(key)
        if fp is None:
            hy, hx = int(np.ceil(a)), int(np.ceil(b))
            oy, ox = np.mgrid[-hy:hy + 1, -hx:hx + 1]
            inside = (oy / a) ** 2 + (ox / b) ** 2 < 1.0
            fp = (oy[inside], ox[inside])
            footprints[key] = fp
        py, px = fp[0] + y, fp[1] + x
        ok = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        blocked[py[ok], px[ok]] = True
    return mask
