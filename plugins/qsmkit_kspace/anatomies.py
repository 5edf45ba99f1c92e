"""Random anatomies seen by random coil arrays: varied 2D multi-coil training slices.

A learned reconstruction trained on one phantom memorises it. This generator draws every slice
afresh from a family wide enough that a network must learn to undo the undersampling, not the
object:

- **anatomy** (:func:`random_anatomy`): a body outline (rotated super-ellipse with a wobbly,
  Fourier-perturbed boundary, random size and position in the field of view), an optional
  bright shell (skin / fat / skull), and 3-24 inner structures of five kinds (ellipses, blobs
  with perturbed boundaries, polygons, rings, thin curved vessels) with random intensities that
  either replace or add to what is below; edges are anti-aliased over about a pixel. Then a
  multi-scale band-limited texture, a random contrast curve (gamma), a smooth multiplicative
  bias field, and a smooth complex phase (low-order polynomial plus a band-limited field).
- **coils** (:func:`random_coil_sensitivities`): 2-32 circular loops around the object with
  random cylinder radius, loop radius, angular positions (jittered), one or two rings and a
  random slice position along the ring axis; their receive fields ``B_x - i B_y`` come from the
  Biot-Savart sum of :func:`.multicoil.loop_coil_sensitivities` (evaluated on a coarse grid and
  interpolated), with a random receiver phase per coil. Maps are normalised to
  ``sum_c |S_c|^2 = 1``; the data keep the coils' relative intensities.
- **noise**: complex Gaussian, white in k-space, std log-uniform in a range relative to the
  largest coil-image magnitude, optionally correlated between coils.

The reference is fastMRI's: the RSS of the fully sampled noisy coil images
(``reconstruction_rss``), centre-cropped when the readout is oversampled. All transforms are the
centred orthonormal FFTs of :mod:`qsmkit.fft` (through :mod:`.transforms`).

:func:`write_anatomy_files` writes such slices in the fastMRI training layout (what ``qsmkit
simulate-kspace --anatomies N`` does), so they can be read by ``kspace_read/fastmri`` and by
``qsmkit train unet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import ParameterError

from .multicoil import loop_coil_sensitivities
from .transforms import fft2c_np, ifft2c_np

__all__ = ["random_anatomy", "random_coil_sensitivities", "random_multicoil_slice", "random_multicoil_batch",
           "write_anatomy_files"]

_COARSE = 28  # Biot-Savart grid per axis before interpolation (the fields are smooth)


# ------------------------------------------------------------------------------------ helpers
def _range(value: Any, name: str, integer: bool = False) -> tuple[float, float]:
    """A scalar or a ``(low, high)`` pair as a checked ``(low, high)`` tuple."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        lo = hi = value
    else:
        try:
            lo, hi = value
        except (TypeError, ValueError):
            raise ParameterError(f"{name} = {value!r}: give a number or a [low, high] pair") from None
    if integer and (int(lo) != lo or int(hi) != hi):
        raise ParameterError(f"{name} = {value!r}: give whole numbers")
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ParameterError(f"{name} = {value!r}: low must not exceed high")
    return (int(lo), int(hi)) if integer else (float(lo), float(hi))


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row / column coordinates with isotropic pixels, the longer axis spanning [-1, 1)."""
    H, W = int(shape[0]), int(shape[1])
    half = max(H, W) / 2.0
    y = ((np.arange(H) - H // 2) / half).astype(np.float32)[:, None]
    x = ((np.arange(W) - W // 2) / half).astype(np.float32)[None, :]
    return y, x


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], corr: float) -> np.ndarray:
    """Band-limited Gaussian random field (zero mean, unit std over the grid) with correlation length ``corr``
    (fraction of the field of view), made by low-pass filtering white noise in k-space."""
    H, W = int(shape[0]), int(shape[1])
    ky = (np.arange(H) - H // 2)[:, None] / H
    kx = (np.arange(W) - W // 2)[None, :] / W
    sigma_px = corr * max(H, W)
    filt = np.exp(-0.5 * (ky ** 2 + kx ** 2) * (2 * np.pi * sigma_px) ** 2).astype(np.float32)
    white = rng.standard_normal((2, H, W), dtype=np.float32)
    white = white[0] + 1j * white[1]
    f = ifft2c_np(white * filt).real
    f = f - f.mean()
    sd = float(f.std())
    return (f / sd).astype(np.float32) if sd > 0 else np.zeros((H, W), np.float32)


def _soft_inside(level: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased indicator of ``level < 1`` with an edge ``width`` (in units of ``level``)."""
    return (0.5 * (1.0 - np.tanh((level - 1.0) / max(width, 1e-6)))).astype(np.float32)


