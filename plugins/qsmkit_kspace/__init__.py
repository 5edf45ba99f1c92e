"""Built-in plugin: k-space reconstruction for fastMRI and skm-tea data.

Stages (``stage: <kind>, method: <name>``):

- ``kspace_read``: ``fastmri``, ``skmtea`` — read the file given as ``inputs.kspace`` (lazily, only
  the selected slices) and replace the ``kspace`` artifact (a path) by a :class:`KSpaceData`;
  also write ``target`` (reference magnitude Volume) when the file has one, ``sampling_mask``
  (fastMRI test files) and ``maps`` (skm-tea).
- ``undersample``: ``random``, ``equispaced`` (fastMRI-compatible column masks), ``poisson``
  (2D variable-density Poisson disc), ``from_file`` — write the masked ``kspace`` and
  ``sampling_mask``.
- ``coil_maps``: ``espirit``, ``from_file`` — write ``maps``.
- ``recon``: ``zero_filled``, ``sense``, ``cs_wavelet`` — write ``image`` (magnitude Volume, centre
  crop) and, when a ``target`` exists, fastMRI ``metrics`` (NMSE, PSNR, SSIM).

Inputs read from the pipeline: ``kspace`` (path), and optionally ``format`` (``fastmri`` |
``skmtea``; must match the reader), ``slices`` (int, list or ``"a:b"``) and ``echo`` (skm-tea).

Non-Volume artifacts: ``kspace`` is a :class:`KSpaceData`; ``sampling_mask`` a bool ndarray
broadcastable to ``(H, W)`` (fastMRI column masks are ``(1, W)``); ``maps`` a complex64 ndarray
``(slices, n_maps, coils, H, W)``. These types, and the ``recon`` base class
:class:`~qsmkit.kspace.ReconStage`, live in the public core module :mod:`qsmkit.kspace` (documented
there for plugin authors); the names here are kept for backward compatibility.

Commands (hook ``qsmkit_register_commands``): ``qsmkit simulate-kspace`` (:mod:`.commands`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.params import ITERATIONS, lam, max_iter, tol
from qsmkit.errors import ConfigError, GeometryError, InputDataError, MissingArtifactError, ParameterError

from qsmkit.kspace import RECON_PARAMS, KSpaceData, ReconStage, check_sampling_mask, kspace_memory_errors, \
    require_kspace, to_volume

__all__ = [
    "KSpaceData", "ReconStage", "FastMRIRead", "SkmTeaRead", "RandomUndersample", "EquispacedUndersample",
    "PoissonUndersample", "FileUndersample", "EspiritMaps", "FileMaps", "ZeroFilled", "Sense", "CSWavelet",
    "simulate_kspace_files",
]


def simulate_kspace_files(out_dir, **kwargs) -> dict[str, Path]:
    """Write small simulated multi-coil files in both layouts (see :mod:`qsmkit_kspace.simulate`)."""
    from .simulate import simulate_kspace_files as _sim

    return _sim(out_dir, **kwargs)


# ----------------------------------------------------------------------------------------- helpers
_kspace = require_kspace  # older names of the qsmkit.kspace checks
_mask_2d = check_sampling_mask


def _check_file(inputs, p, fmt: str, reader) -> None:
    """Validation-time check of a k-space reader's input: format, file structure, slice selection."""
    from .kdata import parse_slices

    _check_format(inputs, fmt)
    if isinstance(inputs.get("kspace"), Path):
        with reader(inputs["kspace"]) as f:
            parse_slices(p.slices if p.slices is not None else inputs.get("slices"), f.n_slices)


def _check_format(ctx, want: str) -> None:
    if "format" in ctx and ctx["format"] is not None:
        fmt = str(ctx["format"]).lower().replace("-", "").replace("_", "")
        if fmt != want.replace("-", ""):
            raise ConfigError(f"inputs.format is '{ctx['format']}' but the kspace_read method is '{want}'; "
                              f"make them agree")


def _source_path(ctx) -> Path:
    src = ctx["kspace"]
    if isinstance(src, KSpaceData):
        raise ConfigError("kspace_read got k-space that was already read; give inputs.kspace as a file path")
    if not isinstance(src, (str, Path)):
        raise ConfigError(f"inputs.kspace must be a file path, got {type(src).__name__}")
    return Path(src)


