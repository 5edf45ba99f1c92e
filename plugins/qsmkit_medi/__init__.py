"""Built-in plugin: MEDI-L1 dipole inversion (``stage: inversion, method: medi``).

Morphology enabled dipole inversion with the nonlinear data term (Liu et al. 2012/2013), options
for SMV preprocessing, MERIT and MEDI+0 (CSF regularisation); torch on CPU or CUDA. The algorithm,
its scaling and conventions are documented in :mod:`qsmkit_medi.medi`; the CSF mask in
:mod:`qsmkit_medi.masks`; the edge mask and phase scale, shared with TFI, are the core's
:func:`qsmkit.operators.gradient_mask` and :func:`qsmkit.physics.phase_scale`.

Inputs: ``local_field`` (ppm) and ``mask`` (required); ``magnitude`` (edge mask; required unless
``edge_percentage: 0``), ``noise_weight`` (data weights; without it the weights are uniform and a
warning is logged), ``field_strength`` / ``echo_times`` (phase scale of the data term; 3 T and
5 ms echo spacing are assumed without them), ``csf_mask`` (optional, for ``lambda_csf > 0``;
found from an R2* map of the multi-echo magnitude when not given).
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.params import lam, max_iter, tol
from qsmkit.errors import GeometryError, MissingArtifactError, StageError
from qsmkit.operators import gradient_mask
from qsmkit.physics import phase_scale

from .masks import csf_mask_from_r2star, r2star_map
from .medi import MediResult, medi

__all__ = ["MEDI", "medi", "MediResult", "gradient_mask", "csf_mask_from_r2star", "r2star_map", "phase_scale"]


class MEDI(Stage):
    """MEDI-L1: nonlinear data term, magnitude edge prior, Gauss-Newton + IRLS + CG."""

    kind, name = "inversion", "medi"
    reads = ("local_field", "mask")
    optional_reads = ("magnitude", "noise_weight", "field_strength", "echo_times", "csf_mask")
    writes = ("chi",)
    optional_writes = ("mask",)  # the SMV-eroded mask, when smv_radius_mm > 0
    description = ("morphology enabled dipole inversion (MEDI-L1, Liu 2012): nonlinear data term, "
                   "magnitude edge prior, SMV / MERIT / MEDI+0 options; torch CPU or GPU")
    params = (
        lam(1000.0, range=(1e-3, 1e8),
            doc="data-term weight (the MEDI toolbox's lambda: radians at the echo spacing; larger = less smoothing)"),
        Param("edge_percentage", float, 0.9, range=(0.0, 3.0),
              doc="edge mask size, toolbox convention: number of edge gradient components / number of mask "
                  "voxels (0.9 = ~30% of components are edges); 0 = plain TV, no magnitude needed"),
        Param("smv_radius_mm", float, 0.0, unit="mm", range=(0.0, 20.0),
              doc="SMV preprocessing radius (D <- (1-S)D, f <- f - S*f, mask eroded); 0 = off"),
        Param("merit", bool, False, doc="MERIT: down-weight voxels whose residual exceeds 6 standard deviations"),
        Param("lambda_csf", float, 0.0, range=(0.0, 1e6),
              doc="MEDI+0 weight of CSF uniformity (toolbox scale, e.g. 100); 0 = off; chi is then referenced to CSF"),
        max_iter(15, range=(1, 200), doc="Gauss-Newton iterations (at most)"),
        Param("cg_max_iter", int, 10, range=(1, 1000), doc="conjugate-gradient iterations per Gauss-Newton step"),
        Param("cg_tol", float, 0.01, range=(1e-8, 1.0), doc="CG relative residual tolerance"),
        tol(0.02, range=(0.0, 1.0),
            doc="stop when the relative update ||dchi||/||chi|| falls below this"),
        Param("epsilon", float, 1e-3, unit="ppm/mm", range=(1e-8, 1.0),
              doc="smoothing of the L1 norm in the IRLS weights 1/sqrt(|M_G grad chi|^2 + epsilon^2)"),
        Param("padding", float, 1.0, range=(1.0, 4.0),
              doc="FFT grid = mask bounding box enlarged by this factor (then to fast FFT sizes); 1 = none"),
        DEVICE_PARAM,
    )

    def thread_limit(self, ctx, p):
        """One CPU thread on small grids (:func:`qsmkit_medi.medi.thread_limit`), else no limit."""
        if ctx is None or p is None or "mask" not in ctx or not hasattr(ctx["mask"], "data"):
            return None
        from .medi import thread_limit

        return thread_limit(ctx["mask"].data, p.padding)

    def run(self, ctx, p):
        f, mask = ctx["local_field"], ctx["mask"]
        m = np.asarray(mask.data) > 0
        if f.grid_shape != mask.grid_shape or f.data.ndim != 3:
            raise GeometryError(f"inversion/medi: local_field {f.shape} and mask {mask.shape} must be one 3D grid")
        if not m.any():
            raise StageError("inversion/medi: the mask is empty (all zero); check the mask / background stage")

        magnitude = ctx["magnitude"].data if "magnitude" in ctx else None
        if magnitude is not None and tuple(magnitude.shape[:3]) != f.grid_shape:
            raise GeometryError(f"inversion/medi: magnitude grid {magnitude.shape[:3]} differs from "
                                f"local_field {f.grid_shape}")
        if magnitude is None and p.edge_percentage > 0:
            raise MissingArtifactError(
                "stage inversion/medi needs 'magnitude' for its edge mask (M_G); give 'magnitude' under inputs, "
                "or set edge_percentage: 0 to regularise without edges (plain TV)")
        nw = None
        if "noise_weight" in ctx:
            nw = ctx["noise_weight"].data
            if tuple(nw.shape[:3]) != f.grid_shape:
                raise GeometryError(f"inversion/medi: noise_weight grid {nw.shape} differs from "
                                    f"local_field {f.grid_shape}")
        else:
            ctx.log("warning: no 'noise_weight' (made by an echo_combine stage); using uniform data weights")
        b0 = ctx["field_strength"] if "field_strength" in ctx else None
        te = ctx["echo_times"] if "echo_times" in ctx else None
        if b0 is None or te is None:
            ctx.log("note: field_strength/echo_times not given; the data term assumes 3 T and a 5 ms echo spacing")

        csf = None
        if p.lambda_csf > 0:
            csf = self._csf_mask(ctx, m, magnitude, te, b0, f.voxel_size)

        dev = resolve_device(p.device)
        res = medi(f.data, m, f.voxel_size, f.b0_direction, magnitude, nw,
                   lam=p["lambda"], edge_percentage=p.edge_percentage, smv_radius_mm=p.smv_radius_mm,
                   merit=p.merit, lambda_csf=p.lambda_csf, csf_mask=csf, field_strength=b0, echo_times=te,
                   max_iter=p.max_iter, cg_max_iter=p.cg_max_iter, cg_tol=p.cg_tol, tol=p.tol,
                   epsilon=p.epsilon, padding=p.padding, device=dev, log=ctx.log)
        ctx.log(f"{res.n_iter} Gauss-Newton iterations, {sum(res.cg_iters)} CG iterations, "
                f"{'converged' if res.converged else 'stopped at max_iter'}, {res.seconds:.1f} s on {dev}")
        out = {"chi": f.like(res.chi, units="ppm")}
        if p.smv_radius_mm > 0:
            out["mask"] = mask.like(res.mask, units=mask.units)
        return out

    @staticmethod
    def _csf_mask(ctx, m, magnitude, te, b0, voxel_size) -> np.ndarray:
        if "csf_mask" in ctx:
            c = np.asarray(ctx["csf_mask"].data) > 0
            if c.shape != m.shape:
                raise GeometryError(f"inversion/medi: csf_mask grid {c.shape} differs from the mask {m.shape}")
            src = "given csf_mask"
        else:
            if magnitude is None or magnitude.ndim != 4 or magnitude.shape[3] < 2 or te is None:
                raise MissingArtifactError(
                    "stage inversion/medi with lambda_csf > 0 needs a CSF mask: give 'csf_mask' under inputs, "
                    "or a multi-echo 'magnitude' with 'echo_times' to find CSF from R2*, or set lambda_csf: 0")
            r2s = r2star_map(magnitude, te, m)
            c = csf_mask_from_r2star(r2s, m, voxel_size, field_strength=b0 or 3.0)
            src = "R2* < %.3g 1/s" % (5.0 * (b0 or 3.0) / 3.0)
        c &= m
        if not c.any():
            raise StageError("inversion/medi: no CSF found inside the mask for MEDI+0; give a 'csf_mask' input or "
                             "set lambda_csf: 0")
        ml = c.sum() * float(np.prod(voxel_size)) / 1000.0
        ctx.log(f"CSF mask for MEDI+0: {int(c.sum())} voxels ({ml:.1f} mL), {src}")
        return c


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(MEDI)
