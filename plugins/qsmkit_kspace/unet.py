"""The fastMRI baseline U-Net (Ronneberger et al. 2015, as configured by Zbontar et al. 2018).

Architecture of ``fastmri.models.Unet`` (``fastmri_examples/unet``), re-implemented here with
the same layer order and the same parameter names (so ``state_dict`` keys line up):

- ``down_sample_layers``: ``num_pool_layers`` :class:`ConvBlock` s, channels ``chans``,
  ``2 chans``, ..., each followed by 2 x 2 average pooling;
- ``conv``: the bottleneck :class:`ConvBlock` (``2^num_pool_layers chans`` channels);
- ``up_transpose_conv`` / ``up_conv``: per level a :class:`TransposeConvBlock` (2 x 2 transposed
  convolution, stride 2, halving the channels), concatenation with the skip connection
  (reflect-padded by one pixel when an odd size was pooled), and a :class:`ConvBlock`; the last
  level ends in a 1 x 1 convolution to ``out_chans``.

:class:`ConvBlock` = 2 x (3 x 3 convolution without bias, InstanceNorm2d, LeakyReLU(0.2),
Dropout2d(drop_prob)); :class:`TransposeConvBlock` = ConvTranspose2d(2, stride 2, no bias),
InstanceNorm2d, LeakyReLU(0.2). fastMRI's defaults are ``chans = 32``, ``num_pool_layers = 4``,
``drop_prob = 0`` (7.8 M parameters).

The input and output are real images ``(N, in_chans, H, W)``; the fastMRI recipe feeds the
instance-normalised zero-filled RSS magnitude and predicts the normalised fully sampled RSS
(:func:`normalize_instance`, :func:`denormalize`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ConvBlock", "TransposeConvBlock", "Unet", "normalize_instance", "denormalize", "network_input",
           "reconstruct", "load_unet", "SHIPPED", "ARCH_KEYS"]

#: constructor arguments of :class:`Unet` (what a checkpoint's ``arch`` holds)
ARCH_KEYS = {"in_chans": int, "out_chans": int, "chans": int, "num_pool_layers": int, "drop_prob": float}


class ConvBlock(nn.Module):
    """Two 3 x 3 convolutions, each followed by instance normalisation, LeakyReLU(0.2) and 2D dropout."""

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float):
        super().__init__()
        self.in_chans, self.out_chans, self.drop_prob = int(in_chans), int(out_chans), float(drop_prob)
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class TransposeConvBlock(nn.Module):
    """2 x 2 transposed convolution (stride 2, upsampling by 2), instance normalisation, LeakyReLU(0.2)."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.in_chans, self.out_chans = int(in_chans), int(out_chans)
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class Unet(nn.Module):
    """fastMRI's U-Net (see the module docstring).

    Parameters
    ----------
    in_chans, out_chans : int
        Channels of the input and output images (1 and 1 for magnitude reconstruction).
    chans : int
        Channels after the first convolution block (doubled at each pooling level).
    num_pool_layers : int
        Down-sampling (and up-sampling) levels.
    drop_prob : float
        Dropout2d probability in every :class:`ConvBlock`.
    """

    def __init__(self, in_chans: int = 1, out_chans: int = 1, chans: int = 32, num_pool_layers: int = 4,
                 drop_prob: float = 0.0):
        super().__init__()
        if min(int(in_chans), int(out_chans), int(chans), int(num_pool_layers)) < 1:
            raise ValueError("Unet: in_chans, out_chans, chans and num_pool_layers must be >= 1")
        if not 0.0 <= float(drop_prob) < 1.0:
            raise ValueError(f"Unet: drop_prob must lie in [0, 1), got {drop_prob}")
        self.in_chans, self.out_chans = int(in_chans), int(out_chans)
        self.chans, self.num_pool_layers, self.drop_prob = int(chans), int(num_pool_layers), float(drop_prob)

        ch = self.chans
        self.down_sample_layers = nn.ModuleList([ConvBlock(self.in_chans, ch, self.drop_prob)])
        for _ in range(self.num_pool_layers - 1):
            self.down_sample_layers.append(ConvBlock(ch, ch * 2, self.drop_prob))
            ch *= 2
        self.conv = ConvBlock(ch, ch * 2, self.drop_prob)
        self.up_conv = nn.ModuleList()
        self.up_transpose_conv = nn.ModuleList()
        for _ in range(self.num_pool_layers - 1):
            self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
            self.up_conv.append(ConvBlock(ch * 2, ch, self.drop_prob))
            ch //= 2
        self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
        self.up_conv.append(nn.Sequential(ConvBlock(ch * 2, ch, self.drop_prob),
                                          nn.Conv2d(ch, self.out_chans, kernel_size=1, stride=1)))

    def arch(self) -> dict:
        """Constructor arguments (stored in checkpoints as ``arch``)."""
        return {"in_chans": self.in_chans, "out_chans": self.out_chans, "chans": self.chans,
                "num_pool_layers": self.num_pool_layers, "drop_prob": self.drop_prob}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, out_chans, H, W)`` (any H, W >= 1)."""
        stack = []
        output = image
        for layer in self.down_sample_layers:
            output = layer(output)
            stack.append(output)
            output = F.avg_pool2d(output, kernel_size=2, stride=2, padding=0)
        output = self.conv(output)
        for transpose_conv, conv in zip(self.up_transpose_conv, self.up_conv):
            skip = stack.pop()
            output = transpose_conv(output)
            pad = [0, skip.shape[-1] - output.shape[-1], 0, skip.shape[-2] - output.shape[-2]]
            if any(pad):
                output = F.pad(output, pad, "reflect" if min(output.shape[-2:]) > 1 else "replicate")
            output = conv(torch.cat([output, skip], dim=1))
        return output


def normalize_instance(image: torch.Tensor, eps: float = 1e-11, clamp: float = 6.0):
    """fastMRI's per-image normalisation: ``(x - mean) / (std + eps)`` clamped to ``[-clamp, clamp]``.

    Parameters
    ----------
    image : torch.Tensor, (N, ..., H, W)
        Each of the ``N`` images is normalised by its own mean and (unbiased) standard deviation.

    Returns
    -------
    (normalised, mean, std)
        ``mean`` and ``std`` have shape ``(N, 1, ..., 1)`` (broadcastable to ``image``).
    """
    dims = tuple(range(1, image.ndim))
    mean = image.mean(dim=dims, keepdim=True)
    std = image.std(dim=dims, keepdim=True)
    out = (image - mean) / (std + eps)
    return (out.clamp(-clamp, clamp) if clamp > 0 else out), mean, std


def denormalize(output: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-11) -> torch.Tensor:
    """Undo :func:`normalize_instance`: ``output * (std + eps) + mean``."""
    return output * (std + eps) + mean


def network_input(kspace: torch.Tensor, mask: torch.Tensor, crop=None, maps: torch.Tensor | None = None,
                  kind: str = "zero_filled", sense_iterations: int = 10) -> torch.Tensor:
    """The U-Net's input image of undersampled multi-coil k-space: ``(N, 1, h, w)`` float32 magnitude.

    Parameters
    ----------
    kspace : torch.Tensor, complex64, (N, C, H, W)
        Undersampled k-space (zeros where not sampled).
    mask : torch.Tensor, float32, broadcastable to (N, 1, H, W)
        Sampling mask.
    crop : (h, w) or None
        Image-space centre crop (fastMRI: the 320 x 320 recon matrix).
    maps : torch.Tensor, complex64, (N, M, C, H, W), optional
        Coil maps (``kind="sense"`` only).
    kind : {"zero_filled", "sense"}
        ``zero_filled``: RSS of the zero-filled coil images (fastMRI's U-Net input);
        ``sense``: magnitude (RSS over map sets) of ``sense_iterations`` CG-SENSE iterations.
    """
    from qsmkit.kspace import center_crop, rss

    from .transforms import zero_filled_coils

    if kind == "zero_filled":
        return rss(zero_filled_coils(kspace, crop, mask), dim=1).unsqueeze(1).to(torch.float32)
    if kind == "sense":
        from .sense import cg_sense

        if maps is None:
            raise ValueError("network_input: kind 'sense' needs coil maps")
        x, _ = cg_sense(kspace, maps, mask, int(sense_iterations), 0.0, 0.0)
        return center_crop(rss(x, dim=1), crop).unsqueeze(1).to(torch.float32)
    raise ValueError(f"network_input: unknown input kind {kind!r}")


def reconstruct(model: Unet, image: torch.Tensor, clamp: float = 6.0, eps: float = 1e-11) -> torch.Tensor:
    """fastMRI's U-Net reconstruction of input images ``(N, 1, h, w)``: normalise each image
    (:func:`normalize_instance`), apply the network, undo the normalisation."""
    x, mean, std = normalize_instance(image, eps, clamp)
    return denormalize(model(x), mean, std, eps).clamp_min(0.0)


#: the weights shipped with the plugin (trained by ``weights/unet_sim.yaml``)
SHIPPED = Path(__file__).resolve().parent / "weights" / "unet_sim.pt"


def load_unet(path: str | Path | None = None, device="cpu") -> tuple[Unet, dict]:
    """A trained U-Net and its normalisation from a ``qsmkit train unet`` checkpoint.

    Parameters
    ----------
    path : path or None
        ``model.pt`` / ``last.pt`` of ``qsmkit train unet``; ``None`` or ``"shipped"``: the
        plugin's weights (:data:`SHIPPED`).
    device : str or torch.device

    Returns
    -------
    (model in eval mode on ``device``, normalisation dict: ``input``, ``sense_iterations``, ``clamp``, ``eps``)

    Raises
    ------
    CheckpointError
        One line for a missing, corrupt, foreign, code-carrying or other-method checkpoint, and
        for one whose architecture or normalisation is not a U-Net's.
    """
    from qsmkit.checkpoints import load_checkpoint, load_weights
    from qsmkit.errors import CheckpointError

    path = SHIPPED if path in (None, "", "shipped") else Path(path)
    if path == SHIPPED and not path.is_file():
        raise CheckpointError(f"the shipped U-Net weights {path} are missing (a broken install?); reinstall qsmkit "
                              f"or give checkpoint: a model.pt made by 'qsmkit train unet'")
    ckpt = load_checkpoint(path, "unet")
    arch = ckpt["arch"]
    if not isinstance(arch, dict) or set(arch) != set(ARCH_KEYS) or not all(
            isinstance(arch[k], (int, float)) and not isinstance(arch[k], bool) for k in ARCH_KEYS):
        raise CheckpointError(f"checkpoint {path} declares no U-Net architecture (arch must give "
                              f"{', '.join(ARCH_KEYS)}); retrain with 'qsmkit train unet'")
    try:
        model = Unet(**{k: ARCH_KEYS[k](v) for k, v in arch.items()})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid U-Net architecture ({exc})") from None
    load_weights(model, ckpt["model"], path)
    norm = dict(ckpt["normalisation"])
    want = {"input": str, "clamp": (int, float), "eps": (int, float)}
    if any(not isinstance(norm.get(k), t) for k, t in want.items()) or norm["input"] not in ("zero_filled", "sense"):
        raise CheckpointError(f"checkpoint {path} lacks the U-Net normalisation (input, clamp, eps); "
                              f"retrain with 'qsmkit train unet'")
    norm.setdefault("sense_iterations", 10)
    return model.to(device).eval(), norm
