"""Built-in plugin: Deep Image Prior dipole inversion (``stage: inversion, method: dip``).

An untrained 3D encoder-decoder, fed a fixed noise input, is fitted so that the dipole field of
its output matches the local field inside the mask (:func:`qsmkit_dip.fit.dip`). No training
data are involved. The fit stops by itself (no ground truth needed: the residual on held-out
voxels, the settling of the running average of the outputs) and returns that running average.

Default (issue 20): ``warm_start: tikhonov``: the network learns a correction to a fast
gradient-regularised inversion whose weight is chosen on the held-out voxels
(:mod:`qsmkit_dip.warmstart`); that map is also the first candidate of the stopping rule, which
stops as soon as the held-out residual stops improving by ``min_delta`` for ``patience``
iterations or the result settles. On the simulator's 2 mm whole head (working box 72 x 88 x 64)
this fit stops after 20 iterations, ~40 CPU s in all, at 22.5 % NRMSE (TKD 36.9 %), where the
plain DIP (``warm_start: none``, 16 channels, min_iterations 100, patience 150: the settings
before issue 20) took ~2 CPU s per iteration for several hundred iterations (20-35 CPU minutes)
for ~28 %. On that head the network's correction stays negligible within those iterations:
the accuracy is the warm start's, and ``warm_start: none`` (or ``pretrain``) is the choice
for a result shaped by the network prior alone (benchmarks/bench_dip.py ``--fit``).

Memory and time: the network runs on the mask's bounding box (``crop_to_mask: true``, the
default) plus ``margin`` voxels, rounded up to a multiple of ``2**depth``. Per iteration on one
core of a shared machine (CPU s): ~1 s with the default 8 channels and ~2 s with 16 on the 2 mm
box above (the full-resolution 3x3x3 convolution and its backward pass take ~40 % of it, the
dipole FFTs ~3 %); peak memory ~0.9 GiB there. A 1 mm whole head has ~8x the voxels.

torch is imported only when the stage runs (or when :mod:`qsmkit_dip.network` is imported).
"""

from __future__ import annotations

from qsmkit import Param, Stage, hookimpl
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.params import ITERATIONS, max_iter, use_noise_weight

from .fit import WARM_STARTS, DipoleOperator, StoppingRule, dip, working_box

__all__ = ["DIP", "dip", "DipoleOperator", "StoppingRule", "working_box"]


def _has(ctx, name: str) -> bool:
    """Whether the context holds an artifact (iterates its names: a missing one raises no error)."""
    return any(k == name for k in ctx)


