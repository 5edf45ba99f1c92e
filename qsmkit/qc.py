"""Quality-control pictures of one run: orthogonal views of χ, the local field and the mask.

Each picture is one PNG with three panels (axial, coronal, sagittal) through the centre of the
mask's bounding box, in the neurological convention: the volume is first reoriented to the
closest RAS axes, so the subject's right is on the picture's right, anterior is up in the axial
view and superior is up in the others; the voxel aspect ratio is kept.

``qc_chi.png``
    χ in ppm, grey scale, **fixed window** :data:`CHI_WINDOW_PPM` = −0.1 … 0.2 ppm (the same in
    every run, so pictures of a cohort compare by eye: deep grey matter bright, white matter a
    little darker than cortex, veins white). Voxels outside the mask are shown as 0 ppm.
``qc_local_field.png``
    local field in ppm, diverging colour map, **symmetric window** ±w with ``w`` the
    :data:`FIELD_PERCENTILE` th percentile of ``|field|`` inside the mask (robust to a few
    extreme voxels at the mask edge or near a vein); ``w`` is printed in the title.
``qc_mask.png``
    the first echo's magnitude (grey, 0 … its 99th percentile) with the mask outline in red: a
    mask that cuts into brain or leaks into the skull shows at a glance.

A picture is drawn only when its artifacts exist as 3D (or, for the magnitude, 4D) volumes on one
grid and, in a run, when the run computed its subject (χ, the local field, the mask) rather than
being given it as an input. matplotlib is imported only here, with its non-interactive Agg backend through the
object-oriented API (no pyplot, no display needed); ``qsmkit --help`` never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .volume import Volume

__all__ = ["CHI_WINDOW_PPM", "FIELD_PERCENTILE", "QC_FILES", "Picture", "field_window", "orthogonal_views",
           "qc_pictures", "write_qc"]

#: display window of χ in ppm (fixed, the same for every run)
CHI_WINDOW_PPM = (-0.1, 0.2)
#: percentile of |local field| in the mask that sets the symmetric field window
FIELD_PERCENTILE = 99.0
#: picture file -> the artifacts it needs (the last one is its subject)
QC_FILES: dict[str, tuple[str, ...]] = {
    "qc_chi.png": ("chi",),
    "qc_local_field.png": ("local_field",),
    "qc_mask.png": ("magnitude", "mask"),
}
_VIEWS = ("axial", "coronal", "sagittal")


def _canonical(vol: Volume, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (first 3 axes on ``vol``'s grid) reoriented to the closest RAS axes; returns (data, voxel size)."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(vol.affine)
    vs = np.asarray(vol.voxel_size, float)[ornt[:, 0].astype(int)]
    return apply_orientation(data, ornt), vs


def orthogonal_views(data: np.ndarray, voxel_size, centre=None) -> dict[str, tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices of a RAS-ordered 3D array for display.

    Returns ``{view: (image, aspect)}``; each image is indexed ``[row, column]`` with row 0 at the
    bottom (draw with ``origin="lower"``) and ``aspect`` is the height/width ratio of one pixel.
    ``centre`` is the voxel index (i, j, k) the slices go through (default: the grid centre).
    """
    a = np.asarray(data)
    if a.ndim != 3:
        raise ValueError(f"orthogonal_views needs a 3D array, got shape {a.shape}")
    i, j, k = (np.asarray(a.shape) // 2) if centre is None else (int(c) for c in centre)
    vx, vy, vz = (float(v) for v in voxel_size)
    return {
        "axial": (a[:, :, k].T, vy / vx),      # x right, y (anterior) up
        "coronal": (a[:, j, :].T, vz / vx),    # x right, z (superior) up
        "sagittal": (a[i, :, :].T, vz / vy),   # y (anterior) right, z up
    }


def _mask_centre(mask: np.ndarray | None, shape) -> tuple[int, int, int]:
    if mask is None or not mask.any():
        return tuple(int(s) // 2 for s in shape)
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    return tuple(int((ix[0] + ix[-1]) // 2) for ix in idx)


def field_window(field: np.ndarray, mask: np.ndarray | None, percentile: float = FIELD_PERCENTILE) -> float:
    """Half-width (ppm) of the symmetric local-field window: the ``percentile`` of |field| in the mask."""
    vals = np.abs(field[mask]) if mask is not None and mask.any() else np.abs(field).ravel()
    vals = vals[np.isfinite(vals)]
    w = float(np.percentile(vals, percentile)) if vals.size else 0.0
    return w if w > 0 else 1e-3


def _figure(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.9), dpi=100)
    fig.suptitle(title, fontsize=11)
    return fig


def _draw(fig, views: dict, *, cmap: str, vmin: float, vmax: float, label: str, outline: dict | None = None):
    axes = fig.subplots(1, 3)
    im = None
    for ax, name in zip(axes, _VIEWS):
        img, aspect = views[name]
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect=aspect,
                       interpolation="nearest")
        if outline is not None:
            m = outline[name][0].astype(np.float32)
            if 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])  # no tick objects at all (set_axis_off still builds and measures them)
        ax.set_yticks([])
        ax.set_frame_on(False)
    cbar = fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.02)
    cbar.set_label(label, fontsize=9)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", facecolor="white")


