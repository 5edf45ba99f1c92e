"""Built-in plugin: background field removal (``stage: background``, methods ``sharp``,
``resharp``, ``ismv``, ``lbv`` and ``pdf``), and the harmonic limit of such methods.

Each method is a pure array function in its own module (:func:`sharp`, :func:`resharp`,
:func:`ismv`, :func:`lbv`, :func:`pdf`) on the core operators (:class:`qsmkit.operators.SMV`,
:class:`qsmkit.operators.Dipole`, :func:`qsmkit.operators.cg`); the stages here only check the
inputs, call them and log how much of the mask is kept. :func:`harmonic_limit` (in
:mod:`.lbv`) is the true local field minus its harmonic part in the mask: the best local field
any method that removes every harmonic field can return (benchmarks and TFI compare against it).
The Laplace solver of LBV is :mod:`.laplace` (multigrid-preconditioned CG).
"""

from __future__ import annotations


from qsmkit import Param, Stage, hookimpl
from qsmkit.device import resolve_device
from qsmkit.errors import GeometryError, StageError
from qsmkit.params import CPU_DEVICE, DEVICE, lam, max_iter, tol, use_noise_weight
from qsmkit.volume import field_and_mask

from .ismv import ismv
from .lbv import harmonic_limit, lbv
from .pdf import PDF_MAX_ITER, PDF_PAD_VOXELS, pdf
from .resharp import resharp
from .sharp import sharp

__all__ = ["Sharp", "Resharp", "Ismv", "Lbv", "Pdf", "sharp", "resharp", "ismv", "lbv", "pdf", "harmonic_limit"]


def _radius(p):
    return Param("radius_mm", float, p, unit="mm", range=(0.1, 50.0), doc="radius of the SMV ball")


class _SmvBackground(Stage):
    """Common input checks and output of the background stages."""

    kind = "background"
    reads = ("total_field", "mask")
    writes = ("local_field", "mask")

    def _inputs(self, ctx):
        tf, mv = ctx["total_field"], ctx["mask"]
        f, m = field_and_mask(tf, mv, "total_field", f"background/{self.name}")
        return tf, mv, f, m

    def _outputs(self, ctx, tf, mv, m, local, eroded, radius, extra=""):
        if not eroded.any():
            raise StageError(f"background/{self.name}: the mask is thinner than the SMV ball "
                             f"({radius:g} mm); give a smaller radius_mm or a larger mask")
        ctx.log(f"radius {radius:g} mm{extra}; eroded mask {int(eroded.sum())} of {int(m.sum())} voxels "
                f"({100.0 * eroded.sum() / m.sum():.1f} % kept)")
        return {"local_field": tf.like(local, units="ppm"), "mask": mv.like(eroded, units="bool")}


