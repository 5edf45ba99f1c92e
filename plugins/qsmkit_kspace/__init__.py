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
``(slices, n_maps, coils, H, W)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.errors import ConfigError, GeometryError, InputDataError, MissingArtifactError, ParameterError

from .kdata import KSpaceData, from_volume, to_volume

__all__ = [
    "KSpaceData", "FastMRIRead", "SkmTeaRead", "RandomUndersample", "EquispacedUndersample",
    "PoissonUndersample", "FileUndersample", "EspiritMaps", "FileMaps", "ZeroFilled", "Sense", "CSWavelet",
    "simulate_kspace_files",
]


def simulate_kspace_files(out_dir, **kwargs) -> dict[str, Path]:
    """Write small simulated multi-coil files in both layouts (see :mod:`qsmkit_kspace.simulate`)."""
    from .simulate import simulate_kspace_files as _sim

    return _sim(out_dir, **kwargs)


# ----------------------------------------------------------------------------------------- helpers
def _kspace(ctx, label: str) -> KSpaceData:
    kd = ctx["kspace"]
    if not isinstance(kd, KSpaceData):
        raise MissingArtifactError(f"stage {label} needs k-space data but 'kspace' is {type(kd).__name__}; "
                                   f"add a kspace_read stage first")
    return kd


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


def _mask_2d(mask: Any, kd: KSpaceData, where: str) -> np.ndarray:
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
        return {"kspace": _apply_mask(kd, m), "sampling_mask": m}


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
              Param("iterations", int, 30, range=(1, 1000), doc="maximum power iterations per voxel"),
              Param("tol", float, 1e-4, range=(0.0, 1.0), doc="stop when eigenvalues change less than this"),
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
        maps, eig = espirit_maps(kd.data, mask, tuple(p.calib), p.kernel, p.threshold, p.crop, p.maps,
                                 p.iterations, p.tol, p.softcrop, dev, log=ctx.log)
        from . import espirit as _esp

        if _esp.last_iterations:
            ctx.log(f"ESPIRiT power iterations (last slice): {_esp.last_iterations}")
        inside = float((eig[:, 0] > p.crop).mean())
        ctx.log(f"ESPIRiT maps {maps.shape}: {inside * 100:.1f}% of voxels kept (eigenvalue > {p.crop})")
        return {"maps": maps}


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
                if ds.ndim != 5:
                    raise InputDataError(f"{path.name}: {p.dataset} has shape {ds.shape}; expected (x, y, z, coil, nmaps)")
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
_COMMON_RECON = (
    Param("crop", bool, True, doc="centre crop to the header's recon size (image space)"),
    Param("complex_output", str, "none", choices=("none", "real_imag", "4d"),
          doc="also write the complex image: image_real + image_imag, or image_complex (x, y, z, 2)"),
    Param("batch_slices", int, 8, range=(1, 4096), doc="slices reconstructed together"),
)


