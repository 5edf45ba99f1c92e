"""Built-in plugin: COSMOS multi-orientation inversion (``stage: inversion, method: cosmos``).

Reads the registered ``orientations`` artifact (see ``register/simpleitk``): every entry's
``local_field`` (ppm), ``mask`` and optional ``noise_weight`` on the reference grid, each Volume
carrying that orientation's B0 in the reference voxel frame. Writes ``chi`` (ppm, reference grid)
and ``mask``: the **intersection** of the registered masks (and of the top-level ``mask`` when
present), the only region where every orientation measured the field. Voxels outside it are
zero in ``chi``.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, Volume, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.params import lam, max_iter, tol, use_noise_weight
from qsmkit.errors import GeometryError, InputDataError, StageError

from .cosmos import condition_map, cosmos, cosmos_cg

__all__ = ["COSMOS", "cosmos", "cosmos_cg", "condition_map"]


def _label(i: int, o: dict) -> str:
    for key in ("magnitude", "local_field"):
        v = o.get(key) if isinstance(o, dict) else None
        if isinstance(v, Volume) and v.meta.get("source"):
            return f"orientation {i} ({v.meta['source']})"
    return f"orientation {i}"


class COSMOS(Stage):
    """Joint inversion of registered multi-orientation local fields."""

    kind, name = "inversion", "cosmos"
    scope = "joint"
    reads = ("orientations",)
    optional_reads = ("mask",)
    writes = ("chi", "mask")
    description = ("COSMOS (Liu 2009): k-space least squares over several head orientations, closed form "
                   "or noise-weighted CG; needs a register stage first")
    params = (
        Param("solver", str, "cg", choices=("closed_form", "cg"),
              doc="cg: noise-weighted least squares with chi supported in the mask, started from the closed "
                  "form (default; lower error, as it does not treat the field outside the mask as zero); "
                  "closed_form: sum D_i F_i / (sum D_i^2 + eps) only"),
        lam(1e-3, range=(0.0, 10.0), aliases=("regularization",),
            doc="eps added to sum D_i^2 (closed form) / Tikhonov weight (cg); dimensionless"),
        Param("padding", float, 1.25, range=(1.0, 4.0),
              doc="minimum zero-padding factor per axis (1.25 and 1.5 give the same chi on the phantom; "
                  "1.25 halves the CG time)"),
        use_noise_weight(True, aliases=("use_noise_weights",), doc="cg: weight each orientation by its noise_weight"),
        max_iter(50, range=(1, 10000), doc="cg: maximum iterations"),
        tol(1e-2, range=(1e-8, 1.0),
            doc="cg: stop at this relative residual (from the closed-form start, 1e-2 takes 5-10 iterations; "
                  "tighter values change chi by < 1 % NRMSE on the phantom)"),
        Param("min_overlap", float, 0.5, range=(0.0, 1.0),
              doc="error when the masks' intersection keeps less than this fraction of the reference mask"),
        DEVICE_PARAM,
    )

    def run(self, ctx, p):
        where = ctx.stage_label or "inversion/cosmos"
        orients = ctx["orientations"]
        if not isinstance(orients, (list, tuple)) or len(orients) < 2:
            raise InputDataError(f"{where}: COSMOS needs at least 2 orientations (3 or more recommended); give "
                                 f"inputs.orientations as a list of acquisitions, the reference first")
        for i, o in enumerate(orients):
            if not isinstance(o, dict) or not isinstance(o.get("local_field"), Volume) \
                    or not isinstance(o.get("mask"), Volume):
                raise InputDataError(f"{where}: {_label(i, o) if isinstance(o, dict) else f'orientation {i}'} has "
                                     f"no local_field or mask; run the per-orientation stages and register first")
        ref = orients[0]
        te0, b00 = ref.get("echo_times"), ref.get("field_strength")
        ref_f: Volume = ref["local_field"]
        for i, o in enumerate(orients[1:], 1):
            te, b0 = o.get("echo_times"), o.get("field_strength")
            if te0 is not None and te is not None:
                a, b = np.asarray(te0, float).ravel(), np.asarray(te, float).ravel()
                if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-9):
                    raise InputDataError(f"{where}: {_label(i, o)} has echo times {b.tolist()} s but the reference "
                                         f"has {a.tolist()} s; COSMOS needs the same echo times for every orientation")
            if b00 is not None and b0 is not None and not np.isclose(float(b0), float(b00), rtol=1e-6):
                raise InputDataError(f"{where}: {_label(i, o)} was acquired at {float(b0)} T but the reference at "
                                     f"{float(b00)} T; all orientations need the same field strength")
            for key in ("local_field", "mask"):
                v = o[key]
                if v.grid_shape != ref_f.grid_shape or not np.allclose(v.affine, ref_f.affine, atol=1e-3):
                    raise GeometryError(f"{where}: the {key} of {_label(i, o)} is not on the reference grid; add "
                                        f"'- {{stage: register, method: simpleitk}}' before the COSMOS inversion")
        if len(orients) < 3:
            ctx.log("warning: 2 orientations leave directions where both dipole kernels vanish; use 3 or more")

        mask = np.logical_and.reduce([np.asarray(o["mask"].data) > 0 for o in orients])
        top = ctx.get("mask")
        if isinstance(top, Volume) and top.grid_shape == ref_f.grid_shape:
            mask &= np.asarray(top.data) > 0
        ref_n = int(np.count_nonzero(np.asarray(ref["mask"].data) > 0))
        if ref_n == 0:
            raise StageError(f"{where}: the reference orientation's mask is empty")
        frac = float(mask.sum()) / ref_n
        if frac < p.min_overlap:
            raise StageError(f"{where}: the registered masks overlap in only {100 * frac:.0f}% of the reference mask "
                             f"(< {100 * p.min_overlap:.0f}%); check the registration (transforms) and the masks")

        fields = [np.asarray(o["local_field"].data, dtype=np.float32) for o in orients]
        dirs = [np.asarray(o["local_field"].b0_direction, dtype=np.float64) for o in orients]
        angles = [float(np.degrees(np.arccos(np.clip(abs(float(d @ dirs[0])), -1, 1)))) for d in dirs]
        ctx.log(f"{len(orients)} orientations; B0 tilt from the reference: "
                f"{', '.join(f'{a:.1f}' for a in angles)} deg; mask {int(mask.sum())} voxels")
        vs = ref_f.voxel_size
        chi = cosmos(fields, dirs, vs, mask, p.lam, p.padding)
        info: dict = {"solver": p.solver, "orientations": len(orients), "b0_tilt_deg": angles,
                      "mask_voxels": int(mask.sum()), "mask_fraction_of_reference": frac}
        if p.solver == "cg":
            weights = None
            if p.use_noise_weight and all(isinstance(o.get("noise_weight"), Volume) for o in orients):
                weights = [np.where(np.asarray(o["mask"].data) > 0, np.asarray(o["noise_weight"].data, np.float32), 0)
                           for o in orients]
            elif p.use_noise_weight:
                ctx.log("not every orientation has a noise_weight: using uniform weights")
            dev = resolve_device(p.device)
            try:
                chi, cg = cosmos_cg(fields, dirs, vs, mask, weights, p.lam, p.padding, p.max_iter,
                                    p.tol, device=str(dev), x0=chi, log=ctx.log)
            except ValueError as exc:
                raise StageError(f"{where}: {exc}") from None
            ctx.log(f"CG: {cg['iterations']} iterations, relative residual {cg['relative_residual']:.2e}")
            info.update(cg=cg, weighted=weights is not None)
        ctx.report_metrics({"cosmos": info})
        return {"chi": ref_f.like(chi.astype(np.float32), units="ppm"), "mask": ref_f.like(mask, units="bool")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(COSMOS)
