"""Tests of the Deep Image Prior inversion plugin (qsmkit_dip): tiny volumes, few iterations."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmkit.errors import InputDataError, ParameterError, StageError  # noqa: E402
from qsmkit.physics import dipole_convolve, dipole_kernel  # noqa: E402
from qsmkit.fft import padded_shape  # noqa: E402
from qsmkit.plugins import load_registry  # noqa: E402
from qsmkit.stage import StageContext  # noqa: E402
from qsmkit.volume import Volume  # noqa: E402
from qsmkit_dip import DIP, DipoleOperator, dip, working_box  # noqa: E402
from qsmkit_dip.fit import StoppingRule  # noqa: E402
from qsmkit_dip.network import DIPGenerator, make_noise_input  # noqa: E402

# the plain DIP (no warm start) on a tiny network; the warm start has its own tests below
FAST = dict(channels=4, depth=2, input_channels=4, skip_channels=2, device="cpu", log_every=1000, warm_start="none")
WARM = {**FAST, "warm_start": "tikhonov"}


def tiny_phantom(n=16, vs=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0)):
    """Ellipsoidal 'brain' with two blobs (ppm) and its field from the core forward model."""
    g = (np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2) / (n / 2)
    x, y, z = g
    mask = (x / 0.85) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2 <= 1
    chi = np.zeros((n, n, n), np.float32)
    chi[((x - 0.25) / 0.3) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2 <= 1] = 0.1
    chi[((x + 0.3) / 0.2) ** 2 + ((y + 0.2) / 0.25) ** 2 + ((z - 0.1) / 0.3) ** 2 <= 1] = -0.05
    chi *= mask
    field = dipole_convolve(chi, vs, b0) * mask
    return chi, field.astype(np.float32), mask


# --------------------------------------------------------------------------- the physics is the core's
@pytest.mark.parametrize("padding", [1.0, 1.5])
def test_dipole_operator_equals_core_dipole_convolve(padding):
    rng = np.random.default_rng(1)
    shape, vs = (12, 14, 10), (0.8, 1.0, 1.6)
    b0 = np.array([0.2, -0.3, 0.93])
    chi = rng.standard_normal(shape).astype(np.float32)
    op = DipoleOperator(shape, vs, b0, padding)
    got = op(torch.from_numpy(chi)).numpy()
    ref = dipole_convolve(chi, vs, b0, padding)
    # same kernel, same zero-padded grid: equal to float32 round-off
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    # the kernel *is* the core kernel on the core padded grid (its rfft half spectrum)
    core = dipole_kernel(padded_shape(shape, padding), vs, b0, rfft=True)
    assert np.array_equal(op.kernel.numpy(), core)


def test_dipole_operator_is_self_adjoint_and_differentiable():
    rng = np.random.default_rng(2)
    shape = (8, 10, 12)
    op = DipoleOperator(shape, (1, 1, 1), (0, 0, 1), 1.5)
    a = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).double()
    b = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).double()
    op.kernel = op.kernel.double()
    lhs, rhs = float((op(a) * b).sum()), float((a * op(b)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    a.requires_grad_(True)
    (op(a) * b).sum().backward()  # gradient of <Da, b> is D b
    assert torch.allclose(a.grad, op(b), atol=1e-10)


# --------------------------------------------------------------------------- network and input
def test_generator_shapes_and_noise_input():
    net = DIPGenerator(in_channels=3, channels=4, depth=3, skip=True, skip_channels=2)
    z = make_noise_input((16, 8, 24), 3, seed=5)
    assert z.shape == (1, 3, 16, 8, 24) and z.dtype == torch.float32
    assert float(z.std()) == pytest.approx(0.1, rel=0.05)
    assert torch.equal(z, make_noise_input((16, 8, 24), 3, seed=5))
    # built slice by slice along the third axis: slice k is the k-th 2D draw of the generator
    g = torch.Generator().manual_seed(5)
    first = torch.randn((3, 16, 8), generator=g) * 0.1
    assert torch.equal(z[0, :, :, :, 0], first)
    assert net(z).shape == (1, 1, 16, 8, 24)
    plain = DIPGenerator(in_channels=3, channels=4, depth=3, skip=False)
    assert plain(z).shape == (1, 1, 16, 8, 24)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in net.parameters())


def test_working_box_crops_to_mask_and_rounds_to_multiple():
    m = np.zeros((40, 30, 20), bool)
    m[10:21, 5:12, 3:9] = True
    box, shape = working_box(m, 8, crop_to_mask=True, margin=2)
    assert box == (slice(8, 23), slice(3, 14), slice(1, 11))
    assert shape == (16, 16, 16)
    box, shape = working_box(m, 8, crop_to_mask=False)
    assert box == (slice(0, 40), slice(0, 30), slice(0, 20)) and shape == (40, 32, 24)


# --------------------------------------------------------------------------- the fit
def test_loss_decreases_and_beats_tkd_on_tiny_phantom():
    """Truth test (16^3, 120 iterations): the loss falls and chi is closer to the truth than TKD's."""
    from qsmkit_tkd import tkd

    chi_t, field, mask = tiny_phantom(16)
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=120, early_stop=False, lr=2e-2, ema=0.9,
                 check_every=1, **FAST)
    loss = np.array(h["data_loss"])
    # relative residual energy starts near 1 (output ~0) and falls by a factor of 10 at least
    assert loss[0] > 0.5 and loss[-10:].mean() < 0.1 * loss[0]
    assert h["iterations"] == 120 and not h["stopped"] and h["best_iteration"] == 120
    assert chi.dtype == np.float32 and chi.shape == field.shape
    assert np.all(chi[~mask] == 0)

    def nrmse(x):  # percent, both demeaned over the mask (chi is defined up to a constant)
        e, t = x[mask] - x[mask].mean(), chi_t[mask] - chi_t[mask].mean()
        return 100 * np.linalg.norm(e - t) / np.linalg.norm(t)

    n_dip, n_tkd = nrmse(chi), nrmse(tkd(field, mask, (1, 1, 1), (0, 0, 1)))
    assert n_tkd > 20.0          # TKD on this phantom: about 25 %
    assert n_dip < 0.9 * n_tkd   # DIP after 120 iterations: about 18 %


