"""Deep Image Prior (DIP) dipole inversion: fit an untrained generator to the local field.

A randomly initialised 3D encoder-decoder ``f_theta`` (:mod:`qsmkit_dip.network`) maps a fixed
noise input ``z`` to a susceptibility map; ``theta`` is fitted so that the dipole field of the
output matches the measured local field inside the mask::

    argmin_theta  || W M (d * chi_theta - f) ||_p^p  (+ tv_weight * TV(chi_theta)),
    chi_theta = M f_theta(z)

(``p = 2`` or ``1``; ``W`` the optional normalised noise weight; ``M`` the mask). No training
data and no ground truth are involved: the network's structure is the regulariser, because it
reproduces smooth, piecewise structures long before it reproduces noise or streaks. Fitting too
long overfits them, so the loop stops by itself (see "Stopping rule" below).

Warm start (``warm_start``, default ``"tikhonov"``). The fit can start from a fast
gradient-regularised least-squares map ``chi0`` (:func:`qsmkit_dip.warmstart.tikhonov_start`,
its weight chosen by the held-out residual): ``"tikhonov"`` fits ``chi = M (chi0 + f_theta(z))``
with the output layer initialised to zero; ``"pretrain"`` first fits ``f_theta(z)`` to ``chi0``
in the image domain, then to the field. Either way ``chi0`` is the stopping rule's candidate of
iteration 0, so the result is never worse on the held-out voxels than the start.

The dipole convolution is the core one, :class:`qsmkit.operators.Dipole` (real-FFT half
spectrum on the zero-padded grid of :func:`qsmkit.fft.padded_shape`, in torch and
differentiable); :class:`DipoleOperator` is that operator with its kernel on the fitting device.

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

The fit stops when ``v`` has not improved (by more than ``min_delta`` of its minimum) for
``patience`` iterations, or when
``s < stop_tol`` (settled), and returns the running average of the best iteration (lowest
``v``). Averaging removes the step-to-step jitter of the raw output, whose error fluctuates
by several percent between steps. Without hold-out, ``s`` replaces ``v`` as the watched score
(the ES-WMV criterion with an exponential window, so no window of volumes is stored).

References: Ulyanov, Vedaldi, Lempitsky, Deep Image Prior, CVPR 2018; Li et al., Self-validation:
early stopping for single-instance deep generative priors (hold-out of measurements); Wang et
al., Early stopping for deep image prior (ES-WMV, windowed moving variance of the outputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from qsmkit.device import resolve_device
from qsmkit.errors import InputDataError, ParameterError, StageError
from qsmkit.progress import progress

from .components import DipoleOperator, StoppingRule, _deterministic, _tv, working_box
from .warmstart import tikhonov_start

__all__ = ["dip", "DipoleOperator", "StoppingRule", "working_box", "WARM_STARTS"]

#: starting points of the fit (``warm_start``)
WARM_STARTS = ("none", "tikhonov", "pretrain")


# --------------------------------------------------------------------------- the inversion
def dip(field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float], *,
        noise_weight: np.ndarray | None = None,
        iterations: int = 2000, min_iterations: int = 20, lr: float = 5e-3,
        channels: int = 8, depth: int = 3, input_channels: int = 8, skip: bool = True,
        skip_channels: int = 4, input_noise: float = 0.0, loss: str = "l2", tv_weight: float = 0.0,
        ema: float = 0.98, early_stop: bool = True, patience: int = 40, check_every: int = 10,
        stop_tol: float = 5e-3, holdout: float = 0.1, min_delta: float = 5e-3,
        warm_start: str = "tikhonov", pretrain_steps: int = 50,
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
    min_delta : float
        Stopping rule: a held-out residual (instability) counts as a new minimum for the
        ``patience`` clock only if it is lower than the previous minimum by more than this
        fraction of it (0: any decrease), so the fit stops as soon as the residual stops
        improving appreciably; the result is still the running average of the lowest value.
    warm_start : {"tikhonov", "pretrain", "none"}
        ``"tikhonov"``: the network learns a correction to a fast gradient-regularised inversion
        ``chi0`` (:func:`qsmkit_dip.warmstart.tikhonov_start`, its weight chosen by the held-out
        residual): ``chi = M (chi0 + f_theta(z))`` with the output layer initialised to zero,
        so the fit starts at ``chi0``; ``chi0`` itself is the first candidate of the stopping
        rule (iteration 0). ``"pretrain"``: the network alone (plain DIP output), first fitted
        for ``pretrain_steps`` Adam steps to reproduce ``chi0`` (image-domain least squares),
        then to the field; ``chi0`` is again the candidate of iteration 0. ``"none"``: the
        plain DIP from a random network.
    pretrain_steps : int
        Steps of the ``"pretrain"`` warm start.
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

    The stopping rule (held-out residual, output instability): module docstring, :class:`StoppingRule`.
    """
    f, m, w = _checked_inputs(field, mask, noise_weight, loss, ema)
    if warm_start not in WARM_STARTS:
        raise ParameterError(f"warm_start = {warm_start!r} is not allowed; choose {' or '.join(WARM_STARTS)}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    prob = _prepare(f, m, w, voxel_size, b0_dir, dev, depth=depth, crop_to_mask=crop_to_mask, margin=margin,
                    padding=padding, holdout=holdout, seed=seed)
    cfg = dict(iterations=int(iterations), min_iterations=min_iterations, lr=lr, input_noise=input_noise,
               loss=loss, tv_weight=tv_weight, ema=ema, early_stop=early_stop, patience=patience,
               check_every=check_every, stop_tol=stop_tol, min_delta=min_delta, warm_start=warm_start,
               pretrain_steps=pretrain_steps, amp=bool(amp) and dev.type == "cuda", log=log,
               log_every=log_every, callback=callback, callback_every=callback_every)
    net_cfg = dict(input_channels=input_channels, channels=channels, depth=depth, skip=skip,
                   skip_channels=skip_channels)
    chi, hist = _fit(prob, dev, int(seed), net_cfg, cfg)
    hist.update(seconds=time.perf_counter() - t0, working_shape=tuple(prob.shape), device=str(dev),
                scale_ppm=prob.scale)
    return chi, hist


