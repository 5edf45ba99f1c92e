"""``Volume``: an array with its geometry (affine, voxel size, B0 direction), units and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .physics import b0_direction_from_affine, voxel_sizes


@dataclass
class Volume:
    """A 3D or 4D image on a voxel grid.

    Attributes
    ----------
    data : numpy.ndarray
        Image array, shape (x, y, z) or (x, y, z, n) (e.g. n echoes).
    affine : numpy.ndarray
        4x4 voxel -> world (scanner, mm) transform, as nibabel returns it (sform first).
    units : str
        Units of ``data``: ``"ppm"``, ``"rad"``, ``"a.u."``, ``"bool"``, ...
    b0_direction : numpy.ndarray
        Unit B0 direction in the voxel frame (see :func:`qsmkit.physics.b0_direction_from_affine`).
    header : nibabel header or None
        Header of the file this volume (or the volume it was derived from) came from; writing
        keeps its sform/qform codes and fields, so outputs share the input's geometry exactly.
    meta : dict
        Free metadata (echo times, field strength, source path, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    units: str = ""
    b0_direction: np.ndarray | None = None
    header: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.b0_direction is None:
            self.b0_direction = b0_direction_from_affine(self.affine)
        else:
            b = np.asarray(self.b0_direction, dtype=np.float64)
            self.b0_direction = b / np.linalg.norm(b)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """Voxel edge lengths in mm, from the affine."""
        return tuple(float(v) for v in voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The spatial (first three) dimensions."""
        return tuple(self.data.shape[:3])

    def like(self, data: np.ndarray, units: str | None = None, **meta: Any) -> "Volume":
        """A new volume on the same grid and geometry with other data (and optionally units)."""
        data = np.asarray(data)
        if tuple(data.shape[:3]) != self.grid_shape:
            raise ValueError(f"like(): grid {data.shape[:3]} differs from {self.grid_shape}")
        new_meta = {**self.meta, **meta}
        return replace(self, data=data, units=self.units if units is None else units,
                       b0_direction=np.array(self.b0_direction), meta=new_meta)

    @classmethod
    def from_array(cls, data: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                   units: str = "", b0_direction: Sequence[float] | None = None, **meta: Any) -> "Volume":
        """A volume with a diagonal affine of ``voxel_size`` (mm) centred on the grid."""
        vs = np.asarray(voxel_size, dtype=np.float64)
        aff = np.diag(np.r_[vs, 1.0])
        aff[:3, 3] = -vs * (np.asarray(np.shape(data)[:3]) - 1) / 2.0
        return cls(np.asarray(data), aff, units=units, b0_direction=b0_direction, meta=dict(meta))


def field_and_mask(field: Volume, mask: Volume, field_name: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The 3D float data of ``field`` and the boolean ``mask`` of a stage, checked (one-line errors).

    A trailing axis of length 1 is dropped; the grids must agree, the mask must not be empty and
    the field must be finite inside it. ``label`` (e.g. ``background/sharp``) names the stage.
    """
    from .errors import GeometryError, InputDataError, StageError

    f = np.asarray(field.data)
    if f.ndim == 4 and f.shape[3] == 1:
        f = f[..., 0]
    if f.ndim != 3:
        raise InputDataError(f"{field_name} must be 3D, got shape {f.shape}")
    m = np.asarray(mask.data) > 0
    if m.shape != f.shape:
        raise GeometryError(f"mask grid {m.shape} differs from the {field_name} grid {f.shape}; "
                            f"resample the mask onto the field grid")
    if not m.any():
        raise StageError(f"{label}: the mask is empty; check the mask stage or mask file")
    if not np.all(np.isfinite(f[m])):
        raise InputDataError(f"{field_name} has NaN or infinite values inside the mask; fix the input field")
    return f, m