def test_stops_by_itself_and_returns_the_best_running_average():
    _, field, mask = tiny_phantom(16)
    seen = {}

    def cb(it, x, avg):
        seen[it] = avg

    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=500, min_iterations=20, stop_tol=0.05,
                 patience=150, min_delta=0.0,
                 lr=2e-2, ema=0.9, check_every=5, callback=cb, callback_every=5, **FAST)
    assert h["stopped"] and h["iterations"] < 500 and "settled" in h["reason"]
    assert h["instability"][-1] < 0.05
    # the result is the running average of the best iteration (lowest held-out residual)
    vals = dict(zip(h["iteration"], h["validation"]))
    assert vals[h["best_iteration"]] == min(v for i, v in vals.items() if i >= 20)
    assert np.array_equal(chi, seen[h["best_iteration"]])


def test_stopping_rule_settle_and_patience_branches():
    # without hold-out the instability is the score (ES-WMV)
    rule = StoppingRule(min_iterations=30, patience=40, tol=1e-3)
    # before min_iterations nothing counts, however small
    assert rule.update(10, 1e-9) == (False, False) and rule.best_iteration == 0
    # U-shaped instability: minimum at 60, no new minimum for 40 iterations -> stop at 100
    seq = {30: 0.5, 40: 0.2, 50: 0.1, 60: 0.05, 70: 0.06, 80: 0.08, 90: 0.07, 100: 0.09}
    out = {it: rule.update(it, v) for it, v in seq.items()}
    assert out[60] == (True, False) and out[90] == (False, False) and out[100] == (False, True)
    assert rule.best_iteration == 60 and "instability" in rule.reason
    # with hold-out, the held-out residual is the score; the instability still ends a settled fit
    rule = StoppingRule(min_iterations=0, patience=20, tol=1e-3)
    assert rule.update(10, 0.5, 0.30) == (True, False)
    assert rule.update(20, 0.1, 0.20) == (True, False)
    assert rule.update(30, 0.01, 0.25) == (False, False)   # instability falls, residual rises
    assert rule.update(40, 0.01, 0.21) == (False, True)    # 20 iterations without a better residual
    assert rule.best_iteration == 20 and "held-out residual" in rule.reason
    rule = StoppingRule(min_iterations=0, patience=1000, tol=1e-3)
    assert rule.update(5, 0.5, 0.3) == (True, False)
    assert rule.update(10, 5e-4, 0.2) == (True, True) and "settled" in rule.reason