# --------------------------------------------------------------------------- steps of dip()
def _checked_inputs(field, mask, noise_weight, loss, ema):
    """Validated float32 field, bool mask and the noise weight normalised to mean 1 in the mask (or None)."""
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
    return f, m, w


@dataclass
class _Problem:
    """The data of one DIP fit on its working grid (torch tensors on the fitting device)."""

    mask: np.ndarray          # full-grid mask
    box: tuple                # part of the volume on the working grid
    sub: tuple                # where it lies on the working grid
    shape: tuple              # working grid
    scale: float              # field normalisation (ppm)
    f_w: Any                  # normalised field
    m_w: Any                  # mask
    wm_w: Any                 # loss weights (fitted voxels)
    n_mask: float             # number of fitted voxels
    hv_w: Any                 # held-out weights (or None)
    hv_den: float             # held-out field energy
    op: Any                   # dipole operator

    def to_full(self, t) -> np.ndarray:
        """Working-grid tensor (normalised) -> full-grid ppm array, zero outside the mask."""
        out = np.zeros(self.mask.shape, dtype=np.float32)
        out[self.box] = (t.detach().float().cpu().numpy() * np.float32(self.scale))[self.sub]
        out[~self.mask] = 0
        return out


def _prepare(f, m, w, voxel_size, b0_dir, dev, *, depth, crop_to_mask, margin, padding, holdout, seed) -> _Problem:
    """Working grid, normalised field, loss and hold-out weights, and the dipole operator."""
    import torch

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
    hv_w, hv_den = None, 0.0
    if hold is not None:
        hv_w = torch.from_numpy(wm * hold).to(dev)
        hv_den = float((hv_w * f_w).square().sum().clamp_min(1e-30))
    op = DipoleOperator(wshape, voxel_size, b0_dir, padding, dev)
    return _Problem(m, box, sub, tuple(wshape), scale, f_w, m_w, wm_w, n_mask, hv_w, hv_den, op)


