"""HFS-SDE (recon/hfs_sde, qsmkit train hfs_sde): the high-frequency SDE, the predictor-corrector
sampler with data consistency, the score network, training/resume and checkpoint safety."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import run_stage

torch = pytest.importorskip("torch")

from qsmkit.checkpoints import save_checkpoint  # noqa: E402
from qsmkit.errors import CheckpointError, GeometryError, ParameterError  # noqa: E402
from qsmkit.kspace import KSpaceData, from_volume  # noqa: E402
from qsmkit.training import check_config  # noqa: E402

from qsmkit_kspace.hfs_sde import (HFSSDE, _fft, _Sampler, data_consistency, dsm_loss,  # noqa: E402
                                   hfs_sde_reconstruct, low_frequency_mask, pc_step, perturb)
from qsmkit_kspace.score_net import PUBLISHED, SMALL, TINY, ScoreUNet  # noqa: E402
from qsmkit_kspace.sense import SenseOp  # noqa: E402
from qsmkit_kspace.stages_hfs_sde import SHIPPED, HfsSde, load_score_model  # noqa: E402
from qsmkit_kspace.train_hfs_sde import DEFAULTS, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def crandn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def zero_eps(x, t):
    return torch.zeros_like(x)


def random_eps(x, t):
    return torch.randn_like(x)


def column_mask(W, acs, extra, offset=0):
    m = np.zeros((1, W), np.float32)
    m[0, W // 2 - acs // 2: W // 2 - acs // 2 + acs] = 1
    m[0, offset::extra] = 1
    return torch.from_numpy(m)[None, None]  # (1, 1, 1, W)


def multicoil(S=2, C=4, Hn=16, Wn=16, seed=0):
    """Smooth random maps with sum_c |S_c|^2 = 1 and the k-space of a random image."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, Hn), np.linspace(-1, 1, Wn), indexing="ij")
    rng = np.random.default_rng(seed)
    maps = np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / 1.5) * np.exp(1j * (c * xx + d * yy))
                     for a, b, c, d in rng.uniform(-1, 1, (C, 4))])
    maps = maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    maps = torch.from_numpy(np.broadcast_to(maps, (S, 1, C, Hn, Wn)).astype(np.complex64).copy())
    x = crandn(S, Hn, Wn, seed=seed + 1)
    k = _fft(maps[:, 0] * x[:, None])
    return maps, x, k


# ------------------------------------------------------------------------------------ the SDE
def test_low_frequency_masks():
    L = low_frequency_mask((8, 10), "low_frequency", 4)
    assert L.shape == (1, 10) and L.sum() == 4 and L[0, 3:7].all()  # centred on W // 2 = 5
    C = low_frequency_mask((8, 10), "center", 3)
    assert C.shape == (8, 10) and C.sum() == 9 and C[3:6, 4:7].all()
    with pytest.raises(ParameterError, match="acs = 12 does not fit"):
        low_frequency_mask((8, 10), "low_frequency", 12)
    with pytest.raises(ParameterError, match="choose one of"):
        low_frequency_mask((8, 10), "box", 3)


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("mask_kind", ["low_frequency", "center"])
def test_forward_process_leaves_the_low_frequencies_untouched(kind, mask_kind):
    sde = HFSSDE(kind)
    L = low_frequency_mask((16, 16), mask_kind, 6)
    Lt = torch.from_numpy(L)
    x0 = crandn(64, 16, 16, seed=1)
    K0 = _fft(x0)
    for t in (1e-5, 0.01, 0.3, 0.7, 1.0):
        tt = torch.full((64,), t)
        xt, zh = perturb(x0, tt, L, sde)
        Kt = _fft(xt)
        # low frequencies: unchanged to float precision at every noise level
        assert float((Lt * (Kt - K0)).abs().max()) <= 2e-6 * float(K0.abs().max()) * max(1.0, float(sde.std(tt)[0]))
        # high frequencies: mean m(t) x0, noise of variance s(t)^2 per real component
        m, s = float(sde.mean_coeff(tt)[0]), float(sde.std(tt)[0])
        r = ((1 - Lt) * (Kt - m * K0)) / s
        var = float((r.abs() ** 2).sum() / (2 * 64 * (1 - Lt).expand(16, 16).sum()))
        assert var == pytest.approx(1.0, rel=0.05)
        np.testing.assert_allclose(_fft(zh).numpy() * (1 - L), _fft(zh).numpy(), atol=1e-5)


