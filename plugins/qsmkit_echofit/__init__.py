"""Built-in plugin: multi-echo weighted linear fit (``stage: echo_combine, method: weighted_fit``)."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE
from qsmkit.errors import GeometryError, InputDataError, MissingArtifactError, StageError, UnitsError

from .wls import weighted_fit

__all__ = ["WeightedFit", "weighted_fit"]


class WeightedFit(Stage):
    """Weighted least-squares fit of unwrapped phase against TE: total field and noise weight."""

    kind, name = "echo_combine", "weighted_fit"
    reads = ("unwrapped_phase", "echo_times", "field_strength")
    optional_reads = ("magnitude", "mask")
    writes = ("total_field", "noise_weight")
    description = ("weighted least-squares phase = phi0 + omega*TE (weights magnitude^2); "
                   "total field in ppm and its inverse noise std")
    params = (
        Param("fit_offset", bool, True,
              doc="fit the phase offset phi0 (needs >= 2 echoes); false assumes phi0 = 0"),
        Param("weighting", str, "magnitude_squared", choices=("magnitude_squared", "uniform"),
              doc="echo weights: magnitude^2 (inverse phase-noise variance) or equal"),
        Param("correct_wraps", bool, True,
              doc="move an echo that lies more than pi from the line through the other echoes by "
                  "2*pi*k and refit (repairs isolated unwrapping errors; needs > 2 echoes)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        up = ctx["unwrapped_phase"]
        phase = np.asarray(up.data)
        if phase.ndim == 3:
            phase = phase[..., None]
        if phase.ndim != 4:
            raise InputDataError(f"unwrapped_phase must be 4D (x, y, z, echo), got shape {phase.shape}")
        n_e = phase.shape[3]
        te = np.atleast_1d(np.asarray(ctx["echo_times"], dtype=np.float64))
        if te.size != n_e:
            raise InputDataError(f"{te.size} echo times were given for {n_e} echoes; give one echo time per echo")
        if not np.all(np.isfinite(te)) or np.any(te <= 0):
            raise UnitsError(f"echo times must be positive seconds, got {te.tolist()}")
        if np.any(te > 1.0):
            raise UnitsError(f"echo times {te.tolist()} look like milliseconds; give them in seconds")
        b0 = float(ctx["field_strength"])
        if not np.isfinite(b0) or b0 <= 0:
            raise UnitsError(f"field_strength must be a positive number of tesla, got {b0}")
        if p.fit_offset and n_e < 2:
            raise StageError("echo_combine/weighted_fit: one echo cannot separate the phase offset from "
                             "the field; set fit_offset: false (assumes phi0 = 0)")
        if p.fit_offset and np.ptp(te) <= 0:
            raise InputDataError("all echo times are equal; the fit needs different echo times")
        mag = None
        if p.weighting == "magnitude_squared":
            if "magnitude" not in ctx:
                raise MissingArtifactError("echo_combine/weighted_fit needs 'magnitude' for weighting: "
                                           "magnitude_squared; give it under inputs or set weighting: uniform")
            mv = ctx["magnitude"]
            mag = np.asarray(mv.data)
            if mag.ndim == 3:
                mag = mag[..., None]
            if mag.shape != phase.shape:
                raise GeometryError(f"magnitude shape {mag.shape} differs from unwrapped_phase {phase.shape}; "
                                    "give magnitude and phase on the same grid and echoes")
        mask = None
        if "mask" in ctx:
            mask = np.asarray(ctx["mask"].data) > 0
            if mask.shape != phase.shape[:3]:
                raise GeometryError(f"mask grid {mask.shape} differs from the phase grid {phase.shape[:3]}")
            if not mask.any():
                raise StageError("echo_combine/weighted_fit: the mask is empty; check the mask stage or file")
        res = weighted_fit(phase, mag, te, b0, mask, p.fit_offset, p.weighting, p.correct_wraps)
        sig = f"sigma {res['sigma']:.4g}, " if np.isfinite(res["sigma"]) else ""
        ctx.log(f"fitted {n_e} echoes (TE {te.min() * 1e3:.2f}-{te.max() * 1e3:.2f} ms, {b0:g} T); "
                f"noise {sig}from {res['sigma_source']}; {res['n_corrected']} voxel(s) with a 2*pi echo fix")
        return {"total_field": up.like(res["field"], units="ppm"),
                "noise_weight": up.like(res["noise_weight"], units="1/ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(WeightedFit)
