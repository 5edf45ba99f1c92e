"""Deep Image Prior (DIP) dipole inversion: fit an untrained generator to the local field.

A randomly initialised 3D encoder-decoder ``f_theta`` (:mod:`qsmkit_dip.network`) maps a fixed
noise input ``z`` to a susceptibility map; ``theta`` is fitted so that the dipole field of the
output matches the measured local field inside the mask::

    argmin_theta  || W M (d * chi_theta - f) ||_p^p  (+ tv_weight * TV(chi_theta)),
    chi_theta = M f_theta(z)

(``p = 2`` or ``1``; ``W`` the optional normalised noise weight; ``M`` the mask). No training
data and no ground truth are involved: the network's structure is the regulariser, because it
reproduces smooth, piecewise structures long before it reproduces noise or streaks. Fitting too
long overfits them, so the loop stops by itself (see :func:`dip`, "Stopping rule").

The dipole convolution is the core one: the kernel is :func:`qsmkit.physics.dipole_kernel` on
the grid :func:`qsmkit.fft.padded_shape` gives (zero padding, same as
:func:`qsmkit.physics.dipole_convolve`), in its real-FFT half-spectrum form
(``dipole_kernel(..., rfft=True)``, as the core's ``irfftn(D * rfftn(chi))``), moved to torch
with ``torch.from_numpy``.

References: Ulyanov, Vedaldi, Lempitsky, Deep Image Prior, CVPR 2018; Li et al., Self-validation:
early stopping for single-instance deep generative priors (hold-out of measurements); Wang et
al., Early stopping for deep image prior (ES-WMV, windowed moving variance of the outputs).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.errors import InputDataError, ParameterError, StageError
from qsmkit.physics import dipole_kernel

__all__ = ["dip", "DipoleOperator", "StoppingRule", "working_box"]


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
        idx = np.nonzero(m)
        box = tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
                    for i, n in zip(idx, m.shape))
    else:
        box = tuple(slice(0, n) for n in m.shape)
    shape = tuple(int(math.ceil((s.stop - s.start) / multiple) * multiple) for s in box)
    return box, shape


class DipoleOperator:
    """Field in ppm of a susceptibility map (ppm) on a fixed grid, in torch, differentiable.

    ``op(chi)`` equals :func:`qsmkit.physics.dipole_convolve` ``(chi, voxel_size, b0_dir,
    padding)`` up to float32 round-off: same kernel (:func:`qsmkit.physics.dipole_kernel`),
    same zero-padded grid (:func:`qsmkit.fft.padded_shape`). Zero padding at the end of each
    axis instead of around the centre gives the identical cropped result (circular convolution
    commutes with shifts). The operator is self-adjoint (real even kernel).

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
        import torch

        self.shape = tuple(int(s) for s in shape)
        self.padded = qfft.padded_shape(self.shape, padding)
        half = dipole_kernel(self.padded, voxel_size, b0_dir, rfft=True)
        self.kernel = torch.from_numpy(np.ascontiguousarray(half, dtype=np.float32)).to(device)

    def __call__(self, chi):
        """Apply to a real tensor whose last three axes are :attr:`shape`; returns the field."""
        import torch

        dims = (-3, -2, -1)
        spec = torch.fft.rfftn(chi, s=self.padded, dim=dims)
        field = torch.fft.irfftn(spec * self.kernel, s=self.padded, dim=dims)
        nx, ny, nz = self.shape
        return field[..., :nx, :ny, :nz]


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


