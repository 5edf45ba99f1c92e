"""NIfTI input/output on nibabel with exact geometry.

Outputs keep the source header (sform/qform codes, srow, quaternion, pixdim), so an output's
affine and codes equal the input's bit for bit; data are written as float32 (masks as uint8).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputDataError
from ..volume import Volume
from .atomic import atomic_path


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
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{name}: file not found: {p}; check the path (relative paths resolve against the pipeline file)")
    if p.is_dir():
        raise InputDataError(f"{name}: {p} is a folder, not a NIfTI file")
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(type(img).__name__)
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, OSError, EOFError, ValueError, TypeError) as exc:
        raise InputDataError(f"{name}: {p} is not a readable NIfTI file ({type(exc).__name__}); "
                             f"give a .nii or .nii.gz image") from None
    if data.ndim < 3 or data.ndim > 4:
        raise InputDataError(f"{name}: {p} has {data.ndim} dimensions {data.shape}; expected 3D (x,y,z) or 4D (x,y,z,echo)")
    if np.iscomplexobj(data):
        raise InputDataError(f"{name}: {p} holds complex data; give magnitude and phase as separate real images")
    data = data.astype(np.float32, copy=False)
    if not allow_nonfinite:
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputDataError(f"{name}: {p} contains {bad} NaN/inf voxels; replace them (e.g. with 0 and exclude them from the mask)")
    from ..physics import b0_direction_from_affine

    affine = img.affine
    b0 = b0_direction_from_affine(affine, b0_world if b0_world is not None else (0.0, 0.0, 1.0))
    return Volume(data, affine, units=units, b0_direction=b0, header=img.header.copy(), meta={"source": str(p)})


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
