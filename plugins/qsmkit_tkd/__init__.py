"""Built-in plugin: TKD dipole inversion (``stage: inversion, method: tkd``)."""

from __future__ import annotations

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE

from .tkd import tkd

__all__ = ["TKD", "tkd"]


class TKD(Stage):
    """Truncated k-space division of the local field."""

    kind, name = "inversion", "tkd"
    reads, writes = ("local_field", "mask"), ("chi",)
    description = "truncated k-space division (Shmueli 2009); fast, streak-prone, underestimates"
    params = (
        Param("threshold", float, 0.15, range=(0.01, 1.0), doc="dipole kernel truncation level"),
        Param("padding", float, 1.5, range=(1.0, 4.0), doc="minimum zero-padding factor per axis"),
        Param("correct", bool, True, doc="undo TKD's underestimation (Schweser 2013 correction factor)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        f, mask = ctx["local_field"], ctx["mask"]
        chi = tkd(f.data, mask.data, f.voxel_size, f.b0_direction, p.threshold, p.padding, p.correct)
        return {"chi": f.like(chi, units="ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(TKD)
