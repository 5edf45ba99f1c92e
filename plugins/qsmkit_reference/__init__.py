"""Built-in plugin: susceptibility referencing (``stage: reference, method: mean | none``)."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE
from qsmkit.errors import GeometryError, StageError

from .reference import reference_to_region

__all__ = ["ReferenceMean", "ReferenceNone", "reference_to_region"]


class ReferenceMean(Stage):
    """Reference chi to its mean (or median) over the mask."""

    kind, name = "reference", "mean"
    reads = ("chi", "mask")
    writes = ("chi",)
    description = "subtract the mean (or median) of chi over the mask: chi relative to the whole-mask average"
    params = (
        Param("statistic", str, "mean", choices=("mean", "median"),
              doc="reference value over the mask: mean, or median (robust to veins and haemorrhage)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        chi, mv = ctx["chi"], ctx["mask"]
        m = np.asarray(mv.data) > 0
        if m.shape != chi.grid_shape:
            raise GeometryError(f"mask grid {m.shape} differs from the chi grid {chi.grid_shape}")
        if not m.any():
            raise StageError("reference/mean: the mask is empty; check the mask or background stage")
        out, ref = reference_to_region(np.asarray(chi.data), m, None, p.statistic)
        ctx.log(f"subtracted the {p.statistic} over the mask: {ref:.5g} ppm")
        return {"chi": chi.like(out, units="ppm")}


class ReferenceNone(Stage):
    """Leave chi as the inversion produced it (its implicit reference)."""

    kind, name = "reference", "none"
    reads = ("chi",)
    writes = ("chi",)
    description = "no referencing: chi passes through unchanged"
    params = (CPU_DEVICE,)

    def run(self, ctx, p):
        chi = ctx["chi"]
        return {"chi": chi.like(np.asarray(chi.data, dtype=np.float32), units=chi.units or "ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(ReferenceMean)
    registry.add(ReferenceNone)