def _fit(prob: _Problem, dev, seed: int, net_cfg: dict, cfg: dict) -> tuple[np.ndarray, dict]:
    """The Adam loop with the running average and the stopping rule; returns chi (ppm) and the history."""
    import torch

    from .network import DIPGenerator, make_noise_input

    with _deterministic(dev.type == "cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DIPGenerator(net_cfg["input_channels"], net_cfg["channels"], net_cfg["depth"], net_cfg["skip"],
                           net_cfg["skip_channels"]).to(dev)
        z = make_noise_input(prob.shape, net_cfg["input_channels"], seed).to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed + 1)
        base = chi0 = None
        if cfg["warm_start"] != "none":
            chi0, ws = tikhonov_start(prob.op, prob.f_w, prob.wm_w, prob.m_w, prob.hv_w, prob.hv_den)
        if cfg["warm_start"] == "tikhonov":
            base = chi0
            with torch.no_grad():  # start at chi0 exactly: the network's output is zero at first
                net.out.weight.zero_()
                net.out.bias.zero_()
        opt = torch.optim.Adam(net.parameters(), lr=float(cfg["lr"]))
        if cfg["warm_start"] == "pretrain":
            ws["pretrain_error"] = _pretrain(prob, net, z, opt, chi0, int(cfg["pretrain_steps"]))
        n_params = sum(p.numel() for p in net.parameters())
        st = _FitState(prob.shape, dev, 1.0 - float(cfg["ema"]),
                       StoppingRule(cfg["min_iterations"], cfg["patience"], cfg["stop_tol"], cfg["min_delta"]))
        if chi0 is not None:
            st.hist["warm_start"] = ws
            st.start_from(prob, chi0, cfg["early_stop"], average=base is not None)
        it = 0
        for it in progress(range(1, cfg["iterations"] + 1), "DIP"):
            x, total_v, data_v = _step(prob, net, z, gen, opt, dev, cfg, base)
            st.update_average(x, it)
            if it % cfg["check_every"] == 0 or it == cfg["iterations"]:
                st.check(prob, it, total_v, data_v, cfg["early_stop"])
            _report(prob, st, it, x, total_v, cfg)
            if st.stopped:
                break
        if cfg["early_stop"] and st.best is not None:  # stopped, or budget used: the best running average
            result, best_it = st.best, st.rule.best_iteration
        else:
            result, best_it = st.avg, it
        chi = prob.to_full(result)
    st.hist.update(iterations=it, stopped=st.stopped, reason=st.reason, best_iteration=best_it,
                   params=int(n_params))
    return chi, st.hist


def _pretrain(prob: _Problem, net, z, opt, target, steps: int) -> float:
    """``steps`` Adam steps fitting the network's masked output to ``target``; returns the
    final relative error ``||M (f(z) - target)|| / ||M target||``."""
    import torch

    den = float(target.square().sum().clamp_min(1e-30))
    err = 1.0
    for _ in range(steps):
        x = net(z).float()[0, 0] * prob.m_w
        loss = (x - target).square().sum() / den
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        err = float(loss.detach()) ** 0.5
    return err


def _step(prob: _Problem, net, z, gen, opt, dev, cfg, base=None):
    """One Adam step on the data (+ TV) loss; returns the masked output and the loss values.

    ``base`` (the warm start ``chi0``, or None) is added to the network's output."""
    import torch

    zin = z if cfg["input_noise"] <= 0 else z + float(cfg["input_noise"]) * torch.randn(
        z.shape, generator=gen, device=dev)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg["amp"]):
        out = net(zin)
    x = (out.float()[0, 0] if base is None else out.float()[0, 0] + base) * prob.m_w
    r = (prob.op(x) - prob.f_w) * prob.wm_w
    data = (r.square().sum() if cfg["loss"] == "l2" else r.abs().sum()) / prob.n_mask
    total = data + cfg["tv_weight"] * _tv(x) if cfg["tv_weight"] > 0 else data
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return x, float(total.detach()), float(data.detach())


