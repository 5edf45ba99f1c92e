"""Built-in plugin: multi-echo field fits (``stage: echo_combine``, methods ``weighted_fit`` and ``nonlinear_fit``)."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE, max_iter, tol
from qsmkit.errors import GeometryError, InputDataError, MissingArtifactError, StageError
from qsmkit.operators import dilate_mm

from .nonlinear import NOISE_MODES, linear_start, nonlinear_fit
from .wls import weighted_fit

__all__ = ["WeightedFit", "weighted_fit", "NonlinearFit", "nonlinear_fit"]

#: the ``fit_margin_mm`` parameter of both fits
MARGIN_PARAM = Param(
    "fit_margin_mm", float, 0.0, unit="mm", range=(0.0, 50.0),
    doc="fit also in a shell of this width (at least one voxel) around the mask (the field there helps total "
        "field inversion tell brain from background sources at the mask's edge; needs the phase unwrapped "
        "there, i.e. the unwrap stage before the mask stage); 0 = inside the mask")


def fit_region(ctx, shape, margin_mm: float, voxel_size, unwrapped: np.ndarray, label: str):
    """The voxels to fit: the mask (None: all), dilated by ``margin_mm`` (at least one voxel) when given.
    The margin is dropped, with a log line, where the unwrapped phase is zero (unwrapping ran inside
    the mask only)."""
    mask = ctx.optional_mask(shape)
    if mask is None or margin_mm <= 0:
        return mask
    margin_mm = max(float(margin_mm), float(min(voxel_size)))
    grown = dilate_mm(mask, margin_mm, voxel_size)
    shell = grown & ~mask
    unwrapped_there = np.any(unwrapped[shell] != 0, axis=-1)
    if not unwrapped_there.any():
        ctx.log(f"warning: {label}: fit_margin_mm {margin_mm:g}: the unwrapped phase is zero around the mask (the "
                f"unwrapping ran inside the mask only); fitting inside the mask. Put the unwrap stage before the "
                f"mask stage to fit the margin")
        return mask
    grown[shell] = unwrapped_there
    ctx.log(f"fitting the mask and a {margin_mm:g} mm margin around it ({int(unwrapped_there.sum())} voxels)")
    return grown


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
        MARGIN_PARAM,
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
        te, b0 = ctx.echo_times(n_e), ctx.field_strength()
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
        mask = fit_region(ctx, phase.shape[:3], p.fit_margin_mm, up.voxel_size, phase, "echo_combine/weighted_fit")
        res = weighted_fit(phase, mag, te, b0, mask, p.fit_offset, p.weighting, p.correct_wraps)
        sig = f"sigma {res['sigma']:.4g}, " if np.isfinite(res["sigma"]) else ""
        ctx.log(f"fitted {n_e} echoes (TE {te.min() * 1e3:.2f}-{te.max() * 1e3:.2f} ms, {b0:g} T); "
                f"noise {sig}from {res['sigma_source']}; {res['n_corrected']} voxel(s) with a 2*pi echo fix")
        return {"total_field": up.like(res["field"], units="ppm"),
                "noise_weight": up.like(res["noise_weight"], units="1/ppm")}


class NonlinearFit(Stage):
    """Complex nonlinear fit of the multi-echo signal (Liu et al. 2013): field, phi0 and a residual noise map."""

    kind, name = "echo_combine", "nonlinear_fit"
    reads = ("phase", "magnitude", "unwrapped_phase", "echo_times", "field_strength")
    #: ``phase_offset``: the offset an earlier stage (phase_offset/mcpc3ds) removed from ``phase``;
    #: the fitted offset is added to it, so ``phase_offset`` stays the offset of the measured data
    optional_reads = ("mask", "phase_offset")
    writes = ("total_field", "noise_weight", "phase_offset")
    description = ("complex nonlinear fit |S_e| exp(i(phi0 + omega TE_e)) to the wrapped data (Gauss-Newton / "
                   "Levenberg-Marquardt from the weighted linear fit); noise weight from the residuals")
    params = (
        max_iter(20, range=(0, 500), doc="Levenberg-Marquardt iterations at most (0 = the linear fit)"),
        tol(1e-5, range=(1e-9, 0.1),
            doc="rad: a voxel stops when its step changes the model phase by less than this"),
        Param("noise", str, "voxel", choices=NOISE_MODES,
              doc="noise level from the residuals: pooled (median over the mask), local (Gaussian average) "
                  "or voxel (each voxel's residual, floored at a quarter of the pooled level: low weight "
                  "where the model does not fit)"),
        Param("noise_sigma_mm", float, 4.0, unit="mm", range=(0.5, 50.0),
              doc="width of the local average for noise: local"),
        Param("branch", str, "spatial", choices=("spatial", "start"),
              doc="spatial: fit from the data's echo-to-echo estimate, alias branch from the unwrapped "
                  "phase through a spatially unwrapped smooth difference (robust to Laplacian residue); "
                  "start: fit from the linear fit directly"),
        MARGIN_PARAM,
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        pv, mv, uv = ctx["phase"], ctx["magnitude"], ctx["unwrapped_phase"]
        phase, mag, up = (np.asarray(v.data) for v in (pv, mv, uv))
        phase, mag, up = (x[..., None] if x.ndim == 3 else x for x in (phase, mag, up))
        if phase.ndim != 4:
            raise InputDataError(f"phase must be 4D (x, y, z, echo), got shape {phase.shape}")
        for name, arr in (("magnitude", mag), ("unwrapped_phase", up)):
            if arr.shape != phase.shape:
                raise GeometryError(f"{name} shape {arr.shape} differs from phase {phase.shape}; give them on the "
                                    f"same grid with the same echoes")
        n_e = phase.shape[3]
        te, b0 = ctx.echo_times(n_e), ctx.field_strength()
        if n_e < 2:
            raise StageError("echo_combine/nonlinear_fit: one echo cannot separate the phase offset from the field; "
                             "use weighted_fit with fit_offset: false")
        if np.ptp(te) <= 0:
            raise InputDataError("all echo times are equal; the fit needs different echo times")
        mask = fit_region(ctx, phase.shape[:3], p.fit_margin_mm, pv.voxel_size, up, "echo_combine/nonlinear_fit")
        sel = mag if mask is None else mag[mask]
        if not np.any(sel > 0):
            raise InputDataError("echo_combine/nonlinear_fit: the magnitude is zero everywhere"
                                 + ("" if mask is None else " in the mask") + "; check the magnitude input")
        start = linear_start(up, mag, te, b0, mask)
        res = nonlinear_fit(phase, mag, te, b0, start["field"], start["phi0"], mask, p.max_iter, p.tol, p.noise,
                            p.noise_sigma_mm, pv.voxel_size, p.branch)
        sig = (f"noise sigma {res['sigma_pooled']:.4g} ({p.noise})" if not res["relative"]
               else "relative noise weights (no redundant echoes)")
        ctx.log(f"nonlinear complex fit of {n_e} echoes ({b0:g} T): {res['iterations']} iteration(s), median "
                f"cost ratio to the linear start {res['cost_ratio']:.3g}, {100 * res['changed']:.2g} % of voxels "
                f"moved by over half an alias period; {sig}")
        phi0 = res["phi0"]
        if "phase_offset" in ctx:  # removed before the fit (MCPC-3D-S): report the data's whole offset
            removed = np.asarray(ctx["phase_offset"].data, np.float32)
            if removed.shape != phi0.shape:
                raise GeometryError(f"phase_offset grid {removed.shape} differs from the phase grid {phi0.shape}")
            phi0 = np.angle(np.exp(1j * (removed + phi0))).astype(np.float32)
            ctx.log("phase_offset: the fitted residual offset added to the one removed earlier")
        return {"total_field": pv.like(res["field"], units="ppm"),
                "noise_weight": pv.like(res["noise_weight"], units="1/ppm"),
                "phase_offset": pv.like(phi0, units="rad")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(WeightedFit)
    registry.add(NonlinearFit)
