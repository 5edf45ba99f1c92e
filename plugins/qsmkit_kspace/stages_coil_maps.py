"""``coil_maps`` stages: ``espirit`` (ESPIRiT in torch) and ``from_file`` (maps stored in an HDF5 file);
each writes ``maps`` (complex64 ``(slices, n_maps, coils, H, W)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsmkit import Param, Stage
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.errors import ConfigError, GeometryError, InputDataError, ParameterError
from qsmkit.kspace import KSpaceData, check_sampling_mask, kspace_memory_errors, require_kspace
from qsmkit.params import ITERATIONS, max_iter, tol

__all__ = ["EspiritMaps", "FileMaps"]


class _CoilMaps(Stage):
    """A ``coil_maps`` stage: reads the k-space, writes ``maps``."""

    kind = "coil_maps"
    reads = ("kspace",)
    writes = ("maps",)


class EspiritMaps(_CoilMaps):
    """ESPIRiT sensitivity maps (torch)."""

    name = "espirit"
    optional_reads = ("sampling_mask",)
    description = "ESPIRiT (Uecker 2014) in torch; BART-like defaults (24x24 calib, 6x6 kernel, t=0.001, crop 0.8)"
    params = (Param("calib", list, [24, 24], range=(4, 4096), item_type=int, doc="calibration region (rows, columns)"),
              Param("kernel", int, 6, range=(2, 16), doc="kernel width"),
              Param("threshold", float, 0.001, range=(1e-8, 0.9),
                    doc="signal subspace: keep sigma_i/sigma_0 > sqrt(threshold) (BART -t)"),
              Param("crop", float, 0.8, range=(0.0, 1.0), doc="zero the maps where the eigenvalue <= crop (BART -c)"),
              Param("softcrop", bool, False, doc="BART's soft S-curve weighting instead of a hard crop"),
              Param("maps", int, 1, range=(1, 2), doc="number of sets of maps"),
              max_iter(30, range=(1, 1000), aliases=ITERATIONS, doc="maximum power iterations per voxel"),
              tol(1e-4, range=(0.0, 1.0), doc="stop when eigenvalues change less than this"),
              DEVICE_PARAM)

    def run(self, ctx, p):
        from .espirit import espirit_maps

        kd = require_kspace(ctx, "coil_maps/espirit")
        if len(p.calib) != 2:
            raise ParameterError("calib needs 2 values (rows, columns)")
        mask = check_sampling_mask(ctx["sampling_mask"], kd, "coil_maps/espirit") if "sampling_mask" in ctx else None
        if mask is not None and mask.ndim == 3:
            mask = mask.all(axis=0)
        dev = resolve_device(p.device)
        with kspace_memory_errors("coil_maps/espirit", kd.data.shape, kd.source):
            maps, eig = espirit_maps(kd.data, mask, tuple(p.calib), p.kernel, p.threshold, p.crop, p.maps,
                                     p.max_iter, p.tol, p.softcrop, dev, log=ctx.log)
        from . import espirit as _esp

        if _esp.last_iterations:
            ctx.log(f"ESPIRiT power iterations (last slice): {_esp.last_iterations}")
        inside = float((eig[:, 0] > p.crop).mean())
        ctx.log(f"ESPIRiT maps {maps.shape}: {inside * 100:.1f}% of voxels kept (eigenvalue > {p.crop})")
        return {"maps": maps}


def _check_maps_dataset(ds, path: Path, name: str, kd: KSpaceData) -> None:
    """A maps dataset ``(x, y, z, coil, nmaps)`` checked against the file, the k-space and memory before reading."""
    import h5py

    from .h5limits import check_dataset, check_memory

    if not isinstance(ds, h5py.Dataset):
        raise InputDataError(f"{path.name}: '{name}' is a group, not a dataset; set params.dataset")
    shape = check_dataset(ds, path, name)
    if len(shape) != 5:
        raise InputDataError(f"{path.name}: {name} has shape {shape}; expected (x, y, z, coil, nmaps)")
    H, W = kd.image_shape
    # skm-tea: maps[x] is (y, z, coil, nmaps); fastMRI-like grid: maps[:, :, slice] is (H, W, coil, nmaps)
    n_axis, grid = (0, shape[1:4]) if kd.layout == "skmtea" else (2, (shape[0], shape[1], shape[3]))
    if tuple(grid) != (H, W, kd.n_coils) or max(kd.slice_indices) >= shape[n_axis]:
        raise GeometryError(f"{path.name}: {name} of shape {shape} does not match the k-space {kd.data.shape} "
                            f"(slices {min(kd.slice_indices)}..{max(kd.slice_indices)} of the file)")
    check_memory(2 * kd.n_slices * shape[4] * kd.n_coils * H * W * 8, path,
                 f"the maps of {kd.n_slices} slice(s) from {name} {shape}", kd.n_slices)


class FileMaps(_CoilMaps):
    """Sensitivity maps from the file (skm-tea ``maps``) or a separate HDF5 file."""

    name = "from_file"
    optional_reads = ("maps",)
    description = "maps stored with the data (skm-tea) or in an HDF5 file (dataset (x, y, z, coil, nmaps))"
    params = (Param("path", str, None, doc="HDF5 file with maps (default: the k-space file)"),
              Param("dataset", str, "maps", doc="dataset name"))

    def run(self, ctx, p):
        kd = require_kspace(ctx, "coil_maps/from_file")
        if p.path is None and "maps" in ctx:
            maps = np.asarray(ctx["maps"])
        else:
            path = Path(p.path) if p.path else kd.source
            if path is None:
                raise ConfigError("coil_maps from_file: give params.path (the k-space was not read from a file)")
            from .fastmri import open_h5

            with open_h5(path, "maps file") as f:
                if p.dataset not in f:
                    raise InputDataError(f"{path.name} has no '{p.dataset}' dataset; set params.dataset")
                ds = f[p.dataset]
                _check_maps_dataset(ds, path, p.dataset, kd)
                if kd.layout == "skmtea":
                    maps = np.stack([np.transpose(ds[int(i)], (3, 2, 0, 1)) for i in kd.slice_indices])
                else:  # fastMRI-like grid: (H, W, slice, coil, nmaps)
                    maps = np.stack([np.transpose(ds[:, :, int(i)], (3, 2, 0, 1)) for i in kd.slice_indices])
        expect = (kd.n_slices, kd.n_coils) + kd.image_shape
        if maps.ndim != 5 or (maps.shape[0],) + tuple(maps.shape[2:]) != expect:
            raise GeometryError(f"maps of shape {maps.shape} do not match the k-space {kd.data.shape}; expected "
                                f"(slices, nmaps, coils, H, W) = ({expect[0]}, nmaps, {expect[1]}, {expect[2]}, {expect[3]})")
        return {"maps": maps.astype(np.complex64, copy=False)}