def test_vp_schedule_matches_the_authors():
    sde = HFSSDE("vp")  # beta 0.1 -> 20
    t = torch.tensor([0.0, 0.5, 1.0])
    lmc = -0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1
    np.testing.assert_allclose(sde.mean_coeff(t).numpy(), np.exp(lmc.numpy()), rtol=1e-6)
    np.testing.assert_allclose(sde.std(t).numpy(), np.sqrt(1 - np.exp(2 * lmc.numpy())), rtol=1e-5)
    np.testing.assert_allclose(sde.g2(t).numpy(), [0.1, 10.05, 20.0], rtol=1e-6)
    a, G2, alpha = sde.discrete(999, 1000)
    assert G2 == pytest.approx(0.02) and alpha == pytest.approx(0.98) and a == pytest.approx(np.sqrt(0.98) - 1)
    with pytest.raises(ParameterError, match="vp"):
        HFSSDE("sub-vp")


def test_dsm_loss_of_a_zero_network_is_the_high_frequency_fraction():
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    torch.manual_seed(0)
    loss = float(dsm_loss(zero_eps, crandn(256, 16, 16, seed=2), L, HFSSDE("vp")))
    assert loss == pytest.approx(1 - 4 / 16, rel=0.03)  # mean |Mh z|^2 / 2 = fraction of high frequencies


# -------------------------------------------------------------------------------- the sampler
def _state(eps, sde, L, maps, mask, y, **kw):
    op = SenseOp(maps, mask)
    Lt = torch.from_numpy(L)
    return _Sampler(eps, sde, Lt, op, y, kw.get("mse", 2.5), kw.get("corrector_mse", 0.1), kw.get("snr", 0.16),
                    None), op, Lt


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_a_step_with_zero_score_is_data_consistency(kind):
    sde = HFSSDE(kind)
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    maps, _, k = multicoil()
    mask = column_mask(16, 4, 3)
    y = k * mask
    state, op, Lt = _state(zero_eps, sde, L, maps, mask, y)
    K = _fft(crandn(2, 16, 16, seed=5))
    K = Lt * _fft(op.adjoint(Lt * y)[:, 0]) + (1 - Lt) * K
    t, dt = 0.6, 1 / 50
    Knew, Kmean = pc_step(state, K, 29, 50, t, dt, noise=False)
    # the score-free reverse SDE step: VE x, VP x + 1/2 beta dt Mh x; then data consistency
    g2 = float(sde.g2(torch.tensor(t)))
    Kfree = K if kind == "ve" else K + (1 - Lt) * (0.5 * g2 * dt) * K
    want = data_consistency(Kfree, Lt, op, y)
    np.testing.assert_allclose(Kmean.numpy(), want.numpy(), atol=1e-5 * float(K.abs().max()))
    np.testing.assert_allclose(Knew.numpy(), want.numpy(), atol=1e-5 * float(K.abs().max()))
    # the low frequencies did not move at all
    assert torch.equal(Lt * Knew, Lt * K)


def test_data_consistency_replaces_the_samples_of_one_coil():
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    Lt = torch.from_numpy(L)
    mask = column_mask(16, 4, 3)
    ones = torch.ones(2, 1, 1, 16, 16, dtype=torch.complex64)
    y = _fft(crandn(2, 1, 16, 16, seed=3)) * mask
    K = _fft(crandn(2, 16, 16, seed=4))
    D = data_consistency(K, Lt, SenseOp(ones, mask), y)
    hm = (1 - Lt) * mask[:, 0]
    np.testing.assert_allclose((hm * D).numpy(), (hm * y[:, 0]).numpy(), atol=2e-6 * float(y.abs().max()))
    np.testing.assert_allclose(((1 - mask[:, 0]) * D).numpy(), ((1 - mask[:, 0]) * K).numpy(), atol=2e-6 * float(K.abs().max()))


