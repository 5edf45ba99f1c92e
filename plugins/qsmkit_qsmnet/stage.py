"""The ``inversion`` stage ``qsmnet``: a trained QSMnet checkpoint applied to the local field."""

from __future__ import annotations

import time
from pathlib import Path

from qsmkit import Param, Stage
from qsmkit.device import DEVICE_PARAM, resolve_device

__all__ = ["QSMnetStage", "SHIPPED_WEIGHTS", "load_qsmnet"]

#: the small-width model trained on simulated heads that ships with qsmkit
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "qsmnet_small.pt"


def load_qsmnet(path, device=None):
    """``(net, checkpoint)`` from a qsmkit QSMnet checkpoint (safe loading; one-line errors)."""
    from qsmkit.checkpoints import load_checkpoint, load_weights
    from qsmkit.errors import CheckpointError

    from .network import QSMnet

    ckpt = load_checkpoint(path, "qsmnet")
    arch = ckpt["arch"]
    try:
        if set(arch) - {"width", "residual"}:
            raise TypeError(f"unknown keys {sorted(set(arch) - {'width', 'residual'})}")
        net = QSMnet(int(arch.get("width", 32)), bool(arch.get("residual", False)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} declares an architecture QSMnet cannot build ({exc})") from None
    load_weights(net, ckpt["model"], path)
    norm = ckpt["normalisation"]
    for key in ("field_scale", "chi_scale"):
        v = norm.get(key)
        if not isinstance(v, (int, float)) or not v > 0:
            raise CheckpointError(f"checkpoint {path} lacks the normalisation statistic '{key}'; retrain it "
                                  f"with 'qsmkit train qsmnet'")
    net.eval()
    if device is not None:
        net.to(device)
    return net, ckpt


class QSMnetStage(Stage):
    """QSMnet inversion of the local field with a trained checkpoint."""

    kind, name = "inversion", "qsmnet"
    reads, writes = ("local_field", "mask"), ("chi",)
    description = ("QSMnet (Yoon 2018): trained 3D U-Net on 64^3 patches; resamples to a B0-aligned 1 mm grid "
                   "when needed (torch)")
    params = (
        Param("checkpoint", str, "", doc="QSMnet checkpoint (.pt from 'qsmkit train qsmnet'); empty: the shipped "
                                          "small model"),
        Param("overlap", float, 0.25, range=(0.0, 0.9), doc="fraction of a 64^3 tile shared with its neighbour"),
        Param("blend", str, "cosine", choices=("cosine", "gaussian"), doc="window blending overlapping tiles"),
        Param("batch", int, 2, range=(1, 256), doc="tiles per network call (memory is fixed by this)"),
        Param("patch", int, 64, range=(16, 256), doc="tile edge in voxels (a multiple of 16)"),
        Param("interpolation", str, "bspline", choices=("linear", "bspline"),
              doc="resampling into / out of the training frame when it is needed (bspline: cubic)"),
        DEVICE_PARAM,
    )

    def run(self, ctx, p):
        from qsmkit.errors import ParameterError

        from .inference import invert, network_fn

        if p.patch % 16:
            raise ParameterError(f"inversion/qsmnet: patch must be a multiple of 16, got {p.patch}")
        f, mask = ctx["local_field"], ctx["mask"]
        dev = resolve_device(p.device)
        path = Path(p.checkpoint) if p.checkpoint else SHIPPED_WEIGHTS
        net, ckpt = load_qsmnet(path, dev)
        norm = ckpt["normalisation"]
        vt = tuple(float(v) for v in norm.get("voxel_size", (1.0, 1.0, 1.0)))
        t0 = time.perf_counter()
        chi = invert(network_fn(net, dev.type == "cpu"), f.data, mask.data, f.affine, f.b0_direction, norm,
                     bool(ckpt["arch"].get("residual", False)), vt, log=ctx.log, interpolation=p.interpolation, patch=p.patch,
                     overlap=p.overlap, blend=p.blend, batch=p.batch, device=dev)
        ctx.log(f"qsmnet: {path.name} (width {ckpt['arch'].get('width')}, residual "
                f"{bool(ckpt['arch'].get('residual', False))}) on {dev}, {time.perf_counter() - t0:.1f} s")
        return {"chi": f.like(chi, units="ppm")}