def _rotated(y: np.ndarray, x: np.ndarray, cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return (x - cx) * s + (y - cy) * c, (x - cx) * c - (y - cy) * s


def _perturbed_level(rng, y, x, cy, cx, a, b, theta, power, wobble) -> np.ndarray:
    """Level function of a rotated super-ellipse (semi-axes a, b, exponent ``power``) whose
    boundary radius is modulated by a random Fourier series of amplitude ``wobble``."""
    v, u = _rotated(y, x, cy, cx, theta)
    lvl = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1.0 / power)
    if wobble > 0:
        phi = np.arctan2(v / b, u / a)
        mod = np.ones_like(phi)
        for k in range(2, 7):
            amp = wobble / k * rng.standard_normal(2)
            mod = mod + amp[0] * np.cos(k * phi) + amp[1] * np.sin(k * phi)
        lvl = lvl / np.maximum(mod, 0.3)
    return lvl


# ------------------------------------------------------------------------------------ anatomy
def _box(y: np.ndarray, x: np.ndarray, cy: float, cx: float, radius: float) -> tuple[slice, slice]:
    """Index box of the grid covering the disc ``(cy, cx), radius`` (structures are drawn only there)."""
    yy, xx = y[:, 0], x[0]
    r0, r1 = np.searchsorted(yy, cy - radius), np.searchsorted(yy, cy + radius, side="right")
    c0, c1 = np.searchsorted(xx, cx - radius), np.searchsorted(xx, cx + radius, side="right")
    return slice(int(r0), int(max(r1, r0))), slice(int(c0), int(max(c1, c0)))