@pytest.mark.parametrize("eps", [zero_eps, random_eps], ids=["zero", "random"])
@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion"])
def test_output_keeps_the_measured_data_single_coil(eps, predictor):
    L = low_frequency_mask((16, 16), "low_frequency", 6)
    Lt = torch.from_numpy(L)
    mask = column_mask(16, 6, 4, offset=1)
    ones = torch.ones(2, 1, 1, 16, 16, dtype=torch.complex64)
    y = 37.0 * _fft(crandn(2, 1, 16, 16, seed=7)) * mask  # any scale
    torch.manual_seed(0)
    x = hfs_sde_reconstruct(eps, y, ones, mask, L, HFSSDE("vp"), n_steps=12, predictor=predictor)
    Kx = _fft(x)
    # float32: one FFT round trip errs by ~1e-7 of the norm of the whole (output) k-space
    tol = 1e-6 * max(float(y.abs().pow(2).sum().sqrt()), float(Kx.abs().pow(2).sum().sqrt()))
    # the measured low-frequency region of the output is the measured data
    assert float((Lt * (Kx - y[:, 0])).abs().max()) <= tol
    # with hard data consistency every acquired sample is the measured one
    assert float((mask[:, 0] * (Kx - y[:, 0])).abs().max()) <= tol
    # and the rest was filled in (not left at zero)
    assert float(((1 - mask[:, 0]) * Kx).abs().max()) > 0


def test_output_low_frequencies_are_the_combined_measured_data_multicoil():
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    Lt = torch.from_numpy(L)
    maps, _, k = multicoil()
    mask = column_mask(16, 4, 3)
    y = k * mask
    x = hfs_sde_reconstruct(random_eps, y, maps, mask, L, HFSSDE("ve"), n_steps=8, hard_dc=False,
                            generator=torch.Generator().manual_seed(1))
    ref = _fft(SenseOp(maps, mask).adjoint(Lt * y)[:, 0])
    Kx = _fft(x)
    assert float((Lt * (Kx - ref)).abs().max()) <= 1e-6 * float(Kx.abs().pow(2).sum().sqrt())


def test_support_zeroes_the_background_and_keeps_the_image_inside():
    maps, _, k = multicoil()
    inside = torch.zeros(16, 16)
    inside[3:13, 2:14] = 1.0  # cropped maps: zero outside a box
    maps = maps * inside
    mask = column_mask(16, 4, 3)
    y = _fft(maps[:, 0] * _ifft_img(k, maps)[:, None]) * mask
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    plain, kept = (hfs_sde_reconstruct(random_eps_seeded(), y, maps, mask, L, HFSSDE("vp"), n_steps=8, support=sup,
                                       generator=torch.Generator().manual_seed(3)) for sup in (False, True))
    out = 1 - inside
    assert float((out * plain).abs().max()) > 0  # the sampler fills the background from the prior
    assert float((out * kept).abs().max()) == 0.0
    # inside the support the image is the sampler's, so the coil data A x are unchanged
    assert torch.equal(kept, plain * inside)
    A = SenseOp(maps, torch.ones(1, 1, 1, 16, 16))
    np.testing.assert_allclose(A.apply(kept[:, None]).numpy(), A.apply(plain[:, None]).numpy(), atol=1e-6)


def _ifft_img(k, maps):
    """The SENSE combination of fully sampled coil k-space (S, C, H, W)."""
    from qsmkit_kspace.hfs_sde import _ifft

    return (maps[:, 0].conj() * _ifft(k)).sum(1)


def test_sampler_refuses_a_mask_without_the_low_frequencies():
    L = low_frequency_mask((16, 16), "low_frequency", 8)
    maps, _, k = multicoil()
    mask = column_mask(16, 4, 3)  # only 4 central columns
    with pytest.raises(GeometryError, match="does not acquire the whole low-frequency region") as e:
        hfs_sde_reconstruct(zero_eps, k * mask, maps, mask, L, HFSSDE("vp"), n_steps=2)
    assert "\n" not in str(e.value)


def test_sampler_is_seeded_and_batched_per_slice():
    L = low_frequency_mask((16, 16), "low_frequency", 4)
    maps, _, k = multicoil(S=3)
    mask = column_mask(16, 4, 3)
    run1 = hfs_sde_reconstruct(random_eps_seeded(), k * mask, maps, mask, L, HFSSDE("vp"), n_steps=6,
                               generator=torch.Generator().manual_seed(3))
    run2 = hfs_sde_reconstruct(random_eps_seeded(), k * mask, maps, mask, L, HFSSDE("vp"), n_steps=6,
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(run1, run2)
    assert run1.shape == (3, 16, 16) and run1.dtype == torch.complex64


def random_eps_seeded():
    g = torch.Generator().manual_seed(11)
    return lambda x, t: torch.complex(torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g))


