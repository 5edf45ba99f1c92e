"""Brain extraction from a magnitude image with a deformable surface (after FSL BET, Smith 2002).

The method follows S. M. Smith, "Fast robust automated brain extraction", Hum. Brain Mapp. 17:143
(2002): a tessellated sphere (an icosahedron subdivided ``subdivisions`` times) starts inside the
head at its centre of gravity and moves, vertex by vertex, under three forces per iteration:

* a tangential force (half the tangential part of the vector from a vertex to the mean of its
  neighbours) that keeps the vertices evenly spaced;
* a normal smoothing force with a curvature-dependent weight (a sigmoid of the local radius of
  curvature between ``r_min`` = 3.33 mm and ``r_max`` = 10 mm) that keeps the surface smooth;
* an intensity force along the outward normal: from the intensities ``I`` sampled on a line
  inward from the vertex, ``I_min`` (minimum over ``d1`` = 20 mm) and ``I_max`` (maximum over
  ``d1 / 2``) give a local threshold ``t_l = t2 + bt (I_max - t2)``; the vertex moves outward
  when ``I_min > t_l`` (bright tissue under it) and inward otherwise, by
  ``0.05 * 2 (I_min - t_l) / (I_max - t2)`` times the mean vertex spacing.

``t2`` / ``t98`` are the 2nd / 98th percentiles of the image and ``tm`` the median inside the
initial head sphere; ``I_min`` is clipped below at ``t2`` and above at ``tm``, ``I_max`` between
``t = t2 + 0.1 (t98 - t2)`` and ``tm``, as in the paper. The final surface is filled into a
mask by ray parity (each grid column counts its crossings of the mesh), so the mask is a
closed, hole-free region: dark structures inside the brain (veins, haemorrhage, calcification)
are inside it.

On GRE magnitude (first echo) the cerebrospinal fluid is bright and the skull dark, so the surface
stops at the inner table of the skull (the intracranial cavity), not at the pial surface as on
T1-weighted images. ``margin_mm`` then moves the surface inward along its normals, e.g. to put
the border in the subarachnoid CSF about 1 mm inside the skull, away from the unreliable phase
next to bone. Lengths are in mm throughout (anisotropic voxels are sampled in mm).

Why a triangle mesh (and not a level set or a morphological active contour): BET's forces are
explicit and local, its smoothness limits are curvature radii in mm, so the result does not depend
on the voxel size or anisotropy (the image is sampled in mm); the cost is per vertex (2562
vertices, ~20 samples each per iteration), not per voxel, so a 1 mm whole-head grid takes seconds;
and a smooth closed surface cannot leak through a narrow opening, which a voxel-wise region or a
level set with a balloon force can.

Not done here (compared with BET): the self-intersection test with a re-run at higher smoothness,
the vertical gradient of the fractional threshold, and the skull / scalp surfaces (``betsurf``).
Also unlike BET, the iterations stop early once the enclosed volume no longer changes (``tol``).

On real data: the method needs what BET needs, a head whose brain and CSF are brighter than the
bone around them, which first-echo GRE magnitude gives at 1.5-7 T. The smoothness force keeps the
surface out of openings in the skull (foramen magnum, optic canals) through which a threshold
mask leaks into the neck and the orbits; the local threshold follows smooth receive bias. Its
limits are BET's: signal dropout near air (orbitofrontal cortex, temporal poles, more at 7 T and
late echoes) is dark and may be cut off; bright fatty marrow or scalp against a thin skull can pull
the surface out locally; a lesion darker than ``t_l`` within 20 mm of the surface pulls it in
(the haematomas and veins of the simulator lie deeper or are too small); the mesh does not check
for self-intersection. The default ``margin_mm`` of 1 mm is a length, not a fraction: on a child's
or a very small head the subarachnoid space, and the right margin, are thinner.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import sparse

from qsmkit.errors import InputDataError, ParameterError

#: BET constants (Smith 2002): curvature radii of the smoothness sigmoid (mm), the inward search
#: depth for I_min (mm), the step fraction of the intensity force
R_MIN_MM, R_MAX_MM, D1_MM, INTENSITY_STEP = 3.33, 10.0, 20.0, 0.05
#: iterations between two convergence checks (enclosed volume)
CHECK_EVERY = 25


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere tessellated by subdividing an icosahedron.

    Returns vertices ``(n, 3)`` float64 on the unit sphere and triangles ``(m, 3)`` int with
    counter-clockwise (outward-facing) vertex order; ``n = 10 * 4**k + 2``.
    """
    t = (1.0 + 5.0 ** 0.5) / 2.0
    v = np.array([(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
                  (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)], dtype=np.float64)
    f = np.array([(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
                  (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
                  (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)], dtype=np.int64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(subdivisions):
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        uniq, inv = np.unique(edges, axis=0, return_inverse=True)
        mid = v[uniq[:, 0]] + v[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = len(f)
        ab, bc, ca = (len(v) + inv.ravel()[i * m:(i + 1) * m] for i in range(3))
        a, b, c = f[:, 0], f[:, 1], f[:, 2]
        f = np.concatenate([np.stack(s, axis=1) for s in ((a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca))])
        v = np.concatenate([v, mid])
    # outward orientation (the table above is consistent; make sure of the sign)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    if np.sum(fn * v[f].mean(axis=1)) < 0:
        f = f[:, ::-1].copy()
    return v, f


def _neighbour_mean_operator(n: int, faces: np.ndarray) -> sparse.csr_matrix:
    """Sparse ``(n, n)`` matrix that maps vertex positions to the mean of each vertex's neighbours."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.unique(np.sort(e, axis=1), axis=0)
    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    a = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    deg = np.asarray(a.sum(axis=1)).ravel()
    return sparse.diags(1.0 / deg) @ a


def _face_incidence(n: int, faces: np.ndarray) -> sparse.csr_matrix:
    """Sparse ``(n, m)`` vertex-face incidence matrix (sums face vectors onto their vertices)."""
    m = len(faces)
    return sparse.csr_matrix((np.ones(3 * m), (faces.T.ravel(), np.tile(np.arange(m), 3))), shape=(n, m))


def _vertex_normals(v: np.ndarray, faces: np.ndarray, incidence: sparse.csr_matrix | None = None) -> np.ndarray:
    """Unit outward vertex normals (area-weighted mean of the adjacent face normals)."""
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    inc = _face_incidence(len(v), faces) if incidence is None else incidence
    n = inc @ fn
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _enclosed_volume(v: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed, outward-oriented triangle mesh (divergence theorem)."""
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.sum(a * np.cross(b, c)) / 6.0)


def _crossings(v: np.ndarray, faces: np.ndarray, axis: int):
    """Where the lines of grid points along ``axis`` cross the mesh ``v`` (voxel index units).

    Returns (column indices in the two other axes, crossing coordinate along ``axis``).
    """
    others = [a for a in range(3) if a != axis]
    tri = v[faces]                                   # (m, 3 vertices, 3 coords)
    p = tri[:, :, others]                            # projection onto the two other axes
    q = tri[:, :, axis]
    lo = np.ceil(p.min(axis=1)).astype(np.int64)     # first grid line inside each bounding box
    hi = np.floor(p.max(axis=1)).astype(np.int64)
    span = np.maximum(hi - lo + 1, 0)
    cols_i, cols_j, zs = [], [], []
    (x0, y0), (x1, y1), (x2, y2) = p[:, 0].T, p[:, 1].T, p[:, 2].T
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    ok = np.abs(det) > 1e-12
    for di in range(int(span[:, 0].max(initial=0))):
        for dj in range(int(span[:, 1].max(initial=0))):
            sel = np.nonzero(ok & (span[:, 0] > di) & (span[:, 1] > dj))[0]
            if sel.size == 0:
                continue
            gi = lo[sel, 0] + di
            gj = lo[sel, 1] + dj
            d = det[sel]
            w0 = ((y1[sel] - y2[sel]) * (gi - x2[sel]) + (x2[sel] - x1[sel]) * (gj - y2[sel])) / d
            w1 = ((y2[sel] - y0[sel]) * (gi - x2[sel]) + (x0[sel] - x2[sel]) * (gj - y2[sel])) / d
            w2 = 1.0 - w0 - w1
            hit = (w0 >= 0) & (w1 >= 0) & (w2 > 0)
            if not hit.any():
                continue
            s = sel[hit]
            cols_i.append(gi[hit])
            cols_j.append(gj[hit])
            zs.append(w0[hit] * q[s, 0] + w1[hit] * q[s, 1] + w2[hit] * q[s, 2])
    if not zs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(cols_i), np.concatenate(cols_j), np.concatenate(zs)


def _parity_fill(v: np.ndarray, faces: np.ndarray, shape: Sequence[int], axis: int):
    """Inside of a closed mesh by ray parity along ``axis``; also which columns had an odd count."""
    shape = tuple(int(s) for s in shape)
    others = [a for a in range(3) if a != axis]
    ci, cj, z = _crossings(v, faces, axis)
    n_ax = shape[axis]
    keep = (ci >= 0) & (ci < shape[others[0]]) & (cj >= 0) & (cj < shape[others[1]])
    ci, cj, z = ci[keep], cj[keep], z[keep]
    cols = (shape[others[0]], shape[others[1]])
    count = np.zeros(cols, np.int64)
    np.add.at(count, (ci, cj), 1)
    k = np.clip(np.ceil(z).astype(np.int64), 0, n_ax)  # a crossing at z flips every grid point above it
    flips = np.zeros(cols + (n_ax + 1,), np.int8)
    np.add.at(flips, (ci, cj, k), 1)
    inside = (np.cumsum(flips[..., :n_ax], axis=2, dtype=np.int32) % 2).astype(bool)
    inside = np.moveaxis(inside, 2, axis) if axis != 2 else inside
    # moveaxis above puts the ray axis back: others keep their order
    odd = (count % 2).astype(bool)
    return inside, odd


def mesh_to_mask(v: np.ndarray, faces: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxels (centres at integer index coordinates) inside a closed triangle mesh.

    ``v`` is in voxel index units. Ray parity along the last axis; the few columns whose ray
    grazes a mesh edge (odd crossing count) take the parity along the first axis instead.
    """
    inside, odd = _parity_fill(v, faces, shape, 2)
    if odd.any():
        alt, _ = _parity_fill(v, faces, shape, 0)
        inside[odd] = alt[odd]
    return inside


class _Trilinear:
    """Trilinear interpolation of a 3D image at points in mm (index * voxel size); zero outside."""

    def __init__(self, image: np.ndarray, voxel_size: np.ndarray):
        self.img = np.pad(np.asarray(image, dtype=np.float32), 1).ravel()  # a zero border
        self.shape = np.array(image.shape) + 2
        self.strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1])
        self.vs = np.asarray(voxel_size, dtype=np.float64)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        x = points_mm / self.vs + 1.0                             # index in the padded image
        x = np.clip(x, 0.0, self.shape - 1.000001)                # beyond the grid: the zero border
        i0 = np.minimum(x.astype(np.int64), self.shape - 2)
        f = (x - i0).astype(np.float32)
        base = i0 @ self.strides
        out = np.zeros(len(x), np.float32)
        for dx in (0, 1):
            wx = f[:, 0] if dx else 1.0 - f[:, 0]
            for dy in (0, 1):
                wy = wx * (f[:, 1] if dy else 1.0 - f[:, 1])
                off = base + dx * self.strides[0] + dy * self.strides[1]
                out += wy * ((1.0 - f[:, 2]) * self.img[off] + f[:, 2] * self.img[off + 1])
        return out


def bet_surface(image: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                fractional_threshold: float = 0.5, iterations: int = 1000, subdivisions: int = 4,
                tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray, dict]:
    """The BET brain surface of a 3D image (vertices in mm, index * voxel size, and triangles).

    Parameters
    ----------
    image : ndarray, (x, y, z)
        Magnitude image (any scale), e.g. the first GRE echo.
    voxel_size : 3 floats
        Voxel size in mm.
    fractional_threshold : float
        BET's ``bt`` (0..1): smaller values give a larger surface.
    iterations : int
        Most surface updates (BET: 1000).
    subdivisions : int
        Subdivisions of the icosahedron (4: 2562 vertices, as BET).
    tol : float
        Stop early when the enclosed volume changed by less than this fraction over each of the
        last four intervals of :data:`CHECK_EVERY` iterations (0: always run ``iterations``).

    Returns
    -------
    vertices : ndarray (n, 3) float64, mm
    faces : ndarray (m, 3) int
    info : dict
        ``iterations`` run, ``volume_ml`` enclosed, ``t2``, ``t98``, ``tm``, ``centre_mm``,
        ``radius_mm`` (initial head radius estimate)
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    vs = np.asarray(voxel_size, dtype=np.float64)
    st = _start(img, vs)
    sphere, faces = icosphere(subdivisions)
    v = st["centre_mm"] + 0.5 * st["radius_mm"] * sphere  # half the head radius, at the centre of gravity
    mesh = _Mesh(faces, len(v))
    sample = _Trilinear(img, vs)
    d_in = np.arange(0.0, D1_MM + 1e-9, float(vs.min()))  # sample depths along the inward normal (mm)
    vols, done = [], iterations
    for it in range(iterations):
        if it % CHECK_EVERY == 0:  # converged: the enclosed volume changed < tol over 4 checks
            vols.append(_enclosed_volume(v, faces))
            if tol > 0 and len(vols) > 4 and all(abs(vols[-1] / x - 1.0) < tol for x in vols[-5:-1]):
                done = it
                break
        v = _update(v, mesh, sample, d_in, st, float(fractional_threshold))
    info = {"iterations": done, "volume_ml": _enclosed_volume(v, faces) / 1000.0,
            **{k: st[k] for k in ("t2", "t98", "tm", "radius_mm")}, "centre_mm": st["centre_mm"].tolist()}
    return v, faces, info


def _start(img: np.ndarray, vs: np.ndarray) -> dict:
    """BET's start: robust range ``t2``/``t98``, ``t``, centre of gravity, head radius, median ``tm``.

    The centre of gravity weighs the voxels above ``t`` by their intensity (clipped at ``t98``);
    the radius is that of a sphere of the volume above ``t``; ``tm`` is the median of the voxels
    between ``t2`` and ``t98`` inside that sphere.
    """
    t2, t98 = (float(x) for x in np.percentile(_subsample(img), (2, 98)))
    if t98 <= t2:
        raise InputDataError("brain extraction: the magnitude has no contrast (2nd and 98th percentiles are "
                             "equal); give a magnitude image of the head")
    t = t2 + 0.1 * (t98 - t2)
    above = img > t
    w = np.where(above, np.minimum(img, t98), 0.0).astype(np.float64)
    total = float(w.sum())
    others = [tuple(a for a in range(3) if a != k) for k in range(3)]
    centre = np.array([float(w.sum(axis=others[k]) @ np.arange(img.shape[k])) / total for k in range(3)]) * vs
    radius = (3.0 * float(above.sum()) * float(np.prod(vs)) / (4.0 * np.pi)) ** (1.0 / 3.0)
    grids = np.ogrid[tuple(slice(0, n) for n in img.shape)]
    inner = sum((g * vs[k] - centre[k]) ** 2 for k, g in enumerate(grids)) <= radius ** 2
    inner &= (img > t2) & (img < t98)
    tm = float(np.median(img[inner])) if inner.any() else t98
    return {"t2": t2, "t98": t98, "t": t, "tm": tm, "centre_mm": centre, "radius_mm": radius}


def _subsample(x: np.ndarray, max_size: int = 2_000_000) -> np.ndarray:
    """A regular subsample (every k-th voxel per axis) of at most about ``max_size`` values."""
    k = 1
    while x.size / k ** 3 > max_size:
        k += 1
    return x[::k, ::k, ::k] if k > 1 else x


class _Mesh:
    """Fixed connectivity of the surface: neighbour mean, vertex-face incidence, edges."""

    def __init__(self, faces: np.ndarray, n: int):
        self.faces = faces
        self.neighbour_mean = _neighbour_mean_operator(n, faces)
        self.incidence = _face_incidence(n, faces)
        e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        self.edges = np.unique(np.sort(e, axis=1), axis=0)


def _update(v: np.ndarray, mesh: _Mesh, sample: _Trilinear, d_in: np.ndarray, st: dict, bt: float) -> np.ndarray:
    """One BET iteration: tangential, curvature-weighted normal and intensity forces (Smith 2002)."""
    n = _vertex_normals(v, mesh.faces, mesh.incidence)
    s = mesh.neighbour_mean @ v - v
    sn_len = np.sum(s * n, axis=1)
    sn = sn_len[:, None] * n
    s_t = s - sn
    # smoothness: weight f2 from the local curvature 1/r = 2 |s_n| / l^2 (l = mean vertex spacing)
    l_mean = float(np.mean(np.linalg.norm(v[mesh.edges[:, 0]] - v[mesh.edges[:, 1]], axis=1)))
    e_c = 0.5 * (1.0 / R_MIN_MM + 1.0 / R_MAX_MM)
    f_c = 6.0 / (1.0 / R_MIN_MM - 1.0 / R_MAX_MM)
    f2 = 0.5 * (1.0 + np.tanh(f_c * (2.0 * np.abs(sn_len) / max(l_mean * l_mean, 1e-12) - e_c)))
    # intensity: I_min over d1 and I_max over d1/2 inward give the local threshold t_l
    prof = sample((v[:, None, :] - d_in[None, :, None] * n[:, None, :]).reshape(-1, 3)).reshape(len(v), len(d_in))
    n_half = int(np.searchsorted(d_in, 0.5 * D1_MM, side="right"))
    t2, tm = st["t2"], st["tm"]
    i_min = np.clip(prof.min(axis=1), t2, tm)
    i_max = np.clip(prof[:, :n_half].max(axis=1), st["t"], tm)
    t_l = t2 + bt * (i_max - t2)
    f3 = 2.0 * (i_min - t_l) / np.maximum(i_max - t2, 1e-12)
    return v + 0.5 * s_t + f2[:, None] * sn + (INTENSITY_STEP * l_mean * f3)[:, None] * n


def brain_mask(magnitude: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
               fractional_threshold: float = 0.5, margin_mm: float = 1.0, iterations: int = 1000,
               subdivisions: int = 4, tol: float = 1e-4, return_info: bool = False):
    """Brain mask from a magnitude image: BET surface, moved ``margin_mm`` inward, filled.

    Parameters
    ----------
    magnitude : ndarray, (x, y, z)
        Magnitude image (any scale), e.g. the first GRE echo.
    voxel_size : 3 floats
        Voxel size in mm (anisotropic allowed).
    fractional_threshold : float
        BET's fractional intensity threshold ``bt`` in (0, 1); smaller gives a larger mask.
    margin_mm : float
        Inward move of the final surface along its normals (mm; negative moves it outward).
    iterations, subdivisions, tol
        See :func:`bet_surface`.
    return_info : bool
        Also return a dict with the surface statistics.

    Returns
    -------
    ndarray of bool, (x, y, z), and the info dict when ``return_info``.

    References
    ----------
    S. M. Smith, Fast robust automated brain extraction, Hum. Brain Mapp. 17:143-155 (2002).
    """
    m = np.asarray(magnitude, dtype=np.float32)
    if m.ndim != 3:
        raise InputDataError(f"brain_mask: magnitude must be 3D (x, y, z), got shape {m.shape}; pass one echo")
    if not 0.0 < fractional_threshold < 1.0:
        raise ParameterError(f"brain_mask: fractional_threshold = {fractional_threshold} must lie in (0, 1)")
    vs = np.asarray(voxel_size, dtype=np.float64)
    v, faces, info = bet_surface(m, vs, fractional_threshold, iterations, subdivisions, tol)
    mask = surface_to_mask(v, faces, m.shape, vs, margin_mm)
    info["vertices_mm"] = v
    info["faces"] = faces
    return (mask, info) if return_info else mask


def surface_to_mask(vertices_mm: np.ndarray, faces: np.ndarray, shape: Sequence[int],
                    voxel_size: Sequence[float], margin_mm: float = 0.0) -> np.ndarray:
    """Voxels inside a closed surface (vertices in mm, index * voxel size) moved ``margin_mm`` inward."""
    vs = np.asarray(voxel_size, dtype=np.float64)
    v = np.asarray(vertices_mm, dtype=np.float64)
    if margin_mm:
        v = v - margin_mm * _vertex_normals(v, faces)
    return mesh_to_mask(v / vs, faces, shape)
