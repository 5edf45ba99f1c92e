"""Stages of the GRE k-space -> QSM front end: ``kspace_read/gre``, ``undersample/gre``,
``coil_combine/sense`` and ``coil_combine/aspire``.

``kspace_read/gre`` opens a ``qsmkit-gre`` file (:mod:`.gre_io`, ``docs/gre_kspace.md``) as a
lazy :class:`~.gre_io.GreKSpace` and writes ``kspace``, ``echo_times`` (s) and
``field_strength`` (T) (and ``sampling_mask`` when the file has one); ``undersample/gre`` masks
the phase encodings ``(ky, kz)`` of every echo alike; a ``coil_combine`` stage reconstructs
each echo (:mod:`.gre`) and writes the 4D ``magnitude`` (a.u.) and wrapped ``phase`` (rad)
Volumes on the file's grid (affine, voxel size, B0 direction), which the QSM stages
(``unwrap``, ``mask``, ``echo_combine``, ``background``, ``inversion``) read as they read
magnitude and phase NIfTI inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsmkit import Param, Stage
from qsmkit.device import DEVICE_PARAM
from qsmkit.errors import ConfigError, MissingArtifactError, ParameterError
from qsmkit.params import CPU_DEVICE, lam, max_iter, tol
from qsmkit.threads import limited
from qsmkit.volume import Volume

from .gre_io import GreKSpace

__all__ = ["GreRead", "GreUndersample", "GreSense", "GreAspire", "require_gre"]


def require_gre(ctx, label: str) -> GreKSpace:
    """The ``kspace`` artifact as :class:`GreKSpace`, or a one-line error."""
    kd = ctx["kspace"]
    if not isinstance(kd, GreKSpace):
        raise MissingArtifactError(f"stage {label} needs multi-echo GRE k-space but 'kspace' is {type(kd).__name__}; "
                                   f"read it with {{stage: kspace_read, method: gre}} first")
    return kd


def _check_format(inputs) -> None:
    if "format" in inputs and inputs["format"] is not None:
        fmt = str(inputs["format"]).lower().replace("-", "").replace("_", "")
        if fmt not in ("gre", "qsmkitgre"):
            raise ConfigError(f"inputs.format is '{inputs['format']}' but the kspace_read method is 'gre'; "
                              f"make them agree")


def _agree(inputs, kd: GreKSpace, where: str) -> None:
    """Echo times / field strength given under inputs must agree with the file's."""
    if "echo_times" in inputs and inputs["echo_times"] is not None:
        te = np.atleast_1d(np.asarray(inputs["echo_times"], np.float64))
        if te.shape != kd.echo_times.shape or not np.allclose(te, kd.echo_times, rtol=1e-3, atol=1e-6):
            raise ConfigError(f"{where}: inputs.echo_times {np.round(te, 6).tolist()} s disagree with the file's "
                              f"{np.round(kd.echo_times, 6).tolist()} s; remove inputs.echo_times")
    if "field_strength" in inputs and inputs["field_strength"] is not None:
        if abs(float(inputs["field_strength"]) - kd.field_strength) > 1e-3:
            raise ConfigError(f"{where}: inputs.field_strength {inputs['field_strength']} T disagrees with the "
                              f"file's {kd.field_strength:g} T; remove inputs.field_strength")


class GreRead(Stage):
    """Read a ``qsmkit-gre`` multi-echo multi-coil 3D k-space file (lazily, one echo at a time)."""

    kind = "kspace_read"
    name = "gre"
    reads = ("kspace",)
    optional_reads = ("format", "echo_times", "field_strength")
    writes = ("kspace", "echo_times", "field_strength")
    optional_writes = ("sampling_mask",)
    description = "qsmkit-gre .h5: (echo, coil, kx, ky, kz) k-space, echo times, B0, affine, mask, noise"
    params = (Param("prewhiten", bool, True, doc="prewhiten the coils with the file's noise samples"),
              Param("apply_mask", bool, True, doc="apply the file's sampling_mask"))

    @classmethod
    def check_inputs(cls, inputs, p):
        from .gre_io import read_gre

        _check_format(inputs)
        if isinstance(inputs.get("kspace"), Path):
            _agree(inputs, read_gre(inputs["kspace"], p.prewhiten, p.apply_mask), "kspace_read/gre")

    def run(self, ctx, p):
        from .gre_io import read_gre

        _check_format(ctx)
        src = ctx["kspace"]
        if isinstance(src, GreKSpace):
            raise ConfigError("kspace_read got k-space that was already read; give inputs.kspace as a file path")
        if not isinstance(src, (str, Path)):
            raise ConfigError(f"inputs.kspace must be a file path, got {type(src).__name__}")
        kd = read_gre(Path(src), p.prewhiten, p.apply_mask)
        _agree(ctx, kd, "kspace_read/gre")
        ctx.log(f"read {kd!r} from {Path(src).name}" + (" (prewhitened)" if kd.whitener is not None else ""))
        out: dict[str, Any] = {"kspace": kd, "echo_times": np.asarray(kd.echo_times, np.float64),
                               "field_strength": float(kd.field_strength)}
        if kd.sampling_mask is not None:
            out["sampling_mask"] = kd.sampling_mask
        return out