def _resolve(device: Any):
    import torch

    if isinstance(device, torch.device):
        return device
    from qsmkit.device import resolve_device

    return resolve_device(str(device))


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

    The result of a stopped fit is the running average saved at the best iteration.
    """

    def __init__(self, min_iterations: int = 100, patience: int = 150, tol: float = 5e-3):
        self.min_iterations, self.patience, self.tol = int(min_iterations), int(patience), float(tol)
        self.best_value, self.best_iteration = math.inf, 0
        self.reason = ""

    def update(self, iteration: int, instability: float, validation: float | None = None) -> tuple[bool, bool]:
        """Record the signals at ``iteration``; return ``(new best iteration, stop now)``."""
        if iteration < self.min_iterations:
            return False, False
        score = instability if validation is None else validation
        what = "output instability" if validation is None else "held-out residual"
        is_best = score < self.best_value
        if is_best:
            self.best_value, self.best_iteration = score, iteration
        if instability < self.tol:
            self.reason = f"output settled (instability {instability:.2e} < {self.tol:g})"
            return is_best, True
        if iteration - self.best_iteration >= self.patience:
            self.reason = (f"no new minimum of the {what} for {self.patience} iterations "
                           f"(minimum {self.best_value:.3e} at iteration {self.best_iteration})")
            return is_best, True
        return is_best, False


# --------------------------------------------------------------------------- the inversion
def dip(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float], *,
        noise_weight: np.ndarray | None = None,
        iterations: int = 2000, min_iterations: int = 100, lr: float = 5e-3,
        channels: int = 16, depth: int = 3, input_channels: int = 8, skip: bool = True,
        skip_channels: int = 8, input_noise: float = 0.0, loss: str = "l2", tv_weight: float = 0.0,
        ema: float = 0.98, early_stop: bool = True, patience: int = 150, check_every: int = 10,
        stop_tol: float = 5e-3, holdout: float = 0.1,
        seed: int = 0, device: Any = "auto", amp: bool = False, crop_to_mask: bool = True,
        margin: int = 4, padding: float = 1.5, log: Callable[[str], None] | None = None,
        log_every: int = 100,
        callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
        callback_every: int = 0) -> tuple[np.ndarray, dict]:
    """Susceptibility from a local field by a Deep Image Prior.

    Parameters
    ----------
    field : ndarray, (x, y, z)
        Local (tissue) field in ppm of B0.
    mask : ndarray, (x, y, z)
        Region of valid field (bool or 0/1); ``chi`` is zero outside.
    voxel_size : 3 floats
        Voxel size in mm.
    b0_dir : 3 floats
        B0 direction in the voxel frame.
    noise_weight : ndarray, (x, y, z), optional
        Inverse noise standard deviation of the field (1/ppm); normalised here to mean 1 in the
        mask and used as a weight on the residual (weighted least squares for ``loss="l2"``).
    iterations : int
        Iteration budget (Adam steps); the fit ends earlier when the stopping rule fires.
    min_iterations : int
        The stopping rule is not evaluated before this many iterations.
    lr : float
        Adam learning rate.
    channels, depth, input_channels, skip, skip_channels :
        Generator width at full resolution, number of levels, channels of the noise input
        ``z``, skip connections on/off and their width (see :mod:`qsmkit_dip.network`).
    input_noise : float
        Standard deviation of the fresh Gaussian perturbation added to ``z`` at every step
        (DIP's input regularisation; 0 disables it). ``z`` itself has standard deviation 0.1.
    loss : {"l2", "l1"}
        Data-fidelity norm on the (weighted, masked) field residual.
    tv_weight : float
        Weight of an anisotropic total-variation term on the normalised output (0 disables).
    ema : float
        Decay of the exponential running average of the outputs (0.98 averages about the last
        50 iterations). The running average is the result.
    early_stop : bool
        Stop when the stopping rule fires and return the running average of the best iteration
        (else run the whole budget and return the final running average).
    patience : int
        Stopping rule: iterations without a new minimum of the held-out residual (of the output
        instability when ``holdout = 0``).
    check_every : int
        Iterations between evaluations of the instability (it costs one pass over the volume).
    stop_tol : float
        Stopping rule, second criterion: stop as soon as the instability falls below this.
    holdout : float
        Fraction of the mask voxels (a fixed random subset, from ``seed``) left out of the loss
        and used only to watch for overfitting (0 disables it; then the stopping rule watches the
        instability alone).
    seed : int
        Seed of ``z``, of the network initialisation and of the input perturbations. On CPU the
        same seed gives the same result bit for bit (deterministic algorithms are enforced) for
        a given torch build and number of torch threads (a different thread count changes the
        order of floating-point reductions, hence the trajectory, by round-off).
    device : "auto" | "cpu" | "cuda" or torch.device
        Where to fit.
    amp : bool
        Mixed precision (bfloat16 autocast of the network) on CUDA; ignored on CPU. The dipole
        convolution and the loss stay float32.
    crop_to_mask : bool
        Work on the mask's bounding box plus ``margin`` (rounded up to a multiple of
        ``2**depth``) instead of the whole grid; saves memory and time on whole-head volumes.
    margin : int
        Voxels around the mask's bounding box when cropping.
    padding : float
        Minimum zero-padding factor of the dipole convolution (as
        :func:`qsmkit.physics.dipole_convolve`).
    log : callable, optional
        Receives a progress line every ``log_every`` iterations.
    log_every : int
        Iterations between progress lines.
    callback : callable, optional
        ``callback(iteration, output, running_average)`` with full-grid ppm arrays every
        ``callback_every`` iterations (for studies of the fit; not used by the algorithm).
    callback_every : int
        Iterations between callback calls (0 disables).

    Returns
    -------
    chi : ndarray, float32, (x, y, z)
        Susceptibility in ppm, zero outside the mask, mean-free in the mask only up to what the
        data determine (reference it afterwards).
    history : dict
        ``iteration``, ``loss``, ``data_loss`` (relative: mean squared normalised residual on the
        fitted voxels, ~ residual energy over field energy), ``instability``, ``validation`` (the
        held-out relative residual of the running average, or None) (lists over the checked
        iterations), ``iterations`` (run),
        ``stopped`` (bool), ``reason``, ``best_iteration``, ``seconds``, ``working_shape``,
        ``device``, ``params`` (parameters count).

    Notes
    -----
    Stopping rule (no ground truth; :class:`StoppingRule`). DIP first reproduces the structure
    that the data determine and only later the noise, streaks and model errors; run too long, it
    overfits them. Two signals are watched every ``check_every`` iterations:

    * the held-out residual ``v = ||H (d * m - f)||^2 / ||H f||^2`` of the running average ``m``
      on the voxels ``H`` (``holdout`` of the mask) that the loss never sees. Their noise is
      independent of the fitted voxels', so ``v`` falls while the fit generalises and rises once
      it starts to explain the noise of the fitted voxels (hold-out validation of a single
      instance, as in DIP self-validation). On noise-free data it keeps falling.
    * the instability ``s = sum(var) / sum(m^2)``, with ``a = 1 - ema``, ``delta = x - m;
      m += a delta; var = (1 - a)(var + a delta^2)`` updated every step: the squared relative
      size of the output's recent motion. It falls by orders of magnitude while the structure is
      built and flattens at a floor set by the optimiser's jitter.

    The fit stops when ``v`` has not improved for ``patience`` iterations, or when
    ``s < stop_tol`` (settled), and returns the running average of the best iteration (lowest
    ``v``). Averaging removes the step-to-step jitter of the raw output, whose error fluctuates
    by several percent between steps. Without hold-out, ``s`` replaces ``v`` as the watched score
    (the ES-WMV criterion with an exponential window, so no window of volumes is stored).
    """
    import torch

    from .network import DIPGenerator, make_noise_input

    # ---------------------------------------------------------------- checks
    f = np.asarray(field, dtype=np.float32)
    m = np.asarray(mask) > 0
    if f.ndim != 3:
        raise InputDataError(f"DIP needs a 3D local field, got shape {f.shape}; pass one volume (x, y, z)")
    if m.shape != f.shape:
        raise InputDataError(f"mask shape {m.shape} differs from local field shape {f.shape}; give both on one grid")
    if not m.any():
        raise StageError("the mask is empty; DIP needs a non-empty mask of valid field")
    if loss not in ("l2", "l1"):
        raise ParameterError(f"loss = {loss!r} is not allowed; choose l2 or l1")
    if not (0.0 <= ema < 1.0):
        raise ParameterError(f"ema = {ema} must be in [0, 1)")
    if not np.all(np.isfinite(f[m])):
        raise InputDataError("the local field has NaN or inf inside the mask; fix the field or the mask")
    w = None
    if noise_weight is not None:
        w = np.asarray(noise_weight, dtype=np.float32)
        if w.shape != f.shape:
            raise InputDataError(f"noise_weight shape {w.shape} differs from local field shape {f.shape}")
        w = np.where(m & np.isfinite(w), np.maximum(w, 0), 0).astype(np.float32)
        mw = float(w[m].mean())
        if mw <= 0:
            raise InputDataError("noise_weight is zero everywhere in the mask; drop it or fix it")
        w /= mw

    dev = _resolve(device)
    use_amp = bool(amp) and dev.type == "cuda"
    t0 = time.perf_counter()

    # ---------------------------------------------------------------- working grid
    box, wshape = working_box(m, 2 ** int(depth), crop_to_mask, int(margin))
    sub = tuple(slice(0, s.stop - s.start) for s in box)

    def to_work(a: np.ndarray) -> np.ndarray:
        out = np.zeros(wshape, dtype=np.float32)
        out[sub] = a[box]
        return out

    scale = float(np.sqrt(np.mean(np.square(f[m], dtype=np.float64))))
    if not scale > 0:
        raise StageError("the local field is zero everywhere in the mask; nothing to invert")
    f_w = torch.from_numpy(to_work(f) / np.float32(scale)).to(dev)
    m_w = torch.from_numpy(to_work(m.astype(np.float32))).to(dev)
    wm = to_work(m.astype(np.float32)) if w is None else to_work(w) * to_work(m.astype(np.float32))
    hold = None
    if holdout > 0:
        if not holdout < 0.5:
            raise ParameterError(f"holdout = {holdout} must be in [0, 0.5); 0.1 is usual, 0 disables it")
        # a fixed random subset of mask voxels that the loss never sees (seeded)
        pick = np.random.default_rng(int(seed) + 2).random(f.shape, dtype=np.float32) < holdout
        hold = to_work((pick & m).astype(np.float32))
        if hold.sum() < 10 or (wm * (1 - hold) > 0).sum() < 10:
            hold = None  # too few voxels to hold out any
    wm_t = wm if hold is None else wm * (1 - hold)
    n_mask = float(m.sum()) if hold is None else float(((1 - hold) * to_work(m.astype(np.float32))).sum())
    wm_w = torch.from_numpy(wm_t).to(dev)
    if hold is not None:
        hv_w = torch.from_numpy(wm * hold).to(dev)
        hv_den = float((hv_w * f_w).square().sum().clamp_min(1e-30))
    op = DipoleOperator(wshape, voxel_size, b0_dir, padding, dev)

    with _deterministic(dev.type == "cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = DIPGenerator(input_channels, channels, depth, skip, skip_channels).to(dev)
        z = make_noise_input(wshape, input_channels, seed).to(dev)
        gen = torch.Generator(device=dev).manual_seed(int(seed) + 1)
        opt = torch.optim.Adam(net.parameters(), lr=float(lr))
        n_params = sum(p.numel() for p in net.parameters())

        def to_full(t) -> np.ndarray:
            out = np.zeros(f.shape, dtype=np.float32)
            out[box] = (t.detach().float().cpu().numpy() * np.float32(scale))[sub]
            out[~m] = 0
            return out

        a = 1.0 - float(ema)
        avg = torch.zeros(wshape, device=dev)
        var = torch.zeros(wshape, device=dev)
        best = None
        rule = StoppingRule(min_iterations, patience, stop_tol)
        hist: dict[str, Any] = {"iteration": [], "loss": [], "data_loss": [], "instability": [],
                                "validation": []}
        stopped, reason, it = False, "iteration budget used", 0
        last_log_t, last_log_it = time.perf_counter(), 0
        for it in range(1, int(iterations) + 1):
            zin = z if input_noise <= 0 else z + float(input_noise) * torch.randn(
                z.shape, generator=gen, device=dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(zin)
            x = out.float()[0, 0] * m_w
            r = (op(x) - f_w) * wm_w
            data = (r.square().sum() if loss == "l2" else r.abs().sum()) / n_mask
            total = data + tv_weight * _tv(x) if tv_weight > 0 else data
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

            total_v, data_v = float(total.detach()), float(data.detach())
            with torch.no_grad():
                xd = x.detach()
                if it == 1:
                    avg.copy_(xd)
                else:
                    delta = xd - avg
                    avg.add_(delta, alpha=a)
                    var.mul_(1.0 - a).addcmul_(delta, delta, value=a * (1.0 - a))
            check = it % check_every == 0 or it == iterations
            if check:
                with torch.no_grad():
                    s = float(var.sum() / avg.square().sum().clamp_min(1e-30))
                    v = None if hold is None else float(((op(avg) - f_w) * hv_w).square().sum()) / hv_den
                hist["iteration"].append(it)
                hist["loss"].append(total_v)
                hist["data_loss"].append(data_v)
                hist["instability"].append(s)
                hist["validation"].append(v)
                is_best, stop = rule.update(it, s, v)
                if is_best and early_stop:
                    best = avg.clone() if best is None else best.copy_(avg)
                if early_stop and stop:
                    stopped, reason = True, rule.reason
            if log is not None and (it % log_every == 0 or stopped or it == iterations):
                now = time.perf_counter()
                rate = (it - last_log_it) / max(now - last_log_t, 1e-9)
                last_log_t, last_log_it = now, it
                sv = hist["instability"][-1] if hist["instability"] else float("nan")
                vv = hist["validation"][-1] if hist["validation"] and hist["validation"][-1] is not None else float("nan")
                log(f"dip {it}/{iterations}  loss {total_v:.3e}  held-out {vv:.3e}  instability {sv:.2e}  "
                    f"{rate:.2f} it/s")
            if callback is not None and callback_every and (it % callback_every == 0 or stopped):
                callback(it, to_full(x), to_full(avg))
            if stopped:
                break

        if early_stop and best is not None:  # stopped, or budget used: the best running average
            result, best_it = best, rule.best_iteration
        else:
            result, best_it = avg, it
        chi = to_full(result)

    hist.update(iterations=it, stopped=stopped, reason=reason, best_iteration=best_it,
                seconds=time.perf_counter() - t0, working_shape=tuple(wshape), device=str(dev),
                params=int(n_params), scale_ppm=scale)
    return chi, hist