def test_held_out_voxels_are_not_fitted():
    """Changing the field on the held-out voxels changes the validation signal, never the fit."""
    _, field, mask = tiny_phantom(16)
    hold = (np.random.default_rng(0 + 2).random(field.shape, dtype=np.float32) < 0.2) & mask
    assert hold.sum() > 50
    flipped = np.where(hold, -field, field)   # same RMS in the mask, so the same normalisation
    kw = dict(iterations=40, early_stop=False, holdout=0.2, seed=0, check_every=5, lr=2e-2, **FAST)
    a, ha = dip(field, mask, (1, 1, 1), (0, 0, 1), **kw)
    b, hb = dip(flipped, mask, (1, 1, 1), (0, 0, 1), **kw)
    assert np.array_equal(a, b) and ha["data_loss"] == hb["data_loss"]
    # the held-out residual falls when the held-out field agrees with the fitted one (~0.43 after
    # 40 iterations) and rises when it is the opposite (~1.9)
    assert ha["validation"][-1] < 0.6 * ha["validation"][0] and hb["validation"][-1] > 1.5
    # without hold-out every voxel is fitted and no validation signal is recorded
    c, hc = dip(flipped, mask, (1, 1, 1), (0, 0, 1), **{**kw, "holdout": 0.0})
    assert not np.array_equal(a, c) and hc["validation"] == [None] * 8


def test_patience_stop_returns_the_average_saved_at_the_minimum(monkeypatch):
    """The loop keeps the running average of the best iteration the rule reports, and returns it."""
    import qsmkit_dip.fit as mod

    class Scripted(StoppingRule):  # best at iteration 20, stop at 40
        def update(self, iteration, instability, validation=None):
            if iteration == 20:
                self.best_iteration = 20
            if iteration == 40:
                self.reason = "no new minimum (scripted)"
            return iteration == 20, iteration == 40

    monkeypatch.setattr(mod, "StoppingRule", Scripted)
    _, field, mask = tiny_phantom(16)
    seen = {}
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=100, lr=2e-2, check_every=5,
                 callback=lambda it, x, avg: seen.__setitem__(it, avg), callback_every=5, **FAST)
    assert h["stopped"] and h["iterations"] == 40 and h["best_iteration"] == 20
    assert np.array_equal(chi, seen[20]) and not np.array_equal(chi, seen[40])


def test_same_seed_same_result_on_cpu_different_seed_differs():
    _, field, mask = tiny_phantom(16)
    kw = dict(iterations=8, early_stop=False, input_noise=0.03, **FAST)
    a, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), seed=3, **kw)
    b, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), seed=3, **kw)
    c, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), seed=4, **kw)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # the global torch RNG and deterministic mode are left as they were
    assert not torch.are_deterministic_algorithms_enabled()


def test_uniform_noise_weight_changes_nothing_and_weight_is_used():
    _, field, mask = tiny_phantom(16)
    kw = dict(iterations=5, early_stop=False, **FAST)
    a, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), **kw)
    b, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), noise_weight=np.full(field.shape, 7.0, np.float32), **kw)
    assert np.array_equal(a, b)  # normalised to mean 1 in the mask
    w = np.where(np.indices(field.shape)[0] < 8, 10.0, 0.1).astype(np.float32)
    c, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), noise_weight=w, **kw)
    assert not np.array_equal(a, c)


def test_l1_and_tv_options_run():
    _, field, mask = tiny_phantom(16)
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=30, early_stop=False, loss="l1",
                 tv_weight=0.01, lr=1e-2, check_every=1, **FAST)
    assert h["loss"][-1] < h["loss"][0]
    assert np.isfinite(chi).all()


def test_crop_to_mask_result_is_on_the_full_grid():
    _, field, mask = tiny_phantom(16)
    big = np.zeros((32, 24, 20), np.float32)
    bigm = np.zeros(big.shape, bool)
    big[4:20, 2:18, 2:18], bigm[4:20, 2:18, 2:18] = field, mask
    chi, h = dip(big, bigm, (1, 1, 1), (0, 0, 1), iterations=3, early_stop=False, crop_to_mask=True,
                 margin=1, **FAST)
    assert chi.shape == big.shape and np.all(chi[~bigm] == 0) and np.any(chi[bigm] != 0)
    assert h["working_shape"] == (16, 16, 16)  # bbox of the mask + 1 voxel, rounded up to 4


