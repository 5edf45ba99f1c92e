"""Built-in plugin: magnitude-threshold mask (``stage: mask, method: threshold``)."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.params import CPU_DEVICE
from qsmkit.errors import InputDataError, ParameterError, StageError

from .threshold import dilate_mm, erode_mm, fill_enclosed_holes, largest_component, otsu_threshold, threshold_mask

__all__ = ["ThresholdMask", "dilate_mm", "erode_mm", "fill_enclosed_holes", "largest_component", "otsu_threshold",
           "threshold_mask"]


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
        data = np.asarray(mag.data)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise InputDataError(f"magnitude must be 3D or 4D (x, y, z, echo), got shape {data.shape}")
        if p.echo > data.shape[3]:
            raise ParameterError(f"mask/threshold: echo = {p.echo} but the magnitude has {data.shape[3]} "
                                 f"echo(es); choose echo between 1 and {data.shape[3]}")
        m = data[..., p.echo - 1]
        if not np.all(np.isfinite(m)):
            raise InputDataError("magnitude contains NaN or infinite values; fix the input magnitude")
        if float(np.max(m)) <= float(np.min(m)):
            raise InputDataError("magnitude is constant; a threshold cannot find the head in it")
        mask, info = threshold_mask(m, mag.voxel_size, p.threshold, p.largest_component, p.fill_holes,
                                    p.erode_mm, p.dilate_mm, return_info=True)
        if not mask.any():
            hint = ("lower 'threshold'" if p.threshold is not None else "give 'threshold'")
            raise StageError(f"mask/threshold: the mask is empty (threshold {info['threshold']:.4g}, "
                             f"erode_mm {p.erode_mm:g}); {hint} or reduce erode_mm")
        ctx.log(f"threshold {info['threshold']:.4g} ({info['method']}); mask {int(mask.sum())} voxels "
                f"({100.0 * mask.mean():.1f}% of the grid)")
        return {"mask": mag.like(mask, units="bool")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(ThresholdMask)
