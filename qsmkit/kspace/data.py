"""The ``kspace`` artifact (:class:`KSpaceData`), its Volume conversions, and the checks every k-space stage makes.

Part of the public :mod:`qsmkit.kspace` module (import from there); see its docstring for the
artifacts' shapes, dtypes and units.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import GeometryError, InputDataError, MissingArtifactError, StageError
from ..volume import Volume

__all__ = ["KSpaceData", "to_volume", "from_volume", "require_kspace", "check_sampling_mask", "is_out_of_memory",
           "kspace_memory_errors"]


# ------------------------------------------------------------------------------------ the artifact
@dataclass
class KSpaceData:
    """Multi-coil Cartesian k-space of one volume (the ``kspace`` artifact).

    Every reader produces this layout, whatever the file's (fastMRI: ``H`` = readout, ``W`` =
    phase encoding; skm-tea: one readout position ``x`` of the hybrid ``(x, ky, kz)`` k-space,
    ``H`` = ky, ``W`` = kz).

    Attributes
    ----------
    data : ndarray, complex64, (slices, coils, H, W)
        k-space, DC at ``(H // 2, W // 2)``; unsampled samples are 0.
    layout : str
        ``"fastmri"`` or ``"skmtea"`` (the file layout it came from; decides the output axes).
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
            raise InputDataError(f"KSpaceData.data must be (slices, coils, H, W), got shape {self.data.shape}")
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


# ------------------------------------------------------------------------------------------ checks
def require_kspace(ctx, label: str) -> KSpaceData:
    """The ``kspace`` artifact as :class:`KSpaceData`, or a one-line error if no reader ran first."""
    kd = ctx["kspace"]
    if not isinstance(kd, KSpaceData):
        raise MissingArtifactError(f"stage {label} needs k-space data but 'kspace' is {type(kd).__name__}; "
                                   f"add a kspace_read stage first")
    return kd


def check_sampling_mask(mask: Any, kd: KSpaceData, where: str) -> np.ndarray:
    """Validate a sampling mask against the k-space grid: bool ``(H|1, W|1)`` or ``(S, H|1, W|1)``."""
    m = np.asarray(mask)
    H, W = kd.image_shape
    if m.ndim == 1:
        m = m[None, :]
    ok = m.ndim in (2, 3) and m.shape[-2] in (1, H) and m.shape[-1] in (1, W) and (
        m.ndim == 2 or m.shape[0] in (1, kd.n_slices))
    if not ok:
        raise GeometryError(f"{where}: sampling mask of shape {np.shape(mask)} does not match the k-space slices "
                            f"({kd.n_slices} x {H} x {W}); a column mask must have {W} entries")
    return m != 0


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: numpy's MemoryError or torch's (CPU or CUDA) RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


@contextmanager
def kspace_memory_errors(label: str, shape: Sequence[int], source: str | Path | None = None,
                         n_slices: int | None = None, batch_param: bool = False) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into a one-line :class:`StageError`.

    The message names the k-space ``shape`` (and ``source`` file) and suggests reading fewer
    slices with ``inputs.slices`` (``n_slices``: how many the block works on; default
    ``shape[0]``) and, with ``batch_param``, lowering ``params.batch_slices``.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        dims = " x ".join(str(int(s)) for s in shape)
        src = f" of {Path(source).name}" if source is not None else ""
        n = int(n_slices) if n_slices is not None else int(shape[0]) if len(shape) else 0
        example = f"0:{max(1, n // 4)}" if n > 1 else "0"
        batch = " or lower params.batch_slices" if batch_param else ""
        raise StageError(f"{label}: out of memory on the k-space ({dims}){src}, {n} slice(s); read fewer slices "
                         f"with inputs.slices (e.g. --set inputs.slices={example}){batch}") from None
