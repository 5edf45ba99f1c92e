"""``KSpaceData``: the in-memory multi-coil k-space artifact shared by the k-space stages.

Every reader produces the same layout, whatever the file's: ``data`` is complex64 with shape
``(slices, coils, H, W)``, where each slice is an independent 2D Cartesian problem over the last
two axes (fastMRI: ``H`` = readout, ``W`` = phase encoding; skm-tea: one readout position ``x``
of the hybrid ``(x, ky, kz)`` k-space, ``H`` = ky, ``W`` = kz). The DC sample of each slice sits
at index ``(H // 2, W // 2)`` (centred orthonormal FFT convention, DESIGN.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit import Volume

__all__ = ["KSpaceData", "to_volume", "from_volume"]


@dataclass
class KSpaceData:
    """Multi-coil Cartesian k-space of one volume (the ``kspace`` artifact).

    Attributes
    ----------
    data : ndarray, complex64, (slices, coils, H, W)
        k-space, DC at ``(H // 2, W // 2)``; unsampled samples are 0.
    layout : str
        ``"fastmri"`` or ``"skmtea"`` (the file layout it came from).
    slice_indices : tuple of int
        Indices of the slices in the file (fastMRI slice number, skm-tea readout position x).
    voxel_size : 3 floats
        mm of the full image grid as ``(H, W, slice)`` spacing.
    crop_size : (int, int) or None
        Image-space centre crop ``(H, W)`` for outputs and evaluation (fastMRI: the header's
        recon matrix, e.g. 320 x 320); ``None`` keeps the full grid.
    padding : (int, int) or None
        fastMRI ``padding_left``, ``padding_right``: acquired phase-encoding columns are
        ``[left, right)``; masks are zeroed outside, as fastMRI's ``apply_mask`` does.
    header : dict
        Header values (encoding/recon sizes, FOV in mm, file attributes such as ``max``,
        ``norm``, ``acquisition``, ``acceleration``, ``num_low_frequencies``).
    source : Path or None
        File it was read from.
    echo : int or None
        Echo index (skm-tea).
    """

    data: np.ndarray
    layout: str = "fastmri"
    slice_indices: tuple = ()
    voxel_size: tuple = (1.0, 1.0, 1.0)
    crop_size: tuple | None = None
    padding: tuple | None = None
    header: dict = field(default_factory=dict)
    source: Path | None = None
    echo: int | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"KSpaceData.data must be (slices, coils, H, W), got shape {self.data.shape}")
        if not self.slice_indices:
            self.slice_indices = tuple(range(self.data.shape[0]))

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.data.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return int(self.data.shape[2]), int(self.data.shape[3])

    @property
    def slice_axis(self) -> int:
        """Axis of the slices in output Volumes: 2 for fastMRI (x, y, slice), 0 for skm-tea (x, y, z)."""
        return 0 if self.layout == "skmtea" else 2

    def with_data(self, data: np.ndarray, **changes: Any) -> "KSpaceData":
        """A copy with other k-space samples (same geometry and header)."""
        return replace(self, data=np.asarray(data), **changes)

    def __repr__(self) -> str:  # keep logs short (never print the array)
        return (f"KSpaceData(layout={self.layout!r}, shape={tuple(self.data.shape)}, "
                f"slices={list(self.slice_indices)[:4]}{'...' if self.n_slices > 4 else ''}, "
                f"voxel_size={tuple(round(v, 4) for v in self.voxel_size)}, crop={self.crop_size})")


def _volume_voxel_size(kd: KSpaceData) -> tuple[float, float, float]:
    vh, vw, vs = (float(v) for v in kd.voxel_size)
    return (vs, vh, vw) if kd.slice_axis == 0 else (vh, vw, vs)


def to_volume(images: np.ndarray, kd: KSpaceData, units: str = "a.u.", **meta: Any) -> Volume:
    """Slice-first images ``(slices, H, W[, n])`` -> a qsmkit Volume on the k-space's grid.

    fastMRI: Volume axes ``(H, W, slice)``; skm-tea: ``(x, y, z)`` = ``(slice, H, W)``. The
    affine is diagonal with the voxel size in mm (FOV / matrix, from the header) and centred.
    """
    images = np.asarray(images)
    if kd.slice_axis == 2:
        order = (1, 2, 0) + tuple(range(3, images.ndim))
        images = np.transpose(images, order)
    return Volume.from_array(np.ascontiguousarray(images), _volume_voxel_size(kd), units=units,
                             b0_direction=(0.0, 0.0, 1.0), **meta)


def from_volume(vol: Volume | np.ndarray, kd: KSpaceData) -> np.ndarray:
    """Inverse of :func:`to_volume`: Volume data -> slice-first ``(slices, H, W[, n])``."""
    a = np.asarray(vol.data if isinstance(vol, Volume) else vol)
    if kd.slice_axis == 2:
        order = (2, 0, 1) + tuple(range(3, a.ndim))
        a = np.transpose(a, order)
    return a


def parse_slices(spec: Any, n_total: int, where: str = "slices") -> list[int]:
    """Slice selection from YAML: ``None`` (all), an int, a list of ints, or ``"a:b[:step]"``."""
    from qsmkit.errors import ConfigError

    if spec is None or spec == "all":
        return list(range(n_total))
    if isinstance(spec, (bool, float)):
        raise ConfigError(f"{where} = {spec!r}: give an index, a list of indices or 'start:stop'")
    if isinstance(spec, int):
        idx = [spec]
    elif isinstance(spec, str):
        try:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) == 1:
                idx = [parts[0]]
            elif 2 <= len(parts) <= 3:
                idx = list(range(n_total))[slice(*parts)]
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{where} = {spec!r} is not understood; use e.g. 5, [3, 4, 5] or '10:20'") from None
    elif isinstance(spec, Sequence):
        idx = []
        for v in spec:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"{where} = {spec!r}: every entry must be an integer slice index")
            idx.append(int(v))
    else:
        raise ConfigError(f"{where} = {spec!r} is not understood; use e.g. 5, [3, 4, 5] or '10:20'")
    out = []
    for i in idx:
        j = i + n_total if i < 0 else i
        if not 0 <= j < n_total:
            raise ConfigError(f"{where}: slice {i} is outside the file's {n_total} slices (0..{n_total - 1})")
        out.append(j)
    if not out:
        raise ConfigError(f"{where} = {spec!r} selects no slice of the file's {n_total}")
    return out
