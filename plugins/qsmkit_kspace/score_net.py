"""The score network of HFS-SDE: the "ddpm" U-Net of score_sde (Song et al., ICLR 2021), 2 channels.

Architecture (Ho et al., NeurIPS 2020, as re-implemented in score_sde's ``models/ddpm.py`` and used
unchanged by HFS-SDE, Cao et al., IEEE TMI 2024):

- a sinusoidal embedding of the time label ``t * 999`` (continuous-time training), two dense
  layers to ``4 nf`` channels;
- a 3x3 input convolution to ``nf`` channels; for each resolution level ``i`` (channel multiplier
  ``ch_mult[i]``) ``num_res_blocks`` residual blocks (GroupNorm, swish, 3x3 conv, time bias,
  GroupNorm, swish, dropout, 3x3 conv, 1x1 skip where the width changes), self-attention blocks at
  the resolutions listed in ``attn_resolutions``, and a stride-2 3x3 convolution between levels;
- a middle of residual block, attention, residual block;
- the mirrored decoder with ``num_res_blocks + 1`` residual blocks per level on the concatenated
  skip connections (attention after them at the same levels), nearest-neighbour upsampling followed by a 3x3 convolution;
- GroupNorm, swish and a 3x3 output convolution to the 2 channels (real, imaginary).

The network predicts the standardised noise ``eps`` of the perturbation; the score is
``-eps / std(t)`` (score_sde's convention for VP-type SDEs, see :mod:`.hfs_sde`).

Sizes (``arch`` of the checkpoint): the published HFS-SDE network is :data:`PUBLISHED`
(nf 128, ch_mult (1, 2, 2, 2), 2 residual blocks, attention at 16 x 16, dropout 0.1, about
34 M parameters; it needs a GPU); :data:`SMALL` (nf 16, 1 residual block) is the one trained on a
CPU for the shipped weights. Image sizes must be divisible by ``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from qsmkit.errors import ConfigError, GeometryError

__all__ = ["ScoreUNet", "PUBLISHED", "SMALL", "TINY", "build_score_net", "timestep_embedding"]

#: the published HFS-SDE / score_sde "ddpm" configuration (320 x 320 fastMRI knee)
PUBLISHED = {"nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1,
             "channels": 2, "image_size": 320}
#: the small network of the shipped CPU weights (128 x 128 simulated slices)
SMALL = {"nf": 16, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
         "channels": 2, "image_size": 128}
#: a tiny network for tests
TINY = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
        "channels": 2, "image_size": 16}

_ARCH_KEYS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "channels", "image_size")


def timestep_embedding(labels: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(l w_k), cos(l w_k)]`` of (float) labels ``(B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) * torch.arange(half, dtype=torch.float32, device=labels.device)
                      / max(half - 1, 1))
    arg = labels.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(ch // 4, 32) or 1, num_channels=ch, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        nn.init.zeros_(self.temb.bias)
        self.norm2 = _norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))  # block starts as the identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attn(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]  # (B, HW, C)
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


class ScoreUNet(nn.Module):
    """score_sde "ddpm" U-Net conditioned on the diffusion time ``t`` in ``[0, 1]``.

    Parameters
    ----------
    nf : int
        Base width (channels of the first level).
    ch_mult : sequence of int
        Width multiplier per resolution level (``len(ch_mult) - 1`` downsamplings).
    num_res_blocks : int
        Residual blocks per level in the encoder (the decoder has one more).
    attn_resolutions : sequence of int
        Feature-map sizes (smaller image side) at which self-attention blocks are inserted.
    dropout : float
        Dropout rate inside the residual blocks.
    channels : int
        Input/output channels (2: real and imaginary part of the complex image).
    image_size : int
        Training image size (defines which levels hold attention; other sizes divisible by
        ``2 ** (len(ch_mult) - 1)`` run, with attention at the same levels).
    """

    def __init__(self, nf: int = 32, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, channels: int = 2,
                 image_size: int = 128):
        super().__init__()
        self.nf, self.ch_mult, self.channels = int(nf), [int(c) for c in ch_mult], int(channels)
        self.num_res_blocks, self.image_size = int(num_res_blocks), int(image_size)
        levels = len(self.ch_mult)
        temb = 4 * self.nf
        self.temb = nn.Sequential(nn.Linear(self.nf, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(self.channels, self.nf, 3, padding=1)
        attn_levels = {i for i in range(levels) if self.image_size // 2 ** i in {int(a) for a in attn_resolutions}}
        self.attn_levels = sorted(attn_levels)
        self.down = nn.ModuleList()
        skips = [self.nf]
        ch = self.nf
        for i, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                out = self.nf * mult
                self.down.append(_ResBlock(ch, out, temb, dropout))
                ch = out
                if i in attn_levels:
                    self.down.append(_Attn(ch))
                skips.append(ch)
            if i != levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, temb, dropout), _Attn(ch), _ResBlock(ch, ch, temb, dropout)])
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            out = self.nf * self.ch_mult[i]
            for _ in range(self.num_res_blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), out, temb, dropout))
                ch = out
            if i in attn_levels:
                self.up.append(_Attn(ch))
            if i != 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.channels, 3, padding=1))
        self.factor = 2 ** (levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` (B, channels, H, W) float32, ``t`` (B,) in [0, 1] -> predicted noise (B, channels, H, W)."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise GeometryError(f"the score network needs image sides divisible by {self.factor}, got "
                                f"{tuple(x.shape[-2:])}")
        temb = self.temb(timestep_embedding(t * 999.0, self.nf))
        hs = [self.conv_in(x)]
        h = hs[-1]
        for m in self.down:
            if isinstance(m, _ResBlock):
                h = m(h, temb)
                hs.append(h)
            elif isinstance(m, _Attn):
                h = m(h)
                hs[-1] = h
            else:  # downsampling convolution
                h = m(h)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for m in self.up:
            if isinstance(m, _ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_score_net(arch: dict) -> ScoreUNet:
    """A :class:`ScoreUNet` from a checkpoint's ``arch`` mapping (one-line error on bad keys)."""
    unknown = set(arch) - set(_ARCH_KEYS)
    if unknown:
        raise ConfigError(f"score network: unknown architecture keys {sorted(unknown)}; allowed: {list(_ARCH_KEYS)}")
    try:
        return ScoreUNet(**arch)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"score network: invalid architecture {arch} ({exc})") from None
