"""Built-in plugin: SMV-based background field removal (``stage: background``, methods
``sharp``, ``resharp`` and ``ismv``).

Each method is a pure array function in its own module (:func:`sharp`, :func:`resharp`,
:func:`ismv`) on the core operators (:class:`qsmkit.operators.SMV`, :func:`qsmkit.operators.cg`);
the stages here only check the inputs, call them and log the erosion of the mask.
"""

from __future__ import annotations


from qsmkit import Param, Stage, hookimpl
from qsmkit.errors import StageError
from qsmkit.params import CPU_DEVICE, lam, max_iter, tol
from qsmkit.volume import field_and_mask

from .ismv import ismv
from .resharp import resharp
from .sharp import sharp

__all__ = ["Sharp", "Resharp", "Ismv", "sharp", "resharp", "ismv"]


def _radius(p):
    return Param("radius_mm", float, p, unit="mm", range=(0.1, 50.0), doc="radius of the SMV ball")


class _SmvBackground(Stage):
    """Common input checks and output of the SMV background stages."""

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
        lam(1e-2, range=(0.0, 10.0), doc="Tikhonov weight on the local field's norm"),
        tol(1e-4, doc="CG stopping tolerance ||r|| / ||b||"),
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


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(Sharp)
    registry.add(Resharp)
    registry.add(Ismv)
