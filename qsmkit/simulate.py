"""Numerical head phantom with ground truth for multi-echo GRE QSM.

The head is defined by implicit shape functions (ellipsoids, a folded cortex from a smooth random
field, tubes for veins) in a *head frame* whose size is a fixed fraction of the field of view, so
any grid works: 64^3 at 1 mm gives a small head, ~180 x 216 x 180 at 1 mm a life-size one.

Forward model
-------------
* Susceptibility ``chi`` (ppm, SI) relative to CSF; air is +9.4 ppm relative to tissue. The
  field is computed for ``chi - chi_air`` (the head is an object in air, and zero padding is air).
* The labels are evaluated on a grid ``oversample`` times finer than the output, the field is
  computed there by FFT with the unit dipole kernel of :mod:`qsmkit.physics` (B0 in the voxel
  frame, zero padding ``padding``), and the *complex* multi-echo signal
  ``M0 * exp(-TE/T2*) * exp(i*(phi0 + 2*pi*GAMMA_BAR*B0*1e-6*field*TE))`` is block-averaged to the
  output grid. Reconstructions therefore do not share the simulator's discrete kernel, and
  intravoxel dephasing near air/tissue interfaces is modelled.
* Truth: ``total_field`` is the block mean of the fine total field ``D * (chi - CHI_AIR)`` over
  the head; ``local_field`` is the block mean of the field of the chi *inside the brain mask
  only* (the true local field), so that ``background = total_field - local_field`` is the field
  of everything outside the mask plus the uniform ``-CHI_AIR`` of the mask region (harmonic
  inside the mask); ``chi`` is the block mean of the fine chi inside
  the brain, zero outside the (output) mask; ``labels`` and ``mask`` are the analytic labels at
  the output voxel centres. ``mask`` is the brain with its ventricles, sulci and the inner half of
  the subarachnoid CSF; its border lies in CSF about 1 mm inside the skull.
* Complex Gaussian noise of standard deviation ``sigma`` per real/imaginary channel with
  ``sigma = mean(|S(TE1)| in mask) / snr``.

Default grid: (112, 128, 96) at 1.5 mm (168 x 192 x 144 mm FOV, 5 echoes 4-20 ms, 3 T, SNR 100),
about 4-5 s of CPU. A life-size 180 x 216 x 180 grid at 1 mm with ``oversample=2`` peaks at
about 3.4 GB RSS (echoes are processed slab by slab, float32/complex64).

Head rotation (for COSMOS) rotates the head (chi, M0, T2*, labels, phi0) in the scanner frame
about the world centre of the field of view, with B0 fixed: the head-frame coordinate of a world
point ``p`` is ``R.T @ (p - c)``; shapes are evaluated analytically at those coordinates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import fft as _fft
from .errors import ParameterError
from .operators import Dipole
from .physics import GAMMA_BAR, b0_direction_from_affine, voxel_sizes
from .volume import Volume

__all__ = ["LABELS", "TISSUES", "BRAIN_LABELS", "CHI_AIR", "Phantom", "simulate_phantom",
           "simulate_orientations", "rotation_matrix", "DEFAULT_SHAPE", "DEFAULT_VOXEL_SIZE",
           "DEFAULT_ECHO_TIMES"]

#: label value -> tissue name
LABELS: dict[int, str] = {
    0: "background",        # air outside the head
    1: "csf",
    2: "grey_matter",
    3: "white_matter",
    4: "globus_pallidus",
    5: "putamen",
    6: "caudate",
    7: "red_nucleus",
    8: "substantia_nigra",
    9: "vein",
    10: "calcification",
    11: "haemorrhage",
    12: "scalp",            # skin, fat, muscle and the soft tissue of the face / skull base
    13: "air_sinus",
    14: "skull",
    15: "thalamus",
}
_ID = {v: k for k, v in LABELS.items()}

#: labels of the intracranial cavity; the brain mask holds all but the outer half of the
#: subarachnoid CSF (the border of the mask lies in CSF, ~1 mm from the skull)
BRAIN_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15)

#: susceptibility of air relative to CSF / water-like tissue, ppm (SI)
CHI_AIR = 9.4

#: tissue -> (chi in ppm relative to CSF, proton density M0 (a.u.), T2* in ms at 3 T)
TISSUES: dict[str, tuple[float, float, float]] = {
    "background": (CHI_AIR, 0.0, 1.0),
    "csf": (0.0, 0.50, 300.0),
    "grey_matter": (0.02, 0.68, 52.0),
    "white_matter": (-0.03, 0.80, 42.0),
    "globus_pallidus": (0.19, 0.66, 18.0),
    "putamen": (0.09, 0.68, 30.0),
    "caudate": (0.07, 0.68, 36.0),
    "red_nucleus": (0.13, 0.70, 22.0),
    "substantia_nigra": (0.15, 0.66, 20.0),
    "vein": (0.40, 0.60, 10.0),
    "calcification": (-0.20, 0.25, 8.0),
    "haemorrhage": (0.50, 0.45, 7.0),
    "scalp": (0.0, 0.90, 30.0),
    "air_sinus": (CHI_AIR, 0.0, 1.0),
    "skull": (-2.0, 0.03, 1.5),
    "thalamus": (0.01, 0.74, 40.0),
}

DEFAULT_SHAPE = (112, 128, 96)
DEFAULT_VOXEL_SIZE = (1.5, 1.5, 1.5)
DEFAULT_ECHO_TIMES = (0.004, 0.008, 0.012, 0.016, 0.020)


# ============================================================================ geometry
def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about the world x, y, z axes.

    The head is first rotated about x, then about y, then about z (extrinsic, scanner frame).
    """
    ax, ay, az = (math.radians(float(a)) for a in rotation_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# Structures in normalised head coordinates u (head surface = unit sphere; x left-right,
# y posterior->anterior, z inferior->superior). Ellipsoids: (label, centre, semi-axes).
_BRAIN_C = np.array([0.0, 0.0, 0.12])
_BRAIN_S = np.array([0.80, 0.82, 0.70])
_CSF_GAP = 0.035          # subarachnoid CSF between brain and skull (u units)
_MASK_MARGIN = 0.5 * _CSF_GAP   # brain mask: brain + the inner half of the subarachnoid CSF
_MASK_BIT = np.uint8(128)       # internal: label | 128 marks points inside the brain mask
_BONE = 0.06              # skull thickness (u units)
_SINUSES = [((0.0, 0.885, -0.15), (0.13, 0.05, 0.085)),      # frontal sinus
            ((0.0, 0.25, -0.72), (0.11, 0.09, 0.07)),        # sphenoid sinus
            ((0.66, -0.18, -0.42), (0.08, 0.09, 0.09)),      # mastoid air cells
            ((-0.66, -0.18, -0.42), (0.08, 0.09, 0.09))]
# neck: elliptic cylinder of soft tissue below the head, to the edge of the field of view
_NECK_TOP, _NECK_C, _NECK_S = -0.45, (0.0, -0.12), (0.42, 0.45)


def _pair(label, c, s):
    x, y, z = c
    return [(label, (x, y, z), s), (label, (-x, y, z), s)]


_DEEP = (
    _pair(_ID["thalamus"], (0.095, -0.13, 0.10), (0.075, 0.15, 0.09))
    + _pair(_ID["caudate"], (0.150, 0.24, 0.20), (0.065, 0.11, 0.10))        # head
    + _pair(_ID["caudate"], (0.130, 0.05, 0.28), (0.040, 0.14, 0.045))       # body
    + _pair(_ID["putamen"], (0.30, 0.07, 0.08), (0.07, 0.17, 0.13))
    + _pair(_ID["globus_pallidus"], (0.225, 0.03, 0.06), (0.045, 0.10, 0.085))
    + _pair(_ID["red_nucleus"], (0.065, -0.13, -0.13), (0.042, 0.042, 0.042))
    + _pair(_ID["substantia_nigra"], (0.11, -0.08, -0.18), (0.04, 0.10, 0.03))
    # ventricles (CSF) after the nuclei: they win where they touch
    + _pair(_ID["csf"], (0.085, -0.02, 0.25), (0.05, 0.30, 0.065))
    + _pair(_ID["csf"], (0.075, 0.24, 0.22), (0.04, 0.10, 0.075))
    + _pair(_ID["csf"], (0.13, -0.30, 0.17), (0.05, 0.10, 0.07))
    + [(_ID["csf"], (0.0, -0.04, 0.06), (0.012, 0.12, 0.08))]
    + [(_ID["haemorrhage"], (0.40, -0.30, 0.32), (0.06, 0.07, 0.05))]
    + [(_ID["calcification"], (-0.22, -0.42, 0.33), (0.022, 0.022, 0.022))]
)
_DEEP_BOX = (np.array([-0.50, -0.55, -0.30]), np.array([0.50, 0.45, 0.45]))

# veins: (chi, relative radius (x mean head radius), polyline points in u)
_VEINS = [
    # internal cerebral veins, paired, along the roof of the third ventricle
    (0.45, 0.014, [(0.025, 0.12, 0.16), (0.025, -0.05, 0.17), (0.02, -0.25, 0.15), (0.0, -0.33, 0.10)]),
    (0.45, 0.014, [(-0.025, 0.12, 0.16), (-0.025, -0.05, 0.17), (-0.02, -0.25, 0.15), (0.0, -0.33, 0.10)]),
    # straight sinus towards the back
    (0.40, 0.018, [(0.0, -0.33, 0.10), (0.0, -0.55, 0.25), (0.0, -0.72, 0.30)]),
    # medullary / cortical veins
    (0.35, 0.011, [(0.22, 0.30, 0.30), (0.38, 0.36, 0.42), (0.50, 0.40, 0.50)]),
    (0.30, 0.011, [(-0.25, -0.15, 0.38), (-0.40, -0.20, 0.52), (-0.50, -0.22, 0.60)]),
    (0.35, 0.010, [(0.15, -0.45, 0.40), (0.30, -0.55, 0.45), (0.42, -0.60, 0.40)]),
]


def _sss_polyline(n: int = 14) -> list[tuple[float, float, float]]:
    """Superior sagittal sinus: midline arc in the CSF between brain and skull."""
    t = np.linspace(np.radians(25), np.radians(165), n)
    r = 1.0 + 0.5 * _CSF_GAP / _BRAIN_S[2]
    ys = _BRAIN_C[1] + r * _BRAIN_S[1] * np.cos(t)
    zs = _BRAIN_C[2] + r * _BRAIN_S[2] * np.sin(t)
    return [(0.0, float(y), float(z)) for y, z in zip(ys, zs)]


_VEINS.append((0.35, 0.022, _sss_polyline()))


@dataclass
class _Anatomy:
    """Random (seeded) parts of the anatomy: the cortical folding field.

    Lengths are in units of the mean brain radius (about 62 mm on a life-size head).
    """

    wave_dirs: np.ndarray      # (n, 3) unit vectors
    wave_phase: np.ndarray     # (n,)
    wave_number: float         # rad per unit of isotropic head coordinate
    sulcus_depth: float = 0.19
    sulcus_halfwidth: float = 0.013
    gm_thickness: float = 0.044


def _make_anatomy(seed: int, n_waves: int = 24, gyral_period: float = 0.21) -> _Anatomy:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n_waves, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = 2.0 * np.pi / gyral_period
    return _Anatomy(d.astype(np.float32), rng.uniform(0, 2 * np.pi, n_waves).astype(np.float32), float(k))


def _ellipsoid(x, y, z, c, s):
    return ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 <= 1.0


def _seg_dist2(px, py, pz, a, b):
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    L2 = float(ab @ ab)
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / np.float32(max(L2, 1e-12))
    np.clip(t, 0.0, 1.0, out=t)
    dx = px - a[0] - t * ab[0]
    dy = py - a[1] - t * ab[1]
    dz = pz - a[2] - t * ab[2]
    return dx * dx + dy * dy + dz * dz


class _Head:
    """Implicit head model: maps head-frame coordinates (u units) to labels and phase offset."""

    def __init__(self, semi_axes_mm: np.ndarray, anatomy: _Anatomy, min_vein_radius_mm: float):
        self.S = np.asarray(semi_axes_mm, dtype=np.float64)          # head semi-axes, mm
        self.s_mean = float(np.exp(np.mean(np.log(self.S))))
        self.iso = (self.S / self.s_mean).astype(np.float32)       # u -> isotropic units
        self.anat = anatomy
        self.brain_radius_iso = float(np.mean(_BRAIN_S * self.iso))
        self.veins = []
        for chi, rel_r, pts in _VEINS:
            r_mm = max(rel_r * self.s_mean, min_vein_radius_mm)
            p_mm = np.asarray(pts, np.float64) * self.S[None, :]
            lo = (p_mm.min(0) - r_mm) / self.S
            hi = (p_mm.max(0) + r_mm) / self.S
            self.veins.append((chi, r_mm, p_mm.astype(np.float32), lo, hi))

    # ------------------------------------------------------------------ labels
    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Label (uint8) at head-frame points (1-D float32 arrays, u units).

        Points inside the brain mask carry the extra bit ``_MASK_BIT`` (128): the mask is the
        brain ellipsoid dilated by ``_MASK_MARGIN``, i.e. brain, ventricles, sulci and the inner
        half of the subarachnoid CSF, so that its border lies in CSF about 1 mm from the skull.
        Built in layers, each step overwriting the previous one where it applies: scalp, skull,
        sinuses and CSF cavity; brain tissue (cortex, white matter, sulci, fissure); deep grey
        matter; veins; the mask bit.
        """
        lab = np.zeros(x.shape, np.uint8)
        r2 = x * x + y * y + z * z
        neck = ((z < _NECK_TOP) & (((x - _NECK_C[0]) / _NECK_S[0]) ** 2 + ((y - _NECK_C[1]) / _NECK_S[1]) ** 2 <= 1.0))
        head = np.nonzero((r2 <= 1.0) | neck)[0]
        if head.size == 0:
            return lab
        x, y, z = x[head], y[head], z[head]
        sub = np.full(head.shape, _ID["scalp"], np.uint8)
        cav = self._skull_sinuses_csf(x, y, z, sub)
        self._brain_tissue(x, y, z, sub)
        self._deep_structures(x, y, z, sub)
        self._veins(x, y, z, sub, cav)
        inmask = np.nonzero(cav)[0]
        inmask = inmask[_ellipsoid(x[inmask], y[inmask], z[inmask], _BRAIN_C, _BRAIN_S + _MASK_MARGIN)]
        sub[inmask] |= _MASK_BIT
        lab[head] = sub
        return lab

    @staticmethod
    def _skull_sinuses_csf(x, y, z, sub: np.ndarray) -> np.ndarray:
        """Skull, air sinuses and the CSF-filled cavity into ``sub``; returns the cavity (bool)."""
        # cavity: brain ellipsoid dilated by the CSF gap; skull: dilated further by the bone
        cav = _ellipsoid(x, y, z, _BRAIN_C, _BRAIN_S + _CSF_GAP)
        bone = _ellipsoid(x, y, z, _BRAIN_C, _BRAIN_S + _CSF_GAP + _BONE) & ~cav
        sub[bone] = _ID["skull"]
        zlo = min(c[2] - e[2] for c, e in _SINUSES)
        zhi = max(c[2] + e[2] for c, e in _SINUSES)
        cand = np.nonzero((z > zlo) & (z < zhi) & ~cav)[0]
        if cand.size:
            xs, ys, zs = x[cand], y[cand], z[cand]
            sl = sub[cand]
            for c, s in _SINUSES:
                sl[_ellipsoid(xs, ys, zs, c, s)] = _ID["air_sinus"]
            sub[cand] = sl
        sub[cav] = _ID["csf"]
        return cav

    def _brain_tissue(self, x, y, z, sub: np.ndarray) -> None:
        """White matter, the folded cortex with its sulci and the interhemispheric fissure into ``sub``."""
        bx = (x - _BRAIN_C[0]) / _BRAIN_S[0]
        by = (y - _BRAIN_C[1]) / _BRAIN_S[1]
        bz = (z - _BRAIN_C[2]) / _BRAIN_S[2]
        rho = np.sqrt(bx * bx + by * by + bz * bz)
        brain = np.nonzero(rho <= 1.0)[0]
        if not brain.size:
            return
        bl = np.full(brain.shape, _ID["white_matter"], np.uint8)
        # depth below the brain hull, in units of the mean brain radius
        depth = 1.0 - rho[brain]
        a = self.anat
        shell = np.nonzero(depth < a.sulcus_depth + a.gm_thickness)[0]
        if shell.size:
            idx = brain[shell]
            d_sulc = self._sulcus_distance(x[idx], y[idx], z[idx])
            ds = depth[shell]
            below = np.maximum(ds - np.float32(a.sulcus_depth), np.float32(0.0))
            d_sulc = np.sqrt(d_sulc * d_sulc + below * below) - np.float32(a.sulcus_halfwidth)
            d_csf = np.minimum(ds, d_sulc)
            sl = np.where(d_csf < a.gm_thickness, np.uint8(_ID["grey_matter"]), np.uint8(_ID["white_matter"]))
            sl[d_csf < 0] = _ID["csf"]
            bl[shell] = sl
        # interhemispheric fissure above the corpus callosum
        xb, zb = x[brain], z[brain]
        fiss_w = 0.7 / self.S[0] * max(1.0, 0.012 * self.s_mean)
        bl[(np.abs(xb) < fiss_w) & (zb > _BRAIN_C[2] + 0.30)] = _ID["csf"]
        sub[brain] = bl

    @staticmethod
    def _deep_structures(x, y, z, sub: np.ndarray) -> None:
        """Deep grey matter and ventricles into ``sub``, evaluated on the points in their bounding box only."""
        lo, hi = _DEEP_BOX
        box = np.nonzero((x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1]) & (z > lo[2]) & (z < hi[2]))[0]
        if box.size:
            dl = sub[box]
            xs, ys, zs = x[box], y[box], z[box]
            for label, c, s in _DEEP:
                dl[_ellipsoid(xs, ys, zs, c, s)] = label
            sub[box] = dl

    def _veins(self, x, y, z, sub: np.ndarray, cav: np.ndarray) -> None:
        """Veins (tubes along polylines) inside the cavity into ``sub`` (bounding-box prefilter, one axis at a time)."""
        cav_idx = np.nonzero(cav)[0]
        cx, cy, cz = x[cav_idx], y[cav_idx], z[cav_idx]
        for _chi, r_mm, p_mm, vlo, vhi in self.veins:
            vb = np.nonzero((cx > vlo[0]) & (cx < vhi[0]))[0]
            vb = vb[(cy[vb] > vlo[1]) & (cy[vb] < vhi[1]) & (cz[vb] > vlo[2]) & (cz[vb] < vhi[2])]
            if vb.size == 0:
                continue
            px = cx[vb] * np.float32(self.S[0])
            py = cy[vb] * np.float32(self.S[1])
            pz = cz[vb] * np.float32(self.S[2])
            d2 = np.full(vb.shape, np.inf, np.float32)
            for a, b in zip(p_mm[:-1], p_mm[1:]):
                np.minimum(d2, _seg_dist2(px, py, pz, a, b), out=d2)
            sub[cav_idx[vb[d2 <= r_mm * r_mm]]] = _ID["vein"]

    def _sulcus_distance(self, x, y, z) -> np.ndarray:
        """Approximate distance (brain-radius units) to the nearest sulcal sheet.

        The sulci are the zero set of a smooth random field ``g`` (a sum of plane waves with
        seeded directions); the distance is ``|g| / |grad g|`` (first-order level-set distance).
        """
        a = self.anat
        xi, yi, zi = x * self.iso[0], y * self.iso[1], z * self.iso[2]
        g = np.zeros(x.shape, np.float32)
        gx = np.zeros(x.shape, np.float32)
        gy = np.zeros(x.shape, np.float32)
        gz = np.zeros(x.shape, np.float32)
        k = np.float32(a.wave_number)
        for d, ph in zip(a.wave_dirs, a.wave_phase):
            arg = k * (d[0] * xi + d[1] * yi + d[2] * zi) + ph
            g += np.cos(arg)
            sn = np.sin(arg)
            gx -= d[0] * sn
            gy -= d[1] * sn
            gz -= d[2] * sn
        grad = np.sqrt(gx * gx + gy * gy + gz * gz)
        grad *= k
        np.maximum(grad, np.float32(0.3 * a.wave_number), out=grad)
        np.abs(g, out=g)
        g /= grad
        g *= np.float32(1.0 / self.brain_radius_iso)
        return g

    # ------------------------------------------------------------------ phase offset
    @staticmethod
    def phi0(x, y, z) -> np.ndarray:
        """Smooth receive/transmit phase offset (rad), head frame."""
        return (0.6 + 0.7 * x - 0.4 * y + 0.5 * z + 0.4 * (x * x - z * z) + 0.3 * x * y).astype(np.float32)


# ============================================================================ phantom
#: the files :meth:`Phantom.write` writes
PHANTOM_FILES = {f"{n}.nii.gz" for n in ("magnitude", "phase", "chi", "local_field", "total_field", "mask",
                                         "labels")} | {"phantom.json"}


@dataclass
class Phantom:
    """A simulated multi-echo GRE acquisition with its ground truth.

    Attributes
    ----------
    magnitude : Volume
        4D (x, y, z, echo) float32, a.u.
    phase : Volume
        4D wrapped phase, rad in [-pi, pi).
    echo_times : numpy.ndarray
        Echo times in s (float64).
    field_strength : float
        B0 in T.
    truth : dict of Volume
        ``chi`` (ppm rel. CSF, 0 outside mask), ``local_field`` (ppm), ``total_field`` (ppm),
        ``mask`` (bool, brain + inner half of the subarachnoid CSF), ``labels`` (uint8, see
        :data:`LABELS`).
    rotation : numpy.ndarray
        3x3 head rotation applied in the world (scanner) frame about ``meta["rotation_center_mm"]``.
    meta : dict
        Options and derived quantities (b0 direction, noise sigma, head semi-axes, timings).
    phase_offset : Volume or None
        The true phase offset phi0 (rad), block-averaged to the output grid.
    """

    magnitude: Volume
    phase: Volume
    echo_times: np.ndarray
    field_strength: float
    truth: dict
    rotation: np.ndarray
    meta: dict = field(default_factory=dict)
    phase_offset: Volume | None = None

    def __repr__(self) -> str:
        return (f"Phantom(shape={self.magnitude.grid_shape}, voxel_size={self.magnitude.voxel_size}, "
                f"echo_times={[float(t) for t in self.echo_times]}, field_strength={self.field_strength}, "
                f"rotation_deg={self.meta.get('rotation_deg')}, snr={self.meta.get('options', {}).get('snr')})")

    @property
    def mask(self) -> Volume:
        return self.truth["mask"]

    def artifacts(self) -> dict:
        """Artifacts for the pipeline engine: magnitude, phase, echo_times, field_strength, truth."""
        return {"magnitude": self.magnitude, "phase": self.phase,
                "echo_times": np.asarray(self.echo_times, dtype=np.float64),
                "field_strength": float(self.field_strength), "truth": dict(self.truth)}

    def json_dict(self) -> dict:
        """What ``phantom.json`` holds (echo times, field strength, B0, rotation, options)."""
        m = self.meta
        return {"echo_times": [float(t) for t in self.echo_times], "echo_times_units": "s",
                "field_strength": float(self.field_strength), "field_strength_units": "T",
                "b0_direction_world": m.get("b0_direction_world"),
                "b0_direction_voxel": [float(v) for v in self.magnitude.b0_direction],
                "rotation": np.asarray(self.rotation).tolist(),
                "rotation_deg": m.get("rotation_deg"),
                "rotation_center_mm": m.get("rotation_center_mm"),
                "affine": np.asarray(self.magnitude.affine).tolist(),
                "shape": list(self.magnitude.grid_shape),
                "voxel_size_mm": list(self.magnitude.voxel_size),
                "labels": {str(k): v for k, v in LABELS.items()},
                "tissues": {k: {"chi_ppm": v[0], "m0": v[1], "t2star_ms_3T": v[2]} for k, v in m.get("tissues", TISSUES).items()},
                "noise_sigma": m.get("noise_sigma"),
                "options": m.get("options", {}),
                "chi_reference": "csf", "units": {"chi": "ppm", "field": "ppm", "phase": "rad"}}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write NIfTI files and ``phantom.json`` (atomically) to ``out_dir``; returns name -> path."""
        from .io import save_nifti, write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        vols = {"magnitude": self.magnitude, "phase": self.phase, **self.truth}
        for name, vol in vols.items():
            paths[name] = save_nifti(vol, out / f"{name}.nii.gz")
        p = out / "phantom.json"
        write_json(self.json_dict(), p)
        paths["phantom"] = p
        return paths


# ============================================================================ helpers
def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over non-overlapping ``f^3`` blocks (float32 or complex64), by strided slice sums per axis."""
    dt = np.complex64 if np.iscomplexobj(x) else np.float32
    if f == 1:
        return np.array(x, dtype=dt)
    y = x
    for ax in range(3):
        sl = [slice(None)] * 3
        sl[ax] = slice(0, None, f)
        acc = np.array(y[tuple(sl)], dtype=dt)
        for o in range(1, f):
            sl[ax] = slice(o, None, f)
            acc += y[tuple(sl)]
        y = acc
    y *= np.float32(1.0 / f ** 3)
    return y


def _field_from_chi(chi_fine: np.ndarray, dipole: Dipole) -> np.ndarray:
    """Field (ppm, float32) of ``chi_fine`` (ppm) by the core dipole convolution (zero-padded, half spectrum)."""
    return dipole.apply(chi_fine)


def _check_params(shape, voxel_size, echo_times, field_strength, oversample, padding, snr) -> None:
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise ParameterError(f"simulate: shape must be 3 integers >= 8, got {tuple(shape)}")
    if len(voxel_size) != 3 or any(not (0.05 <= float(v) <= 20.0) for v in voxel_size):
        raise ParameterError(f"simulate: voxel_size must be 3 values in mm between 0.05 and 20, got {tuple(voxel_size)}")
    te = np.asarray(echo_times, dtype=np.float64)
    if te.ndim != 1 or te.size < 1 or np.any(te <= 0) or not np.all(np.isfinite(te)):
        raise ParameterError("simulate: echo_times must be a non-empty list of positive times in seconds")
    if np.any(te > 1.0):
        raise ParameterError(f"simulate: echo_times look like milliseconds ({te.tolist()}); give them in seconds, e.g. 0.004")
    if not (0.05 <= float(field_strength) <= 21.1):
        raise ParameterError(f"simulate: field_strength {field_strength} T is outside 0.05-21.1 T")
    if int(oversample) != oversample or not (1 <= int(oversample) <= 4):
        raise ParameterError(f"simulate: oversample must be an integer 1-4, got {oversample}")
    if not (1.0 <= float(padding) <= 4.0):
        raise ParameterError(f"simulate: padding must be between 1 and 4, got {padding}")
    if snr is not None and not (float(snr) > 0):
        raise ParameterError(f"simulate: snr must be positive (or None/inf for no noise), got {snr}")


def _head_semi_axes(shape, affine, fov_fraction) -> np.ndarray:
    """Head semi-axes (mm) along world x, y, z: ``fov_fraction`` of the FOV half-extent along the
    voxel axis closest to each world axis."""
    vs = voxel_sizes(affine)
    half = 0.5 * np.asarray(shape, np.float64) * vs
    R = np.asarray(affine, np.float64)[:3, :3] / vs[None, :]
    out = np.empty(3)
    for w in range(3):
        out[w] = half[int(np.argmax(np.abs(R[w])))]
    return fov_fraction * out


# ============================================================================ main: named steps
@dataclass
class _Acquisition:
    """Validated geometry of one simulated acquisition (see :func:`simulate_phantom`)."""

    shape: tuple
    A: np.ndarray            # voxel -> world affine (mm)
    vs: np.ndarray           # voxel size (mm)
    te: np.ndarray           # echo times (s)
    os_: int                 # oversampling factor per axis
    snr: float | None
    b0w: np.ndarray          # unit B0 direction, world frame
    b_vox: np.ndarray        # unit B0 direction, voxel frame
    R: np.ndarray            # head rotation (world frame)
    center: np.ndarray       # rotation centre (world, mm)
    S: np.ndarray            # head semi-axes (mm)


def _grid(shape, voxel_size, affine) -> tuple[tuple, np.ndarray, np.ndarray]:
    """``(shape, affine, voxel size)``: the given affine (checked) or a centred diagonal one."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"simulate: shape must be 3 integers, got {shape!r}") from None
    if affine is not None:
        A = np.asarray(affine, np.float64)
        if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-9:
            raise ParameterError("simulate: affine must be a finite, invertible 4x4 voxel-to-world matrix")
        vs = voxel_sizes(A)
    else:
        vs = np.asarray(voxel_size, np.float64)
        if len(vs) != 3:
            raise ParameterError(f"simulate: voxel_size must be 3 values in mm, got {tuple(voxel_size)}")
        A = np.diag(np.r_[vs, 1.0])
        A[:3, 3] = -vs * (np.asarray(shape) - 1) / 2.0
    return shape, A, vs


def _acquisition(shape, voxel_size, echo_times, field_strength, b0_direction, affine, rotation_deg, snr,
                 oversample, padding, fov_fraction, head_semi_axes_mm) -> _Acquisition:
    """Check the options of :func:`simulate_phantom` and derive the acquisition geometry."""
    shape, A, vs = _grid(shape, voxel_size, affine)
    snr_val = None if snr is None or not np.isfinite(float(snr)) else float(snr)
    _check_params(shape, vs, echo_times, field_strength, oversample, padding, snr_val)
    b0w = np.asarray(b0_direction, np.float64)
    if b0w.shape != (3,) or not np.isfinite(np.linalg.norm(b0w)) or np.linalg.norm(b0w) == 0:
        raise ParameterError("simulate: b0_direction must be a non-zero 3-vector in world coordinates")
    b0w = b0w / np.linalg.norm(b0w)
    S = (np.asarray(head_semi_axes_mm, np.float64) if head_semi_axes_mm is not None
         else _head_semi_axes(shape, A, fov_fraction))
    return _Acquisition(shape=shape, A=A, vs=vs, te=np.asarray(echo_times, np.float64), os_=int(oversample),
                        snr=snr_val, b0w=b0w, b_vox=b0_direction_from_affine(A, b0w),
                        R=rotation_matrix(rotation_deg),
                        center=A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + A[:3, 3], S=S)


def _tissue_tables(chi_overrides, field_strength):
    """``(tissues, chi_lut, m0_lut, r2_lut, in_brain)``: per-tissue values with the overrides, and
    look-up tables over the internal label code (label | ``_MASK_BIT`` inside the brain mask)."""
    tissues = dict(TISSUES)
    for name, val in (chi_overrides or {}).items():
        if name not in tissues:
            raise ParameterError(f"simulate: unknown tissue {name!r} in chi_overrides; known: {', '.join(tissues)}")
        tissues[name] = (float(val),) + tissues[name][1:]
    chi_lut = np.zeros(256, np.float32)
    m0_lut = np.zeros(256, np.float32)
    r2_lut = np.zeros(256, np.float32)
    for k, name in LABELS.items():
        c, m0, t2 = tissues[name]
        for code in (k, k | int(_MASK_BIT)):
            chi_lut[code], m0_lut[code] = c, m0
            r2_lut[code] = 1.0 / (t2 * 1e-3) * (float(field_strength) / 3.0)
    in_brain = np.zeros(256, bool)
    in_brain[int(_MASK_BIT):] = True
    return tissues, chi_lut, m0_lut, r2_lut, in_brain


class _Sampler:
    """Labels (and phi0) of the head at voxel-index coordinates of the acquisition grid."""

    def __init__(self, head: _Head, acq: _Acquisition):
        A, S, R = acq.A, acq.S, acq.R
        self.head = head
        # world -> head frame (u units): u = diag(1/S) R^T (A[:3,:3] i + A[:3,3] - c)
        self.M = np.diag(1.0 / S) @ R.T @ A[:3, :3]
        self.t0 = np.diag(1.0 / S) @ R.T @ (A[:3, 3] - acq.center)

    def __call__(self, idx0: np.ndarray, idx1: np.ndarray, idx2: np.ndarray, want_phi0: bool):
        """Labels (and phi0) at voxel-index coordinates given per axis (outer grid)."""
        M, t0 = self.M, self.t0
        g0, g1, g2 = np.meshgrid(idx0.astype(np.float32), idx1.astype(np.float32), idx2.astype(np.float32),
                                 indexing="ij", copy=False)
        pts = [None, None, None]
        for r in range(3):
            pts[r] = (np.float32(M[r, 0]) * g0 + np.float32(M[r, 1]) * g1 + np.float32(M[r, 2]) * g2
                      + np.float32(t0[r])).ravel()
        lab = self.head.labels(*pts).reshape(g0.shape)
        phi = self.head.phi0(*pts).reshape(g0.shape) if want_phi0 else None
        return lab, phi


def _fine_grid(sample: _Sampler, shape, os_: int, chunk_voxels: int):
    """Labels and phi0 on the ``os_`` times finer grid, in slabs: ``(labels_f, phi0_f, step)``."""
    fshape = tuple(s * os_ for s in shape)
    fine_idx = [((np.arange(n) + 0.5) / os_ - 0.5) for n in fshape]   # in output voxel indices
    labels_f = np.empty(fshape, np.uint8)
    phi0_f = np.empty(fshape, np.float32)
    per_slice = fshape[1] * fshape[2]
    step = max(os_, (max(1, chunk_voxels // per_slice) // os_) * os_)
    for a in range(0, fshape[0], step):
        b = min(a + step, fshape[0])
        labels_f[a:b], phi0_f[a:b] = sample(fine_idx[0][a:b], fine_idx[1], fine_idx[2], True)
    return labels_f, phi0_f, step


def _fields(labels_f, phi0_f, chi_lut, in_brain, vs, os_: int, b_vox, padding):
    """Fine-grid fields and their block means: ``(chi_truth, local_out, total_f, total_out,
    phi0_out, pshape)`` (``total_f`` stays on the fine grid for the signal)."""
    fshape = labels_f.shape
    pshape = _fft.padded_shape(fshape, padding)
    vs_f = vs / os_
    dipole = Dipole(fshape, vs_f, b_vox, fft_shape=pshape)
    chi_f = chi_lut[labels_f]
    chi_f *= in_brain[labels_f]
    local_f = _field_from_chi(chi_f, dipole)
    chi_truth = _block_mean(chi_f, os_)
    del chi_f
    # background sources: the head relative to the surrounding air (chi - CHI_AIR) minus the
    # referenced chi inside the mask, which is the local part: total = D * (chi - CHI_AIR) over
    # the head. Inside the mask that leaves -CHI_AIR, a uniform block whose field is harmonic
    # inside the mask (its sources sit on the mask surface).
    chi_bg = chi_lut[labels_f] - np.float32(CHI_AIR)
    chi_bg[in_brain[labels_f]] = -np.float32(CHI_AIR)
    total_f = _field_from_chi(chi_bg, dipole)
    del chi_bg, dipole
    total_f += local_f
    local_out = _block_mean(local_f, os_)
    del local_f
    total_out = _block_mean(total_f, os_)
    phi0_out = _block_mean(phi0_f, os_)
    return chi_truth, local_out, total_f, total_out, phi0_out, pshape


def _cis(ph: np.ndarray) -> np.ndarray:
    """``exp(i ph)`` as complex64."""
    z = np.empty(ph.shape, np.complex64)
    np.cos(ph, out=z.real)
    np.sin(ph, out=z.imag)
    return z


def _signal(labels_f, total_f, phi0_f, m0_lut, r2_lut, te, field_strength, shape, os_: int, step: int):
    """Block-averaged complex multi-echo signal ``(x, y, z, echo)`` (complex64), slab by slab.

    S_e = M0 exp(-R2* TE_e) exp(i (phi0 + omega f TE_e)), block-averaged as a complex signal.
    With equally spaced echoes exp(i omega f TE_e) is built by the recurrence z_e = z_{e-1} dz.
    """
    fshape = labels_f.shape
    omega = 2.0 * np.pi * GAMMA_BAR * float(field_strength) * 1e-6          # rad/s per ppm
    ne = te.size
    sig = np.empty(shape + (ne,), np.complex64)
    amp_luts = [(m0_lut * np.exp(-r2_lut * t)).astype(np.float32) for t in te]
    dte = np.diff(te)
    uniform = ne > 1 and bool(np.allclose(dte, dte[0], rtol=1e-9, atol=1e-12))
    for a in range(0, fshape[0], step):
        b = min(a + step, fshape[0])
        lab, fld, p0 = labels_f[a:b], total_f[a:b], phi0_f[a:b]
        if uniform:
            z = _cis(fld * np.float32(omega * te[0]) + p0)
            dz = _cis(fld * np.float32(omega * dte[0]))
        for e, t in enumerate(te):
            if uniform:
                if e:
                    z *= dz
            else:
                z = _cis(fld * np.float32(omega * t) + p0)
            sig[a // os_:b // os_, :, :, e] = _block_mean(amp_luts[e][lab] * z, os_)
    return sig


def _output_labels(sample: _Sampler, shape, chunk_voxels: int, in_brain):
    """Analytic labels (without the mask bit) and the brain mask at the output voxel centres."""
    labels_out = np.empty(shape, np.uint8)
    step_o = max(1, chunk_voxels // (shape[1] * shape[2]))
    out_idx = [np.arange(n, dtype=np.float64) for n in shape]
    for a in range(0, shape[0], step_o):
        b = min(a + step_o, shape[0])
        labels_out[a:b], _ = sample(out_idx[0][a:b], out_idx[1], out_idx[2], False)
    mask = in_brain[labels_out]
    labels_out &= np.uint8(0x7F)
    return labels_out, mask


def _add_noise(sig, mask, snr_val, seed: int):
    """Add complex Gaussian noise (in place) and split: ``(magnitude, phase in [-pi, pi), sigma)``."""
    sigma = 0.0
    if snr_val is not None:
        mean1 = float(np.abs(sig[..., 0])[mask].mean()) if mask.any() else float(np.abs(sig[..., 0]).mean())
        sigma = mean1 / snr_val
        rng = np.random.default_rng(seed)
        for e in range(sig.shape[-1]):
            n = rng.standard_normal((2,) + sig.shape[:-1], dtype=np.float32)
            sig[..., e].real += sigma * n[0]
            sig[..., e].imag += sigma * n[1]
    mag = np.abs(sig).astype(np.float32)
    phase = np.angle(sig).astype(np.float32)
    phase[phase >= np.float32(np.pi)] -= np.float32(2 * np.pi)
    return mag, phase, sigma


def _metadata(acq: _Acquisition, field_strength, affine, rotation_deg, seed, padding, anatomy_seed, fov_fraction,
              chi_overrides, tissues, sigma, pshape, timing) -> dict:
    """The phantom's ``meta`` dict: the options used (JSON-friendly), noise level and timing."""
    te, b0w = acq.te, acq.b0w
    options = {"shape": list(acq.shape), "voxel_size": [float(v) for v in acq.vs], "echo_times": te.tolist(),
               "field_strength": float(field_strength), "b0_direction": b0w.tolist(),
               "affine_given": affine is not None, "rotation_deg": [float(r) for r in rotation_deg],
               "snr": acq.snr, "seed": int(seed), "oversample": acq.os_, "padding": float(padding),
               "anatomy_seed": int(anatomy_seed), "fov_fraction": float(fov_fraction),
               "head_semi_axes_mm": [float(s) for s in acq.S], "chi_overrides": dict(chi_overrides or {})}
    return {"source": "qsmkit.simulate", "echo_times": te.tolist(), "field_strength": float(field_strength),
            "b0_direction_world": b0w.tolist(), "rotation_deg": [float(r) for r in rotation_deg],
            "rotation_center_mm": acq.center.tolist(), "noise_sigma": sigma, "padded_fine_shape": list(pshape),
            "options": options, "tissues": tissues, "timing_s": timing}


# ============================================================================ main
def simulate_phantom(shape: Sequence[int] = DEFAULT_SHAPE,
                     voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
                     echo_times: Sequence[float] = DEFAULT_ECHO_TIMES,
                     field_strength: float = 3.0,
                     b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
                     affine: np.ndarray | None = None,
                     rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                     snr: float | None = 100.0,
                     seed: int = 0,
                     oversample: int = 2,
                     padding: float = 1.5,
                     *,
                     anatomy_seed: int = 0,
                     fov_fraction: float = 0.84,
                     head_semi_axes_mm: Sequence[float] | None = None,
                     chi_overrides: Mapping[str, float] | None = None,
                     chunk_voxels: int = 4_000_000,
                     verbose: bool = False,
                     **kw: Any) -> Phantom:
    """Simulate a multi-echo GRE head acquisition with ground truth (see the module docstring).

    Parameters
    ----------
    shape : 3 ints
        Output grid. Default (112, 128, 96) at 1.5 mm: a 168 x 192 x 144 mm FOV, ~1.4 M voxels.
    voxel_size : 3 floats
        Voxel size in mm (anisotropic allowed); ignored when ``affine`` is given.
    echo_times : floats
        Echo times in s.
    field_strength : float
        B0 in T (T2* values, given at 3 T, are scaled by 3/B0).
    b0_direction : 3 floats
        B0 direction in the world (scanner) frame.
    affine : 4x4 array, optional
        Voxel -> world (mm) affine of the acquisition, e.g. oblique. Default: diagonal of
        ``voxel_size``, centred on the grid.
    rotation_deg : 3 floats
        Head rotation (degrees) about the world x, y, z axes through the FOV centre, applied as
        ``Rz @ Ry @ Rx``. B0 does not move.
    snr : float or None
        Mean first-echo magnitude in the brain divided by the noise standard deviation per
        real/imaginary channel; ``None`` or ``inf`` for noise-free data.
    seed : int
        Noise seed (the anatomy uses ``anatomy_seed``, so rotations share one head).
    oversample : int
        Fine-grid factor per axis for the forward model (complex block averaging).
    padding : float
        Minimum zero-padding factor of the fine grid for the dipole convolution (>= 1.5 advised).
    anatomy_seed : int
        Seed of the cortical folding pattern.
    fov_fraction : float
        Head diameter as a fraction of the FOV along each axis.
    head_semi_axes_mm : 3 floats, optional
        Head semi-axes (mm, head frame x, y, z) instead of ``fov_fraction``.
    chi_overrides : mapping, optional
        ``{tissue name: chi in ppm}`` to change :data:`TISSUES` values.
    chunk_voxels : int
        Fine-grid points processed at once (memory control).
    verbose : bool
        Print the grid sizes and timings.
    **kw
        Anything else raises :class:`~qsmkit.errors.ParameterError` naming the valid options
        (so that a typo in a pipeline's ``inputs: {simulate: {...}}`` is reported clearly).

    Returns
    -------
    Phantom
    """
    t_start = time.perf_counter()
    if kw:
        import inspect

        valid = [n for n in inspect.signature(simulate_phantom).parameters if n != "kw"]
        raise ParameterError(f"simulate: unknown option(s) {', '.join(sorted(kw))}; valid options: {', '.join(valid)}")
    acq = _acquisition(shape, voxel_size, echo_times, field_strength, b0_direction, affine, rotation_deg, snr,
                       oversample, padding, fov_fraction, head_semi_axes_mm)
    shape, os_ = acq.shape, acq.os_
    head = _Head(acq.S, _make_anatomy(anatomy_seed), min_vein_radius_mm=0.6 * float(acq.vs.max()))
    tissues, chi_lut, m0_lut, r2_lut, in_brain = _tissue_tables(chi_overrides, field_strength)
    sample = _Sampler(head, acq)

    labels_f, phi0_f, step = _fine_grid(sample, shape, os_, chunk_voxels)
    t_geom = time.perf_counter()
    chi_truth, local_out, total_f, total_out, phi0_out, pshape = _fields(labels_f, phi0_f, chi_lut, in_brain,
                                                                         acq.vs, os_, acq.b_vox, padding)
    t_field = time.perf_counter()
    sig = _signal(labels_f, total_f, phi0_f, m0_lut, r2_lut, acq.te, field_strength, shape, os_, step)
    del total_f, phi0_f, labels_f
    t_sig = time.perf_counter()
    labels_out, mask = _output_labels(sample, shape, chunk_voxels, in_brain)
    chi_truth *= mask
    mag, phase, sigma = _add_noise(sig, mask, acq.snr, seed)
    del sig

    timing = {"geometry": t_geom - t_start, "fields": t_field - t_geom, "signal": t_sig - t_field,
              "total": time.perf_counter() - t_start}
    meta = _metadata(acq, field_strength, affine, rotation_deg, seed, padding, anatomy_seed, fov_fraction,
                     chi_overrides, tissues, sigma, pshape, timing)
    te = acq.te

    def vol(data, units, **m):
        return Volume(data, acq.A, units=units, b0_direction=acq.b_vox, meta={"simulated": True, **m})

    truth = {"chi": vol(chi_truth, "ppm", reference="csf"),
             "local_field": vol(local_out, "ppm"),
             "total_field": vol(total_out, "ppm"),
             "mask": vol(mask, "bool"),
             "labels": vol(labels_out, "label", labels={int(k): v for k, v in LABELS.items()})}
    if verbose:
        print(f"simulate_phantom: {shape} fine {tuple(s * os_ for s in shape)} padded {pshape}: {meta['timing_s']}")
    return Phantom(magnitude=vol(mag, "a.u.", echo_times=te.tolist()),
                   phase=vol(phase, "rad", echo_times=te.tolist()),
                   echo_times=te, field_strength=float(field_strength), truth=truth, rotation=acq.R,
                   meta=meta, phase_offset=vol(phi0_out, "rad"))

def simulate_orientations(rotations_deg: Sequence[Sequence[float]], **kwargs: Any) -> list[Phantom]:
    """The same head in several orientations (for COSMOS), one :class:`Phantom` per rotation.

    The first entry is the reference frame (usually ``(0, 0, 0)``). All share the grid/affine and
    the anatomy (``anatomy_seed``); orientation ``i`` uses noise seed ``seed + i``.
    """
    rots = [tuple(float(a) for a in r) for r in rotations_deg]
    if not rots or any(len(r) != 3 for r in rots):
        raise ParameterError("simulate_orientations: give a non-empty list of (x, y, z) rotations in degrees")
    if "rotation_deg" in kwargs:
        raise ParameterError("simulate_orientations: pass rotations in rotations_deg, not rotation_deg")
    seed = int(kwargs.pop("seed", 0))
    return [simulate_phantom(rotation_deg=r, seed=seed + i, **kwargs) for i, r in enumerate(rots)]
