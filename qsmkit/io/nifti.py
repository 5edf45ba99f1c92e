"""NIfTI input/output on nibabel with exact geometry.

Outputs keep the source header (sform/qform codes, srow, quaternion, pixdim), so an output's
affine and codes equal the input's bit for bit; data are written as float32 (masks as uint8).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeometryError, InputDataError, QsmkitWarning
from ..volume import Volume
from .atomic import atomic_path


#: rotation (degrees) between a file's sform and qform above which the choice changes B0 materially
QFORM_SFORM_TOLERANCE_DEG = 1.0
#: largest ratio of uncompressed to compressed size that deflate can reach (gzip's theoretical bound)
_MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class NiftiInfo:
    """What a NIfTI header claims, checked against the file and the machine (no voxel data read)."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    nbytes: int


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available now (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when the machine does not have them available."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InputDataError(f"{what} needs {nbytes / 2**30:.1f} GiB of memory but {avail / 2**30:.1f} GiB are "
                             f"available; check the file (a corrupt header?) or use a machine with more memory")


def _gzip_size_ok(path: Path, expected: int) -> bool:
    """Whether the gzip file ``path`` decompresses to at least ``expected`` bytes (bounded memory)."""
    import gzip
    import zlib

    size = path.stat().st_size
    if expected > size * _MAX_DEFLATE_RATIO:
        return False  # no deflate stream expands that much
    with open(path, "rb") as fh:  # single-member files (as nibabel writes them) store the size mod 2**32
        fh.seek(max(size - 4, 0))
        isize = int.from_bytes(fh.read(4), "little")
    if isize == expected % (1 << 32):
        return True
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while got < expected:
                chunk = fh.read(min(1 << 24, expected - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, zlib.error):
        return False
    return got >= expected


def _rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation between the direction cosines of two affines."""
    ra = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    rb = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    c = (np.trace(ra.T @ rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _check_geometry(img, p: Path, name: str) -> np.ndarray:
    hdr = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    lin = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(lin)) < 1e-12 or np.any(np.linalg.norm(lin, axis=0) == 0):
        raise GeometryError(f"{name}: {p} has a singular or non-finite affine (zero voxel size or collapsed axes); "
                            f"fix the header's sform/qform (e.g. with fslorient or nibabel) before using it")
    if hasattr(hdr, "get_qform") and int(hdr["sform_code"]) > 0 and int(hdr["qform_code"]) > 0:
        q = np.asarray(hdr.get_qform(), dtype=np.float64)
        angle = _rotation_deg(affine, q)
        if angle > QFORM_SFORM_TOLERANCE_DEG:
            raise GeometryError(f"{name}: {p} has sform and qform rotated {angle:.1f} deg apart, which changes the B0 "
                                f"direction; make them agree (fslorient -copysform2qform, or set qform_code to 0 to "
                                f"use the sform)")
        if not np.allclose(affine, q, atol=1e-3, rtol=1e-4):
            warnings.warn(f"{name}: {p} has sform and qform that differ in position or voxel size; the sform is "
                          f"used (set qform_code to 0 to silence this)", QsmkitWarning, stacklevel=3)
    return affine


def read_header(path: str | os.PathLike, name: str = "input") -> tuple[NiftiInfo, object]:
    """Open a NIfTI file lazily and check its header against the file and the machine.

    The claimed data size must fit in the file (uncompressed size for ``.gz``, checked with a
    bounded read) and in the available memory, before any voxel is read; the affine must be
    invertible, and the sform and qform must not disagree on orientation.

    Returns
    -------
    (NiftiInfo, nibabel image)
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{name}: file not found: {p}; check the path (relative paths resolve against the "
                             f"pipeline file)")
    if p.is_dir():
        raise InputDataError(f"{name}: {p} is a folder, not a NIfTI file; give a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(type(img).__name__)
        shape = tuple(int(n) for n in img.header.get_data_shape())
        dtype = np.dtype(img.header.get_data_dtype())
        offset = int(img.header.get_data_offset())
    except (ImageFileError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise InputDataError(f"{name}: {p} is not a readable NIfTI file ({type(exc).__name__}); "
                             f"give a .nii or .nii.gz image") from None
    if len(shape) < 3 or len(shape) > 4 or min(shape) < 1:
        raise InputDataError(f"{name}: {p} has {len(shape)} dimensions {shape}; expected 3D (x,y,z) or 4D "
                             f"(x,y,z,echo) with at least one voxel along each")
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    claimed = f"{name}: {p} claims shape {shape} of {dtype} ({nbytes / 2**30:.2f} GiB)"
    if p.name.lower().endswith(".gz"):
        fits = _gzip_size_ok(p, offset + nbytes)
    else:
        fits = p.stat().st_size >= offset + nbytes
    if not fits:
        raise InputDataError(f"{claimed} but the file holds less data; the file is truncated or its header is "
                             f"wrong: re-export it")
    n_voxels = int(np.prod(shape, dtype=np.float64))
    check_allocation(nbytes + (4 * n_voxels if dtype != np.float32 else 0), f"{name}: {p} with shape {shape}")
    affine = _check_geometry(img, p, name)
    return NiftiInfo(p, shape, affine, dtype, nbytes), img


def load_nifti(path: str | os.PathLike, name: str = "input", units: str = "",
               b0_world: Sequence[float] | None = None, allow_nonfinite: bool = False) -> Volume:
    """Load a NIfTI file as a float32 :class:`Volume`, with clear errors for bad files.

    Parameters
    ----------
    path : path
        ``.nii`` or ``.nii.gz`` file.
    name : str
        Artifact name used in error messages (``phase``, ``mask``, ...).
    units : str
        Units to attach.
    b0_world : 3 floats, optional
        B0 direction in world coordinates (default scanner z).
    allow_nonfinite : bool
        Accept NaN/inf (otherwise an :class:`InputDataError` names the count and the file).
    """
    info, img = read_header(path, name)
    p = info.path
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise InputDataError(f"{name}: {p} is not a readable NIfTI file ({type(exc).__name__}); "
                             f"give a .nii or .nii.gz image") from None
    if np.iscomplexobj(data):
        raise InputDataError(f"{name}: {p} holds complex data; give magnitude and phase as separate real images")
    data = data.astype(np.float32, copy=False)
    if not allow_nonfinite:
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputDataError(f"{name}: {p} contains {bad} NaN/inf voxels; replace them (e.g. with 0 and exclude them from the mask)")
    from ..physics import b0_direction_from_affine

    b0 = b0_direction_from_affine(info.affine, b0_world if b0_world is not None else (0.0, 0.0, 1.0))
    return Volume(data, info.affine, units=units, b0_direction=b0, header=img.header.copy(), meta={"source": str(p)})


def _header_for(vol: Volume, data: np.ndarray):
    import nibabel as nib

    if vol.header is not None:
        hdr = vol.header.copy()
    else:
        hdr = nib.Nifti1Header()
        hdr.set_sform(vol.affine, code=1)
        hdr.set_qform(vol.affine, code=1)
        hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr["scl_slope"], hdr["scl_inter"] = np.nan, np.nan
    return hdr


def save_nifti(vol: Volume, path: str | os.PathLike) -> Path:
    """Write ``vol`` to ``path`` atomically, with its source header's geometry (float32; bool -> uint8)."""
    import nibabel as nib

    data = np.asarray(vol.data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif np.iscomplexobj(data):
        raise ValueError("save_nifti() takes real data; write magnitude/phase or real/imag separately")
    elif data.dtype != np.uint8:
        data = data.astype(np.float32, copy=False)
    hdr = _header_for(vol, data)
    cls = nib.Nifti2Image if isinstance(vol.header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data, vol.affine, hdr)  # nibabel keeps the header geometry when it matches the affine
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
