"""Checks of what an HDF5 file's datasets claim, made before anything is read.

A dataset's shape is only a claim: a small file can hold a chunked dataset that was never
written, or one resized (``maxshape``) far beyond its data, claiming terabytes. Reading it would
allocate what it claims. The readers therefore check, for every dataset they read:

- the shape has no empty axis (and a dataspace at all);
- the claimed size (elements x dtype itemsize) can be in the file: uncompressed data cannot be
  larger than the file, and data compressed with the standard filters (deflate, shuffle,
  fletcher32, LZF) not larger than :data:`MAX_COMPRESSION_RATIO` times the bytes stored
  (deflate expands at most about 1032:1); virtual and external datasets are not bounded by
  this file and are left to the memory check;
- what a read would allocate (the selected slices) fits in the available memory;

and the k-space readers check that each slice has at least :data:`MIN_IMAGE_SAMPLES` samples
along both image axes. Each failure is a one-line :class:`~qsmkit.errors.InputDataError` that
names the file, the dataset and the claimed shape.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Sequence

from qsmkit.errors import InputDataError

__all__ = ["MAX_COMPRESSION_RATIO", "MIN_IMAGE_SAMPLES", "check_dataset", "check_image_axes", "check_memory",
           "claimed_nbytes", "format_bytes"]

#: largest plausible ratio of claimed to stored bytes for the standard HDF5 filters
MAX_COMPRESSION_RATIO = 1100
#: HDF5 filter ids whose expansion is bounded by :data:`MAX_COMPRESSION_RATIO`
#: (deflate 1, shuffle 2, fletcher32 3, LZF 32000)
_BOUNDED_FILTERS = frozenset({1, 2, 3, 32000})
#: fewest k-space samples along each image axis of a slice (smaller is not an image to reconstruct)
MIN_IMAGE_SAMPLES = 8


def format_bytes(n: int) -> str:
    """``"3.2 TiB"``-style size for messages."""
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.1f} {unit}"
    return f"{int(n)} bytes"


def claimed_nbytes(ds) -> int:
    """Bytes the dataset claims: elements x itemsize (exact Python integers, no overflow)."""
    return prod(int(s) for s in (ds.shape or ())) * int(ds.dtype.itemsize)


def _filters(ds) -> list[int]:
    plist = ds.id.get_create_plist()
    return [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def check_dataset(ds, path: str | Path, name: str | None = None) -> tuple[int, ...]:
    """Check one dataset's claimed shape against the file (see the module docstring); returns the shape."""
    path = Path(path)
    name = name or ds.name.lstrip("/")
    where = f"{path.name}: dataset '{name}'"
    if ds.shape is None:
        raise InputDataError(f"{where} has no dataspace (it holds no data); the file is corrupt")
    shape = tuple(int(s) for s in ds.shape)
    if any(s == 0 for s in shape):
        raise InputDataError(f"{where} claims shape {_shape_text(shape)}, with an empty axis; the file holds no "
                             f"data there - was it written completely?")
    claimed = claimed_nbytes(ds)
    if getattr(ds, "is_virtual", False) or getattr(ds, "external", None):
        return shape  # data in other files: only the memory check applies
    filters = _filters(ds)
    file_size = path.stat().st_size
    stored = int(ds.id.get_storage_size())
    if not filters and claimed > file_size:
        raise InputDataError(f"{where} claims shape {_shape_text(shape)} {ds.dtype} ({format_bytes(claimed)}) but the "
                             f"file is only {format_bytes(file_size)}; the file is truncated or corrupt, or the "
                             f"dataset was never written")
    if filters and set(filters) <= _BOUNDED_FILTERS and claimed > max(stored, 1) * MAX_COMPRESSION_RATIO:
        raise InputDataError(f"{where} claims shape {_shape_text(shape)} {ds.dtype} ({format_bytes(claimed)}) but only "
                             f"{format_bytes(stored)} are stored (more than {MAX_COMPRESSION_RATIO}:1 compression); "
                             f"the file is truncated or corrupt, or the dataset was never written")
    return shape


def check_image_axes(path: str | Path, name: str, shape: Sequence[int], layout: str, h: int, w: int) -> None:
    """Refuse k-space whose slices have fewer than :data:`MIN_IMAGE_SAMPLES` samples along an image axis."""
    if min(int(h), int(w)) < MIN_IMAGE_SAMPLES:
        raise InputDataError(f"{Path(path).name}: dataset '{name}' has shape {_shape_text(shape)} {layout}, i.e. "
                             f"{int(h)} x {int(w)} samples per slice; k-space needs at least {MIN_IMAGE_SAMPLES} "
                             f"samples along each image axis - check the file's axis order")


def check_memory(nbytes: int, path: str | Path, what: str, n_slices: int) -> None:
    """Refuse a read of ``nbytes`` that does not fit in the available memory (before allocating)."""
    from qsmkit.io.nifti import available_memory

    avail = available_memory()
    if avail is not None and nbytes > avail:
        example = f"0:{max(1, n_slices // 4)}" if n_slices > 1 else "0"
        raise InputDataError(f"{Path(path).name}: reading {what} needs {format_bytes(nbytes)} of memory but "
                             f"{format_bytes(avail)} are available; read fewer slices with inputs.slices "
                             f"(e.g. --set inputs.slices={example})")
