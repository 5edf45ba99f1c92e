"""``undersample`` stages: ``random``, ``equispaced`` (fastMRI-compatible column masks), ``poisson``
(2D variable-density Poisson disc) and ``from_file``; each writes the masked ``kspace`` and the
``sampling_mask``.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage
from qsmkit.errors import ConfigError, InputDataError, ParameterError
from qsmkit.kspace import KSpaceData, check_sampling_mask, kspace_memory_errors, require_kspace

__all__ = ["RandomUndersample", "EquispacedUndersample", "PoissonUndersample", "FileUndersample"]


def _apply_mask(kd: KSpaceData, m: np.ndarray) -> KSpaceData:
    mm = m[:, None] if m.ndim == 3 else m
    return kd.with_data((kd.data * mm).astype(np.complex64))


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
        kd = require_kspace(ctx, f"undersample/{self.name}")
        m = check_sampling_mask(self.make_mask(kd, p, ctx), kd, f"undersample/{self.name}")
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
