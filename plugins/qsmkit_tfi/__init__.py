"""Built-in plugin: total field inversion (``stage: inversion, method: tfi``).

Preconditioned total field inversion (Liu et al., MRM 2017; the MEDI toolbox's ``TFI_L1``):
one susceptibility map of brain and background fitted to the TOTAL field, so no background
stage runs before it. The algorithm, its conventions and measured accuracy are documented in
:mod:`qsmkit_tfi.tfi`. ``solver: admm`` (the default) solves the same model to convergence by ADMM
(:mod:`qsmkit_tfi.admm`), coarse to fine, with the field offset fitted (or given, or searched); on
the simulated heads (default oversampling) its chi NRMSE is 1.5-2x lower than the Gauss-Newton
solver's (``solver: gauss-newton``; 1.5 mm: 26.9 % against 47.2 %) and it is 3x faster; at 1 mm
14.6 % in 59 s, as good as MEDI from the true local field (15.1 %).

Inputs: ``total_field`` (ppm) and ``mask`` (the brain: preconditioner 1 there, chi referenced to
its mean there); ``head_mask`` (the support, larger than the brain: where the total field has data
and chi is returned; derived from the magnitude when not given), ``magnitude`` (edge mask and
default support), ``noise_weight`` (data weights; else the magnitude), ``field_strength`` /
``echo_times`` (phase scale of the data term, as MEDI; 3 T and 5 ms without them).

In a pipeline that starts from phase (``unwrap -> mask -> echo_combine -> inversion: tfi``) the
total field exists only where the echo fit ran: the mask stage's mask, plus the fit's
``fit_margin_mm`` shell around it. Measured on the simulator's heads (oversampled;
``bench_frontend.py``), chi NRMSE over the brain mask eroded by 4.5 mm / over the whole mask, from
phase (romeo, phase_quality mask, nonlinear fit): with a 2.5 mm fit margin 21.9 / 36.0 % at 1.5 mm
and 14.5 / 25.3 % at 1 mm; without it 22.2 / 65.9 % and 13.9 / 66.7 %; PDF + MEDI on the same route
29.6 / 60.6 % and 32.3 / 48.5 %. Without the margin 85-90 % of the error lies in the mask's outer
two voxel layers, where the brain's field alone cannot tell brain from adjacent bone or air; a fit
of the whole field of view does not work (the field in air is noise, and TFI fits it). The stage
logs a warning when the field covers little more than the mask.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.errors import GeometryError, MissingArtifactError, ParameterError, StageError
from qsmkit.params import lam, max_iter, tol

from .admm import BACKGROUND_TV, COARSE_MM, tfi_admm
from .tfi import CHI_AIR, PAPER_P_BACKGROUND, TfiResult, TfiSystem, auto_preconditioner, head_mask, tfi

__all__ = ["TFI", "tfi", "tfi_admm", "TfiResult", "TfiSystem", "head_mask", "auto_preconditioner"]


class TFI(Stage):
    """Preconditioned total field inversion: chi of brain and background from the total field."""

    kind, name = "inversion", "tfi"
    reads = ("total_field", "mask")
    optional_reads = ("magnitude", "noise_weight", "head_mask", "field_strength", "echo_times")
    writes = ("chi",)
    description = ("total field inversion (TFI, Liu 2017): brain and background chi from the total field, no "
                   "background stage; magnitude edge prior; ADMM (default, coarse-to-fine) or the paper's "
                   "preconditioned Gauss-Newton; torch CPU or GPU")
    params = (
        lam(1000.0, range=(1e-3, 1e8),
            doc="data-term weight (MEDI toolbox scale: radians at the echo spacing; larger = less smoothing)"),
        Param("edge_percentage", float, 0.9, range=(0.0, 3.0),
              doc="edge mask size, toolbox convention: edge gradient components / support voxels; 0 = plain TV"),
        Param("p_background", float, PAPER_P_BACKGROUND, range=(0.0, 1000.0),
              doc="preconditioner outside the brain (the paper's 30); 0 = automatic from the total field"),
        Param("chi_air", float, CHI_AIR, unit="ppm", range=(0.0, 20.0),
              doc="susceptibility of the air around the head relative to tissue (0: none, e.g. a phantom in water)"),
        max_iter(30, range=(1, 500), doc="Gauss-Newton iterations (at most)"),
        Param("cg_max_iter", int, 30, range=(1, 2000), doc="conjugate-gradient iterations per Gauss-Newton step"),
        Param("cg_tol", float, 0.01, range=(1e-8, 1.0), doc="CG relative residual tolerance"),
        tol(0.001, range=(0.0, 1.0), doc="stop when the relative update ||dy||/||y|| falls below this (y is dominated by the "
                                        "background: a larger value stops too early)"),
        Param("epsilon", float, 1e-3, unit="ppm/mm", range=(1e-8, 1.0),
              doc="smoothing of the L1 norm in the IRLS weights"),
        Param("margin_mm", float, 10.0, unit="mm", range=(0.0, 100.0),
              doc="air around the support's bounding box in the work grid (room for background sources)"),
        Param("padding", float, 1.0, range=(1.0, 3.0),
              doc="zero-padding factor of the work grid's FFTs; 1 = periodic on the work grid"),
        Param("solver", str, "admm", choices=("admm", "gauss-newton"),
              doc="admm: the model solved to convergence by ADMM (qsmkit_tfi.admm; uses lambda, edge_percentage, "
                  "chi_air, margin_mm, offset, background_tv, admm_iter, coarse_mm, refine_iter); gauss-newton: the "
                  "paper's preconditioned Gauss-Newton/CG (uses p_background, max_iter, cg_max_iter, cg_tol, tol, epsilon, padding)"),
        Param("offset", str, "fit", doc="admm: field offset of the total field: 'fit' (fitted jointly), a number in "
                                        "ppm when known (e.g. 0), or 'search' (the offset whose map has the least TV "
                                        "in the brain; 2.5-5x slower)"),
        Param("background_tv", float, BACKGROUND_TV, range=(0.001, 100.0),
              doc="admm: TV weight outside the brain mask relative to inside"),
        Param("admm_iter", int, 300, range=(1, 5000),
              doc="admm: iterations from zero (on the coarse level when there is one, see coarse_mm)"),
        Param("coarse_mm", float, COARSE_MM, unit="mm", range=(0.0, 10.0),
              doc="admm: voxel size of a coarse level solved first when the input voxels are at most half of it "
                  "(then refine_iter iterations on the input grid); 0 = input grid only"),
        Param("refine_iter", int, 150, range=(1, 5000),
              doc="admm: iterations on the input grid after the coarse level"),
        DEVICE_PARAM,
    )

    @classmethod
    def validate_params(cls, given, where):
        """As every stage's, except that ``offset`` may be a number (YAML ``offset: 0``) as well as a word."""
        off = (given or {}).get("offset")
        if isinstance(off, (int, float)) and not isinstance(off, bool):
            given = {**given, "offset": repr(float(off))}
        params = super().validate_params(given, where)
        _offset(params.offset, f"{where}.params.offset")
        return params

    def run(self, ctx, p):
        f, mask = ctx["total_field"], ctx["mask"]
        label = "inversion/tfi"
        data = np.asarray(f.data)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3 or f.grid_shape != mask.grid_shape:
            raise GeometryError(f"{label}: total_field {f.shape} and mask {mask.shape} must be one 3D grid")
        m = np.asarray(mask.data) > 0
        if not m.any():
            raise StageError(f"{label}: the mask is empty (all zero); check the mask stage or mask file")
        arrays = {}
        for key in ("magnitude", "noise_weight", "head_mask"):
            if key in ctx:
                a = np.asarray(ctx[key].data)
                if tuple(a.shape[:3]) != f.grid_shape:
                    raise GeometryError(f"{label}: {key} grid {a.shape[:3]} differs from total_field {f.grid_shape}")
                arrays[key] = a
        if "magnitude" not in arrays and ("head_mask" not in arrays or p.edge_percentage > 0):
            need = "its edge mask and the support (head) mask" if "head_mask" not in arrays else "its edge mask"
            raise MissingArtifactError(
                f"stage {label} needs 'magnitude' for {need}; give 'magnitude' under inputs"
                + (", or give 'head_mask' and set edge_percentage: 0" if "head_mask" not in arrays
                   else ", or set edge_percentage: 0"))
        if "noise_weight" not in arrays:
            ctx.log("note: no 'noise_weight'; the data are weighted by the magnitude" if "magnitude" in arrays
                    else "warning: no 'noise_weight' or magnitude; uniform data weights over the support")
        sup = arrays.get("head_mask")
        if sup is not None and sup.ndim == 4:
            sup = sup[..., 0]
        b0 = ctx["field_strength"] if "field_strength" in ctx else None
        te = ctx["echo_times"] if "echo_times" in ctx else None
        if b0 is None or te is None:
            ctx.log("note: field_strength/echo_times not given; the data term assumes 3 T and a 5 ms echo spacing")
        nw = arrays.get("noise_weight")
        if nw is not None:
            nwd = nw[..., 0] if nw.ndim == 4 else nw
            outside = int(np.count_nonzero((nwd > 0) & ~m))
            if outside < 0.1 * int(m.sum()):
                ctx.log(f"warning: the total field has data (noise_weight > 0) in only {outside} voxels outside the "
                        f"mask: TFI needs the field of the head around the brain (scalp, skull base) to tell brain "
                        f"from background sources at the edge of the mask, where most of its error then lies; fit "
                        f"a margin around the mask (echo_combine fit_margin_mm: 2.5, unwrap before mask, as "
                        f"pipelines/tfi.yaml) or give a total_field and noise_weight that cover the head")
        dev = resolve_device(p.device)
        if p.solver == "admm":
            res = tfi_admm(data, m, f.voxel_size, f.b0_direction, sup, arrays.get("magnitude"),
                           arrays.get("noise_weight"), lam=p["lambda"], edge_percentage=p.edge_percentage,
                           background_tv=p.background_tv, offset=_offset(p.offset, label), field_strength=b0,
                           echo_times=te, max_iter=p.admm_iter, coarse_mm=p.coarse_mm, refine_iter=p.refine_iter,
                           margin_mm=p.margin_mm, chi_air=p.chi_air,
                           device=dev, log=ctx.log)
            ctx.log(f"{res.n_iter} ADMM iterations, {res.seconds:.1f} s on {dev}; offset {res.offsets[-1]:.4g} ppm; "
                    f"chi on the support ({int(res.support.sum())} voxels), brain mean 0")
            return {"chi": f.like(res.chi, units="ppm")}
        res = tfi(data, m, f.voxel_size, f.b0_direction, sup, arrays.get("magnitude"), arrays.get("noise_weight"),
                  lam=p["lambda"], edge_percentage=p.edge_percentage, p_background=p.p_background,
                  field_strength=b0, echo_times=te, max_iter=p.max_iter, cg_max_iter=p.cg_max_iter,
                  cg_tol=p.cg_tol, tol=p.tol, epsilon=p.epsilon, margin_mm=p.margin_mm, chi_air=p.chi_air,
                  padding=p.padding, device=dev, log=ctx.log)
        ctx.log(f"{res.n_iter} Gauss-Newton iterations, {sum(res.cg_iters)} CG iterations, "
                f"{'converged' if res.converged else 'stopped at max_iter'}, {res.seconds:.1f} s on {dev}; "
                f"chi on the support ({int(res.support.sum())} voxels), brain mean 0")
        return {"chi": f.like(res.chi, units="ppm")}


def _offset(value: str, label: str) -> float | str:
    """The ``offset`` parameter: ``"fit"``, ``"search"`` or a number in ppm."""
    text = str(value).strip().lower()
    if text in ("fit", "search"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ParameterError(f"{label}: offset must be 'fit', 'search' or a number in ppm (e.g. offset: 0), got {value!r}") from None


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(TFI)