class _FitState:
    """Running average and variance of the outputs, history, best iterate and stopping state."""

    def __init__(self, shape, dev, a: float, rule: StoppingRule):
        import torch

        self.a = a
        self.avg = torch.zeros(shape, device=dev)
        self.var = torch.zeros(shape, device=dev)
        self.best = None
        self.rule = rule
        self.hist: dict[str, Any] = {"iteration": [], "loss": [], "data_loss": [], "instability": [],
                                     "validation": []}
        self.stopped, self.reason = False, "iteration budget used"
        self.started = False
        self.last_log_t, self.last_log_it = time.perf_counter(), 0

    def start_from(self, prob: _Problem, x0, early_stop: bool, average: bool = True) -> None:
        """Make ``x0`` (the warm start) the candidate of iteration 0 (and the running average)."""
        import torch

        if average:
            with torch.no_grad():
                self.avg.copy_(x0)
            self.started = True
        v = None if prob.hv_w is None else self._validation(prob, x0)
        if v is not None and early_stop:
            self.rule.seed_best(v)
            self.best = x0.clone()

    @staticmethod
    def _validation(prob: _Problem, x) -> float:
        """Held-out relative residual of ``x``."""
        return float(((prob.op(x) - prob.f_w) * prob.hv_w).square().sum()) / prob.hv_den

    def update_average(self, x, it: int) -> None:
        import torch

        a = self.a
        with torch.no_grad():
            xd = x.detach()
            if it == 1 and not self.started:
                self.avg.copy_(xd)
            else:
                delta = xd - self.avg
                self.avg.add_(delta, alpha=a)
                self.var.mul_(1.0 - a).addcmul_(delta, delta, value=a * (1.0 - a))

    def check(self, prob: _Problem, it: int, total_v: float, data_v: float, early_stop: bool) -> None:
        import torch

        with torch.no_grad():
            s = float(self.var.sum() / self.avg.square().sum().clamp_min(1e-30))
            v = None if prob.hv_w is None else self._validation(prob, self.avg)
        h = self.hist
        h["iteration"].append(it)
        h["loss"].append(total_v)
        h["data_loss"].append(data_v)
        h["instability"].append(s)
        h["validation"].append(v)
        is_best, stop = self.rule.update(it, s, v)
        if is_best and early_stop:
            self.best = self.avg.clone() if self.best is None else self.best.copy_(self.avg)
        if early_stop and stop:
            self.stopped, self.reason = True, self.rule.reason


def _report(prob: _Problem, st: _FitState, it: int, x, total_v: float, cfg: dict) -> None:
    """Progress line and study callback."""
    log, iterations = cfg["log"], cfg["iterations"]
    if log is not None and (it % cfg["log_every"] == 0 or st.stopped or it == iterations):
        now = time.perf_counter()
        rate = (it - st.last_log_it) / max(now - st.last_log_t, 1e-9)
        st.last_log_t, st.last_log_it = now, it
        h = st.hist
        sv = h["instability"][-1] if h["instability"] else float("nan")
        vv = h["validation"][-1] if h["validation"] and h["validation"][-1] is not None else float("nan")
        log(f"dip {it}/{iterations}  loss {total_v:.3e}  held-out {vv:.3e}  instability {sv:.2e}  "
            f"{rate:.2f} it/s")
    cb, every = cfg["callback"], cfg["callback_every"]
    if cb is not None and every and (it % every == 0 or st.stopped):
        cb(it, prob.to_full(x), prob.to_full(st.avg))