def test_errors_are_user_errors():
    _, field, mask = tiny_phantom(16)
    with pytest.raises(InputDataError):
        dip(field, mask[:8], (1, 1, 1), (0, 0, 1), iterations=1, **FAST)
    with pytest.raises(StageError):
        dip(field, np.zeros_like(mask), (1, 1, 1), (0, 0, 1), iterations=1, **FAST)
    with pytest.raises(ParameterError):
        dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=1, loss="huber", **FAST)
    with pytest.raises(ParameterError):
        dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=1, holdout=0.7, **FAST)
    with pytest.raises(ParameterError):
        DIP.validate_params({"iterations": 0}, where="stages.0")
    with pytest.raises(ParameterError):
        DIP.validate_params({"learning_rate": 0.1}, where="stages.0")


# --------------------------------------------------------------------------- the stage
def test_stage_through_registry_keeps_geometry_and_logs():
    _, field, mask = tiny_phantom(16, vs=(1.0, 1.0, 2.0))
    vol = Volume.from_array(field, (1.0, 1.0, 2.0), units="ppm")
    mvol = vol.like(mask, units="bool")
    cls = load_registry().get("inversion", "dip")
    assert cls is DIP
    p = cls.validate_params({"iterations": 4, "channels": 4, "depth": 2, "input_channels": 4,
                             "log_every": 2, "device": "cpu"}, where="stages.0")
    lines = []
    ctx = StageContext({"local_field": vol, "mask": mvol}, stage_label="inversion/dip", log=lines.append)
    out = {**cls().run(ctx, p), "metrics": ctx.metrics}
    chi = out["chi"]
    assert chi.units == "ppm" and np.array_equal(chi.affine, vol.affine) and chi.data.dtype == np.float32
    assert np.all(chi.data[~mask] == 0)
    assert any("loss" in ln for ln in lines) and any(ln.startswith("dip 2/4") for ln in lines)
    assert out["metrics"]["dip"]["iterations"] == 4
    # an optional noise_weight artifact is used when present (and ignored when switched off)
    nw = vol.like(np.where(np.indices(mask.shape)[0] < 8, 10.0, 0.1).astype(np.float32), units="1/ppm")
    art = {"local_field": vol, "mask": mvol, "noise_weight": nw}
    with_w = cls().run(StageContext(art, log=lines.append), p)["chi"].data
    p_off = cls.validate_params({**p, "use_noise_weight": False}, where="stages.0")
    without = cls().run(StageContext(art, log=lines.append), p_off)["chi"].data
    assert np.array_equal(without, chi.data) and not np.array_equal(with_w, chi.data)


def test_stage_defaults_are_the_function_defaults():
    import inspect

    sig = inspect.signature(dip).parameters
    shared = [p for p in DIP.params if p.name in sig]
    assert len(shared) >= 20
    for p in shared:
        assert sig[p.name].default == p.default, p.name


def test_plugin_import_does_not_import_torch():
    code = "import sys, qsmkit_dip; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- issue 20: warm start, adaptive stop
def _nrmse(x, chi_t, mask):
    """Percent, both demeaned over the mask."""
    e, t = x[mask] - x[mask].mean(), chi_t[mask] - chi_t[mask].mean()
    return 100 * np.linalg.norm(e - t) / np.linalg.norm(t)


def test_tikhonov_start_is_chosen_on_the_held_out_voxels_and_beats_tkd():
    """The warm start alone (one step with a zero output layer) is chi0, better than TKD on the truth."""
    from qsmkit_dip.warmstart import LAMBDAS
    from qsmkit_tkd import tkd

    chi_t, field, mask = tiny_phantom(16)
    chi0, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=1, early_stop=False, **WARM)
    ws = h["warm_start"]
    assert ws["lambda"] in LAMBDAS and ws["cg_iterations"] > 0
    vals = [v for v in ws["validation"]]
    # the chosen weight has the lowest held-out residual of those tried (the sweep stops past it)
    assert vals[LAMBDAS.index(ws["lambda"])] == min(vals)
    n0, n_tkd = _nrmse(chi0, chi_t, mask), _nrmse(tkd(field, mask, (1, 1, 1), (0, 0, 1)), chi_t, mask)
    assert n0 < 0.8 * n_tkd and np.all(chi0[~mask] == 0)
    # the output layer starts at zero, so the first output and the running average are chi0 itself
    from qsmkit_dip.fit import _checked_inputs, _prepare
    from qsmkit_dip.warmstart import tikhonov_start

    f, m, w = _checked_inputs(field, mask, None, "l2", 0.98)
    prob = _prepare(f, m, w, (1, 1, 1), (0, 0, 1), torch.device("cpu"), depth=2, crop_to_mask=True, margin=4,
                    padding=1.5, holdout=0.1, seed=0)
    ref, _ = tikhonov_start(prob.op, prob.f_w, prob.wm_w, prob.m_w, prob.hv_w, prob.hv_den)
    assert np.allclose(chi0, prob.to_full(ref), atol=1e-6 * np.abs(chi0).max())


