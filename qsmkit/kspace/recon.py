"""``ReconStage``: the base class of ``recon`` methods (see :mod:`qsmkit.kspace` for an example).

Part of the public :mod:`qsmkit.kspace` module (import from there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..device import DEVICE_PARAM, resolve_device
from ..errors import GeometryError, MissingArtifactError, ParameterError
from ..stage import Param, Stage
from .arrays import center_crop, mask_tensor, normalization_scale
from .data import KSpaceData, check_sampling_mask, from_volume, kspace_memory_errors, require_kspace, to_volume

__all__ = ["RECON_PARAMS", "ReconStage"]


#: parameters every :class:`ReconStage` reads (``crop``, ``complex_output``, ``batch_slices``);
#: a subclass adds its own and :data:`~qsmkit.device.DEVICE_PARAM`
RECON_PARAMS: tuple[Param, ...] = (
    Param("crop", bool, True, doc="centre crop to the header's recon size (image space)"),
    Param("complex_output", str, "none", choices=("none", "real_imag", "4d"),
          doc="also write the complex image: image_real + image_imag, or image_complex (x, y, z, 2)"),
    Param("batch_slices", int, 8, range=(1, 4096), doc="slices reconstructed together"),
)


class ReconStage(Stage):
    """Base of ``recon`` methods: k-space (+ mask, maps) -> ``image`` (see the module docstring).

    Class attributes a subclass sets: ``name``, ``description``, ``params`` (start from
    :data:`RECON_PARAMS`; add :data:`~qsmkit.device.DEVICE_PARAM` and, to be able to switch the
    normalisation off, ``Param("normalize", bool, True)``), ``reads`` (add ``"maps"`` when the
    method needs them) and ``needs_maps`` (``False`` for methods without coil maps).

    :meth:`run` (usually not overridden) validates ``sampling_mask`` and ``maps`` against the
    k-space, divides the k-space by :func:`normalization_scale` (unless ``params.normalize`` is
    false), calls :meth:`reconstruct` on batches of ``params.batch_slices`` slices under
    ``torch.no_grad()``, undoes the scale, centre-crops to :attr:`KSpaceData.crop_size` (when
    ``params.crop``), writes ``image`` (RSS over the sets of maps) and the complex outputs, and
    reports :meth:`evaluate`'s metrics (``ctx.report_metrics``) when a ``target`` exists. An
    out-of-memory error becomes a one-line :class:`~qsmkit.errors.StageError` that names the
    k-space shape and ``inputs.slices``.
    """

    kind = "recon"
    reads = ("kspace",)
    optional_reads = ("sampling_mask", "maps", "target")
    writes = ("image",)
    optional_writes = ("image_real", "image_imag", "image_complex")  # complex_output; metrics with a target
    params = RECON_PARAMS + (DEVICE_PARAM,)
    #: whether the method needs ``maps`` (``run`` refuses to start without them)
    needs_maps = True

    def reconstruct(self, y, maps, mask, p, ctx):  # pragma: no cover - interface
        """Reconstruct one batch of slices.

        Parameters
        ----------
        y : torch.Tensor, complex64, (S, C, H, W)
            Normalised, masked k-space of ``S`` slices on ``p.device``.
        maps : torch.Tensor, complex64, (S, M, C, H, W), or None
            Coil maps of the same slices (``None`` without a ``maps`` artifact).
        mask : torch.Tensor, float32, broadcastable to (S, C, H, W)
            Sampling mask (1 = sampled; all ones without a ``sampling_mask``).
        p : qsmkit.stage.Params
            Validated parameters.
        ctx : qsmkit.stage.StageContext
            For ``ctx.log``; the centre crop of this run is ``self.crop_size``.

        Returns
        -------
        torch.Tensor, complex, (S, M, H, W) or already centre-cropped (S, M, h, w)
            The image (``M`` sets of maps; 1 without maps), on the normalised scale.
        """
        raise NotImplementedError

    def evaluate(self, image: np.ndarray, target: np.ndarray, kd: KSpaceData) -> dict[str, float] | None:
        """Metrics of the magnitude ``image`` against ``target``, both ``(slices, h, w)`` float32.

        The default reports nothing; the built-in methods override it with the fastMRI metrics
        (``qsmkit_kspace.metrics.evaluate_volume``: NMSE, PSNR, SSIM).
        """
        return None

    def _maps(self, ctx, kd: KSpaceData, p, label: str) -> np.ndarray | None:
        if "maps" in ctx and not getattr(self, "_magnitude_only", False):
            maps = np.asarray(ctx["maps"])
            if maps.ndim != 5 or maps.shape[0] != kd.n_slices or maps.shape[2:] != (kd.n_coils,) + kd.image_shape:
                raise GeometryError(f"{label}: maps {maps.shape} do not match the k-space {kd.data.shape}")
            return maps
        if self.needs_maps and getattr(p, "combine", "maps") == "maps":
            raise MissingArtifactError(f"stage {label} needs 'maps'; add a coil_maps stage (espirit) before it")
        return None

    def _images(self, ctx, kd: KSpaceData, mask, maps, p) -> np.ndarray:
        import torch

        dev = resolve_device(p.device)
        scale = normalization_scale(kd.data, mask) if getattr(p, "normalize", True) else 1.0
        S = kd.n_slices
        H, W = kd.image_shape
        images = []
        for s0 in range(0, S, p.batch_slices):
            sl = slice(s0, min(S, s0 + p.batch_slices))
            y = torch.from_numpy(np.ascontiguousarray(kd.data[sl])).to(dev) / scale
            mk = mask_tensor(mask if mask is None or mask.ndim == 2 else mask[sl], y.shape[0], (H, W), dev)
            mp = torch.from_numpy(np.ascontiguousarray(maps[sl])).to(dev) if maps is not None else None
            with torch.no_grad():
                x = self.reconstruct(y * mk, mp, mk, p, ctx)
            images.append(center_crop(x, self.crop_size).cpu().numpy() * scale)
        return np.concatenate(images).astype(np.complex64)  # (S, M, h, w)

    def run(self, ctx, p):
        label = f"recon/{self.name}"
        kd = require_kspace(ctx, label)
        if p.complex_output != "none" and getattr(self, "_magnitude_only", False):
            raise ParameterError(f"{label}: complex_output needs a complex image; use combine: maps")
        mask = check_sampling_mask(ctx["sampling_mask"], kd, label) if "sampling_mask" in ctx else None
        maps = self._maps(ctx, kd, p, label)
        #: image-space centre crop of this run (``None``: full grid)
        self.crop_size = kd.crop_size if p.crop else None
        self._crop = self.crop_size  # older name
        with kspace_memory_errors(label, kd.data.shape, kd.source, kd.n_slices, batch_param=True):
            img = self._images(ctx, kd, mask, maps, p)
            mag = np.sqrt(np.sum(np.abs(img) ** 2, axis=1)).astype(np.float32)
        out: dict[str, Any] = {"image": to_volume(mag, kd, units="a.u.", recon=self.name)}
        if p.complex_output != "none":
            c = img[:, 0]
            if p.complex_output == "real_imag":
                out["image_real"] = to_volume(c.real.astype(np.float32), kd, units="a.u.")
                out["image_imag"] = to_volume(c.imag.astype(np.float32), kd, units="a.u.")
            else:
                out["image_complex"] = to_volume(np.stack([c.real, c.imag], axis=-1).astype(np.float32), kd,
                                                 units="a.u.", components="real,imag")
        if "target" in ctx:
            gt = from_volume(ctx["target"], kd).astype(np.float32)
            m = self.evaluate(center_crop(mag, gt.shape[-2:]), gt, kd)
            if m:
                ctx.log(f"NMSE {m['nmse']:.4g}  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}"
                        if {"nmse", "psnr", "ssim"} <= set(m) else f"metrics: {m}")
                ctx.report_metrics(m)
        return out