# ------------------------------------------------------------------------------------ network
def test_score_network_shapes_attention_and_sizes():
    net = ScoreUNet(**TINY)
    x = torch.randn(3, 2, 16, 16)
    with torch.no_grad():
        out = net(x, torch.rand(3))
    assert out.shape == x.shape and float(out.abs().max()) == 0.0  # zero-initialised output layer
    small = ScoreUNet(**SMALL)
    assert small.attn_levels == [3]  # 128 / 2^3 = 16
    # published: 320 / 2^i = 320, 160, 80, 40 has no 16 x 16 level (attention only in the middle, as score_sde)
    big = ScoreUNet(**PUBLISHED)
    assert big.attn_levels == [] and 30e6 < sum(p.numel() for p in big.parameters()) < 40e6
    assert sum(p.numel() for p in small.parameters()) < 2_000_000
    with pytest.raises(GeometryError, match="divisible by 2"):
        net(torch.randn(1, 2, 15, 16), torch.rand(1))


# ----------------------------------------------------------------------------------- training
def tiny_config(**over):
    cfg = check_config({"epochs": 3, "steps_per_epoch": 6, "batch_size": 4, "lr": 0.002, "warmup": 1, "threads": 1,
                        "model": {"size": "tiny"}, "low_frequency": {"acs": 4},
                        "data": {"image_size": 16, "validation_slices": 4}}, DEFAULTS)
    cfg.update(over)
    return cfg