def _structure(rng, y, x, body_c, body_ab, px: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Soft indicator of one random inner structure (ellipse, blob, polygon, ring or vessel) and the
    index box of the grid it covers."""
    kind = rng.choice(5, p=[0.3, 0.25, 0.15, 0.1, 0.2])
    size = float(np.exp(rng.uniform(np.log(0.03), np.log(0.35)))) * min(body_ab)
    r = np.sqrt(rng.uniform(0, 1)) * 0.8
    ang = rng.uniform(0, 2 * np.pi)
    cy = body_c[0] + r * body_ab[0] * np.sin(ang)
    cx = body_c[1] + r * body_ab[1] * np.cos(ang)
    theta = rng.uniform(0, np.pi)
    if kind in (0, 1, 3):
        aspect = rng.uniform(0.4, 1.0)
        a, b = size, size * aspect
        power = 2.0 if kind != 1 else rng.uniform(1.5, 3.5)
        box = _box(y, x, cy, cx, 2.2 * a + 4 * px)  # covers the wobble (radius <= a / 0.3 never reached)
        ys, xs = y[box[0]], x[:, box[1]]
        lvl = _perturbed_level(rng, ys, xs, cy, cx, a, b, theta, power, 0.25 if kind == 1 else 0.0)
        ind = _soft_inside(lvl, px / b)
        if kind == 3:  # ring: remove a concentric core
            t = rng.uniform(0.3, 0.8)
            ind = ind * (1.0 - _soft_inside(lvl / t, px / (b * t)))
        return ind, box
    if kind == 2:  # regular polygon with 3-8 sides
        n = int(rng.integers(3, 9))
        box = _box(y, x, cy, cx, size / np.cos(np.pi / n) + 4 * px)
        v, u = _rotated(y[box[0]], x[:, box[1]], cy, cx, theta)
        phi = np.arctan2(v, u)
        sector = 2 * np.pi / n
        rad = np.sqrt(u * u + v * v) * np.cos((np.mod(phi, sector)) - sector / 2) / np.cos(sector / 2)
        return _soft_inside(rad / size, px / size), box
    # vessel: a thin quadratic Bezier curve
    p0 = np.array([cy, cx])
    d = rng.standard_normal((2, 2)) * size * 2.5
    t = np.linspace(0.0, 1.0, 48, dtype=np.float32)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * (p0 + d[0]) + t ** 2 * (p0 + d[1])  # (48, 2)
    width = float(np.exp(rng.uniform(np.log(1.0), np.log(5.0)))) * px
    lo, hi = pts.min(0) - width - 4 * px, pts.max(0) + width + 4 * px
    box = _box(y, x, 0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), 0.5 * float(max(hi - lo)))
    ys, xs = y[box[0]], x[:, box[1]]
    dist2 = np.full((ys.shape[0], xs.shape[1]), np.inf, dtype=np.float32)
    for py, pxx in pts:
        dist2 = np.minimum(dist2, (ys - py) ** 2 + (xs - pxx) ** 2)
    return _soft_inside(np.sqrt(dist2) / width, px / width), box


def random_anatomy(rng: np.random.Generator, shape: Sequence[int] = (320, 320),
                   fill: tuple[float, float] = (0.45, 0.92)) -> tuple[np.ndarray, np.ndarray]:
    """One random complex anatomy.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random choice (the same state gives the same anatomy).
    shape : (H, W)
        Image grid (pixels are isotropic; the longer side spans the normalised range [-1, 1)).
    fill : (low, high)
        Range of the body's semi-axes as a fraction of the half field of view.

    Returns
    -------
    image : ndarray, complex64, (H, W)
        Magnitude in [0, 1] (maximum 1), smooth phase in rad.
    support : ndarray, bool, (H, W)
        Where the body is (magnitude of its outline > 0.5).
    """
    H, W = int(shape[0]), int(shape[1])
    if H < 8 or W < 8:
        raise ParameterError(f"anatomy shape {tuple(shape)} is too small; give at least 8 x 8 pixels")
    y, x = _grid((H, W))
    px = 2.0 / max(H, W)
    ymax, xmax = H / max(H, W), W / max(H, W)
    a = rng.uniform(*fill) * ymax
    b = rng.uniform(*fill) * xmax
    cy = rng.uniform(-0.08, 0.08) * ymax
    cx = rng.uniform(-0.08, 0.08) * xmax
    theta = rng.uniform(-0.5, 0.5) if rng.uniform() < 0.7 else rng.uniform(0, np.pi)
    lvl = _perturbed_level(rng, y, x, cy, cx, a, b, theta, rng.uniform(1.7, 3.0), rng.uniform(0.0, 0.12))
    body = _soft_inside(lvl, px / min(a, b))
    mag = body * rng.uniform(0.15, 0.7)
    if rng.uniform() < 0.7:  # shell: skin / fat / skull
        t = rng.uniform(0.03, 0.12)
        shell = body * (1.0 - _soft_inside(lvl / (1.0 - t), px / min(a, b)))
        mag = mag * (1.0 - shell) + shell * rng.uniform(0.2, 1.3)
    for _ in range(int(rng.integers(3, 25))):  # structures stay inside the body
        ind, box = _structure(rng, y, x, (cy, cx), (a, b), px)
        if ind.size == 0:
            continue
        ind = ind * body[box]
        val = rng.uniform(0.0, 1.3)
        if rng.uniform() < 0.65:
            mag[box] = mag[box] * (1.0 - ind) + ind * val
        else:
            mag[box] = mag[box] + ind * rng.uniform(-0.4, 0.4)
    mag = np.clip(mag, 0.0, None)
    for _ in range(int(rng.integers(1, 3))):  # texture at one or two scales
        tex = _smooth_field(rng, (H, W), float(np.exp(rng.uniform(np.log(0.004), np.log(0.05)))))
        mag = mag * np.clip(1.0 + rng.uniform(0.0, 0.25) * tex, 0.2, None)
    peak = float(mag.max())
    mag = (mag / peak) if peak > 0 else mag
    mag = mag ** rng.uniform(0.6, 1.6)  # contrast curve
    bias = np.exp(rng.uniform(0.0, 0.35) * _smooth_field(rng, (H, W), rng.uniform(0.2, 0.5)))
    mag = mag * bias
    mag = (mag / max(float(mag.max()), 1e-12)).astype(np.float32)
    c = rng.uniform(-1.0, 1.0, size=6) * np.array([2.0, 2.0, 1.0, 1.0, 1.0, np.pi])
    phase = c[0] * y + c[1] * x + c[2] * x * y + c[3] * (x * x - y * y) + c[4] * (x * x + y * y) + c[5]
    phase = phase + rng.uniform(0.0, 1.5) * _smooth_field(rng, (H, W), rng.uniform(0.08, 0.3))
    image = (mag * np.exp(1j * phase)).astype(np.complex64)
    return image, body > 0.5


# ------------------------------------------------------------------------------------ coils
def random_coil_sensitivities(rng: np.random.Generator, shape: Sequence[int], n_coils: int,
                              object_extent: Sequence[float] | None = None) -> np.ndarray:
    """Receive sensitivities of a random loop-coil array, ``(n_coils, H, W)`` complex64 (not normalised).

    Loops lie on a cylinder around the object (axis along the slice normal). The cylinder radius
    (1.05-1.6, in units of the half field of view of the longer axis), loop radius (0.25-0.7),
    the angular start and per-coil jitter, one or two rings (two only for 8+ coils) and the
    slice's position along the axis (-0.5 to 0.5) are drawn at random; each loop's
    ``B_x - i B_y`` is :func:`.multicoil.loop_coil_sensitivities` of one loop evaluated at the
    points rotated into that loop's frame (times ``exp(-i angle)`` to rotate the field back),
    on a coarse grid interpolated with cubic splines, times a random receiver phase.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : (H, W)
        Image grid (same normalised coordinates as :func:`random_anatomy`).
    n_coils : int
        Number of loops (>= 1).
    object_extent : (ey, ex), optional
        Half-extent of the object in normalised units (the cylinder encloses it); default the
        half field of view.
    """
    from scipy.interpolate import CubicSpline

    n_coils = int(n_coils)
    if n_coils < 1:
        raise ParameterError(f"n_coils = {n_coils}: give at least one coil")
    H, W = int(shape[0]), int(shape[1])
    ey, ex = object_extent if object_extent is not None else (H / max(H, W), W / max(H, W))
    h, w = min(H, _COARSE), min(W, _COARSE)
    half = max(H, W) / 2.0
    yc = np.linspace(-(H // 2) / half, (H - 1 - H // 2) / half, h)
    xc = np.linspace(-(W // 2) / half, (W - 1 - W // 2) / half, w)
    Yc, Xc = np.meshgrid(yc, xc, indexing="ij")
    rings = 2 if n_coils >= 8 and rng.uniform() < 0.4 else 1
    radius = max(float(ey), float(ex)) * rng.uniform(1.05, 1.6)
    loop_r = rng.uniform(0.25, 0.7)
    z_slice = rng.uniform(-0.5, 0.5)
    spacing = rng.uniform(0.6, 1.1)
    squash = rng.uniform(0.85, 1.0)  # elliptical former
    start = rng.uniform(0, 2 * np.pi)
    per_ring = [n_coils // rings + (1 if r < n_coils % rings else 0) for r in range(rings)]
    coarse = np.empty((n_coils, h, w), dtype=np.complex64)
    j = 0
    for r, nr in enumerate(per_ring):
        zc = (r - (rings - 1) / 2) * spacing
        for i in range(nr):
            th = start + 2 * np.pi * i / nr + np.pi * r / nr + rng.normal(0.0, 0.25 * np.pi / nr)
            # points in the frame where this loop sits at angle 0 (x axis) and z = 0
            px = (Xc * np.cos(th) + Yc * np.sin(th)) / (squash if abs(np.cos(th)) > 0.5 else 1.0)
            py = -Xc * np.sin(th) + Yc * np.cos(th)
            pts = np.stack([px.ravel(), py.ravel(), np.full(px.size, z_slice - zc)], axis=-1)
            b = loop_coil_sensitivities(pts, 1, coil_radius=radius, loop_radius=loop_r, n_rings=1)[0]
            coarse[j] = (b * np.exp(-1j * th + 1j * rng.uniform(0, 2 * np.pi))).reshape(h, w)
            j += 1
    if (h, w) == (H, W):
        return coarse
    # cubic-spline interpolation is linear in the data: one (H, h) and one (W, w) matrix
    ay = CubicSpline(yc, np.eye(h), axis=0)(np.linspace(yc[0], yc[-1], H)).astype(np.complex64)
    ax = CubicSpline(xc, np.eye(w), axis=0)(np.linspace(xc[0], xc[-1], W)).astype(np.complex64)
    return np.einsum("Hh,chw,Ww->cHW", ay, coarse, ax, optimize=True).astype(np.complex64)


# ------------------------------------------------------------------------------------ slices
def random_multicoil_slice(rng: np.random.Generator, shape: Sequence[int] = (320, 320),
                           n_coils: int | Sequence[int] = (4, 16), noise: float | Sequence[float] = (0.002, 0.03),
                           noise_correlation: float | Sequence[float] = (0.0, 0.3),
                           readout_oversampling: int = 1) -> dict[str, np.ndarray]:
    """One random multi-coil slice with its ground truth.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random draw.
    shape : (H, W)
        Image (recon) grid; the reference image has this shape.
    n_coils : int or (low, high)
        Coil count, or the inclusive range it is drawn from (uniformly).
    noise : float or (low, high)
        k-space noise std relative to the largest coil-image magnitude, or a range drawn
        log-uniformly.
    noise_correlation : float or (low, high)
        Strength of the coil-to-coil noise mixing (0: independent coils).
    readout_oversampling : int
        The k-space grid is ``(readout_oversampling * H, W)`` (fastMRI data have 2): the object
        sits in the central ``H`` rows of a larger field of view.

    Returns
    -------
    dict
        ``kspace`` (C, fH, W) complex64 (noisy, fully sampled); ``maps`` (C, fH, W) complex64 with
        ``sum_c |maps_c|^2 = 1``; ``target`` (H, W) float32, the RSS of the fully sampled noisy
        coil images (fastMRI ``reconstruction_rss``), centre-cropped; ``image`` (H, W) complex64
        noise-free object; ``support`` (H, W) bool; ``noise`` (the drawn relative std, 0-d float).
    """
    H, W = int(shape[0]), int(shape[1])
    f = int(readout_oversampling)
    if f < 1:
        raise ParameterError(f"readout_oversampling = {readout_oversampling}: give 1 or more")
    clo, chi = _range(n_coils, "n_coils", integer=True)
    if clo < 1:
        raise ParameterError(f"n_coils = {n_coils!r}: give at least one coil")
    nlo, nhi = _range(noise, "noise")
    if nlo < 0:
        raise ParameterError(f"noise = {noise!r} must not be negative")
    rlo, rhi = _range(noise_correlation, "noise_correlation")
    C = int(rng.integers(clo, chi + 1))
    image, support = random_anatomy(rng, (H, W))
    if f > 1:
        full = np.zeros((f * H, W), np.complex64)
        r0 = (f * H - H) // 2
        full[r0:r0 + H] = image
    else:
        full, r0 = image, 0
    ext = (H / max(H, W), W / max(H, W))
    sens = random_coil_sensitivities(rng, full.shape, C, object_extent=ext)
    rss = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
    maps = (sens / np.maximum(rss, 1e-12)).astype(np.complex64)
    # the data keep the coils' relative intensities, scaled so that their RSS peaks at 1 on the object
    rel = sens / max(float(rss[r0:r0 + H][support].max()) if support.any() else float(rss.max()), 1e-12)
    coil_images = (rel * full[None]).astype(np.complex64)
    k = fft2c_np(coil_images)
    level = float(np.exp(rng.uniform(np.log(max(nlo, 1e-12)), np.log(max(nhi, 1e-12))))) if nhi > 0 else 0.0
    if level > 0:
        sd = level * float(np.abs(coil_images).max())
        n = rng.standard_normal((2,) + k.shape, dtype=np.float32)
        n = n[0] + 1j * n[1]
        rho = rng.uniform(rlo, rhi)
        if rho > 0 and C > 1:
            mix = np.eye(C) + rho * rng.standard_normal((C, C)) / np.sqrt(C)
            mix /= np.sqrt(np.mean(np.sum(np.abs(mix) ** 2, axis=1)))
            n = np.tensordot(mix.astype(np.complex64), n, axes=(1, 0))
        k = k + (sd / np.sqrt(2)) * n
    k = k.astype(np.complex64)
    target = np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=0))[r0:r0 + H].astype(np.float32)
    return {"kspace": k, "maps": maps, "target": target, "image": image, "support": support,
            "noise": np.float32(level)}


def random_multicoil_batch(rng: np.random.Generator, n: int, shape: Sequence[int] = (320, 320),
                           n_coils: int | Sequence[int] = (4, 16), **kwargs: Any) -> dict[str, np.ndarray]:
    """``n`` random slices stacked on a new first axis (one coil count, drawn once, for the batch).

    Takes the arguments of :func:`random_multicoil_slice`; returns its keys with a leading axis
    (``kspace`` and ``maps`` ``(n, C, fH, W)``, ``target`` ``(n, H, W)``, ``noise`` ``(n,)``).
    """
    if int(n) < 1:
        raise ParameterError(f"a batch needs at least one slice, got n = {n}")
    lo, hi = _range(n_coils, "n_coils", integer=True)
    C = int(rng.integers(lo, hi + 1))
    slices = [random_multicoil_slice(rng, shape, C, **kwargs) for _ in range(int(n))]
    return {key: np.stack([s[key] for s in slices]) for key in slices[0]}


# ------------------------------------------------------------------------------------ files
def write_anatomy_files(out_dir: str | Path, n_slices: int, slices_per_file: int = 8,
                        shape: Sequence[int] = (320, 320), n_coils: int | Sequence[int] = (4, 16),
                        noise: float | Sequence[float] = (0.002, 0.03), readout_oversampling: int = 1,
                        pixel_mm: float = 0.5, slice_mm: float = 3.0, seed: int = 0,
                        prefix: str = "anatomy", progress_bar: bool = True) -> list[Path]:
    """Write ``n_slices`` random slices as fastMRI multi-coil training files.

    Each file ``{prefix}_{i:05d}.h5`` holds up to ``slices_per_file`` independent anatomies seen
    by one random coil array size (``kspace`` (slices, coils, fH, W) complex64,
    ``reconstruction_rss`` (slices, H, W), ``ismrmrd_header`` with the encoded and recon matrices,
    attributes ``max``, ``norm``, ``acquisition``, ``patient_id``), as
    :func:`.simulate.simulate_kspace_files` writes the phantom. File ``i`` is drawn from the
    generator seeded with ``(seed, i)``, so any file can be regenerated on its own and sets with
    different seeds do not overlap.

    Returns
    -------
    list of Path
        The files written, in order.
    """
    from qsmkit.progress import progress

    from .simulate import _FastMRIVolume, _write_fastmri_train, ismrmrd_header_xml

    if int(n_slices) < 1 or int(slices_per_file) < 1:
        raise ParameterError("give at least one slice and at least one slice per file")
    H, W = int(shape[0]), int(shape[1])
    f = int(readout_oversampling)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_files = -(-int(n_slices) // int(slices_per_file))
    paths = []
    todo = range(n_files)
    for i in (progress(todo, "anatomies", total=n_files, unit="file") if progress_bar else todo):
        rng = np.random.default_rng([int(seed), i])
        count = min(int(slices_per_file), int(n_slices) - i * int(slices_per_file))
        batch = random_multicoil_batch(rng, count, (H, W), n_coils, noise=noise, readout_oversampling=f)
        header = ismrmrd_header_xml((f * H, W, 1), (H, W, 1), (f * H * pixel_mm, W * pixel_mm, slice_mm),
                                    (H * pixel_mm, W * pixel_mm, slice_mm), W // 2, W - 1)
        r0 = (f * H - H) // 2
        vol = _FastMRIVolume(batch["kspace"], batch["maps"], header, (slice(r0, r0 + H), slice(0, W)), (0, 0))
        paths.append(_write_fastmri_train(out / f"{prefix}_{i:05d}.h5", vol))
    return paths
