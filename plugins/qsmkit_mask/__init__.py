"""Built-in plugin: brain masks (``stage: mask``, methods ``threshold``, ``bet``, ``phase_quality``).

* ``threshold``: magnitude threshold, largest component, hole filling (the intracranial cavity
  where the skull separates it from the scalp);
* ``bet``: a BET-like deformable surface on the magnitude (Smith 2002), :mod:`.brain`;
* ``phase_quality``: threshold of the unwrapping quality map (ROMEO's ``quality``), QSMxT style,
  with an optional mask of the reliable voxels for two-pass QSM, :mod:`.phase_quality`.

A mask file given as ``inputs.mask`` skips the mask stage.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE, max_iter, tol
from qsmkit.errors import GeometryError, InputDataError, ParameterError, StageError

from .brain import bet_surface, brain_mask, icosphere, mesh_to_mask, surface_to_mask
from .phase_quality import METHODS, phase_quality_mask, quality_threshold, robust_threshold
from .threshold import dilate_mm, erode_mm, fill_enclosed_holes, largest_component, otsu_threshold, threshold_mask

__all__ = ["ThresholdMask", "BetMask", "PhaseQualityMask", "dilate_mm", "erode_mm", "fill_enclosed_holes",
           "largest_component", "otsu_threshold", "threshold_mask", "bet_surface", "brain_mask", "icosphere",
           "mesh_to_mask", "surface_to_mask", "phase_quality_mask", "quality_threshold", "robust_threshold"]


def _one_echo(mag, echo: int, label: str) -> np.ndarray:
    """Echo ``echo`` (from 1) of a 3D or 4D magnitude Volume, checked (finite, not constant)."""
    data = np.asarray(mag.data)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise InputDataError(f"magnitude must be 3D or 4D (x, y, z, echo), got shape {data.shape}")
    if echo > data.shape[3]:
        raise ParameterError(f"{label}: echo = {echo} but the magnitude has {data.shape[3]} "
                             f"echo(es); choose echo between 1 and {data.shape[3]}")
    m = data[..., echo - 1]
    if not np.all(np.isfinite(m)):
        raise InputDataError("magnitude contains NaN or infinite values; fix the input magnitude")
    if not np.any(m):
        raise InputDataError(f"{label}: the magnitude is zero everywhere; give the magnitude image of the head")
    if float(np.max(m)) <= float(np.min(m)):
        raise InputDataError("magnitude is constant; a threshold cannot find the head in it")
    return m


class ThresholdMask(Stage):
    """Mask from a magnitude threshold, largest component, hole filling, erosion / dilation."""

    kind, name = "mask", "threshold"
    reads = ("magnitude",)
    writes = ("mask",)
    description = ("magnitude threshold (Otsu or fraction of p99), largest component, 3D hole filling, "
                   "erosion/dilation in mm; gives the head/intracranial cavity, not a BET brain mask")
    params = (
        Param("threshold", float, None, range=(0.0, 1.0),
              doc="threshold as a fraction of the 99th percentile of the magnitude; empty = automatic (Otsu)"),
        Param("echo", int, 1, range=(1, None), doc="which echo's magnitude to threshold (1 = first)"),
        Param("largest_component", bool, True, doc="keep only the largest connected component"),
        Param("fill_holes", bool, True, doc="fill enclosed holes in 3D (the last step)"),
        Param("erode_mm", float, 0.0, unit="mm", range=(0.0, 30.0),
              doc="erosion radius, then the largest component again (cuts scalp-brain bridges)"),
        Param("dilate_mm", float, 0.0, unit="mm", range=(0.0, 30.0),
              doc="dilation radius after the erosion (equal to erode_mm restores the size)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        mag = ctx["magnitude"]
        m = _one_echo(mag, p.echo, "mask/threshold")
        mask, info = threshold_mask(m, mag.voxel_size, p.threshold, p.largest_component, p.fill_holes,
                                    p.erode_mm, p.dilate_mm, return_info=True)
        if not mask.any():
            hint = ("lower 'threshold'" if p.threshold is not None else "give 'threshold'")
            raise StageError(f"mask/threshold: the mask is empty (threshold {info['threshold']:.4g}, "
                             f"erode_mm {p.erode_mm:g}); {hint} or reduce erode_mm")
        ctx.log(f"threshold {info['threshold']:.4g} ({info['method']}); mask {int(mask.sum())} voxels "
                f"({100.0 * mask.mean():.1f}% of the grid)")
        return {"mask": mag.like(mask, units="bool")}


class BetMask(Stage):
    """BET-like brain extraction (Smith 2002) from one echo of the magnitude."""

    kind, name = "mask", "bet"
    reads = ("magnitude",)
    writes = ("mask",)
    description = ("BET-like brain extraction (Smith 2002): a tessellated sphere grown from the centre of "
                   "gravity under smoothness and local-threshold forces, filled; on GRE magnitude it stops at "
                   "the inner skull, then moves margin_mm inward")
    params = (
        Param("fractional_threshold", float, 0.5, range=(0.05, 0.95),
              doc="BET's fractional intensity threshold bt: smaller values give a larger brain"),
        Param("margin_mm", float, 1.0, unit="mm", range=(-10.0, 20.0),
              doc="move the final surface this far inward from the inner skull (1 mm: into the subarachnoid "
                  "CSF of an adult head, off the unreliable phase next to bone; negative moves it outward)"),
        Param("echo", int, 1, range=(1, None), doc="which echo's magnitude to use (1 = first, best contrast)"),
        max_iter(1000, range=(10, 100000), doc="most surface updates (BET: 1000)"),
        Param("subdivisions", int, 4, range=(2, 6),
              doc="icosahedron subdivisions of the surface (4: 2562 vertices, as BET)"),
        tol(1e-4, range=(0.0, 0.1),
            doc="stop when the enclosed volume changes by less than this fraction per 25 iterations "
                "(four times in a row); 0 runs all iterations"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        mag = ctx["magnitude"]
        m = _one_echo(mag, p.echo, "mask/bet")
        mask, info = brain_mask(m, mag.voxel_size, p.fractional_threshold, p.margin_mm, p.max_iter,
                                p.subdivisions, p.tol, return_info=True)
        if not mask.any():
            raise StageError(f"mask/bet: the brain surface collapsed (no voxel inside it); check that the "
                             f"magnitude shows a head, or lower fractional_threshold ({p.fractional_threshold:g}) "
                             f"or margin_mm ({p.margin_mm:g})")
        ctx.log(f"BET surface after {info['iterations']} iterations: {info['volume_ml']:.0f} ml; mask "
                f"{int(mask.sum())} voxels ({100.0 * mask.mean():.1f}% of the grid), margin {p.margin_mm:g} mm")
        return {"mask": mag.like(mask, units="bool")}


class PhaseQualityMask(Stage):
    """Mask from the unwrapping quality map (QSMxT-style), optionally with a reliable-phase mask."""

    kind, name = "mask", "phase_quality"
    reads = ("quality",)
    optional_reads = ("magnitude",)
    writes = ("mask",)
    optional_writes = ("reliable_mask",)
    description = ("threshold of the phase-quality map from unwrap/romeo (Otsu, robust, percentile or a value), "
                   "largest component, erosion/dilation, 3D hole filling; two_pass also writes reliable_mask "
                   "(the mask without the filled holes of unreliable phase)")
    params = (
        Param("method", str, "otsu", choices=METHODS,
              doc="threshold rule: otsu (QSMxT), robust (MriResearchTools robustmask), percentile or value"),
        Param("value", float, None, range=(0.0, 1.0), doc="the quality threshold, with method: value"),
        Param("percentile", float, None, range=(0.0, 100.0),
              doc="percentile of the quality map used as threshold, with method: percentile"),
        Param("factor", float, 1.0, range=(0.05, 20.0),
              doc="multiplies the otsu / robust threshold (QSMxT threshold_algorithm_factor; larger: smaller mask)"),
        Param("use_magnitude", bool, True,
              doc="when a magnitude is available, also require it above its robust noise threshold"),
        Param("echo", int, 1, range=(1, None), doc="which echo's magnitude to use (1 = first)"),
        Param("largest_component", bool, True, doc="keep only the largest connected component"),
        Param("fill_holes", bool, True, doc="fill enclosed holes in 3D (unreliable phase around strong sources)"),
        Param("erode_mm", float, 3.0, unit="mm", range=(0.0, 30.0),
              doc="erosion radius, then the largest component again: cuts bridges of passing quality "
                  "through the skull to the scalp (partial volume on coarse voxels)"),
        Param("dilate_mm", float, 3.0, unit="mm", range=(0.0, 30.0),
              doc="dilation radius after the erosion (equal to erode_mm restores the size)"),
        Param("two_pass", bool, False,
              doc="also write reliable_mask: the voxels of the mask whose phase quality passed the threshold, "
                  "for two-pass QSM (invert inside it first, then inside the filled mask)"),
        CPU_DEVICE,
    )

    @classmethod
    def check_inputs(cls, inputs, p):
        where = "mask/phase_quality"
        if p.method == "value" and p.value is None:
            raise ParameterError(f"{where}: method value needs 'value' (the quality threshold, 0-1)")
        if p.method == "percentile" and p.percentile is None:
            raise ParameterError(f"{where}: method percentile needs 'percentile' (0-100)")
        if p.value is not None and p.method != "value":
            raise ParameterError(f"{where}: 'value' is only used with method: value (method is {p.method}); "
                                 f"remove it or set method: value")
        if p.percentile is not None and p.method != "percentile":
            raise ParameterError(f"{where}: 'percentile' is only used with method: percentile (method is "
                                 f"{p.method}); remove it or set method: percentile")

    def run(self, ctx, p):
        self.check_inputs({}, p)
        qv = ctx["quality"]
        q = np.asarray(qv.data)
        if q.ndim == 4 and q.shape[3] == 1:
            q = q[..., 0]
        if q.ndim != 3:
            raise InputDataError(f"quality must be a 3D map (x, y, z), got shape {q.shape}")
        if not np.all(np.isfinite(q)):
            raise InputDataError("quality contains NaN or infinite values; check the unwrap stage's quality map")
        if not np.any(q):
            raise InputDataError("mask/phase_quality: the quality map is zero everywhere; run unwrap/romeo without "
                                 "a mask (use_mask: false) before this stage, or check the phase")
        if float(np.max(q)) <= float(np.min(q)):
            raise InputDataError("mask/phase_quality: the quality map is constant; a threshold cannot find the "
                                 "brain in it")
        mag = None
        if p.use_magnitude and "magnitude" in ctx:
            mag = _one_echo(ctx["magnitude"], p.echo, "mask/phase_quality")
            if mag.shape != q.shape:
                raise GeometryError(f"magnitude grid {mag.shape} differs from the quality grid {q.shape}; give "
                                    f"both on the same grid")
        mask, info = phase_quality_mask(q, qv.voxel_size, p.method, p.value, p.percentile, p.factor, mag,
                                        p.largest_component, p.fill_holes, p.erode_mm, p.dilate_mm, return_info=True)
        if not mask.any():
            raise StageError(f"mask/phase_quality: the mask is empty (threshold {info['threshold']:.4g}, "
                             f"method {p.method}); lower the threshold (factor, value or percentile) or erode_mm")
        rel = info["reliable"]
        ctx.log(f"quality threshold {info['threshold']:.4g} ({p.method}"
                + (f", x{p.factor:g}" if p.method in ("otsu", "robust") and p.factor != 1.0 else "") + ")"
                + (f", magnitude above {info['magnitude_threshold']:.4g}" if mag is not None else "")
                + f"; mask {int(mask.sum())} voxels ({100.0 * mask.mean():.1f}% of the grid), "
                f"{int(mask.sum() - rel.sum())} of them with unreliable phase (filled)")
        out = {"mask": qv.like(mask, units="bool", description="brain mask from the phase quality")}
        if p.two_pass:
            out["reliable_mask"] = qv.like(rel, units="bool",
                                           description="voxels of the mask with reliable phase (two-pass QSM)")
        return out


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(ThresholdMask)
    registry.add(BetMask)
    registry.add(PhaseQualityMask)
