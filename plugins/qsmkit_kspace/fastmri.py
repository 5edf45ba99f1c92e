"""fastMRI HDF5 reader (multi-coil and single-coil), lazy per slice.

Layout (https://github.com/facebookresearch/fastMRI, ``fastmri/data/mri_data.py``):

- ``kspace``: complex64, multi-coil ``(slices, coils, H, W)``, single-coil ``(slices, H, W)``;
  ``H`` is the (usually 2x oversampled) readout, ``W`` the phase encoding (the sampled columns).
- ``reconstruction_rss`` (multi-coil) / ``reconstruction_esc`` (single-coil): ``(slices, h, w)``
  reference magnitude images, e.g. 320 x 320 (absent in test/challenge files).
- ``ismrmrd_header``: ISMRMRD XML; ``encoding/encodedSpace/matrixSize`` and ``reconSpace``
  sizes, ``encodingLimits/kspace_encoding_step_1`` centre and maximum.
- ``mask``: ``(W,)`` column mask of test/challenge files, with attributes ``acceleration`` and
  ``num_low_frequencies``; file attributes ``max``, ``norm``, ``acquisition``, ``patient_id``.

Every dataset's claimed shape is checked against the file and the available memory before it is
read (:mod:`.h5limits`).

The k-space centre / padding follow fastMRI's ``SliceDataset._retrieve_metadata``::

    padding_left  = encoded_y // 2 - encoding_limits_step1.center
    padding_right = padding_left + encoding_limits_step1.maximum + 1
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from math import prod
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.kspace import kspace_memory_errors

from .h5limits import check_dataset, check_image_axes, check_memory, format_bytes
from .kdata import KSpaceData, parse_slices

__all__ = ["parse_ismrmrd_header", "FastMRIFile", "read_fastmri", "open_h5"]

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


def open_h5(path: str | Path, what: str = "file"):
    """Open an HDF5 file read-only, turning h5py's errors into one-line :class:`InputDataError`."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{what} {path} does not exist; check inputs.kspace")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        reason = str(e).split("(")[0].strip().rstrip(",") or type(e).__name__
        raise InputDataError(
            f"cannot read {path} as HDF5 ({reason}); the file is truncated or corrupt - copy or download it again") from None


