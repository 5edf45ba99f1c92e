"""The simulated multi-coil object: a 3D Shepp-Logan-like phantom seen by loop coils.

The object is a 3D Shepp-Logan-like ellipsoid phantom (piecewise constant magnitude with a
smooth low-order phase). Coil sensitivities are the receive fields ``B_x - i B_y`` of circular
loop coils on a cylinder around the object, computed with the Biot-Savart law (loops cut in
segments), so they are smooth, complex and realistically overlapping. Noise is complex
Gaussian, white in k-space. :mod:`.simulate` writes files in the fastMRI and skm-tea layouts
from it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .transforms import fft2c_np

__all__ = ["shepp_logan_3d", "loop_coil_sensitivities", "simulate_multicoil"]

# intensity, semi-axes (a, b, c), centre (x0, y0, z0), rotation about z (deg)
_ELLIPSOIDS = (
    (1.00, (0.690, 0.920, 0.810), (0.00, 0.000, 0.00), 0.0),
    (-0.80, (0.6624, 0.874, 0.780), (0.00, -0.0184, 0.00), 0.0),
    (-0.20, (0.110, 0.310, 0.220), (0.22, 0.000, 0.00), -18.0),
    (-0.20, (0.160, 0.410, 0.280), (-0.22, 0.000, 0.00), 18.0),
    (0.20, (0.210, 0.250, 0.410), (0.00, 0.350, -0.15), 0.0),
    (0.15, (0.046, 0.046, 0.050), (0.00, 0.100, 0.25), 0.0),
    (0.15, (0.046, 0.046, 0.050), (0.00, -0.100, 0.25), 0.0),
    (0.15, (0.046, 0.023, 0.050), (-0.08, -0.605, 0.00), 0.0),
    (0.15, (0.023, 0.023, 0.020), (0.00, -0.606, 0.00), 0.0),
    (0.15, (0.023, 0.046, 0.020), (0.06, -0.605, 0.00), 0.0),
)


def shepp_logan_3d(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """3D Shepp-Logan magnitude at normalised coordinates (the head fills [-1, 1]^3), float32."""
    out = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
    for amp, (a, b, c), (x0, y0, z0), phi in _ELLIPSOIDS:
        t = np.deg2rad(phi)
        xr = (x - x0) * np.cos(t) + (y - y0) * np.sin(t)
        yr = -(x - x0) * np.sin(t) + (y - y0) * np.cos(t)
        inside = (xr / a) ** 2 + (yr / b) ** 2 + ((z - z0) / c) ** 2 <= 1.0
        out[inside] += amp
    return out


def loop_coil_sensitivities(points: np.ndarray, n_coils: int, coil_radius: float = 1.35,
                            loop_radius: float = 0.55, n_rings: int | None = None,
                            ring_spacing: float = 0.9, n_segments: int = 24) -> np.ndarray:
    """Receive sensitivities ``B_x - i B_y`` of loop coils on a cylinder (Biot-Savart).

    Parameters
    ----------
    points : ndarray, (N, 3)
        Positions (normalised units; the object fills [-1, 1]).
    n_coils : int
        Number of loops, spread over ``n_rings`` rings along z (default 1 ring up to 8 coils,
        else ``ceil(n / 8)`` rings) and evenly in angle (rings rotated against each other).
    coil_radius, loop_radius, ring_spacing : float
        Cylinder radius, loop radius and distance between rings (normalised units).
    n_segments : int
        Straight segments per loop.

    Returns
    -------
    ndarray, complex64, (n_coils, N)
    """
    pts = np.asarray(points, dtype=np.float64)
    rings = n_rings or int(np.ceil(n_coils / 8))
    per_ring = [n_coils // rings + (1 if r < n_coils % rings else 0) for r in range(rings)]
    tt = np.linspace(0, 2 * np.pi, n_segments, endpoint=False)
    out = np.empty((n_coils, pts.shape[0]), dtype=np.complex64)
    j = 0
    for r, nr in enumerate(per_ring):
        zc = (r - (rings - 1) / 2) * ring_spacing
        for i in range(nr):
            th = 2 * np.pi * i / nr + np.pi * r / max(nr, 1)
            nrm = np.array([np.cos(th), np.sin(th), 0.0])
            e1 = np.array([-np.sin(th), np.cos(th), 0.0])
            e2 = np.array([0.0, 0.0, 1.0])
            centre = coil_radius * nrm + np.array([0.0, 0.0, zc])
            loop = centre + loop_radius * (np.cos(tt)[:, None] * e1 + np.sin(tt)[:, None] * e2)
            dl = np.roll(loop, -1, axis=0) - loop
            mid = loop + 0.5 * dl
            bx = np.empty(pts.shape[0])
            by = np.empty(pts.shape[0])
            for chunk in range(0, pts.shape[0], 32768):
                p = pts[chunk:chunk + 32768]
                rx = p[:, 0:1] - mid[None, :, 0]  # (n, seg)
                ry = p[:, 1:2] - mid[None, :, 1]
                rz = p[:, 2:3] - mid[None, :, 2]
                inv = np.maximum(np.sqrt(rx * rx + ry * ry + rz * rz), 0.05) ** -3
                # (dl x R)_x and _y, summed over the segments (Biot-Savart)
                bx[chunk:chunk + 32768] = ((dl[:, 1] * rz - dl[:, 2] * ry) * inv).sum(1)
                by[chunk:chunk + 32768] = ((dl[:, 2] * rx - dl[:, 0] * rz) * inv).sum(1)
            out[j] = (bx - 1j * by).astype(np.complex64)
            j += 1
    return out


def _smooth_sensitivities(u: np.ndarray, v: np.ndarray, zz: np.ndarray, n_coils: int, coarse: int = 40) -> np.ndarray:
    """Loop-coil sensitivities on the (u, v) grid of each slice, ``(S, C, H, W)`` complex64.

    The Biot-Savart sum is evaluated on a grid of at most ``coarse`` points per axis and
    interpolated (cubic) to the full grid: the fields are smooth over the object.
    """
    from scipy.ndimage import map_coordinates

    H, W = len(u), len(v)
    h, w = min(H, coarse), min(W, coarse)
    uc = np.linspace(u[0], u[-1], h)
    vc = np.linspace(v[0], v[-1], w)
    Xc, Yc, Zc = np.meshgrid(uc, vc, zz, indexing="ij")
    pts = np.stack([Xc.ravel(), Yc.ravel(), Zc.ravel()], axis=-1)
    coarse_s = loop_coil_sensitivities(pts, n_coils).reshape(n_coils, h, w, len(zz))
    if (h, w) == (H, W):
        return np.ascontiguousarray(np.transpose(coarse_s, (3, 0, 1, 2)))
    gi = (np.arange(H) * (h - 1) / max(H - 1, 1))[:, None] * np.ones((1, W))
    gj = np.ones((H, 1)) * (np.arange(W) * (w - 1) / max(W - 1, 1))[None, :]
    out = np.empty((len(zz), n_coils, H, W), dtype=np.complex64)
    for s_ in range(len(zz)):
        for c in range(n_coils):
            re = map_coordinates(coarse_s[c, :, :, s_].real, [gi, gj], order=3, mode="nearest")
            im = map_coordinates(coarse_s[c, :, :, s_].imag, [gi, gj], order=3, mode="nearest")
            out[s_, c] = re + 1j * im
    return out


def _phase(x, y, z, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 17)
    c = rng.uniform(-1, 1, size=6)
    return (0.6 * c[0] * x + 0.6 * c[1] * y + 0.3 * c[2] * z + 0.4 * c[3] * x * y
            + 0.4 * c[4] * (x ** 2 - y ** 2) + 0.2 * c[5]).astype(np.float32)


def simulate_multicoil(shape: Sequence[int], n_coils: int = 8, extent: Sequence[float] = (1.0, 1.0, 1.0),
                       z_positions: Sequence[float] | None = None, noise: float = 0.0, seed: int = 0,
                       contrast: float = 0.0) -> dict[str, np.ndarray]:
    """Multi-coil 2D slices of the phantom with ground truth.

    Parameters
    ----------
    shape : (S, H, W)
        Slices and in-plane grid of the image (and k-space).
    n_coils : int
        Number of receive coils.
    extent : (eh, ew, es)
        Half-width of the grid in normalised object units along H and W (1 = the object just
        fits; 2 = 2x oversampled), and through-plane half-range of the slices (``es``) when
        ``z_positions`` is not given.
    z_positions : list of float or None
        Normalised through-plane positions of the slices (default evenly in ``[-es/2, es/2]``).
    noise : float
        Complex noise std in k-space relative to the maximum coil image magnitude.
    seed : int
        Seed for phase and noise.
    contrast : float
        Exponent changing the relative tissue intensities (used for a second echo).

    Returns
    -------
    dict
        ``image`` (S, H, W) complex64 object, ``sens`` (S, C, H, W) complex64 with
        ``sum_c |sens|^2 = 1`` where the coils see anything (normalised), ``coil_images``,
        ``kspace`` (S, C, H, W) complex64 (noisy), ``support`` (S, H, W) bool.
    """
    S, H, W = (int(v) for v in shape)
    eh, ew, es = (float(v) for v in extent)
    if z_positions is None:
        z_positions = np.linspace(-es / 2, es / 2, S) if S > 1 else [0.0]
    zz = np.asarray(z_positions, dtype=np.float64)
    u = (np.arange(H) - H // 2) / (H / 2) * eh
    v = (np.arange(W) - W // 2) / (W / 2) * ew
    X, Y, Z = np.meshgrid(u, v, zz, indexing="ij")  # (H, W, S)
    X, Y, Z = (np.moveaxis(a, -1, 0) for a in (X, Y, Z))  # (S, H, W)
    mag = shepp_logan_3d(X, Y, Z)
    if contrast:
        mag = (np.maximum(mag, 0) ** (1.0 + contrast)).astype(np.float32)
    support = mag > 0
    img = (mag * np.exp(1j * _phase(X, Y, Z, seed))).astype(np.complex64)
    sens = _smooth_sensitivities(u, v, zz, n_coils)
    norm = np.sqrt(np.sum(np.abs(sens) ** 2, axis=1, keepdims=True))
    sens = (sens / np.maximum(norm, 1e-12)).astype(np.complex64)
    # keep realistic relative coil intensities (not normalised) for the data
    raw = sens * norm / norm[support[:, None]].max() if support.any() else sens
    coil_images = (raw * img[:, None]).astype(np.complex64)
    k = fft2c_np(coil_images)
    if noise > 0:
        rng = np.random.default_rng(seed)
        sd = noise * float(np.abs(coil_images).max())
        k = k + (sd / np.sqrt(2)) * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    return {"image": img, "sens": sens, "sens_raw": raw.astype(np.complex64), "coil_images": coil_images,
            "kspace": k.astype(np.complex64), "support": support}
