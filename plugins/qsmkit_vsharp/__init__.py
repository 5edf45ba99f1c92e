"""Built-in plugin: V-SHARP background field removal (``stage: background, method: vsharp``)."""

from __future__ import annotations


from qsmkit import Param, Stage, hookimpl
from qsmkit.errors import StageError
from qsmkit.params import CPU_DEVICE
from qsmkit.volume import field_and_mask

from .vsharp import default_radii, smv_kernel_half, vsharp

__all__ = ["VSharp", "default_radii", "smv_kernel_half", "vsharp"]


class VSharp(Stage):
    """Variable-radius SHARP: local field from total field, and the eroded mask."""

    kind, name = "background", "vsharp"
    reads = ("total_field", "mask")
    writes = ("local_field", "mask")
    description = ("V-SHARP (Li 2011, Wu 2012): SMV high-pass with the largest ball that fits, "
                   "TSVD deconvolution with the largest kernel; writes the eroded mask")
    params = (
        Param("radii_mm", list, None, unit="mm", range=(0.1, 50.0), item_type=float,
              doc="SMV radii; default 12 mm down to 2 voxels in steps of the largest voxel edge "
                  "(12, 11, ..., 2 at 1 mm; 12, 10.5, ..., 3 at 1.5 mm)"),
        Param("threshold", float, 0.05, range=(1e-4, 0.9),
              doc="TSVD truncation of the deconvolution kernel 1 - SMV of the largest radius"),
        Param("reject", float, 6.0, range=(0.0, 100.0),
              doc="drop edge voxels whose small-ball high-pass exceeds this many robust SDs of the "
                  "largest ball's (unreliable edge data); 0 disables"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        tf, mv = ctx["total_field"], ctx["mask"]
        f, m = field_and_mask(tf, mv, "total_field", "background/vsharp")
        radii = p.radii_mm or default_radii(tf.voxel_size)
        local, eroded, info = vsharp(f, m, tf.voxel_size, radii, p.threshold, p.reject, return_info=True)
        if not eroded.any():
            raise StageError(f"background/vsharp: the mask is thinner than the smallest radius "
                             f"({min(info['radii'])} mm); give smaller radii_mm or a larger mask")
        ctx.log(f"radii {', '.join(f'{r:g}' for r in info['radii'])} mm; deconvolution with "
                f"{info['deconvolution_radius']:g} mm; eroded mask {int(eroded.sum())} of {int(m.sum())} voxels "
                f"({info['rejected']} edge voxels rejected)")
        return {"local_field": tf.like(local, units="ppm"), "mask": mv.like(eroded, units="bool")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(VSharp)