def _apply_mask(kd: KSpaceData, m: np.ndarray) -> KSpaceData:
    mm = m[:, None] if m.ndim == 3 else m
    return kd.with_data((kd.data * mm).astype(np.complex64))


# ------------------------------------------------------------------------------------------ readers
_SLICES = Param("slices", list, None, item_type=int, doc="slices to read (default all; inputs.slices also accepts 'a:b')")
_VOXEL = Param("voxel_size", list, None, unit="mm", range=(1e-3, 100.0),
               doc="override the voxel size (fastMRI: H, W, slice; skm-tea: x, y, z)")


class FastMRIRead(Stage):
    """Read a fastMRI multi-coil or single-coil HDF5 file."""

    kind, name = "kspace_read", "fastmri"
    reads = ("kspace",)
    optional_reads = ("format", "slices")
    writes = ("kspace",)
    optional_writes = ("sampling_mask", "target")  # when the file has them (test files; reference images)
    description = "fastMRI .h5 (lazy per slice; header sizes, padding, mask and reference image)"
    params = (_SLICES,
              Param("target_key", str, "auto", doc="reference dataset: auto (reconstruction_rss / _esc) or a name"),
              _VOXEL)

    @classmethod
    def check_inputs(cls, inputs, p):
        from .fastmri import FastMRIFile

        _check_file(inputs, p, "fastmri", FastMRIFile)

    def run(self, ctx, p):
        from .fastmri import read_fastmri

        _check_format(ctx, "fastmri")
        path = _source_path(ctx)
        slices = p.slices if p.slices is not None else (ctx["slices"] if "slices" in ctx else None)
        if p.voxel_size is not None and len(p.voxel_size) != 3:
            raise ParameterError("voxel_size needs 3 values (mm)")
        kd, mask, target = read_fastmri(path, slices, p.target_key, p.voxel_size)
        ctx.log(f"read {kd!r} from {path.name}")
        out: dict[str, Any] = {"kspace": kd}
        if mask is not None:
            out["sampling_mask"] = mask[None, :]
        if target is not None:
            out["target"] = to_volume(target, kd, units="a.u.", source=str(path), reference=p.target_key)
        return out


class SkmTeaRead(Stage):
    """Read an skm-tea v1 recon HDF5 file (one echo)."""

    kind, name = "kspace_read", "skmtea"
    reads = ("kspace",)
    optional_reads = ("format", "slices", "echo")
    writes = ("kspace",)
    optional_writes = ("maps", "target")  # when stored in the file
    description = "skm-tea recon .h5: hybrid (x, ky, kz) k-space per readout slice, maps, target, masks"
    params = (_SLICES,
              Param("echo", int, None, range=(0, 16), doc="echo index (default inputs.echo or 0)"),
              Param("load_maps", bool, True, doc="also read the stored sensitivity maps"),
              _VOXEL)

    @classmethod
    def check_inputs(cls, inputs, p):
        from .skmtea import SkmTeaFile

        _check_file(inputs, p, "skmtea", SkmTeaFile)

    def run(self, ctx, p):
        from .skmtea import read_skmtea

        _check_format(ctx, "skmtea")
        path = _source_path(ctx)
        slices = p.slices if p.slices is not None else (ctx["slices"] if "slices" in ctx else None)
        echo = p.echo if p.echo is not None else (ctx["echo"] if "echo" in ctx else 0)
        if isinstance(echo, bool) or not isinstance(echo, (int, np.integer)):
            raise ConfigError(f"inputs.echo = {echo!r} must be an integer echo index")
        if p.voxel_size is not None and len(p.voxel_size) != 3:
            raise ParameterError("voxel_size needs 3 values (mm)")
        kd, maps, target = read_skmtea(path, slices, int(echo), p.load_maps, p.voxel_size)
        ctx.log(f"read {kd!r} (echo {echo}) from {path.name}")
        out: dict[str, Any] = {"kspace": kd}
        if maps is not None:
            out["maps"] = maps
        if target is not None:
            out["target"] = to_volume(target, kd, units="a.u.", source=str(path), reference="target")
        return out


