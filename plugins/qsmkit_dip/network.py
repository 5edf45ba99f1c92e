"""The Deep Image Prior generator: a light 3D encoder-decoder (U-Net-like) and its noise input.

The architecture follows the "skip" hourglass of Ulyanov et al. (Deep Image Prior, CVPR 2018),
made 3D and slimmed for CPUs:

* encoder level ``i`` (``i = 0 .. depth-1``): a stride-2 3x3x3 convolution (downsampling), then a
  3x3x3 convolution, each followed by batch normalisation and LeakyReLU(0.2);
* skip connection ``i`` (optional): a 1x1x1 convolution of the encoder input at that resolution
  to ``skip_channels`` channels (DIP's narrow skips: a prior that favours smooth, piecewise
  images rather than copying the noise input to the output);
* decoder level ``i``: trilinear x2 upsampling, concatenation of the skip, batch normalisation,
  a 3x3x3 convolution and a 1x1x1 convolution (which already reduces the width to the next finer
  level, so that upsampled tensors are narrow);
* a final 1x1x1 convolution to one channel (linear: susceptibility is signed).

Only the last decoder level works at full resolution (the first encoder convolution has stride
2), so the cost per voxel is about ``27 * (channels + skip_channels) * channels`` multiply-adds
forward. Width doubles per level (capped at 4x ``channels``). Inputs must have every spatial
size divisible by ``2**depth`` (see :func:`qsmkit_dip.fit.working_box`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qsmkit.errors import ParameterError

__all__ = ["DIPGenerator", "make_noise_input", "level_channels"]


def level_channels(channels: int, depth: int, max_factor: int = 4) -> list[int]:
    """Width of each level: ``channels * 2**i`` capped at ``max_factor * channels``."""
    return [int(channels) * min(2 ** i, max_factor) for i in range(int(depth))]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=True)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout, 3, stride=2), nn.BatchNorm3d(cout), _act(),
            _conv(cout, cout, 3), nn.BatchNorm3d(cout), _act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Skip(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv(cin, cout, 1), nn.BatchNorm3d(cout), _act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cmid: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm3d(cin),
            _conv(cin, cmid, 3), nn.BatchNorm3d(cmid), _act(),
            _conv(cmid, cout, 1), nn.BatchNorm3d(cout), _act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DIPGenerator(nn.Module):
    """3D encoder-decoder ``f_theta`` mapping a fixed noise tensor to one output channel.

    Parameters
    ----------
    in_channels : int
        Channels of the noise input ``z``.
    channels : int
        Width of the finest level (doubles per level, capped at 4x).
    depth : int
        Number of down/up-sampling levels; spatial sizes must be divisible by ``2**depth``.
    skip : bool
        Use skip connections (U-Net-like) or not (plain hourglass).
    skip_channels : int
        Width of each skip connection.
    """

    def __init__(self, in_channels: int = 8, channels: int = 16, depth: int = 3, skip: bool = True,
                 skip_channels: int = 8):
        super().__init__()
        if depth < 1:
            raise ParameterError("depth must be >= 1")
        self.depth = int(depth)
        self.skip = bool(skip)
        widths = level_channels(channels, depth)
        cins = [int(in_channels)] + widths[:-1]
        self.down = nn.ModuleList(_Down(cins[i], widths[i]) for i in range(depth))
        s = int(skip_channels) if skip else 0
        self.skips = nn.ModuleList(_Skip(cins[i], s) for i in range(depth)) if skip else None
        # decoder level i receives the upsampled output of level i+1, which has width widths[i]
        # (level i+1's 1x1 conv reduces to it); the bottom receives widths[depth-1].
        self.up = nn.ModuleList(
            _Up(widths[i] + s, widths[i], widths[i - 1] if i > 0 else widths[0]) for i in range(depth))
        self.out = nn.Conv3d(widths[0], 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        feats: list[torch.Tensor] = []
        x = z
        for i in range(self.depth):
            if self.skip:
                feats.append(self.skips[i](x))
            x = self.down[i](x)
        for i in reversed(range(self.depth)):
            x = nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            if self.skip:
                x = torch.cat([x, feats[i]], dim=1)
            x = self.up[i](x)
        return self.out(x)


def make_noise_input(shape: Sequence[int], channels: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    """The fixed DIP input ``z``: ``N`` stacked 2D Gaussian-noise slices, ``N = shape[2]``.

    Slice ``k`` (along the volume's third axis) is an independent ``(channels, shape[0],
    shape[1])`` Gaussian image drawn from a generator seeded with ``seed``; the slices are stacked
    along the third axis to a ``(1, channels, *shape)`` float32 CPU tensor (move it to the
    device afterwards, so the same seed gives the same ``z`` on every device).

    Parameters
    ----------
    shape : 3 ints
        Working grid (x, y, z).
    channels : int
        Number of input channels.
    seed : int
        Random seed.
    scale : float
        Standard deviation of the noise (DIP uses small inputs, 0.1).
    """
    nx, ny, nz = (int(s) for s in shape)
    g = torch.Generator().manual_seed(int(seed))
    slices = [torch.randn((channels, nx, ny), generator=g) for _ in range(nz)]
    z = torch.stack(slices, dim=-1).unsqueeze(0)
    return (z * float(scale)).contiguous()