class DIP(Stage):
    """Deep Image Prior inversion of the local field."""

    kind, name = "inversion", "dip"
    reads = ("local_field", "mask")
    optional_reads = ("noise_weight",)
    writes = ("chi",)
    description = ("Deep Image Prior: untrained 3D U-Net fitted to the local field through the dipole "
                   "model, self-stopping; no training data (torch)")
    params = (
        max_iter(2000, range=(1, 100000), aliases=ITERATIONS, doc="iteration budget (Adam steps); the fit usually stops earlier"),
        Param("min_iterations", int, 20, range=(0, 100000), doc="the stopping rule is not checked before this"),
        Param("early_stop", bool, True, doc="stop when the outputs have settled or start to wander (no ground truth needed)"),
        Param("patience", int, 40, range=(10, 100000), doc="iterations without a better held-out residual before stopping"),
        Param("stop_tol", float, 5e-3, range=(0.0, 1.0), doc="stop once the output instability (relative running variance) falls below this"),
        Param("holdout", float, 0.1, range=(0.0, 0.45), doc="fraction of mask voxels kept out of the fit to detect overfitting (0: off)"),
        Param("min_delta", float, 5e-3, range=(0.0, 0.5), doc="relative decrease of the held-out residual that resets the patience clock (0: any)"),
        Param("warm_start", str, "tikhonov", choices=WARM_STARTS, doc="tikhonov: learn a correction to a fast gradient-regularised inversion (its weight chosen on the held-out voxels); pretrain: fit the network to that map first, then to the field; none: plain DIP"),
        Param("pretrain_steps", int, 50, range=(0, 100000), doc="warm_start pretrain: steps fitting the network to the Tikhonov map first"),
        Param("lr", float, 5e-3, range=(1e-6, 1.0), doc="Adam learning rate"),
        Param("channels", int, 8, range=(1, 256), doc="network width at full resolution (doubles per level, max 4x)"),
        Param("depth", int, 3, range=(1, 6), doc="number of down/up-sampling levels"),
        Param("input_channels", int, 8, range=(1, 256), doc="channels of the noise input z"),
        Param("skip", bool, True, doc="skip connections (U-Net-like) or a plain hourglass"),
        Param("skip_channels", int, 4, range=(1, 256), doc="width of each skip connection"),
        Param("input_noise", float, 0.0, range=(0.0, 1.0), doc="std of the per-step perturbation of z (z has std 0.1)"),
        Param("loss", str, "l2", choices=("l2", "l1"), doc="norm of the masked field residual"),
        Param("tv_weight", float, 0.0, range=(0.0, 10.0), doc="weight of a total-variation term (0: none)"),
        use_noise_weight(True, doc="weight the residual by noise_weight when that artifact exists"),
        Param("ema", float, 0.98, range=(0.0, 0.9999), doc="decay of the running average of the outputs (the result)"),
        Param("seed", int, 0, range=(0, 2 ** 31 - 1), doc="seed of z, of the initial weights and of the perturbations"),
        DEVICE_PARAM,
        Param("amp", bool, False, doc="bfloat16 mixed precision for the network on CUDA (ignored on CPU)"),
        Param("crop_to_mask", bool, True, doc="work on the mask's bounding box + margin (saves memory and time)"),
        Param("margin", int, 4, unit="voxels", range=(0, 64), doc="voxels around the mask's bounding box"),
        Param("padding", float, 1.5, range=(1.0, 4.0), doc="minimum zero-padding factor of the dipole convolution"),
        Param("log_every", int, 100, range=(1, 100000), doc="iterations between progress lines"),
    )

    def run(self, ctx, p):
        f, mask = ctx["local_field"], ctx["mask"]
        nw = ctx["noise_weight"].data if p.use_noise_weight and _has(ctx, "noise_weight") else None
        chi, hist = dip(
            f.data, mask.data, f.voxel_size, f.b0_direction, noise_weight=nw,
            iterations=p.max_iter, min_iterations=p.min_iterations, lr=p.lr, channels=p.channels,
            depth=p.depth, input_channels=p.input_channels, skip=p.skip, skip_channels=p.skip_channels,
            input_noise=p.input_noise, loss=p.loss, tv_weight=p.tv_weight, ema=p.ema,
            early_stop=p.early_stop, patience=p.patience, stop_tol=p.stop_tol, holdout=p.holdout, seed=p.seed,
            min_delta=p.min_delta, warm_start=p.warm_start, pretrain_steps=p.pretrain_steps,
            device=resolve_device(p.device), amp=p.amp, crop_to_mask=p.crop_to_mask, margin=p.margin,
            padding=p.padding, log=ctx.log, log_every=p.log_every)
        result = (f"result = the {p.warm_start} warm start: the network did not improve its held-out residual"
                  if hist["best_iteration"] == 0 and p.warm_start != "none"
                  else f"result = running average at iteration {hist['best_iteration']}")
        ctx.log(f"dip: {hist['iterations']} iterations in {hist['seconds']:.1f} s on {hist['device']} "
                f"({hist['reason']}); {result}")
        info = {k: hist[k] for k in ("iterations", "best_iteration", "stopped", "reason", "device")}
        info["seconds"] = round(float(hist["seconds"]), 2)
        info["final_relative_residual"] = float(hist["data_loss"][-1]) if hist["data_loss"] else None
        ctx.report_metrics({"dip": info})
        return {"chi": f.like(chi, units="ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(DIP)
