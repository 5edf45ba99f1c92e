"""The QSMnet training loss (Yoon et al., NeuroImage 2018): model loss + L1 + gradient loss.

``loss = w_model ||D*(chi_hat - y)||_1 + w_l1 ||chi_hat - y||_1 + w_grad sum_i | |grad_i chi_hat| - |grad_i y| |``
(means over the voxels of the batch; ``D`` the core :class:`~qsmkit.operators.Dipole` on the patch
grid, B0 along the third axis, periodic on the patch; ``grad_i`` forward differences along axis ``i``).
The network output is multiplied by the mask before every term, as the label is zero outside it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qsmkit.operators import Dipole

__all__ = ["QSMnetLoss"]


class QSMnetLoss:
    """Callable ``loss(pred, target, mask) -> (total, parts)`` on ``(B, 1, X, Y, Z)`` tensors.

    Parameters
    ----------
    patch : 3 ints
        Patch grid (the dipole kernel is built for it once).
    voxel_size : 3 floats
        mm.
    w_model, w_l1, w_grad : float
        Weights of the model (dipole) loss, the L1 loss and the gradient loss.
    b0_dir : 3 floats
        B0 in the voxel frame of the patches (the training frame: along the third axis).
    """

    def __init__(self, patch: Sequence[int], voxel_size: Sequence[float] = (1.0, 1.0, 1.0), w_model: float = 0.5,
                 w_l1: float = 1.0, w_grad: float = 0.1, b0_dir: Sequence[float] = (0.0, 0.0, 1.0)):
        self.dipole = Dipole(tuple(int(p) for p in patch), voxel_size, b0_dir, padding=1.0)
        self.w_model, self.w_l1, self.w_grad = float(w_model), float(w_l1), float(w_grad)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
        pred = pred * mask
        diff = pred - target
        l1 = diff.abs().mean()
        zero = pred.new_zeros(())
        model = self.dipole.apply(diff).abs().mean() if self.w_model else zero
        grad = zero
        if self.w_grad:
            for dim in (-3, -2, -1):
                grad = grad + (torch.diff(pred, dim=dim).abs() - torch.diff(target, dim=dim).abs()).abs().mean()
        total = self.w_l1 * l1 + self.w_model * model + self.w_grad * grad
        return total, {"l1": float(l1.detach()), "model": float(model.detach()), "grad": float(grad.detach())}
