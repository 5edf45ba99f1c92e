"""The anatomical model of the numerical head phantom: labels, tissue values and shapes.

The head is defined by implicit shape functions (ellipsoids, a folded cortex from a smooth random
field, tubes for veins) in normalised head coordinates ``u`` (head surface = unit sphere); the
forward model (:mod:`qsmkit.simulate.forward`) evaluates :meth:`_Head.labels` at the head-frame
coordinates of its grid points and maps the labels to chi, M0 and T2* through :data:`TISSUES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LABELS", "TISSUES", "BRAIN_LABELS", "CHI_AIR", "HAEMATOMA_TISSUE", "PHASE_OFFSETS"]

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


#: tissue values of label ``haemorrhage`` with ``simulate_phantom(haemorrhage=True)``: an acute /
#: early subacute haematoma (deoxyhaemoglobin), chi +1.0 ppm rel. CSF, T2* 5 ms at 3 T
HAEMATOMA_TISSUE: tuple[float, float, float] = (1.0, 0.45, 5.0)

#: the phase-offset models :meth:`_Head.phi0` knows (``simulate_phantom(phase_offset=...)``)
PHASE_OFFSETS: tuple[str, ...] = ("smooth", "coil", "none")

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

# haematoma (``haemorrhage=True``): a ball in the deep white matter of the left centrum
# semiovale, above the putamen and lateral to the caudate body and the ventricles, with a radius
# of _HAEMATOMA_RADIUS times the mean head semi-axis (9 mm on the default grid's 70 mm head)
_HAEMATOMA_C = (-0.34, 0.10, 0.38)
_HAEMATOMA_RADIUS = 0.13

# "coil" phase offset: linear ramp plus Gaussian bumps centred just outside the head, one per
# virtual receive element: (centre in u, amplitude rad); bump width _COIL_WIDTH (u units)
_COIL_RAMP = (0.6, 1.8, -1.2, 0.9)          # constant, d/dx, d/dy, d/dz (rad per u)
_COILS = [((1.25, 0.30, 0.10), 3.5), ((-1.20, -0.20, 0.30), -3.0), ((0.20, 1.25, -0.10), 2.8),
          ((-0.30, -1.20, 0.20), -2.5), ((0.10, 0.20, 1.25), 2.2), ((0.60, -0.70, -0.80), -2.0)]
_COIL_WIDTH = 0.55

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

    def __init__(self, semi_axes_mm: np.ndarray, anatomy: _Anatomy, min_vein_radius_mm: float,
                 phase_offset: str = "smooth", haematoma: bool = False):
        self.S = np.asarray(semi_axes_mm, dtype=np.float64)          # head semi-axes, mm
        self.phase_offset = phase_offset
        self.haematoma = bool(haematoma)
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
        #: haematoma radius (mm) and its semi-axes in u units (a ball in mm)
        self.haematoma_radius_mm = _HAEMATOMA_RADIUS * self.s_mean
        self.haematoma_semi_axes = tuple(float(self.haematoma_radius_mm / s) for s in self.S)

    # ------------------------------------------------------------------ labels
    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Label (uint8) at head-frame points (1-D float32 arrays, u units).

        Points inside the brain mask carry the extra bit ``_MASK_BIT`` (128): the mask is the
        brain ellipsoid dilated by ``_MASK_MARGIN``, i.e. brain, ventricles, sulci and the inner
        half of the subarachnoid CSF, so that its border lies in CSF about 1 mm from the skull.
        Built in layers, each step overwriting the previous one where it applies: scalp, skull,
        sinuses and CSF cavity; brain tissue (cortex, white matter, sulci, fissure); deep grey
        matter; veins; the haematoma (``haematoma=True`` only); the mask bit.
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
        if self.haematoma:
            sub[_ellipsoid(x, y, z, _HAEMATOMA_C, self.haematoma_semi_axes)] = _ID["haemorrhage"]
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
    def phi0(self, x, y, z) -> np.ndarray:
        """Receive/transmit phase offset phi0 (rad, float32, not wrapped) at head-frame points (u units).

        ``phase_offset`` of the head selects the model:

        * ``"smooth"``: ``0.6 + 0.7 x - 0.4 y + 0.5 z + 0.4 (x^2 - z^2) + 0.3 x y`` (about 2 rad
          of variation over the head; no wrap in the brain);
        * ``"coil"``: a coil-combined-like offset, ``0.6 + 1.8 x - 1.2 y + 0.9 z +
          sum_c a_c exp(-|u - p_c|^2 / (2 w^2))`` with six virtual receive elements ``p_c`` just
          outside the head (amplitudes -3.0 .. +3.5 rad, ``w = 0.55``): about 7.5 rad of smooth
          variation across the brain (9 rad across the head), so ``exp(i phi0)`` wraps (as the
          phase of a 32-channel adaptive combination without a reference does); at most
          ~0.1 rad/mm;
        * ``"none"``: zero.
        """
        if self.phase_offset == "none":
            return np.zeros(np.shape(x), np.float32)
        if self.phase_offset == "coil":
            c0, cx, cy, cz = (np.float32(v) for v in _COIL_RAMP)
            out = c0 + cx * x + cy * y + cz * z
            g = np.float32(-0.5 / _COIL_WIDTH ** 2)
            for (px, py, pz), amp in _COILS:
                d2 = (x - np.float32(px)) ** 2 + (y - np.float32(py)) ** 2 + (z - np.float32(pz)) ** 2
                out += np.float32(amp) * np.exp(g * d2)
            return out.astype(np.float32, copy=False)
        return (0.6 + 0.7 * x - 0.4 * y + 0.5 * z + 0.4 * (x * x - z * z) + 0.3 * x * y).astype(np.float32)
