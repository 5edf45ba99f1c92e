"""skm-tea v1 raw-data-track ("files_recon_calib-24") HDF5 reader, lazy per readout slice.

Layout (https://github.com/StanfordMIMI/skm-tea, DATASET.md and ``skm_tea/data/dataset.py``):

- ``kspace``: complex64 ``(x, ky, kz, echo, coil)``: hybrid k-space, already inverse-FFT'd
  along the fully sampled readout ``x``; each ``x`` is an independent 2D ``(ky, kz)`` problem.
- ``maps``: complex64 ``(x, y, z, coil, nmaps)`` sensitivity maps (image space).
- ``target``: complex64 ``(x, y, z, echo, nmaps)`` SENSE reference reconstruction.
- ``masks/poisson_{acc}x`` (e.g. ``poisson_6.0x``): ``(ky, kz)`` Poisson-disc masks, possibly
  of the acquired matrix (smaller than the k-space grid): they are zero-padded to the k-space
  size in the centre, as skm-tea's ``CachingSubsampler`` does.

There is no geometry header in these files; the dataset's nominal voxel spacing
(0.3125, 0.3125, 0.8) mm for (x, y, z) is used unless ``voxel_size`` is given. Every dataset's
claimed shape is checked against the file and the available memory before it is read
(:mod:`.h5limits`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import InputDataError, ParameterError
from qsmkit.kspace import kspace_memory_errors

from .fastmri import H5Reader
from .h5limits import check_dataset, check_image_axes, check_memory
from .kdata import KSpaceData, parse_slices

__all__ = ["SkmTeaFile", "read_skmtea", "SKMTEA_VOXEL_SIZE", "pad_mask_center"]

#: nominal skm-tea qDESS voxel spacing in mm for (x, y, z)
SKMTEA_VOXEL_SIZE = (0.3125, 0.3125, 0.8)


def pad_mask_center(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad a 2D mask to ``shape`` with the mask in the centre (error if it is larger)."""
    mask = np.asarray(mask)
    shape = tuple(int(s) for s in shape)
    if mask.shape == shape:
        return mask
    if mask.ndim != 2 or any(m > s for m, s in zip(mask.shape, shape)):
        raise InputDataError(f"sampling mask of shape {mask.shape} does not fit the k-space grid {shape}")
    out = np.zeros(shape, dtype=mask.dtype)
    o = [(s - m) // 2 for m, s in zip(mask.shape, shape)]
    out[o[0]:o[0] + mask.shape[0], o[1]:o[1] + mask.shape[1]] = mask
    return out


class SkmTeaFile(H5Reader):
    """An skm-tea recon file opened for lazy reading of single readout (x) slices."""

    what = "skm-tea file"

    def _validate(self) -> None:
        import h5py

        f, name = self._f, self.path.name
        if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
            have = ", ".join(sorted(f.keys())) or "nothing"
            raise InputDataError(f"{name} has no 'kspace' dataset (it holds {have}); is it an skm-tea recon file?")
        ks = f["kspace"]
        check_dataset(ks, self.path, "kspace")
        if ks.dtype.kind != "c":
            raise InputDataError(f"{name}: kspace has dtype {ks.dtype}; skm-tea k-space is complex64")
        if ks.ndim == 4 and "maps" not in f:
            raise InputDataError(f"{name}: kspace has 4 axes {ks.shape}; this looks like a fastMRI file - use method: fastmri")
        if ks.ndim != 5:
            raise InputDataError(f"{name}: kspace has shape {ks.shape}; skm-tea stores (x, ky, kz, echo, coil)")
        x, y, z, e, c = ks.shape
        check_image_axes(self.path, "kspace", ks.shape, "(x, ky, kz, echo, coil)", y, z)
        if "maps" in f:
            mp = f["maps"]
            if not isinstance(mp, h5py.Dataset):
                raise InputDataError(f"{name}: 'maps' is a group, not a dataset; expected (x, y, z, coil, nmaps)")
            check_dataset(mp, self.path, "maps")
            if mp.ndim != 5 or tuple(mp.shape[:3]) != (x, y, z) or mp.shape[3] != c:
                if mp.ndim == 5 and tuple(mp.shape[:3]) == (x, y, z) and mp.shape[3] == e and mp.shape[4] == c:
                    raise InputDataError(f"{name}: kspace {ks.shape} and maps {mp.shape} disagree; the echo and coil "
                                         f"axes of kspace look swapped - skm-tea stores (x, ky, kz, echo, coil)")
                raise InputDataError(f"{name}: maps have shape {mp.shape}; expected (x, y, z, coil, nmaps) = "
                                     f"({x}, {y}, {z}, {c}, nmaps) to match kspace {ks.shape}")
        elif e > c and c <= 2:
            raise InputDataError(f"{name}: kspace shape {ks.shape} has {e} echoes and {c} coils; the echo and coil "
                                 f"axes look swapped - skm-tea stores (x, ky, kz, echo, coil)")
        if "target" in f and not isinstance(f["target"], h5py.Dataset):
            raise InputDataError(f"{name}: 'target' is a group, not a dataset; expected (x, y, z, echo, nmaps)")
        self.shape = (x, y, z, e, c)
        self.n_slices, self.n_echoes, self.n_coils = x, e, c
        self.image_shape = (y, z)

    def mask_keys(self) -> list[str]:
        """Names of the masks under ``masks/``."""
        import h5py

        if "masks" not in self._f:
            return []
        if not isinstance(self._f["masks"], h5py.Group):
            raise InputDataError(f"{self.path.name}: 'masks' is a dataset, not a group of masks (masks/poisson_6.0x, ...)")
        return sorted(self._f["masks"].keys())

    def read_mask(self, acceleration: float | None = None, key: str | None = None) -> np.ndarray:
        """A stored Poisson mask ``(ky, kz)`` bool, zero-padded to the k-space grid."""
        keys = self.mask_keys()
        if not keys:
            raise InputDataError(f"{self.path.name} has no masks/ group; use an undersample method that makes a mask")
        if key is None:
            if acceleration is None:
                raise ParameterError("undersample from_file: give 'acceleration' (e.g. 6) or 'key' to pick one of "
                                     + ", ".join(keys))
            want = float(acceleration)
            for k in keys:
                m = re.fullmatch(r"poisson_([0-9.]+)x", k)
                if m and abs(float(m.group(1)) - want) < 1e-6:
                    key = k
                    break
            else:
                raise InputDataError(f"{self.path.name} has no mask for acceleration {want:g}; stored: {', '.join(keys)}")
        elif key not in keys:
            raise InputDataError(f"{self.path.name} has no mask 'masks/{key}'; stored: {', '.join(keys)}")
        ds = self._f["masks"][key]
        shape = check_dataset(ds, self.path, f"masks/{key}")
        squeezed = tuple(s for s in shape if s != 1)
        if len(squeezed) != 2:
            raise InputDataError(f"{self.path.name}: masks/{key} has shape {shape}; expected (ky, kz)")
        if any(m > s for m, s in zip(squeezed, self.image_shape)):
            raise InputDataError(f"{self.path.name}: masks/{key} has shape {shape}, larger than the k-space grid "
                                 f"{self.image_shape}")
        m = np.squeeze(np.asarray(ds[()])).reshape(squeezed)
        return pad_mask_center(m != 0, self.image_shape)

    def read_nbytes(self, n_slices: int, load_maps: bool = True) -> int:
        """Memory that reading ``n_slices`` readout slices (k-space, maps, target) allocates."""
        f, (x, y, z, e, c) = self._f, self.shape
        n = (n_slices + 1) * y * z * c * 8  # result + one slice read at a time
        if load_maps and "maps" in f:
            n += (n_slices + 1) * y * z * c * int(f["maps"].shape[4]) * 8
        if "target" in f and f["target"].ndim == 5:
            t = f["target"]
            check_dataset(t, self.path, "target")
            n += n_slices * y * z * 4 + y * z * int(t.shape[4]) * t.dtype.itemsize
        return n

    def _read(self, dsname: str, index: tuple) -> np.ndarray:
        try:
            return self._f[dsname][index]
        except (OSError, RuntimeError) as e:
            raise InputDataError(f"{self.path.name}: cannot read {dsname} ({str(e).splitlines()[0][:80]}); "
                                 f"the file is corrupt") from None

    def read_kspace(self, slices: Sequence[int], echo: int) -> np.ndarray:
        """``(len(slices), coils, ky, kz)`` complex64, one hyperslab per readout position."""
        out = np.empty((len(slices), self.n_coils) + self.image_shape, dtype=np.complex64)
        for j, i in enumerate(slices):
            out[j] = np.moveaxis(self._read("kspace", (int(i), slice(None), slice(None), int(echo), slice(None))), -1, 0)
        return out

    def read_maps(self, slices: Sequence[int]) -> np.ndarray | None:
        """``(len(slices), nmaps, coils, y, z)`` complex64, or ``None`` without a maps dataset."""
        if "maps" not in self._f:
            return None
        nm = self._f["maps"].shape[4]
        out = np.empty((len(slices), nm, self.n_coils) + self.image_shape, dtype=np.complex64)
        for j, i in enumerate(slices):
            out[j] = np.transpose(self._read("maps", (int(i),)), (3, 2, 0, 1))
        return out

    def read_target(self, slices: Sequence[int], echo: int) -> np.ndarray | None:
        """Magnitude of the reference ``(len(slices), y, z)`` float32 (RSS over maps), or ``None``."""
        if "target" not in self._f:
            return None
        t = self._f["target"]
        check_dataset(t, self.path, "target")
        if t.ndim != 5 or tuple(t.shape[:3]) != self.shape[:3]:
            raise InputDataError(f"{self.path.name}: target has shape {t.shape}; expected (x, y, z, echo, nmaps)")
        out = np.empty((len(slices),) + self.image_shape, dtype=np.float32)
        for j, i in enumerate(slices):
            a = self._read("target", (int(i), slice(None), slice(None), int(echo), slice(None)))
            out[j] = np.sqrt(np.sum(np.abs(a) ** 2, axis=-1))
        return out


def read_skmtea(path: str | Path, slices: Any = None, echo: int = 0, load_maps: bool = True,
                voxel_size: Sequence[float] | None = None) -> tuple[KSpaceData, np.ndarray | None, np.ndarray | None]:
    """Read selected readout slices of one echo of an skm-tea recon file.

    Parameters
    ----------
    path : str or Path
        skm-tea ``.h5`` recon file.
    slices : None, int, list of int or ``"a:b"``
        Readout positions ``x`` to read (default all).
    echo : int
        Echo index (0 or 1 for qDESS).
    load_maps : bool
        Also read the stored sensitivity maps.
    voxel_size : 3 floats or None
        (x, y, z) voxel size in mm; default the dataset's nominal (0.3125, 0.3125, 0.8).

    Returns
    -------
    (KSpaceData, maps or None, target or None)
        ``maps`` is ``(slices, nmaps, coils, ky, kz)``; ``target`` ``(slices, ky, kz)`` magnitude.
    """
    with SkmTeaFile(path) as sf:
        if not 0 <= int(echo) < sf.n_echoes:
            raise ParameterError(f"echo = {echo} but {sf.path.name} has {sf.n_echoes} echoes (0..{sf.n_echoes - 1})")
        idx = parse_slices(slices, sf.n_slices)
        check_memory(sf.read_nbytes(len(idx), load_maps), sf.path,
                     f"{len(idx)} readout slice(s) of kspace {sf.shape}" + (" with maps" if load_maps else ""), len(idx))
        with kspace_memory_errors("kspace_read/skmtea", sf.shape, sf.path, len(idx)):
            k = sf.read_kspace(idx, echo)
            maps = sf.read_maps(idx) if load_maps else None
            target = sf.read_target(idx, echo)
        vx, vy, vz = (float(v) for v in (voxel_size or SKMTEA_VOXEL_SIZE))
        header = {"shape": sf.shape, "mask_keys": sf.mask_keys(), "n_echoes": sf.n_echoes}
        kd = KSpaceData(data=k, layout="skmtea", slice_indices=tuple(idx), voxel_size=(vy, vz, vx),
                        crop_size=None, padding=None, header=header, source=Path(path), echo=int(echo))
        return kd, maps, target
