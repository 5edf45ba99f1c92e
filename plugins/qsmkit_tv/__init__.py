"""Built-in plugin: TV-ADMM and rapid two-step (RTS) dipole inversion (``stage: inversion``).

* ``method: tv`` -- TV-regularised ADMM with closed-form k-space updates (Bilgic et al., MRM
  2014;72:1444 and JMRI 2014;40:181): :func:`qsmkit_tv.tv.tv_admm`.
* ``method: rts`` -- rapid two-step inversion (Kames et al., NeuroImage 2018;167:276), QSMxT's
  default: :func:`qsmkit_tv.rts.rts`.

Both read ``local_field`` (ppm) and ``mask`` and write ``chi`` (ppm, zero mean: reference it
afterwards); torch on CPU or CUDA (``device``).
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.errors import GeometryError, StageError
from qsmkit.params import lam, max_iter, tol

from .rts import rts
from .tv import tv_admm

__all__ = ["TV", "RTS", "tv_admm", "rts"]

_PADDING = Param("padding", float, 1.0, range=(1.0, 4.0),
                 doc="FFT grid = mask bounding box (+ margin) enlarged by this factor; 1 = margin only")
_MARGIN = Param("margin", int, 4, unit="voxels", range=(0, 64),
                doc="zero voxels added around the mask's bounding box (periodic wrap-around guard)")


def _check(ctx, label):
    f, mask = ctx["local_field"], ctx["mask"]
    if f.data.ndim != 3 or f.grid_shape != mask.grid_shape:
        raise GeometryError(f"{label}: local_field {f.shape} and mask {mask.shape} must be one 3D grid")
    m = np.asarray(mask.data) > 0
    if not m.any():
        raise StageError(f"{label}: the mask is empty (all zero); check the mask / background stage")
    return f, m


class TV(Stage):
    """TV-ADMM: ``min 1/2 ||W (D chi - f)||^2 + lambda ||grad chi||_1``, closed-form ADMM updates."""

    kind, name = "inversion", "tv"
    reads, writes = ("local_field", "mask"), ("chi",)
    description = ("total-variation ADMM with closed-form k-space updates (Bilgic 2014); "
                   "seconds on a whole head, torch CPU or GPU")
    params = (
        lam(5e-5, range=(1e-8, 1.0), unit="ppm mm",
            doc="TV weight for a field in ppm (larger = smoother)"),
        Param("rho", float, 0.0, range=(0.0, 1e6),
              doc="ADMM penalty of the gradient split; 0 = 100 * lambda (Bilgic 2014)"),
        Param("rho_data", float, 0.3, range=(1e-4, 1e4),
              doc="ADMM penalty of the data split y = D chi (masked data term)"),
        max_iter(15, range=(1, 10000), doc="ADMM iterations (at most; 15 reaches ~11 % NRMSE on a 1 mm head)"),
        tol(1e-3, range=(0.0, 1.0), doc="stop when ||chi_k - chi_k-1|| / ||chi_k|| falls below this"),
        _PADDING, _MARGIN, DEVICE_PARAM,
    )

    def run(self, ctx, p):
        f, m = _check(ctx, "inversion/tv")
        dev = resolve_device(p.device)
        chi, info = tv_admm(f.data, m, f.voxel_size, f.b0_direction, lam=p["lambda"], rho=p.rho or None, rho_data=p.rho_data,
                            max_iter=p.max_iter, tol=p.tol, padding=p.padding, margin=p.margin, device=dev,
                            return_info=True)
        ctx.log(f"{info['n_iter']} ADMM iterations on {'x'.join(map(str, info['fft_shape']))}, "
                f"{'converged' if info['converged'] else 'stopped at max_iter'}, on {dev}")
        return {"chi": f.like(chi, units="ppm")}


class RTS(Stage):
    """Rapid two-step: MINRES fit for the well-conditioned cone, then TV-ADMM for the ill-conditioned cone."""

    kind, name = "inversion", "rts"
    reads, writes = ("local_field", "mask"), ("chi",)
    description = ("rapid two-step inversion (Kames 2018, QSMxT's default): well-conditioned cone by a masked MINRES fit, "
                   "ill-conditioned cone by TV-ADMM; torch CPU or GPU")
    params = (
        Param("delta", float, 0.15, range=(0.01, 0.6), doc="well-conditioned cone |D| > delta (Kames 2018)"),
        Param("mu", float, 1e5, range=(1e-3, 1e12), doc="weight of the well-conditioned k-space data in step 2"),
        Param("rho", float, 10.0, range=(1e-3, 1e6), doc="ADMM penalty of step 2; TV threshold 1/rho"),
        max_iter(20, range=(1, 10000), doc="ADMM iterations of step 2 (at most)"),
        tol(1e-2, range=(0.0, 1.0), doc="stop step 2 when ||chi_k - chi_k-1|| / ||chi_k|| falls below this"),
        Param("minres_iter", int, 8, range=(1, 1000),
              doc="step-1 preconditioned MINRES iterations (fit of chi in the mask to the field)"),
        Param("precond_floor", float, 0.03, range=(1e-4, 0.6),
              doc="step-1 preconditioner 1 / max(|D|, precond_floor)"),
        Param("step1_padding_mm", float, 40.0, unit="mm", range=(0.0, 1000.0),
              doc="zeros appended per axis to the step-1 grid (keeps the periodic copies' field away)"),
        _PADDING, _MARGIN, DEVICE_PARAM,
    )

    def run(self, ctx, p):
        f, m = _check(ctx, "inversion/rts")
        dev = resolve_device(p.device)
        chi, info = rts(f.data, m, f.voxel_size, f.b0_direction, delta=p.delta, mu=p.mu, rho=p.rho, tol=p.tol,
                        max_iter=p.max_iter, minres_iter=p.minres_iter, precond_floor=p.precond_floor,
                        step1_padding_mm=p.step1_padding_mm, padding=p.padding, margin=p.margin, device=dev,
                        return_info=True)
        ctx.log(f"{info['minres_iter']} MINRES on {'x'.join(map(str, info['step1_shape']))} + "
                f"{info['n_iter']} ADMM iterations on "
                f"{'x'.join(map(str, info['fft_shape']))}, "
                f"{'converged' if info['converged'] else 'stopped at max_iter'}, on {dev}")
        return {"chi": f.like(chi, units="ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(TV)
    registry.add(RTS)