# ------------------------------------------------------------------------------------ undersampling
_CF = Param("center_fractions", list, [0.08], range=(0.0, 1.0), doc="fraction of fully sampled centre columns")
_ACCS = Param("accelerations", list, [4.0], range=(1.0, 64.0),
              doc="acceleration factors (one pair is drawn per volume, as fastMRI)")
_SEED = Param("seed", int, 0, doc="mask seed (fastMRI's RandomState semantics)")
_SEED_FILE = Param("seed_from_filename", bool, False, doc="seed with tuple(map(ord, file name)) as fastMRI's test masks")
_PAD = Param("respect_padding", bool, True, doc="never sample fastMRI's padding columns (apply_mask padding)")


class _Undersample(Stage):
    kind = "undersample"
    reads = ("kspace",)
    writes = ("kspace", "sampling_mask")

    def make_mask(self, kd: KSpaceData, p, ctx) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, ctx, p):
        kd = _kspace(ctx, f"undersample/{self.name}")
        m = _mask_2d(self.make_mask(kd, p, ctx), kd, f"undersample/{self.name}")
        H, W = kd.image_shape
        frac = float(np.broadcast_to(m if m.ndim == 2 else m[0], (H, W)).mean())
        ctx.log(f"sampling mask {m.shape}: {frac * 100:.1f}% of k-space, acceleration {1 / max(frac, 1e-12):.2f}")
        with kspace_memory_errors(f"undersample/{self.name}", kd.data.shape, kd.source):
            masked = _apply_mask(kd, m)
        return {"kspace": masked, "sampling_mask": m}


def _fastmri_seed(kd: KSpaceData, p):
    from .masks import fastmri_seed

    if p.seed_from_filename:
        if kd.source is None:
            raise ConfigError("seed_from_filename needs k-space read from a file")
        return fastmri_seed(kd.source.name)
    return p.seed


class RandomUndersample(_Undersample):
    """fastMRI RandomMaskFunc column mask."""

    name = "random"
    description = "fastMRI RandomMaskFunc: random columns + fully sampled centre (same columns for the same seed)"
    params = (_CF, _ACCS, _SEED, _SEED_FILE, _PAD)

    def make_mask(self, kd, p, ctx):
        from .masks import apply_padding, random_mask

        col, nlow, acc = random_mask(kd.image_shape[1], p.center_fractions, p.accelerations, _fastmri_seed(kd, p))
        ctx.log(f"random mask: acceleration {acc:g}, {nlow} centre columns")
        return apply_padding(col[None, :], kd.padding if p.respect_padding else None)


class EquispacedUndersample(_Undersample):
    """fastMRI EquispacedMaskFractionFunc column mask."""

    name = "equispaced"
    description = "fastMRI EquispacedMaskFractionFunc (or EquiSpacedMaskFunc with exact_spacing) column mask"
    params = (_CF, _ACCS, _SEED, _SEED_FILE, _PAD,
              Param("exact_spacing", bool, False, doc="every acceleration-th column (EquiSpacedMaskFunc)"))

    def make_mask(self, kd, p, ctx):
        from .masks import apply_padding, equispaced_mask

        col, nlow, acc = equispaced_mask(kd.image_shape[1], p.center_fractions, p.accelerations,
                                         _fastmri_seed(kd, p), exact_spacing=p.exact_spacing)
        ctx.log(f"equispaced mask: acceleration {acc:g}, {nlow} centre columns")
        return apply_padding(col[None, :], kd.padding if p.respect_padding else None)