class Sharp(_SmvBackground):
    """SHARP: one SMV radius, truncated deconvolution; writes the eroded mask."""

    name = "sharp"
    description = ("SHARP (Schweser 2011): SMV high-pass with one ball, TSVD deconvolution; "
                   "writes the mask eroded by the ball radius")
    params = (
        _radius(6.0),
        Param("threshold", float, 0.05, range=(1e-4, 0.9),
              doc="TSVD truncation of the deconvolution kernel 1 - SMV"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        tf, mv, f, m = self._inputs(ctx)
        local, eroded = sharp(f, m, tf.voxel_size, radius_mm=p.radius_mm, threshold=p.threshold)
        return self._outputs(ctx, tf, mv, m, local, eroded, p.radius_mm, f"; threshold {p.threshold:g}")


class Resharp(_SmvBackground):
    """RESHARP: Tikhonov-regularised SHARP solved with CG; writes the eroded mask."""

    name = "resharp"
    description = ("RESHARP (Sun & Wilman 2014): SMV high-pass with one ball, Tikhonov-regularised "
                   "deconvolution by CG; writes the mask eroded by the ball radius")
    params = (
        _radius(4.0),
        lam(1e-4, range=(0.0, 10.0), doc="Tikhonov weight on the local field's norm (Sun's reference code: "
                                         "1e-3 or 5e-4; 1e-4 measured better, see the module notes)"),
        tol(1e-4, doc="CG stopping tolerance ||r|| / ||b|| (1e-3 stops before the low frequencies converge)"),
        max_iter(200, doc="maximum CG iterations"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        tf, mv, f, m = self._inputs(ctx)
        local, eroded, info = resharp(f, m, tf.voxel_size, radius_mm=p.radius_mm, lam=p["lambda"],
                                      tol=p.tol, max_iter=p.max_iter, return_info=True)
        extra = "" if info is None else f"; lambda {p['lambda']:g}; CG {info.iterations} iterations"
        return self._outputs(ctx, tf, mv, m, local, eroded, p.radius_mm, extra)


class Ismv(_SmvBackground):
    """iSMV: harmonic background with the total field on the boundary shell; writes the eroded mask."""

    name = "ismv"
    description = ("iSMV (Wen 2014): iterative SMV with boundary correction (solved by CG); "
                   "writes the mask eroded by the (small) ball radius")
    params = (
        Param("radius_mm", float, None, unit="mm", range=(0.1, 50.0),
              doc="radius of the SMV ball; default twice the largest voxel edge"),
        tol(1e-4, doc="CG stopping tolerance ||r|| / ||b||"),
        max_iter(500, doc="maximum CG iterations"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        tf, mv, f, m = self._inputs(ctx)
        r = p.radius_mm if p.radius_mm is not None else 2.0 * float(max(tf.voxel_size))
        local, eroded, info = ismv(f, m, tf.voxel_size, radius_mm=r, tol=p.tol, max_iter=p.max_iter,
                                   return_info=True)
        extra = "" if info is None else f"; CG {info.iterations} iterations"
        return self._outputs(ctx, tf, mv, m, local, eroded, r, extra)


class Lbv(_SmvBackground):
    """LBV: Laplace's equation with the total field on the mask boundary; keeps the whole mask."""

    name = "lbv"
    description = ("LBV (Zhou 2014): background = harmonic field with the total field on the mask's "
                   "boundary layer (multigrid-preconditioned CG); keeps the whole mask (less 'peel' layers)")
    params = (
        Param("peel", int, 0, unit="voxel layers", range=(0, 20),
              doc="outer mask layers dropped before the solve (unreliable edge field); the paper's default 0"),
        tol(1e-3, doc="CG stopping tolerance ||r|| / ||b|| of the Laplace solve (paper: 0.01 for its multigrid)"),
        max_iter(200, doc="maximum CG iterations"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        tf, mv, f, m = self._inputs(ctx)
        local, kept, info = lbv(f, m, tf.voxel_size, peel=p.peel, tol=p.tol, max_iter=p.max_iter,
                                return_info=True)
        if not kept.any():
            raise StageError(f"background/lbv: nothing is left of the mask after peeling {p.peel} layers; "
                             f"give a smaller peel")
        ctx.log(f"peel {p.peel}; CG {info['cg'].iterations} iterations ({info['levels']} multigrid levels); "
                f"mask {int(kept.sum())} of {int(m.sum())} voxels ({100.0 * kept.sum() / m.sum():.1f} % kept)")
        return {"local_field": tf.like(local, units="ppm"), "mask": mv.like(kept, units="bool")}


class Pdf(_SmvBackground):
    """PDF: fit of dipole sources outside the mask (weighted CG); keeps the whole mask."""

    name = "pdf"
    optional_reads = ("noise_weight",)
    description = ("PDF (Liu 2011): background = field of the dipole sources outside the mask that best fit "
                   "the total field (noise-weighted CG); keeps the whole mask")
    params = (
        Param("pad", int, PDF_PAD_VOXELS, unit="voxels", range=(0, 200),
              doc="zero padding of the mask's bounding box per side: the region of background sources "
                  "(MEDI toolbox: 40 in total)"),
        tol(1e-3, doc="CG stopping tolerance ||r|| / ||b||"),
        max_iter(PDF_MAX_ITER, doc="maximum CG iterations (Liu 2011 / MEDI toolbox: 30)"),
        use_noise_weight(True, doc="weight the fit by noise_weight when that artifact exists"),
        DEVICE,
    )

    def run(self, ctx, p):
        tf, mv, f, m = self._inputs(ctx)
        w = None
        if p.use_noise_weight and "noise_weight" in ctx:
            w = ctx["noise_weight"].data
            if tuple(w.shape[:3]) != tf.grid_shape or w.ndim != 3:
                raise GeometryError(f"background/pdf: noise_weight {tuple(w.shape)} is not on the total_field "
                                    f"grid {tf.grid_shape}")
        elif p.use_noise_weight:
            ctx.log("note: no 'noise_weight' (made by an echo_combine stage); uniform weights")
        dev = resolve_device(p.device)
        local, kept, info = pdf(f, m, tf.voxel_size, tf.b0_direction, w, pad=p.pad, tol=p.tol,
                                max_iter=p.max_iter, device=None if dev.type == "cpu" else dev,
                                return_info=True)
        ctx.log(f"{'noise-weighted' if w is not None else 'uniform weights'}; pad {p.pad} voxels; "
                f"CG {info.iterations} iterations (residual {info.relative_residual:.2g}) on {dev}; "
                f"whole mask kept ({int(m.sum())} voxels)")
        return {"local_field": tf.like(local, units="ppm"), "mask": mv.like(kept, units="bool")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(Sharp)
    registry.add(Resharp)
    registry.add(Ismv)
    registry.add(Lbv)
    registry.add(Pdf)