class _Recon(Stage):
    kind = "recon"
    reads = ("kspace",)
    optional_reads = ("sampling_mask", "maps", "target")
    writes = ("image",)
    optional_writes = ("image_real", "image_imag", "image_complex")  # complex_output; metrics with a target
    needs_maps = True

    def reconstruct(self, y, maps, mask, p, ctx):  # pragma: no cover - interface
        """Normalised k-space batch -> complex image batch (S, M, H, W) (torch)."""
        raise NotImplementedError

    def run(self, ctx, p):
        import torch

        from .sense import mask_tensor
        from .transforms import center_crop, normalization_scale

        label = f"recon/{self.name}"
        kd = _kspace(ctx, label)
        if p.complex_output != "none" and getattr(self, "_magnitude_only", False):
            raise ParameterError(f"{label}: complex_output needs a complex image; use combine: maps")
        mask = _mask_2d(ctx["sampling_mask"], kd, label) if "sampling_mask" in ctx else None
        maps = None
        if "maps" in ctx and not getattr(self, "_magnitude_only", False):
            maps = np.asarray(ctx["maps"])
            if maps.ndim != 5 or maps.shape[0] != kd.n_slices or maps.shape[2:] != (kd.n_coils,) + kd.image_shape:
                raise GeometryError(f"{label}: maps {maps.shape} do not match the k-space {kd.data.shape}")
        elif self.needs_maps and getattr(p, "combine", "maps") == "maps":
            raise MissingArtifactError(f"stage {label} needs 'maps'; add a coil_maps stage (espirit) before it")
        dev = resolve_device(p.device)
        scale = normalization_scale(kd.data, mask) if getattr(p, "normalize", True) else 1.0
        S = kd.n_slices
        H, W = kd.image_shape
        crop = kd.crop_size if p.crop else None
        self._crop = crop
        images = []
        for s0 in range(0, S, p.batch_slices):
            sl = slice(s0, min(S, s0 + p.batch_slices))
            y = torch.from_numpy(np.ascontiguousarray(kd.data[sl])).to(dev) / scale
            mk = mask_tensor(mask if mask is None or mask.ndim == 2 else mask[sl], y.shape[0], (H, W), dev)
            mp = torch.from_numpy(np.ascontiguousarray(maps[sl])).to(dev) if maps is not None else None
            with torch.no_grad():
                x = self.reconstruct(y * mk, mp, mk, p, ctx)
            images.append(center_crop(x, crop).cpu().numpy() * scale)
        img = np.concatenate(images).astype(np.complex64)  # (S, M, h, w)
        mag = np.sqrt(np.sum(np.abs(img) ** 2, axis=1)).astype(np.float32)
        out: dict[str, Any] = {"image": to_volume(mag, kd, units="a.u.", recon=self.name)}
        if p.complex_output != "none":
            c = img[:, 0]
            if p.complex_output == "real_imag":
                out["image_real"] = to_volume(c.real.astype(np.float32), kd, units="a.u.")
                out["image_imag"] = to_volume(c.imag.astype(np.float32), kd, units="a.u.")
            else:
                out["image_complex"] = to_volume(np.stack([c.real, c.imag], axis=-1).astype(np.float32), kd,
                                                 units="a.u.", components="real,imag")
        if "target" in ctx:
            from .metrics import evaluate_volume

            gt = from_volume(ctx["target"], kd).astype(np.float32)
            pred = center_crop(mag, gt.shape[-2:])
            m = evaluate_volume(gt, pred, square_crop=kd.layout == "fastmri")
            ctx.log(f"NMSE {m['nmse']:.4g}  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}")
            out["metrics"] = m
        return out


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
        Param("iterations", int, 30, range=(1, 10000), doc="maximum CG iterations"),
        Param("tol", float, 1e-6, range=(0.0, 1.0), doc="relative residual to stop at (0: run all iterations)"),
        Param("lambda", float, 0.0, range=(0.0, 1e6), doc="Tikhonov weight (normalised data: image max ~1)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .sense import cg_sense

        x, _ = cg_sense(y, maps, mask, p.iterations, p.tol, p["lambda"], log=ctx.log)
        return x


class CSWavelet(_Recon):
    """L1-wavelet compressed sensing (FISTA / POGM)."""

    name = "cs_wavelet"
    reads = ("kspace", "maps")
    description = "L1-wavelet CS-SENSE with FISTA or POGM (orthogonal wavelets from PyWavelets / ptwt)"
    params = _COMMON_RECON + (
        Param("lambda", float, 0.002, range=(0.0, 1e3), doc="L1 weight (normalised data: image max ~1)"),
        Param("iterations", int, 30, range=(1, 10000), doc="solver iterations"),
        Param("solver", str, "fista", choices=("fista", "pogm"), doc="proximal gradient method"),
        Param("restart", bool, True, doc="gradient restart of the momentum (O'Donoghue & Candes)"),
        Param("wavelet", str, "db4", doc="orthogonal wavelet (PyWavelets name)"),
        Param("levels", int, 4, range=(1, 10), doc="decomposition levels"),
        Param("backend", str, "auto", choices=("auto", "pywt", "ptwt"), doc="wavelet library (auto: pywt on CPU, ptwt on CUDA)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .cs import cs_wavelet

        return cs_wavelet(y, maps, mask, p["lambda"], p.iterations, p.solver, p.wavelet, p.levels, p.backend,
                          p.restart, log=ctx.log)


STAGES = (FastMRIRead, SkmTeaRead, RandomUndersample, EquispacedUndersample, PoissonUndersample, FileUndersample,
          EspiritMaps, FileMaps, ZeroFilled, Sense, CSWavelet)


@hookimpl
def qsmkit_register_stages(registry):
    for st in STAGES:
        registry.add(st)