class PoissonUndersample(_Undersample):
    """2D variable-density Poisson-disc mask with a calibration box."""

    name = "poisson"
    description = "2D variable-density Poisson disc with a fully sampled calibration box (skm-tea style)"
    params = (Param("acceleration", float, 6.0, range=(1.0, 100.0), doc="target acceleration"),
              Param("calib", list, [24, 24], range=(0, 4096), item_type=int, doc="calibration box (rows, columns)"),
              Param("seed", int, 0, doc="seed of the mask"),
              Param("crop_corner", bool, True, doc="leave the k-space corners unsampled"),
              Param("acq_shape", list, None, range=(1, 100000), item_type=int,
                    doc="acquired matrix (rows, columns) if smaller than the grid; the mask is zero-padded"),
              Param("tol", float, 0.1, range=(1e-3, 1.0), doc="accepted |achieved - target| acceleration"))

    def make_mask(self, kd, p, ctx):
        from .masks import check_acceleration, poisson_disc_mask
        from .skmtea import pad_mask_center

        check_acceleration(p.acceleration, "acceleration")
        if len(p.calib) != 2:
            raise ParameterError("calib needs 2 values (rows, columns)")
        shape = kd.image_shape
        if p.acq_shape is not None:
            if len(p.acq_shape) != 2 or any(a > s for a, s in zip(p.acq_shape, shape)):
                raise ParameterError(f"acq_shape {p.acq_shape} must be 2 sizes no larger than the k-space grid {shape}")
            shape = tuple(p.acq_shape)
        m, acc = poisson_disc_mask(shape, p.acceleration, tuple(p.calib), p.seed, p.crop_corner, p.tol)
        ctx.log(f"Poisson-disc mask {shape}: acceleration {acc:.2f}")
        return pad_mask_center(m, kd.image_shape)


class FileUndersample(_Undersample):
    """Mask stored in the file (fastMRI test ``mask``; skm-tea ``masks/poisson_{acc}x``)."""

    name = "from_file"
    optional_reads = ("sampling_mask",)
    description = "the file's mask: fastMRI test-set 'mask' or skm-tea masks/poisson_{acc}x"
    params = (Param("acceleration", float, None, range=(1.0, 100.0), doc="skm-tea: which masks/poisson_{acc}x"),
              Param("key", str, None, doc="skm-tea: mask name under masks/ (instead of acceleration)"))

    def make_mask(self, kd, p, ctx):
        if p.acceleration is None and p.key is None and "sampling_mask" in ctx:
            return ctx["sampling_mask"]
        if kd.source is None:
            raise InputDataError("undersample from_file: the k-space was not read from a file")
        if kd.layout == "skmtea":
            from .skmtea import SkmTeaFile

            with SkmTeaFile(kd.source) as sf:
                return sf.read_mask(p.acceleration, p.key)
        from .fastmri import FastMRIFile

        with FastMRIFile(kd.source) as fm:
            if fm.mask is None:
                raise InputDataError(f"{kd.source.name} has no 'mask' dataset; use undersample random or equispaced")
            return fm.mask[None, :]


# ------------------------------------------------------------------------------------------ coil maps
class EspiritMaps(Stage):
    """ESPIRiT sensitivity maps (torch)."""

    kind, name = "coil_maps", "espirit"
    reads = ("kspace",)
    optional_reads = ("sampling_mask",)
    writes = ("maps",)
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

        kd = _kspace(ctx, "coil_maps/espirit")
        if len(p.calib) != 2:
            raise ParameterError("calib needs 2 values (rows, columns)")
        mask = _mask_2d(ctx["sampling_mask"], kd, "coil_maps/espirit") if "sampling_mask" in ctx else None
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


class FileMaps(Stage):
    """Sensitivity maps from the file (skm-tea ``maps``) or a separate HDF5 file."""

    kind, name = "coil_maps", "from_file"
    reads = ("kspace",)
    optional_reads = ("maps",)
    writes = ("maps",)
    description = "maps stored with the data (skm-tea) or in an HDF5 file (dataset (x, y, z, coil, nmaps))"
    params = (Param("path", str, None, doc="HDF5 file with maps (default: the k-space file)"),
              Param("dataset", str, "maps", doc="dataset name"))

    def run(self, ctx, p):
        kd = _kspace(ctx, "coil_maps/from_file")
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


# -------------------------------------------------------------------------------------------- recon
_COMMON_RECON = RECON_PARAMS  # crop, complex_output, batch_slices (qsmkit.kspace)