def test_training_reduces_the_loss_and_resume_continues(tmp_path):
    full = run(tiny_config(), tmp_path / "full", device="cpu", log=lambda m: None)
    assert full[-1]["train_loss"] < full[0]["train_loss"] and full[-1]["val_loss"] < full[0]["val_loss"]
    part = run(tiny_config(epochs=2), tmp_path / "part", device="cpu", log=lambda m: None)
    resumed = run(tiny_config(), tmp_path / "part", resume=True, device="cpu", log=lambda m: None)
    assert len(resumed) == 3 and resumed[:2] == [dict(r) for r in part]
    assert resumed[2]["train_loss"] == pytest.approx(full[2]["train_loss"], rel=1e-6)
    hist = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    _, _, ckpt, sde = load_score_model(tmp_path / "part" / "model.pt", "cpu")
    assert ckpt["normalisation"]["low_frequency"] == {"kind": "low_frequency", "acs": 4} and sde.kind == "vp"
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------------------------------------ the stage
def _artifacts(S=2, Hn=16, Wn=16, acs=4, every=3):
    maps, x, k = multicoil(S=S, Hn=Hn, Wn=Wn)
    mask = np.zeros((1, Wn), bool)
    mask[0, Wn // 2 - acs // 2: Wn // 2 - acs // 2 + acs] = True
    mask[0, ::every] = True
    kd = KSpaceData(data=(k.numpy() * mask).astype(np.complex64), layout="fastmri")
    return {"kspace": kd, "sampling_mask": mask, "maps": maps.numpy()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hfs") / "model.pt"
    net = ScoreUNet(**TINY)
    torch.nn.init.normal_(net.conv_out.weight, std=0.01)
    save_checkpoint(path, method="hfs_sde", arch=dict(TINY), model=net.state_dict(),
                    normalisation={"normalize_coeff": 1.5, "sde": HFSSDE("vp").as_dict(),
                                   "low_frequency": {"kind": "low_frequency", "acs": 4}, "image_size": [16, 16]})
    return path


def test_stage_reconstructs_and_keeps_the_low_frequencies(tiny_checkpoint):
    art = _artifacts()
    out = run_stage(HfsSde, art, {"checkpoint": str(tiny_checkpoint), "n_steps": 4, "crop": False,
                                  "complex_output": "real_imag"})
    kd = art["kspace"]
    x = torch.from_numpy((from_volume(out["image_real"], kd) + 1j * from_volume(out["image_imag"], kd)).astype(np.complex64))
    y = torch.from_numpy(art["kspace"].data)
    maps = torch.from_numpy(art["maps"])
    Lt = torch.from_numpy(low_frequency_mask((16, 16), "low_frequency", 4))
    ref = _fft(SenseOp(maps, torch.from_numpy(art["sampling_mask"].astype(np.float32))[None, None]).adjoint(Lt * y)[:, 0])
    assert float((Lt * (_fft(x) - ref)).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_stage_averages_posterior_samples(tiny_checkpoint):
    art = _artifacts()
    params = {"checkpoint": str(tiny_checkpoint), "n_steps": 3, "crop": False, "complex_output": "real_imag"}
    kd = art["kspace"]

    def image(**kw):
        out = run_stage(HfsSde, art, {**params, **kw})
        return from_volume(out["image_real"], kd) + 1j * from_volume(out["image_imag"], kd)

    one, two = (torch.from_numpy(image(samples=n).astype(np.complex64)) for n in (1, 2))
    assert float((two - one).abs().max()) > 1e-3 * float(one.abs().max())  # a second, different sample
    # every sample keeps the measured low frequencies, so their mean does too
    Lt = torch.from_numpy(low_frequency_mask((16, 16), "low_frequency", 4))
    assert float((Lt * (_fft(two) - _fft(one))).abs().max()) <= 1e-5 * float(_fft(one).abs().max())


def test_stage_defaults_follow_the_authors(tiny_checkpoint, monkeypatch):
    seen = {}

    def fake(eps_model, y, maps, mask, L, sde, **kw):
        seen.update(kw, L=L)
        return torch.zeros(y.shape[0], *y.shape[-2:], dtype=torch.complex64)

    import qsmkit_kspace.hfs_sde as mod

    monkeypatch.setattr(mod, "hfs_sde_reconstruct", fake)
    run_stage(HfsSde, _artifacts(), {"checkpoint": str(tiny_checkpoint)})
    assert (seen["n_steps"], seen["snr"], seen["mse"], seen["corrector_mse"]) == (1000, 0.16, 2.5, 0.1)
    assert seen["predictor"] == "euler_maruyama" and seen["L"].sum() == 4
    assert seen["t_eps"] == 1e-3 and seen["support"] is True  # score_sde's eps; support is ours
    run_stage(HfsSde, _artifacts(), {"checkpoint": str(tiny_checkpoint), "accelerated": True,
                                     "low_frequency": "center", "acs": 2})
    assert (seen["n_steps"], seen["snr"]) == (100, 0.32) and seen["L"].shape == (16, 16) and seen["L"].sum() == 4
    assert seen["t_eps"] == 0.03  # tuned on validation slices (docs/hfs_sde.md)


def test_stage_checkpoint_errors_are_one_line(tmp_path, tiny_checkpoint):
    art = _artifacts()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    other = tmp_path / "other.pt"
    save_checkpoint(other, method="unet", arch={}, model={})
    wrong_arch = tmp_path / "arch.pt"
    save_checkpoint(wrong_arch, method="hfs_sde", arch=dict(TINY, nf=4),
                    model=ScoreUNet(**TINY).state_dict(),
                    normalisation={"normalize_coeff": 1.5, "sde": {"kind": "vp"},
                                   "low_frequency": {"kind": "low_frequency", "acs": 4}})
    no_norm = tmp_path / "nonorm.pt"
    save_checkpoint(no_norm, method="hfs_sde", arch=dict(TINY), model=ScoreUNet(**TINY).state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "qsmkit-checkpoint", "x": Evil()}, evil)
    for path, msg in [(corrupt, "corrupt"), (foreign, "not a qsmkit checkpoint"), (other, "belongs to method 'unet'"),
                      (wrong_arch, "does not fit"), (no_norm, "lacks normalisation"), (evil, "refused"),
                      (tmp_path / "missing.pt", "does not exist")]:
        with pytest.raises(CheckpointError, match=msg) as e:
            run_stage(HfsSde, art, {"checkpoint": str(path), "n_steps": 1})
        assert "\n" not in str(e.value)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped weights not present")
def test_shipped_weights_load_and_run():
    eps_model, net, ckpt, sde = load_score_model(SHIPPED, "cpu")
    assert ckpt["method"] == "hfs_sde" and "training" not in ckpt
    assert ckpt["normalisation"]["image_size"] == [128, 128]
    art = _artifacts(S=1, Hn=128, Wn=128, acs=24, every=8)
    out = run_stage(HfsSde, art, {"n_steps": 2, "crop": False})
    assert np.isfinite(out["image"].data).all()


def test_stage_pads_sizes_the_network_cannot_take(tiny_checkpoint):
    art = _artifacts(S=1, Hn=16, Wn=15)  # the tiny network halves once: 15 is padded to 16 for it
    out = run_stage(HfsSde, art, {"checkpoint": str(tiny_checkpoint), "n_steps": 3, "crop": False})
    img = from_volume(out["image"], art["kspace"])
    assert img.shape == (1, 16, 15) and np.isfinite(img).all()
