"""``recon`` stage ``calibrationless``: multi-coil CS without coil maps (:mod:`.calibrationless`).

Writes ``image``: the root sum of squares of the reconstructed coil images, centre-cropped in
image space to the evaluation crop (fastMRI's 320 x 320 / the header's recon size), and, with a
``target``, the fastMRI metrics; the stage metrics (``metrics.json``) also hold the cost of every
iteration (summed over the slices of a batch) and its relative change.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param
from qsmkit.device import DEVICE_PARAM
from qsmkit.params import ITERATIONS, lam, max_iter

from .calibrationless import FORMULATIONS, REGULARIZERS
from .stages_recon import _COMMON_RECON, _Recon

__all__ = ["Calibrationless"]


class Calibrationless(_Recon):
    """Calibrationless group-sparse CS (group-LASSO or OWL; FISTA, POGM or Condat-Vu)."""

    name = "calibrationless"
    reads = ("kspace",)
    needs_maps = False
    description = ("calibrationless multi-coil CS without coil maps: wavelet group-LASSO or OWL, "
                   "FISTA / POGM (synthesis) or Condat-Vu (analysis); RSS of the coil images")
    params = _COMMON_RECON + (
        Param("regularizer", str, "group_lasso", choices=REGULARIZERS,
              doc="group_lasso (l2 over coils, l1 over coefficients) or owl (band-based OSCAR weights)"),
        lam(0.01, range=(0.0, 1e3), doc="group-LASSO lambda / OWL alpha (normalised data: image max ~1)"),
        Param("owl_beta", float, 0.0, range=(0.0, 1e3), doc="OWL slope beta of the OSCAR weights (0: l1)"),
        Param("formulation", str, "synthesis", choices=FORMULATIONS,
              doc="synthesis (FISTA/POGM on wavelet coefficients) or analysis (Condat-Vu on images)"),
        Param("solver", str, "fista", choices=("fista", "pogm"), doc="synthesis solver (analysis: Condat-Vu)"),
        max_iter(100, range=(1, 10000), aliases=ITERATIONS, doc="solver iterations"),
        Param("restart", bool, True, doc="gradient restart of the FISTA / POGM momentum"),
        Param("sigma", float, 0.5, range=(1e-6, 1e6), doc="Condat-Vu dual step (primal: 1 / (L/2 + sigma))"),
        Param("wavelet", str, "sym8", doc="orthogonal wavelet (PyWavelets name), one transform per coil"),
        Param("levels", int, 4, range=(1, 10), doc="decomposition levels"),
        Param("backend", str, "auto", choices=("auto", "torch", "pywt", "ptwt"),
              doc="wavelet transform: auto/torch (periodization, PyWavelets coefficients, any device; pywt: same), ptwt (boundary wavelets)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled RSS image (undone on output)"),
        DEVICE_PARAM)

    #: no maps and no complex output (the image is the RSS of the coil images)
    _magnitude_only = True

    def run(self, ctx, p):
        self._costs: list[np.ndarray] = []
        self._info: dict = {}
        out = super().run(ctx, p)
        cost = np.sum([c.sum(1) for c in self._costs], axis=0)
        change = np.abs(np.diff(cost)) / np.maximum(np.abs(cost[1:]), 1e-30) if cost.size > 1 else np.zeros(0)
        ctx.report_metrics({"calibrationless": {
            "regularizer": p.regularizer, "formulation": p.formulation, "solver": self._info.get("solver"),
            "iterations": int(cost.size), "lipschitz": self._info.get("lipschitz"),
            "restarts": int(self._info.get("restarts", 0)),
            "cost": [float(c) for c in cost], "relative_change": [float(c) for c in change]}})
        return out

    def reconstruct(self, y, maps, mask, p, ctx):
        from .calibrationless import calibrationless

        x, info = calibrationless(y, mask, p.lam, p.max_iter, p.regularizer, p.formulation, p.solver, p.wavelet,
                                  p.levels, p.backend, p.owl_beta, p.restart, p.sigma, log=ctx.log)
        self._costs.append(info["cost"])
        self._info = {"solver": info["solver"], "lipschitz": info["lipschitz"],
                      "restarts": self._info.get("restarts", 0) + info["restarts"]}
        return x  # (S, C, H, W): the base class takes the RSS over axis 1