class _Recon(ReconStage):
    """The built-in recon methods: :class:`qsmkit.kspace.ReconStage` that reports the fastMRI metrics."""

    def evaluate(self, image, target, kd):
        from .metrics import evaluate_volume

        return evaluate_volume(target, image, square_crop=kd.layout == "fastmri")


class ZeroFilled(_Recon):
    """Zero-filled inverse FFT, RSS (or maps) coil combination."""

    name = "zero_filled"
    description = "zero-filled inverse FFT with root-sum-of-squares (or sensitivity-weighted) coil combination"
    needs_maps = False
    params = _COMMON_RECON + (
        Param("combine", str, "rss", choices=("rss", "maps"), doc="coil combination"),
        DEVICE_PARAM)

    def run(self, ctx, p):
        self._magnitude_only = p.combine == "rss"
        if p.combine == "maps" and not "maps" in ctx:
            raise MissingArtifactError("stage recon/zero_filled with combine: maps needs 'maps'; add a coil_maps "
                                       "stage before it or use combine: rss")
        return super().run(ctx, p)

    def reconstruct(self, y, maps, mask, p, ctx):
        import torch

        from .transforms import center_crop, zero_filled_coils

        crop = self._crop
        img = zero_filled_coils(y, crop, mask)  # cropped coil images (S, C, h, w)
        if p.combine == "rss":
            return torch.sqrt((img.abs() ** 2).sum(1, keepdim=True)).to(torch.complex64)
        return (center_crop(maps, crop).conj() * img.unsqueeze(1)).sum(2)


class Sense(_Recon):
    """CG-SENSE with sensitivity maps."""

    name = "sense"
    reads = ("kspace", "maps")
    description = "CG-SENSE (Pruessmann 2001) with optional Tikhonov regularisation, torch, batched slices"
    params = _COMMON_RECON + (
        max_iter(30, range=(1, 10000), aliases=ITERATIONS, doc="maximum CG iterations"),
        tol(1e-6, range=(0.0, 1.0), doc="relative residual to stop at (0: run all iterations)"),
        lam(0.0, range=(0.0, 1e6), doc="Tikhonov weight (normalised data: image max ~1)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .sense import cg_sense

        x, _ = cg_sense(y, maps, mask, p.max_iter, p.tol, p.lam, log=ctx.log)
        return x


class CSWavelet(_Recon):
    """L1-wavelet compressed sensing (FISTA / POGM)."""

    name = "cs_wavelet"
    reads = ("kspace", "maps")
    description = "L1-wavelet CS-SENSE with FISTA or POGM (orthogonal wavelets from PyWavelets / ptwt)"
    params = _COMMON_RECON + (
        lam(0.002, range=(0.0, 1e3), doc="L1 weight (normalised data: image max ~1)"),
        max_iter(30, range=(1, 10000), aliases=ITERATIONS, doc="solver iterations"),
        Param("solver", str, "fista", choices=("fista", "pogm"), doc="proximal gradient method"),
        Param("restart", bool, True, doc="gradient restart of the momentum (O'Donoghue & Candes)"),
        Param("wavelet", str, "db4", doc="orthogonal wavelet (PyWavelets name)"),
        Param("levels", int, 4, range=(1, 10), doc="decomposition levels"),
        Param("backend", str, "auto", choices=("auto", "pywt", "ptwt"), doc="wavelet library (auto: pywt on CPU, ptwt on CUDA)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .cs import cs_wavelet

        return cs_wavelet(y, maps, mask, p.lam, p.max_iter, p.solver, p.wavelet, p.levels, p.backend,
                          p.restart, log=ctx.log)


STAGES = (FastMRIRead, SkmTeaRead, RandomUndersample, EquispacedUndersample, PoissonUndersample, FileUndersample,
          EspiritMaps, FileMaps, ZeroFilled, Sense, CSWavelet)


@hookimpl
def qsmkit_register_stages(registry):
    for st in STAGES:
        registry.add(st)


@hookimpl
def qsmkit_register_commands(cli):
    """``qsmkit simulate-kspace`` (see :mod:`qsmkit_kspace.commands`)."""
    from .commands import COMMANDS

    for cmd in COMMANDS:
        cli.add_command(cmd)
