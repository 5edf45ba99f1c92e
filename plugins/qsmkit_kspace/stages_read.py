"""``kspace_read`` stages: ``fastmri`` and ``skmtea`` read the file given as ``inputs.kspace``.

Each replaces the ``kspace`` artifact (a path) by a :class:`~qsmkit.kspace.KSpaceData` (lazily,
only the selected slices) and writes ``target`` (reference magnitude Volume) when the file has
one, ``sampling_mask`` (fastMRI test files) and ``maps`` (skm-tea).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsmkit import Param, Stage
from qsmkit.errors import ConfigError, ParameterError
from qsmkit.kspace import KSpaceData, to_volume

__all__ = ["FastMRIRead", "SkmTeaRead"]


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


_SLICES = Param("slices", list, None, item_type=int, doc="slices to read (default all; inputs.slices also accepts 'a:b')")
_VOXEL = Param("voxel_size", list, None, unit="mm", range=(1e-3, 100.0),
               doc="override the voxel size (fastMRI: H, W, slice; skm-tea: x, y, z)")


def _voxel_size(p):
    """``params.voxel_size`` (None or 3 values in mm)."""
    if p.voxel_size is not None and len(p.voxel_size) != 3:
        raise ParameterError("voxel_size needs 3 values (mm)")
    return p.voxel_size


class _KSpaceRead(Stage):
    """A ``kspace_read`` stage: format check, file path and slice selection, then :meth:`read`."""

    kind = "kspace_read"
    reads = ("kspace",)
    writes = ("kspace",)

    @staticmethod
    def file_class():  # pragma: no cover - interface
        """The file class (a context manager with ``n_slices``) the validation-time check opens."""
        raise NotImplementedError

    def read(self, path: Path, slices, ctx, p) -> tuple[KSpaceData, dict[str, Any], Any, str]:  # pragma: no cover
        """``(kspace, other outputs, target image or None, the target's reference name)``."""
        raise NotImplementedError

    @classmethod
    def check_inputs(cls, inputs, p):
        _check_file(inputs, p, cls.name, cls.file_class())

    def run(self, ctx, p):
        _check_format(ctx, self.name)
        path = _source_path(ctx)
        slices = p.slices if p.slices is not None else (ctx["slices"] if "slices" in ctx else None)
        kd, extra, target, reference = self.read(path, slices, ctx, p)
        out: dict[str, Any] = {"kspace": kd, **extra}
        if target is not None:
            out["target"] = to_volume(target, kd, units="a.u.", source=str(path), reference=reference)
        return out


class FastMRIRead(_KSpaceRead):
    """Read a fastMRI multi-coil or single-coil HDF5 file."""

    name = "fastmri"
    optional_reads = ("format", "slices")
    optional_writes = ("sampling_mask", "target")  # when the file has them (test files; reference images)
    description = "fastMRI .h5 (lazy per slice; header sizes, padding, mask and reference image)"
    params = (_SLICES,
              Param("target_key", str, "auto", doc="reference dataset: auto (reconstruction_rss / _esc) or a name"),
              _VOXEL)

    @staticmethod
    def file_class():
        from .fastmri import FastMRIFile

        return FastMRIFile

    def read(self, path, slices, ctx, p):
        from .fastmri import read_fastmri

        kd, mask, target = read_fastmri(path, slices, p.target_key, _voxel_size(p))
        ctx.log(f"read {kd!r} from {path.name}")
        return kd, ({} if mask is None else {"sampling_mask": mask[None, :]}), target, p.target_key


class SkmTeaRead(_KSpaceRead):
    """Read an skm-tea v1 recon HDF5 file (one echo)."""

    name = "skmtea"
    optional_reads = ("format", "slices", "echo")
    optional_writes = ("maps", "target")  # when stored in the file
    description = "skm-tea recon .h5: hybrid (x, ky, kz) k-space per readout slice, maps, target, masks"
    params = (_SLICES,
              Param("echo", int, None, range=(0, 16), doc="echo index (default inputs.echo or 0)"),
              Param("load_maps", bool, True, doc="also read the stored sensitivity maps"),
              _VOXEL)

    @staticmethod
    def file_class():
        from .skmtea import SkmTeaFile

        return SkmTeaFile

    def read(self, path, slices, ctx, p):
        from .skmtea import read_skmtea

        echo = p.echo if p.echo is not None else (ctx["echo"] if "echo" in ctx else 0)
        if isinstance(echo, bool) or not isinstance(echo, (int, np.integer)):
            raise ConfigError(f"inputs.echo = {echo!r} must be an integer echo index")
        kd, maps, target = read_skmtea(path, slices, int(echo), p.load_maps, _voxel_size(p))
        ctx.log(f"read {kd!r} (echo {echo}) from {path.name}")
        return kd, ({} if maps is None else {"maps": maps}), target, "target"
