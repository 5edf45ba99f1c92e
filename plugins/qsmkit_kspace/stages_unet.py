"""``recon`` method ``unet``: the fastMRI baseline U-Net (Zbontar et al. 2018) on each slice.

Per batch of slices: the zero-filled RSS image of the undersampled k-space on the evaluation
crop (fastMRI: the header's 320 x 320 recon matrix; or, for a checkpoint trained with ``input:
sense``, the magnitude of a short CG-SENSE with the ``maps`` artifact), normalised per slice as
in training (instance normalisation, clamped; stored in the checkpoint), through the network,
de-normalised. Writes ``image`` on the same crop as the other recon methods and, with a
``target``, the fastMRI metrics. The default checkpoint is the plugin's shipped model
(:data:`.unet.SHIPPED`, trained on simulated anatomies by ``weights/unet_sim.yaml``); any
``model.pt`` of ``qsmkit train unet`` can be given. Checkpoints are read with
``weights_only=True`` (a file carrying code is refused with a one-line error).
"""

from __future__ import annotations

from qsmkit import Param
from qsmkit.device import DEVICE_PARAM, resolve_device
from qsmkit.errors import MissingArtifactError, ParameterError

from .stages_recon import _COMMON_RECON, _Recon

__all__ = ["UNetRecon"]


class UNetRecon(_Recon):
    """fastMRI U-Net on the zero-filled (or SENSE) magnitude of each slice."""

    name = "unet"
    description = ("fastMRI baseline U-Net (Zbontar et al. 2018) on the zero-filled RSS of each slice; "
                   "shipped weights trained on simulated anatomies, or a 'qsmkit train unet' model.pt")
    needs_maps = False
    params = _COMMON_RECON + (
        Param("checkpoint", str, "shipped",
              doc="model.pt written by 'qsmkit train unet' (shipped: the weights in the plugin)"),
        Param("normalize", bool, False,
              doc="divide k-space by the max of the zero-filled image first (the U-Net normalises each slice "
                  "itself, so this only costs an extra inverse FFT)"),
        DEVICE_PARAM)

    #: the last loaded (model, normalisation), keyed by checkpoint path, its mtime and size, and device
    _cache: dict = {}

    def _model(self, p):
        import os

        from .unet import SHIPPED, load_unet

        dev = resolve_device(p.device)
        path = SHIPPED if p.checkpoint in ("", "shipped") else p.checkpoint
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None  # load_unet reports the missing file
        key = (str(path), stamp, str(dev))
        if key not in UNetRecon._cache:
            UNetRecon._cache.clear()  # one model at a time
            UNetRecon._cache[key] = load_unet(p.checkpoint, dev)
        return UNetRecon._cache[key]

    def run(self, ctx, p):
        if p.complex_output != "none":
            raise ParameterError("recon/unet: the U-Net predicts a magnitude image; set complex_output: none")
        self._net, self._norm = self._model(p)
        sense = self._norm["input"] == "sense"
        if sense and "maps" not in ctx:
            raise MissingArtifactError("recon/unet: this checkpoint was trained on SENSE inputs and needs 'maps'; "
                                       "add a coil_maps stage (espirit) before it")
        self._magnitude_only = not sense  # maps are read only for SENSE inputs
        return super().run(ctx, p)

    def reconstruct(self, y, maps, mask, p, ctx):
        import torch

        from .unet import network_input, reconstruct

        nm = self._norm
        x = network_input(y, mask, self.crop_size, maps, nm["input"], int(nm["sense_iterations"]))
        out = reconstruct(self._net, x, float(nm["clamp"]), float(nm["eps"]))  # (S, 1, h, w)
        return out.to(torch.complex64)