def test_warm_started_fit_improves_on_its_start_and_stops_by_itself():
    """Truth test (16^3): the default fit (warm start + adaptive stop) beats TKD by far, stops early."""
    from qsmkit_tkd import tkd

    chi_t, field, mask = tiny_phantom(16)
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=400, check_every=5,
                 min_iterations=20, patience=40, min_delta=0.01, lr=1e-2, **WARM)
    assert h["stopped"] and h["iterations"] < 400
    n_dip, n_tkd = _nrmse(chi, chi_t, mask), _nrmse(tkd(field, mask, (1, 1, 1), (0, 0, 1)), chi_t, mask)
    assert n_dip < 0.8 * n_tkd   # about 17.8 % against TKD 24.9 %
    # the held-out residual of the returned average is the lowest seen (iteration 0 = the warm start)
    seen = [v for it, v in zip(h["iteration"], h["validation"]) if it >= 20]
    best = min(seen + [h["warm_start"]["validation"][-1]])
    if h["best_iteration"] > 0:
        assert dict(zip(h["iteration"], h["validation"]))[h["best_iteration"]] == best


def test_warm_start_is_returned_when_the_network_never_beats_it():
    _, field, mask = tiny_phantom(16)
    chi0, _ = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=1, early_stop=False, **WARM)
    # a huge learning rate wrecks the network's output: the held-out residual only gets worse
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=200, min_iterations=0, patience=20, check_every=5,
                 stop_tol=0.0, min_delta=0.0, lr=5.0, **WARM)
    assert h["stopped"] and h["best_iteration"] == 0 and h["iterations"] == 20
    assert np.array_equal(chi, chi0)


def test_stopping_rule_min_delta_stops_on_a_plateau_but_keeps_the_true_minimum():
    # the held-out residual creeps down by 0.1 % per check: with min_delta 1 % that is a plateau
    rule = StoppingRule(min_iterations=0, patience=30, tol=0.0, min_delta=0.01)
    vals = {10: 1.0, 20: 0.5, 30: 0.499, 40: 0.4985, 50: 0.498}
    out = {it: rule.update(it, 1.0, v) for it, v in vals.items()}
    assert out[50] == (True, True) and rule.best_iteration == 50 and "lower by 0.01" in rule.reason
    # min_delta 0 is the plain rule: every decrease resets the clock
    rule = StoppingRule(min_iterations=0, patience=30, tol=0.0, min_delta=0.0)
    assert not any(rule.update(it, 1.0, v)[1] for it, v in vals.items())
    # a seeded best (the warm start, iteration 0) must be beaten
    rule = StoppingRule(min_iterations=0, patience=20, tol=0.0)
    rule.seed_best(0.1)
    assert rule.update(10, 1.0, 0.2) == (False, False) and rule.update(20, 1.0, 0.15) == (False, True)
    assert rule.best_iteration == 0


def test_warm_start_errors_and_stage_choice():
    _, field, mask = tiny_phantom(16)
    with pytest.raises(ParameterError, match="warm_start"):
        dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=1, **{**FAST, "warm_start": "tv"})
    with pytest.raises(ParameterError):
        DIP.validate_params({"warm_start": "tv"}, where="stages.0")
    assert DIP.validate_params({"warm_start": "none"}, where="stages.0").warm_start == "none"


def test_pretrain_warm_start_fits_the_network_to_chi0_first():
    chi_t, field, mask = tiny_phantom(16)
    kw = {**FAST, "warm_start": "pretrain"}
    chi, h = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=10, early_stop=False, pretrain_steps=80, lr=2e-2,
                 check_every=5, **kw)
    # after pre-training the network reproduces chi0 roughly, so the fit starts with a small residual
    assert h["warm_start"]["pretrain_error"] < 0.5
    assert h["data_loss"][0] < 0.3
    _, h0 = dip(field, mask, (1, 1, 1), (0, 0, 1), iterations=10, early_stop=False, lr=2e-2, check_every=5, **FAST)
    assert h["data_loss"][0] < 0.5 * h0["data_loss"][0]
