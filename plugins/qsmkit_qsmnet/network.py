"""The QSMnet 3D U-Net (Yoon et al., NeuroImage 179:199-206, 2018), channel width a parameter.

Published layout (width 32): an encoder of 4 levels, each two ``3x3x3 conv -> batch norm -> ReLU``
blocks followed by a ``2x2x2`` max-pooling; a bottleneck of two such blocks; a decoder of 4 levels,
each a ``2x2x2`` stride-2 transposed convolution, a concatenation with the encoder features of
the same level and two conv-BN-ReLU blocks; a final ``1x1x1`` convolution to one channel. That is
19 convolutions, 18 batch norms, 18 ReLUs, 4 max-poolings, 4 transposed convolutions and 4
concatenations. Channels double per level (``width * 2**level``, 512 at the bottleneck for width 32).

``residual=True`` is a qsmkit option (not in the paper): the network gets a second input channel,
a closed-form estimate of chi (see :func:`qsmkit_qsmnet.prior.closed_form_prior`), and predicts a
correction to it, ``chi = prior + net(field, prior)``. The layer counts are unchanged.

torch is imported at module level: import this module only where the network is needed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QSMnet", "layer_counts", "LEVELS"]

#: number of down-sampling levels of the published network (input sizes must be multiples of 2**LEVELS)
LEVELS = 4


class _Block(nn.Sequential):
    """``3x3x3 conv -> batch norm -> ReLU``."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class _Concat(nn.Module):
    """Feature concatenation along channels (a module, so that the layer counts can be checked)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat((a, b), dim=1)


class QSMnet(nn.Module):
    """QSMnet 3D U-Net: local field (normalised) -> susceptibility (normalised).

    Parameters
    ----------
    width : int
        Channels at the first level (published: 32; doubles per level).
    residual : bool
        qsmkit option: two input channels (field, closed-form chi) and output ``prior + net``.

    Notes
    -----
    Input ``(N, C, X, Y, Z)`` with ``C = 1`` (``2`` with ``residual``); X, Y, Z multiples of 16.
    With ``residual`` the final convolution starts at zero, so that an untrained network returns
    the prior.
    """

    def __init__(self, width: int = 32, residual: bool = False):
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"QSMnet width must be >= 1, got {width}")
        self.width, self.residual = int(width), bool(residual)
        w = [self.width * 2 ** i for i in range(LEVELS + 1)]
        cin = 2 if self.residual else 1
        self.down = nn.ModuleList()
        for i in range(LEVELS):
            self.down.append(nn.Sequential(_Block(cin if i == 0 else w[i - 1], w[i]), _Block(w[i], w[i])))
        self.pool = nn.ModuleList(nn.MaxPool3d(2) for _ in range(LEVELS))
        self.bottom = nn.Sequential(_Block(w[LEVELS - 1], w[LEVELS]), _Block(w[LEVELS], w[LEVELS]))
        self.upconv = nn.ModuleList(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(LEVELS)))
        self.cat = nn.ModuleList(_Concat() for _ in range(LEVELS))
        self.up = nn.ModuleList(nn.Sequential(_Block(2 * w[i], w[i]), _Block(w[i], w[i]))
                                for i in reversed(range(LEVELS)))
        self.out = nn.Conv3d(w[0], 1, 1)
        if self.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def arch(self) -> dict:
        """Constructor arguments (stored in checkpoints)."""
        return {"width": self.width, "residual": self.residual}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` -> ``(N, 1, X, Y, Z)``."""
        skips = []
        h = x
        for down, pool in zip(self.down, self.pool):
            h = down(h)
            skips.append(h)
            h = pool(h)
        h = self.bottom(h)
        for upconv, cat, up, skip in zip(self.upconv, self.cat, self.up, reversed(skips)):
            h = up(cat(skip, upconv(h)))
        y = self.out(h)
        if self.residual:
            y = y + x[:, 1:2]
        return y


def layer_counts(net: nn.Module) -> dict[str, int]:
    """Numbers of convolutions, batch norms, ReLUs, max-poolings, transposed convolutions, concatenations."""
    kinds = {"conv": nn.Conv3d, "batch_norm": nn.BatchNorm3d, "relu": nn.ReLU, "max_pool": nn.MaxPool3d,
             "transposed_conv": nn.ConvTranspose3d, "concat": _Concat}
    return {k: sum(type(m) is t for m in net.modules()) for k, t in kinds.items()}