class H5Reader:
    """Base of the lazy HDF5 readers: opens the file, runs the subclass's ``_validate``, closes on error."""

    what = "file"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open_h5(self.path, self.what)
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _validate(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()


def _et_query(root: ET.Element, qlist: Sequence[str]) -> str | None:
    """First descendant along ``qlist`` (as fastMRI's ``et_query``); ``None`` if absent."""
    s = "."
    for el in qlist:
        s += f"//ismrmrd_namespace:{el}"
    value = root.find(s, {"ismrmrd_namespace": ISMRMRD_NS})
    return None if value is None else str(value.text)


def parse_ismrmrd_header(xml: bytes | str) -> dict[str, Any]:
    """Sizes, FOV and k-space centre / padding from an ISMRMRD XML header.

    Returns
    -------
    dict
        ``encoding_size`` (x, y, z), ``recon_size`` (x, y, z), ``encoded_fov_mm`` and
        ``recon_fov_mm`` (x, y, z in mm, when present), ``enc_limits_center``,
        ``enc_limits_max`` (maximum + 1), ``padding_left``, ``padding_right`` — exactly as
        fastMRI's ``SliceDataset`` derives them.
    """
    if isinstance(xml, np.ndarray):
        xml = xml.tobytes()
    if isinstance(xml, (bytes, bytearray, np.bytes_)):
        xml = bytes(xml).decode("utf-8", errors="replace")
    try:
        root = ET.fromstring(str(xml).strip())
    except ET.ParseError as e:
        raise InputDataError(f"ismrmrd_header is not valid XML ({e}); the file is corrupt") from None

    def need(path: list[str]) -> int:
        v = _et_query(root, path)
        if v is None:
            raise InputDataError(f"ismrmrd_header has no {'/'.join(path)}; the header is incomplete")
        try:
            return int(float(v))
        except ValueError:
            raise InputDataError(f"ismrmrd_header {'/'.join(path)} = {v!r} is not a number") from None

    def fov(space: str) -> tuple[float, float, float] | None:
        vals = [_et_query(root, ["encoding", space, "fieldOfView_mm", a]) for a in "xyz"]
        if any(v is None for v in vals):
            return None
        return tuple(float(v) for v in vals)

    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    enc_size = tuple(need(enc + [a]) for a in "xyz")
    recon_size = tuple(need(rec + [a]) for a in "xyz")
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    center = need(lims + ["center"])
    lim_max = need(lims + ["maximum"]) + 1
    padding_left = enc_size[1] // 2 - center
    padding_right = padding_left + lim_max
    return {
        "encoding_size": enc_size,
        "recon_size": recon_size,
        "encoded_fov_mm": fov("encodedSpace"),
        "recon_fov_mm": fov("reconSpace"),
        "enc_limits_center": center,
        "enc_limits_max": lim_max,
        "padding_left": padding_left,
        "padding_right": padding_right,
    }


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class FastMRIFile(H5Reader):
    """A fastMRI HDF5 file opened for lazy, per-slice reading.

    Only the header, attributes and dataset shapes are read on opening; :meth:`read_kspace`
    reads the requested slices one by one (an h5py hyperslab each), never the whole dataset.

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file.
    """

    what = "fastMRI file"

    # -- structure ---------------------------------------------------------------------------
    def _validate(self) -> None:
        import h5py

        f = self._f
        name = self.path.name
        if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
            have = ", ".join(sorted(f.keys())) or "nothing"
            raise InputDataError(f"{name} has no 'kspace' dataset (it holds {have}); is it a fastMRI file?")
        ds = f["kspace"]
        shape = check_dataset(ds, self.path, "kspace")
        self._pairs = False  # real/imag stored in a trailing axis of 2
        if ds.dtype.kind != "c":
            if ds.dtype.kind == "f" and shape and shape[-1] == 2:
                self._pairs, shape = True, shape[:-1]
            else:
                raise InputDataError(f"{name}: kspace has dtype {ds.dtype}; fastMRI k-space is complex64")
        if len(shape) == 5 and "maps" in f:
            raise InputDataError(f"{name} looks like an skm-tea file (5-D kspace and maps); use method: skmtea")
        if len(shape) not in (3, 4):
            raise InputDataError(
                f"{name}: kspace has shape {shape}; expected (slices, coils, H, W) for multi-coil or (slices, H, W) "
                f"for single-coil data")
        self.multicoil = len(shape) == 4
        self.kspace_shape = shape
        self.header: dict[str, Any] = {}
        if "ismrmrd_header" in f:
            self.header = parse_ismrmrd_header(self._small_dataset("ismrmrd_header")[()])
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        if self.multicoil:
            s, c, h, w = shape
            enc = self.header.get("encoding_size")
            coils_last = (enc is not None and (h, w) != enc[:2] and (c, h) == enc[:2]) or (
                w < c and w < h and w <= 64 and min(c, h) > 4 * w)
            if coils_last:
                raise InputDataError(
                    f"{name}: kspace shape {shape} looks like (slices, H, W, coils); fastMRI stores "
                    f"(slices, coils, H, W) - transpose the array (e.g. np.moveaxis(k, -1, 1)) before writing")
        check_image_axes(self.path, "kspace", ds.shape,
                         "(slices, coils, H, W)" if self.multicoil else "(slices, H, W)", shape[-2], shape[-1])
        self.n_slices = int(shape[0])
        self.image_shape = (int(shape[-2]), int(shape[-1]))
        if "mask" in f:
            mds = self._small_dataset("mask")
            if mds.ndim != 1 or mds.shape[0] != self.image_shape[1]:
                raise InputDataError(
                    f"{name}: mask has shape {mds.shape} but kspace has {self.image_shape[1]} columns; "
                    f"the mask must be ({self.image_shape[1]},)")
            self.mask: np.ndarray | None = np.asarray(mds[()]) != 0
        else:
            self.mask = None

    def _small_dataset(self, key: str, limit: int = 64 << 20):
        """A dataset read whole (header, mask): checked, and refused above ``limit`` bytes."""
        import h5py

        ds = self._f[key]
        if not isinstance(ds, h5py.Dataset):
            raise InputDataError(f"{self.path.name}: '{key}' is a group, not a dataset; the file is not a fastMRI file")
        shape = check_dataset(ds, self.path, key)
        if ds.size * ds.dtype.itemsize > limit:
            raise InputDataError(f"{self.path.name}: dataset '{key}' claims shape {shape} "
                                 f"({format_bytes(ds.size * ds.dtype.itemsize)}); far too large for a fastMRI {key}")
        return ds

    def read_nbytes(self, n_slices: int, target_key: str = "auto") -> int:
        """Memory that reading ``n_slices`` slices (k-space complex64 and the reference float32) allocates."""
        coils = self.kspace_shape[1] if self.multicoil else 1
        n = n_slices * coils * self.image_shape[0] * self.image_shape[1] * 8
        k = self.target_key(target_key)
        if k is not None:
            ds = self._f[k]
            shape = check_dataset(ds, self.path, k)
            n += n_slices * prod(shape[1:]) * (4 + ds.dtype.itemsize)  # float32 result + one slice read at a time
        return n

    @property
    def padding(self) -> tuple[int, int] | None:
        if "padding_left" not in self.header:
            return None
        return int(self.header["padding_left"]), int(self.header["padding_right"])

    def target_key(self, key: str = "auto") -> str | None:
        """The reference image dataset (``reconstruction_rss`` multi-coil, ``_esc`` single-coil)."""
        import h5py

        if key != "auto":
            if key not in self._f:
                raise InputDataError(f"{self.path.name} has no '{key}' dataset; use target_key: auto")
            found: str | None = key
        else:
            order = ("reconstruction_rss", "reconstruction_esc") if self.multicoil else (
                "reconstruction_esc", "reconstruction_rss")
            found = next((k for k in order if k in self._f), None)
        if found is not None and not isinstance(self._f[found], h5py.Dataset):
            raise InputDataError(f"{self.path.name}: '{found}' is a group, not a reference image dataset (slices, h, w)")
        return found

    def voxel_size(self) -> tuple[float, float, float]:
        """mm of the image grid (H, W, slice): encoded FOV / encoded matrix in-plane, recon FOV z / recon z."""
        h = self.header
        efov, rfov = h.get("encoded_fov_mm"), h.get("recon_fov_mm")
        if not efov or not h.get("encoding_size"):
            return (1.0, 1.0, 1.0)
        enc = h["encoding_size"]
        vh, vw = efov[0] / max(enc[0], 1), efov[1] / max(enc[1], 1)
        vz = (rfov[2] / max(h["recon_size"][2], 1)) if rfov else efov[2] / max(enc[2], 1)
        return tuple(float(v) if v > 0 else 1.0 for v in (vh, vw, vz))

    # -- data ----------------------------------------------------------------------------------
    def read_kspace(self, slices: Sequence[int]) -> np.ndarray:
        """k-space of the given slices, ``(len(slices), coils, H, W)`` complex64, read slice by slice."""
        ds = self._f["kspace"]
        s0 = self.kspace_shape
        coils = s0[1] if self.multicoil else 1
        out = np.empty((len(slices), coils) + self.image_shape, dtype=np.complex64)
        for j, i in enumerate(slices):
            try:
                a = ds[int(i)]
            except (OSError, RuntimeError, ValueError) as e:
                raise InputDataError(
                    f"{self.path.name}: cannot read kspace slice {i} ({str(e).splitlines()[0][:80]}); "
                    f"the file is corrupt") from None
            if self._pairs:
                a = a[..., 0] + 1j * a[..., 1]
            out[j] = a if self.multicoil else a[None]
        return out

    def read_target(self, slices: Sequence[int], key: str = "auto") -> np.ndarray | None:
        """Reference images of the given slices ``(len(slices), h, w)`` float32, or ``None``."""
        k = self.target_key(key)
        if k is None:
            return None
        ds = self._f[k]
        if ds.ndim != 3 or ds.shape[0] != self.n_slices:
            raise InputDataError(f"{self.path.name}: {k} has shape {ds.shape}; expected ({self.n_slices}, h, w)")
        try:
            return np.stack([np.abs(ds[int(i)]).astype(np.float32) for i in slices])
        except OSError as e:
            raise InputDataError(f"{self.path.name}: cannot read {k} ({str(e).splitlines()[0][:80]}); the file is corrupt") from None

    def crop_size(self, target: np.ndarray | None = None) -> tuple[int, int] | None:
        """Evaluation crop: the target's in-plane shape, else the header's recon matrix (x, y)."""
        if target is not None:
            return int(target.shape[-2]), int(target.shape[-1])
        rs = self.header.get("recon_size")
        return (int(rs[0]), int(rs[1])) if rs else None


def read_fastmri(path: str | Path, slices: Any = None, target_key: str = "auto",
                 voxel_size: Sequence[float] | None = None) -> tuple[KSpaceData, np.ndarray | None, np.ndarray | None]:
    """Read selected slices of a fastMRI file.

    Parameters
    ----------
    path : str or Path
        fastMRI ``.h5`` file.
    slices : None, int, list of int or ``"a:b"``
        Slices to read (default all).
    target_key : str
        ``auto`` (``reconstruction_rss`` / ``reconstruction_esc``) or a dataset name.
    voxel_size : 3 floats or None
        Override of the (H, W, slice) voxel size in mm; default from the header's FOV / matrix.

    Returns
    -------
    (KSpaceData, mask or None, target or None)
        ``mask`` is the file's ``(W,)`` column mask (test files); ``target`` is
        ``(slices, h, w)`` float32.
    """
    with FastMRIFile(path) as fm:
        idx = parse_slices(slices, fm.n_slices)
        check_memory(fm.read_nbytes(len(idx), target_key), fm.path,
                     f"{len(idx)} slice(s) of kspace {fm.kspace_shape}", len(idx))
        with kspace_memory_errors("kspace_read/fastmri", fm.kspace_shape, fm.path, len(idx)):
            k = fm.read_kspace(idx)
            target = fm.read_target(idx, target_key)
        header = dict(fm.header)
        header["attrs"] = fm.attrs
        header["multicoil"] = fm.multicoil
        kd = KSpaceData(
            data=k, layout="fastmri", slice_indices=tuple(idx),
            voxel_size=tuple(float(v) for v in voxel_size) if voxel_size else fm.voxel_size(),
            crop_size=fm.crop_size(target), padding=fm.padding, header=header, source=Path(path))
        return kd, fm.mask, target