def _vol(artifacts: Mapping[str, Any], name: str) -> Volume | None:
    v = artifacts.get(name)
    return v if isinstance(v, Volume) else None


@dataclass
class Picture:
    """What one QC picture shows, ready to draw: the three views and the display window."""

    file: str
    title: str
    views: dict  # {"axial"|"coronal"|"sagittal": (2D image, pixel aspect)}, see orthogonal_views
    cmap: str
    vmin: float
    vmax: float
    label: str
    outline: dict | None = None  # the mask's views, drawn as a red contour


def qc_pictures(artifacts: Mapping[str, Any], title: str = "") -> list[Picture]:
    """The QC pictures (see the module docstring) that a run's artifacts allow, not yet drawn.

    Parameters
    ----------
    artifacts : mapping
        The run's final artifacts: ``chi`` (ppm), ``local_field`` (ppm), ``magnitude`` (3D or 4D,
        the first echo is drawn) and ``mask`` as :class:`~qsmkit.volume.Volume`.
    title : str
        Prefix of each picture's title (e.g. the pipeline name).
    """
    vols = [_vol(artifacts, n) for n in ("chi", "local_field", "magnitude", "mask")]
    grid = next((v.grid_shape for v in vols if v is not None), None)
    if grid is None:
        return []
    mask_v = _vol(artifacts, "mask")
    mask = None
    if mask_v is not None and mask_v.grid_shape == grid and mask_v.data.ndim == 3:
        mask = np.asarray(mask_v.data) > 0.5
    prefix = f"{title}: " if title else ""
    out: list[Picture] = []

    def views_of(v: Volume, data: np.ndarray):
        d, vs = _canonical(v, data)
        mc = _canonical(v, mask)[0] if mask is not None else None
        centre = _mask_centre(mc, d.shape)
        return orthogonal_views(d, vs, centre), (orthogonal_views(mc, vs, centre) if mc is not None else None)

    def inside(data: np.ndarray) -> np.ndarray:
        return np.where(mask, data, np.float32(0)) if mask is not None else data

    chi = _vol(artifacts, "chi")
    if chi is not None and chi.data.ndim == 3 and chi.grid_shape == grid:
        views, _ = views_of(chi, inside(np.asarray(chi.data, np.float32)))
        lo, hi = CHI_WINDOW_PPM
        out.append(Picture("qc_chi.png", f"{prefix}χ (ppm), window {lo:g} … {hi:g} ppm", views, "gray", lo, hi,
                           "χ (ppm)"))

    lf = _vol(artifacts, "local_field")
    if lf is not None and lf.data.ndim == 3 and lf.grid_shape == grid:
        data = np.asarray(lf.data, np.float32)
        w = field_window(data, mask)
        views, _ = views_of(lf, inside(data))
        out.append(Picture("qc_local_field.png", f"{prefix}local field (ppm), window ±{w:.3g} ppm "
                           f"(p{FIELD_PERCENTILE:g} of |field| in the mask)", views, "RdBu_r", -w, w,
                           "local field (ppm)"))

    mag = _vol(artifacts, "magnitude")
    if mag is not None and mask is not None and mag.grid_shape == grid:
        data = np.asarray(mag.data[..., 0] if mag.data.ndim == 4 else mag.data, np.float32)
        finite = data[np.isfinite(data)]
        hi = float(np.percentile(finite, 99.0)) if finite.size else 1.0
        views, outline = views_of(mag, data)
        out.append(Picture("qc_mask.png", f"{prefix}magnitude (echo 1) with the mask outline (red), "
                           f"{int(mask.sum())} voxels", views, "gray", 0.0, hi if hi > 0 else 1.0,
                           "magnitude (a.u.)", outline))
    return out


def write_qc(artifacts: Mapping[str, Any], folder: str | Path, title: str = "",
             produced: set[str] | None = None) -> list[str]:
    """Draw the QC pictures of :func:`qc_pictures` into ``folder`` as PNGs.

    With ``produced`` (the artifacts the run computed), a picture is drawn only when its subject
    (χ, the local field, the mask) is one of them: a run that is given a local field and inverts it
    gets the χ picture, not a picture of its own input. A run writes the pictures into its staging
    folder, so they are committed (or discarded) with the other outputs and listed in
    ``provenance.json``. Returns the file names written, in :data:`QC_FILES` order.
    """
    folder = Path(folder)
    written: list[str] = []
    for pic in qc_pictures(artifacts, title):
        if produced is not None and QC_FILES[pic.file][-1] not in produced:
            continue
        fig = _figure(pic.title)
        _draw(fig, pic.views, cmap=pic.cmap, vmin=pic.vmin, vmax=pic.vmax, label=pic.label, outline=pic.outline)
        _save(fig, folder / pic.file)
        written.append(pic.file)
    return written
