"""Building blocks of the DIP fit (:func:`qsmkit_dip.fit.dip`): the working box, the dipole
operator on the fitting device, the truth-free stopping rule, total variation and determinism.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np

from qsmkit.operators import Dipole, bounding_box

__all__ = ["DipoleOperator", "StoppingRule", "working_box"]


# --------------------------------------------------------------------------- geometry helpers
def working_box(mask: np.ndarray, multiple: int, crop_to_mask: bool = True,
                margin: int = 4) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """The region of the volume DIP works on, and the working grid shape.

    Parameters
    ----------
    mask : ndarray of bool, (x, y, z)
        Region of valid field.
    multiple : int
        Every working size is rounded up to a multiple of this (``2**depth`` of the network).
    crop_to_mask : bool
        Work on the bounding box of the mask enlarged by ``margin`` voxels (clipped to the
        volume) instead of the whole volume. Susceptibility outside the mask is zero in the
        model, so this changes nothing but memory and time (a brain mask usually fills about a
        third of a head volume's bounding grid).
    margin : int
        Voxels added around the mask's bounding box on each side.

    Returns
    -------
    box : tuple of slices
        The part of the volume copied into the working grid (at its origin corner).
    shape : tuple of ints
        Working grid shape: the box sizes rounded up to ``multiple`` (the extra voxels are
        zero field outside the mask).
    """
    m = np.asarray(mask, dtype=bool)
    if crop_to_mask:
        box = bounding_box(m, margin)
    else:
        box = tuple(slice(0, n) for n in m.shape)
    shape = tuple(int(math.ceil((s.stop - s.start) / multiple) * multiple) for s in box)
    return box, shape


class DipoleOperator(Dipole):
    """The core :class:`~qsmkit.operators.Dipole` (half spectrum) with its kernel in torch on ``device``.

    ``op(chi)`` equals :func:`qsmkit.physics.dipole_convolve` ``(chi, voxel_size, b0_dir,
    padding)`` up to float32 round-off; differentiable; self-adjoint (real even kernel).
    ``op.kernel`` is the torch tensor of :func:`qsmkit.physics.dipole_kernel` ``(..., rfft=True)``
    on the padded grid.

    Parameters
    ----------
    shape : 3 ints
        Grid of the susceptibility maps it is applied to.
    voxel_size : 3 floats
        Voxel size in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    padding : float
        Minimum zero-padding factor per axis (1 disables padding).
    device : torch.device or str
        Where the kernel lives.
    """

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float],
                 padding: float = 1.5, device: Any = "cpu"):
        super().__init__(shape, voxel_size, b0_dir, padding=padding, rfft=True, device=device)

    @property
    def padded(self) -> tuple[int, ...]:
        """The zero-padded FFT grid."""
        return self.fft_shape


# --------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Switch torch's deterministic algorithms on for the block (restoring the previous state)."""
    import torch

    if not enabled:
        yield
        return
    import torch.utils.deterministic as tud

    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = tud.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # filling every new tensor with NaN (a debugging aid of deterministic mode) costs ~20 % here
    tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        tud.fill_uninitialized_memory = prev_fill


def _tv(x):
    """Mean anisotropic total variation (forward differences) of the last three axes."""
    return (x[..., 1:, :, :] - x[..., :-1, :, :]).abs().mean() \
        + (x[..., :, 1:, :] - x[..., :, :-1, :]).abs().mean() \
        + (x[..., :, :, 1:] - x[..., :, :, :-1]).abs().mean()


class StoppingRule:
    """Early stopping of the DIP fit without ground truth.

    Fed, at checked iterations, the instability ``s`` (relative running variance of the outputs,
    see :func:`dip`) and, when voxels are held out, the held-out residual ``v`` of the running
    average, it tracks the best iteration from ``min_iterations`` on (lowest ``v``; lowest ``s``
    without hold-out) and says when to stop:

    * ``v`` has not improved for ``patience`` iterations: the fit has started to explain the noise
      of the voxels it sees at the expense of those it does not (self-validation / hold-out
      cross-validation); without hold-out, ``s`` has made no new minimum for ``patience``
      iterations (ES-WMV: the outputs started to wander again);
    * or ``s < tol``: the output has settled; the running average (the result) no longer moves
      appreciably, and further iterations only refine details slowly.

    With ``min_delta > 0`` only a value lower than the last counted minimum by more than that
    fraction of it restarts the ``patience`` clock (a slow creep down counts as a plateau), so
    the fit stops as soon as the held-out residual stops improving appreciably; the best
    iteration is still the lowest value seen. :meth:`seed_best` makes a warm start (iteration 0)
    the value to beat.

    The result of a stopped fit is the running average saved at the best iteration.
    """

    def __init__(self, min_iterations: int = 100, patience: int = 150, tol: float = 5e-3,
                 min_delta: float = 0.0):
        self.min_iterations, self.patience, self.tol = int(min_iterations), int(patience), float(tol)
        self.min_delta = float(min_delta)
        self.best_value, self.best_iteration = math.inf, 0
        self.clock_value, self.clock_iteration = math.inf, 0   # last appreciable improvement
        self.reason = ""

    def seed_best(self, validation: float) -> None:
        """Make ``validation`` (of the warm start, iteration 0) the value to beat."""
        self.best_value = self.clock_value = float(validation)
        self.best_iteration = self.clock_iteration = 0

    def update(self, iteration: int, instability: float, validation: float | None = None) -> tuple[bool, bool]:
        """Record the signals at ``iteration``; return ``(new best iteration, stop now)``."""
        if iteration < self.min_iterations:
            return False, False
        score = instability if validation is None else validation
        what = "output instability" if validation is None else "held-out residual"
        is_best = score < self.best_value
        if is_best:
            self.best_value, self.best_iteration = score, iteration
        if score < self.clock_value * (1.0 - self.min_delta) or self.clock_value == math.inf:
            self.clock_value, self.clock_iteration = score, iteration
        if instability < self.tol:
            self.reason = f"output settled (instability {instability:.2e} < {self.tol:g})"
            return is_best, True
        if iteration - self.clock_iteration >= self.patience:
            lower = "minimum" if self.min_delta == 0 else f"minimum lower by {self.min_delta:g} of it"
            self.reason = (f"no new {lower} of the {what} for {self.patience} iterations "
                           f"(minimum {self.best_value:.3e} at iteration {self.best_iteration})")
            return is_best, True
        return is_best, False