def gre_mask(shape, pattern: str, acceleration: float, calib, seed: int) -> np.ndarray:
    """A ``(ky, kz)`` sampling mask: ``poisson`` (variable-density Poisson disc) or ``uniform``
    (every ``acceleration``-th ky line, all kz, plus ``calib[0]`` centre lines)."""
    from .masks import check_acceleration, poisson_disc_mask

    acc = check_acceleration(acceleration, "acceleration")
    Y, Z = (int(s) for s in shape)
    if pattern == "poisson":
        m, _ = poisson_disc_mask((Y, Z), acc, tuple(int(c) for c in calib), int(seed))
        return m
    if float(acc) != int(acc):
        raise ParameterError(f"pattern: uniform needs an integer acceleration, got {acceleration}")
    m = np.zeros((Y, Z), dtype=bool)
    m[Y // 2 % int(acc)::int(acc)] = True
    c = min(int(calib[0]), Y)
    m[Y // 2 - c // 2:Y // 2 - c // 2 + c] = True
    return m


class GreUndersample(Stage):
    """Retrospective undersampling of the phase encodings ``(ky, kz)``, the same for every echo."""

    kind = "undersample"
    name = "gre"
    reads = ("kspace",)
    writes = ("kspace", "sampling_mask")
    description = "(ky, kz) mask of multi-echo GRE k-space: Poisson disc or uniform (every R-th ky) + calibration"
    params = (Param("pattern", str, "poisson", choices=("poisson", "uniform"), doc="sampling pattern"),
              Param("acceleration", float, 2.0, range=(1.0, 32.0),
                    doc="acceleration (samples of the full grid / acquired)"),
              Param("calib", list, [24, 24], range=(0, 4096), item_type=int,
                    doc="fully sampled centre (ky, kz); uniform uses the ky size"),
              Param("seed", int, 0, doc="mask seed (poisson)"))

    def run(self, ctx, p):
        kd = require_gre(ctx, "undersample/gre")
        if len(p.calib) != 2:
            raise ParameterError("calib needs 2 values (ky, kz)")
        m = gre_mask(kd.shape[3:], p.pattern, p.acceleration, p.calib, p.seed)
        kd = kd.with_mask(m)
        ctx.log(f"{p.pattern} mask {m.shape}: {kd.sampling_mask.mean() * 100:.1f}% of (ky, kz), acceleration "
                f"{1 / max(kd.sampling_mask.mean(), 1e-12):.2f}")
        return {"kspace": kd, "sampling_mask": kd.sampling_mask}


_PHASE_OFFSET = Param("phase_offset", str, "remove", choices=("remove", "keep"),
                      doc="remove the echo-independent phase (coil + object phi0; needs TE1 = n dTE) or keep it")
_SIGMA = Param("sigma_mm", float, 4.0, unit="mm", range=(0.0, 50.0),
               doc="Gaussian smoothing of the phase-offset estimate (0: none)")
_HOMOG = Param("homogenize_mm", float, 15.0, unit="mm", range=(0.0, 200.0),
               doc="divide the magnitude by its smoothed receive profile of this width (0: keep the coil bias)")


class _Combine(Stage):
    """A ``coil_combine`` stage: multi-echo multi-coil k-space -> ``magnitude``, ``phase`` (4D Volumes)."""

    kind = "coil_combine"
    reads = ("kspace",)
    writes = ("magnitude", "phase")

    def volumes(self, kd: GreKSpace, images: np.ndarray, extra: dict, homogenize_mm: float = 0.0) -> dict[str, Volume]:
        from . import gre

        te = [float(t) for t in kd.echo_times]
        meta = {"echo_times": te, "field_strength": float(kd.field_strength), "coil_combine": self.name,
                "source": str(kd.source) if kd.source is not None else None, "homogenize_mm": float(homogenize_mm),
                **extra}
        mag = np.abs(images).astype(np.float32)
        if homogenize_mm > 0:
            mag = gre.homogenize(mag, self.sigma_vox(kd, homogenize_mm))
        mag = Volume(mag, kd.affine, units="a.u.", b0_direction=kd.b0_direction, meta=dict(meta))
        return {"magnitude": mag, "phase": mag.like(np.angle(images).astype(np.float32), units="rad")}

    @staticmethod
    def sigma_vox(kd: GreKSpace, sigma_mm: float):
        return tuple(float(sigma_mm) / v for v in kd.voxel_size)


class GreSense(_Combine):
    """SENSE per echo with ESPIRiT maps of the first echo (SENSE-1 when fully sampled)."""

    name = "sense"
    description = ("per-echo SENSE-1 / CG-SENSE with first-echo ESPIRiT maps on one virtual reference coil; "
                   "echo-independent phase removed (ASPIRE)")
    params = (Param("calib", list, [24, 24], range=(4, 4096), item_type=int, doc="ESPIRiT calibration box (ky, kz)"),
              Param("kernel", int, 6, range=(2, 16), doc="ESPIRiT kernel width"),
              Param("crop", float, 0.8, range=(0.0, 1.0), doc="ESPIRiT eigenvalue crop"),
              max_iter(30, range=(1, 1000), doc="CG-SENSE iterations (undersampled data)"),
              tol(1e-5, doc="CG-SENSE relative residual"),
              lam(0.0, range=(0.0, 1e3), doc="CG-SENSE Tikhonov weight (data normalised to 1)"),
              _PHASE_OFFSET, _SIGMA, _HOMOG,
              Param("batch_slices", int, 16, range=(1, 4096), doc="readout positions per CG batch"),
              DEVICE_PARAM)

    def run(self, ctx, p):
        from qsmkit.device import resolve_device

        from . import gre

        kd = require_gre(ctx, "coil_combine/sense")
        if len(p.calib) != 2:
            raise ParameterError("calib needs 2 values (ky, kz)")
        if p.phase_offset == "remove":
            gre.echo_ratio(kd.echo_times)
        dev = resolve_device(p.device)
        mask = kd.sampling_mask
        h0 = gre.hybrid(kd.echo(0))
        with limited(1 if dev.type == "cpu" else None):  # ESPIRiT's many small problems: one thread
            maps = gre.espirit_3d(h0, mask, tuple(p.calib), p.kernel, crop=p.crop, device=dev, log=ctx.log)
        first, _ = gre.sense_echo(h0, maps, mask, p.max_iter, p.tol, p["lambda"], p.batch_slices, dev)
        r = gre.virtual_reference(maps, np.abs(first))
        maps = gre.reference_maps(maps, r)
        images = np.empty(kd.grid_shape + (kd.n_echoes,), dtype=np.complex64)
        for e in range(kd.n_echoes):
            h = h0 if e == 0 else gre.hybrid(kd.echo(e))
            images[..., e], it = gre.sense_echo(h, maps, mask, p.max_iter, p.tol, p["lambda"], p.batch_slices, dev)
            ctx.log(f"echo {e + 1}/{kd.n_echoes}: " + (f"CG-SENSE {it} iterations" if it else "SENSE-1"))
        del h0
        if p.phase_offset == "remove":
            off = gre.phase_offset_phasor(images[..., 0], images[..., 1], kd.echo_times,
                                          self.sigma_vox(kd, p.sigma_mm))
            images = gre.remove_phase_offset(images, off[..., None])
            ctx.log(f"echo-independent phase removed (ASPIRE, smoothing {p.sigma_mm:g} mm)")
        return self.volumes(kd, images, {"phase_offset_removed": p.phase_offset == "remove"}, p.homogenize_mm)


class GreAspire(_Combine):
    """ASPIRE: per-coil phase offsets removed, then a magnitude-weighted sum (fully sampled data)."""

    name = "aspire"
    description = "per-coil phase offsets (ASPIRE, Eckstein 2018) removed, magnitude-weighted sum; no maps"
    params = (_SIGMA, _HOMOG, CPU_DEVICE)

    def run(self, ctx, p):
        from . import gre
        from .transforms import ifft2c_np

        kd = require_gre(ctx, "coil_combine/aspire")
        if kd.sampling_mask is not None and not bool(np.all(kd.sampling_mask)):
            raise ParameterError("coil_combine/aspire needs fully sampled k-space (per-coil images); use "
                                 "coil_combine/sense for undersampled data")
        gre.echo_ratio(kd.echo_times)

        def coils(e: int) -> np.ndarray:  # (coil, x, y, z)
            return np.moveaxis(ifft2c_np(gre.hybrid(kd.echo(e)), axes=(-2, -1)), 1, 0)

        c1 = coils(0)
        c2 = coils(1) if kd.n_echoes > 1 else None
        off = gre.phase_offset_phasor(c1, c2, kd.echo_times, self.sigma_vox(kd, p.sigma_mm))
        images = np.empty(kd.grid_shape + (kd.n_echoes,), dtype=np.complex64)
        for e in range(kd.n_echoes):
            ce = c1 if e == 0 else c2 if e == 1 else coils(e)
            images[..., e] = gre.aspire_combine(ce, off)
            ctx.log(f"echo {e + 1}/{kd.n_echoes} combined")
        return self.volumes(kd, images, {"phase_offset_removed": True}, p.homogenize_mm)
