"""Built-in plugin: phase unwrapping (``stage: unwrap``, methods ``laplacian`` and ``romeo``)."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.errors import InputDataError, ParameterError
from qsmkit.params import CPU_DEVICE, ITERATIONS, max_iter, tol

from .laplacian import laplacian_unwrap, phase_laplacian, solve_poisson_neumann
from .romeo_stage import RomeoUnwrap
from .romeo import romeo_unwrap, romeo_weights, seed_order, select_seed, voxel_quality
from .mcpc3ds import MCPC3DS

__all__ = ["LaplacianUnwrap", "laplacian_unwrap", "phase_laplacian", "solve_poisson_neumann",
           "RomeoUnwrap", "romeo_unwrap", "romeo_weights", "seed_order", "select_seed", "voxel_quality"]


class LaplacianUnwrap(Stage):
    """Per-echo Laplacian unwrapping by DCT (Neumann boundary), batched over echoes."""

    kind, name = "unwrap", "laplacian"
    reads = ("phase",)
    optional_reads = ("mask",)
    writes = ("unwrapped_phase",)
    description = ("Laplacian unwrapping (Schofield & Zhu 2003) by DCT; exact up to a constant and, "
                   "inside a mask, a harmonic part that background removal takes out")
    params = (
        Param("laplacian", str, "wrapped", choices=("wrapped", "sincos"),
              doc="phase Laplacian: wrapped neighbour differences (exact below pi/voxel) or "
                  "Schofield-Zhu cos*L(sin)-sin*L(cos)"),
        Param("use_mask", bool, True,
              doc="restrict the solve to the mask (when one is available); output is 0 outside it"),
        max_iter(0, range=(0, 500), aliases=ITERATIONS,
                 doc="with a mask: conjugate-gradient steps (DCT-preconditioned) that solve on the mask "
                  "itself, removing the harmonic part of the direct solve (about 10 suffice); 0 = direct"),
        tol(1e-3, range=(1e-8, 0.5), doc="relative residual at which the iterations stop"),
        Param("snap", bool, False,
              doc="round to the measured phase + 2*pi*k per voxel, offsets consistent across echoes "
                  "(exact values where the Laplacian estimate is within pi; needs max_iter > 0 "
                  "with a mask)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        ph = ctx["phase"]
        data = np.asarray(ph.data)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise InputDataError(f"phase must be 3D or 4D (x, y, z, echo), got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise InputDataError("phase contains NaN or infinite values; fix or mask the input phase")
        mask = ctx.optional_mask(data.shape[:3]) if p.use_mask else None
        if p.snap and mask is not None and p.max_iter == 0:
            raise ParameterError("unwrap/laplacian: snap needs max_iter > 0 when a mask is used (the "
                                 "direct solve leaves a harmonic part that can exceed pi); set max_iter: 30 "
                                 "(formerly 'iterations')")
        u, info = laplacian_unwrap(data, ph.voxel_size, mask, p.laplacian, p.max_iter, p.tol, p.snap,
                                   return_info=True)
        ctx.log(f"Laplacian unwrapping of {data.shape[3]} echo(es) on {data.shape[:3]}"
                + (f", {int(mask.sum())} voxels in mask" if mask is not None else "")
                + (f", {info['iterations']} CG iteration(s)" if p.max_iter else "")
                + (", snapped to the data" if p.snap else ""))
        return {"unwrapped_phase": ph.like(u, units="rad")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(LaplacianUnwrap)
    registry.add(RomeoUnwrap)
    registry.add(MCPC3DS)
