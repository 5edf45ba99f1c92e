"""QSMnet plugin: published layer counts, exact tiling, training frame, trainer, checkpoint errors, stage."""

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmkit.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from qsmkit.errors import CheckpointError  # noqa: E402
from qsmkit.plugins import load_registry  # noqa: E402
from qsmkit.simulate import rotation_matrix  # noqa: E402
from qsmkit.stage import StageContext  # noqa: E402
from qsmkit.training import check_config  # noqa: E402
from qsmkit.volume import Volume  # noqa: E402
from qsmkit_qsmnet.frame import from_frame, to_frame, training_frame  # noqa: E402
from qsmkit_qsmnet.loss import QSMnetLoss  # noqa: E402
from qsmkit_qsmnet.network import QSMnet, layer_counts  # noqa: E402
from qsmkit_qsmnet.patches import infer_patches, tile_starts  # noqa: E402
from qsmkit_qsmnet.stage import SHIPPED_WEIGHTS, load_qsmnet  # noqa: E402
from qsmkit_qsmnet.train import DEFAULTS, run  # noqa: E402

PUBLISHED = {"conv": 19, "batch_norm": 18, "relu": 18, "max_pool": 4, "transposed_conv": 4, "concat": 4}


@pytest.mark.parametrize("width,residual", [(32, False), (8, True), (2, False)])
def test_network_has_the_published_layer_counts(width, residual):
    net = QSMnet(width, residual)
    assert layer_counts(net) == PUBLISHED
    assert net.bottom[0][0].out_channels == 16 * width          # 512 at the published width 32
    x = torch.randn(1, 2 if residual else 1, 16, 16, 32)
    assert net(x).shape == (1, 1, 16, 16, 32)


def test_residual_network_starts_at_its_prior():
    net = QSMnet(2, residual=True).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    assert torch.equal(net(x), x[:, 1:2])


@pytest.mark.parametrize("shape,overlap,blend", [((70, 33, 130), 0.5, "cosine"), ((64, 64, 64), 0.0, "cosine"),
                                                  ((65, 100, 20), 0.66, "gaussian")])
def test_identity_network_is_reproduced_exactly_by_tiling(shape, overlap, blend):
    x = np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32)
    calls = []

    def ident(t):
        calls.append(t.shape[0])
        assert tuple(t.shape[2:]) == (64, 64, 64) and t.shape[0] <= 3
        return t[:, 1:2]

    y = infer_patches(ident, x, size=64, overlap=overlap, blend=blend, batch=3)
    assert y.shape == shape and y.dtype == np.float32
    assert np.array_equal(y, x[1])                               # exactly, edges included
    n_tiles = np.prod([len(tile_starts(max(n, 64), 64, overlap)) for n in shape])
    assert sum(calls) == n_tiles


def test_tiles_cover_the_volume_and_skip_tiles_outside_the_mask():
    assert tile_starts(130, 64, 0.5) == [0, 32, 64, 66] and tile_starts(40, 64, 0.5) == [0]
    x = np.random.default_rng(2).standard_normal((1, 150, 70, 70)).astype(np.float32)
    mask = np.zeros((150, 70, 70), bool)
    mask[10:30, 10:30, 10:30] = True
    seen = []
    y = infer_patches(lambda t: seen.append(1) or t, x, 64, 0.5, "cosine", 1, mask)
    assert np.array_equal(y[mask], x[0][mask]) and len(seen) < len(list(tile_starts(150, 64, 0.5))) * 2


def _oblique_affine(shape, vs, angles):
    r = rotation_matrix(angles)
    a = np.eye(4)
    a[:3, :3] = r * np.asarray(vs)[None, :]
    a[:3, 3] = -r @ (np.asarray(vs) * (np.asarray(shape) - 1) / 2)
    return a, r


@pytest.mark.parametrize("vs,angles", [((1.5, 1.5, 1.5), (0, 0, 0)), ((1.0, 1.2, 2.0), (20, -15, 10))])
def test_training_frame_round_trip_of_a_smooth_volume_within_1_percent(vs, angles):
    shape = (44, 40, 30)
    a, r = _oblique_affine(shape, vs, angles)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    w = idx @ a[:3, :3].T + a[:3, 3]
    smooth = (np.exp(-(w ** 2).sum(-1) / (2 * 14.0 ** 2)) + 0.3 * np.sin(w[..., 0] / 9.0)).astype(np.float32)
    mask = (w ** 2).sum(-1) < 24.0 ** 2
    b0 = r.T @ np.array([0.0, 0.0, 1.0])                          # scanner z in the voxel frame
    fr = training_frame(mask, a, b0, (1.0, 1.0, 1.0))
    assert fr.resampled and fr.angle_deg == pytest.approx(np.degrees(np.arccos(np.clip(b0[2], -1, 1))), abs=1e-6)
    from qsmkit.physics import b0_direction_from_affine
    assert np.allclose(b0_direction_from_affine(fr.affine), (0, 0, 1), atol=1e-9)
    assert np.allclose(np.linalg.norm(fr.affine[:3, :3], axis=0), 1.0)
    for interp in ("linear", "bspline"):
        ff, mf = to_frame(smooth, mask, a, fr, interp)
        back = from_frame(ff, mf, fr, a, mask, interp)
        err = np.linalg.norm(back[mask] - smooth[mask]) / np.linalg.norm(smooth[mask])
        assert err < 0.01 and np.all(back[~mask] == 0), (interp, err)
    aligned = training_frame(mask, np.diag([1.0, 1.0, 1.0, 1.0]), (0, 0, 1))
    assert not aligned.resampled and "no resampling" in aligned.describe((1, 1, 1))


def test_loss_terms_vanish_at_the_label_and_the_model_term_sees_the_dipole():
    loss = QSMnetLoss((16, 16, 16), w_model=0.5, w_l1=1.0, w_grad=0.1)
    y = torch.randn(2, 1, 16, 16, 16)
    m = torch.ones_like(y)
    total, parts = loss(y.clone(), y, m)
    assert float(total) == 0.0
    const = torch.full_like(y, 0.3)             # a constant offset is invisible to D (D(0) = 0) and to the gradient
    _, parts = loss(y + const, y, m)
    assert parts["model"] < 1e-6 and parts["grad"] < 1e-6 and parts["l1"] == pytest.approx(0.3, rel=1e-5)


TINY = {"epochs": 3, "batch": 2, "lr": 0.01, "threads": 1, "channels_last": False,
        "network": {"width": 2, "residual": False},
        "data": {"simulated": 1, "size_min": 40, "size_max": 40, "oversample": 1, "patch": 16,
                 "patches_per_epoch": 6, "heads_per_epoch": 1, "lesions": [1, 2]},
        "validation": {"simulated": 0}}


def _tiny(**over):
    cfg = {**TINY, **over}
    return check_config(cfg, DEFAULTS)


def test_trainer_loss_decreases_and_resume_is_bit_for_bit(tmp_path):
    hist = run(_tiny(epochs=4), tmp_path / "full", device="cpu")
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    run(_tiny(epochs=2), tmp_path / "part", device="cpu")
    hist2 = run(_tiny(epochs=4), tmp_path / "part", resume=True, device="cpu")
    assert [h["train_loss"] for h in hist2] == [h["train_loss"] for h in hist]
    a = load_checkpoint(tmp_path / "full" / "model.pt", "qsmnet")
    b = load_checkpoint(tmp_path / "part" / "model.pt", "qsmnet")
    assert a["arch"] == {"width": 2, "residual": False}
    assert a["normalisation"]["field_scale"] > 0 and a["normalisation"]["voxel_size"] == [1.0, 1.0, 1.0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    net, _ = load_qsmnet(tmp_path / "full" / "model.pt")
    assert net.width == 2


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_bad_checkpoints_get_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = save_checkpoint(tmp_path / "m.pt", method="qsmnet", arch={"width": 2, "residual": False},
                           model=QSMnet(2).state_dict(), normalisation={"field_scale": 0.02, "chi_scale": 0.05})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "qsmkit-checkpoint", "method": "qsmnet", "arch": {}, "model": _Evil()}, evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    other = save_checkpoint(tmp_path / "other.pt", method="qsmnet", arch={"width": 2, "residual": False},
                            model=QSMnet(4).state_dict(), normalisation={"field_scale": 0.02, "chi_scale": 0.05})
    foreign = save_checkpoint(tmp_path / "foreign.pt", method="qsmnet", arch={"width": 2, "residual": False},
                              model=torch.nn.Linear(3, 1).state_dict())
    badarch = save_checkpoint(tmp_path / "arch.pt", method="qsmnet", arch={"width": 2, "depth": 5},
                              model=QSMnet(2).state_dict())
    nonorm = save_checkpoint(tmp_path / "nonorm.pt", method="qsmnet", arch={"width": 2, "residual": False},
                             model=QSMnet(2).state_dict())
    unet = save_checkpoint(tmp_path / "unet.pt", method="unet", arch={}, model=QSMnet(2).state_dict())
    bare = tmp_path / "bare.pt"
    torch.save(QSMnet(2).state_dict(), bare)
    cases = [(cut, "corrupt or truncated"), (junk, "corrupt|refused"), (evil, "refused"), (raw, "refused|corrupt"),
             (other, "does not fit"), (foreign, "does not fit"), (badarch, "cannot build"),
             (nonorm, "normalisation"), (unet, "belongs to method 'unet'"), (bare, "not a qsmkit checkpoint"),
             (tmp_path / "missing.pt", "does not exist")]
    cls = load_registry().get("inversion", "qsmnet")
    vol = Volume.from_array(np.zeros((16, 16, 16), np.float32), (1, 1, 1), units="ppm")
    ctx = StageContext({"local_field": vol, "mask": vol.like(np.ones((16, 16, 16), bool))})
    for path, why in cases:
        with pytest.raises(CheckpointError, match=why) as err:
            cls().run(ctx, cls.validate_params({"checkpoint": str(path), "device": "cpu"}, "t"))
        assert "\n" not in str(err.value), path
    assert not (tmp_path / "PWNED").exists()
    load_qsmnet(good)  # the good one loads


def test_stage_resamples_oblique_coarse_data_and_logs_it(tmp_path):
    from qsmkit.simulate import simulate_phantom

    ck = save_checkpoint(tmp_path / "m.pt", method="qsmnet", arch={"width": 2, "residual": True},
                         model=QSMnet(2, residual=True).state_dict(),
                         normalisation={"field_scale": 0.02, "chi_scale": 0.05, "voxel_size": [1.0, 1.0, 1.0]})
    a, _ = _oblique_affine((32, 32, 28), (1.5, 1.5, 1.5), (15, -10, 0))
    ph = simulate_phantom((32, 32, 28), affine=a, snr=None, echo_times=(0.01,), oversample=1)
    f, m = ph.truth["local_field"], ph.truth["mask"]
    lines = []
    cls = load_registry().get("inversion", "qsmnet")
    out = cls().run(StageContext({"local_field": f, "mask": m}, log=lines.append),
                    cls.validate_params({"checkpoint": str(ck), "device": "cpu", "overlap": 0.5}, "t"))
    chi = out["chi"]
    assert chi.units == "ppm" and np.array_equal(chi.affine, f.affine) and chi.grid_shape == f.grid_shape
    assert np.all(np.isfinite(chi.data)) and np.all(chi.data[~m.data.astype(bool)] == 0)
    assert np.abs(chi.data[m.data.astype(bool)]).mean() > 0
    assert any("B0-aligned grid" in ln and "rotation 18.0 deg" in ln and "1.5x1.5x1.5 -> 1x1x1 mm" in ln
               for ln in lines), lines


@pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason="shipped weights not built")
def test_shipped_weights_load_safely_and_are_small():
    net, ck = load_qsmnet(SHIPPED_WEIGHTS)
    assert layer_counts(net) == PUBLISHED and "training" not in ck
    assert SHIPPED_WEIGHTS.stat().st_size < 8e6
    assert ck["normalisation"]["chi_scale"] > 0 and ck["config"]["network"]["width"] == net.width


def test_plugin_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, qsmkit_qsmnet; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_simulate_susceptibility_equals_the_phantom_truth_and_varies_the_folding():
    from qsmkit.simulate import simulate_phantom, simulate_susceptibility

    ph = simulate_phantom((28, 30, 26), (1.0, 1.0, 1.0), snr=None, echo_times=(0.01,), anatomy_seed=5,
                          rotation_deg=(5, 0, -4), haemorrhage=True)
    s = simulate_susceptibility((28, 30, 26), (1.0, 1.0, 1.0), rotation_deg=(5, 0, -4), anatomy_seed=5,
                                haemorrhage=True)
    for k in ("chi", "mask", "labels"):
        assert np.array_equal(s[k].data, ph.truth[k].data), k
    other = simulate_susceptibility((28, 30, 26), (1.0, 1.0, 1.0), rotation_deg=(5, 0, -4), anatomy_seed=5,
                                    haemorrhage=True, gyral_period=0.15)
    assert not np.array_equal(other["chi"].data, s["chi"].data)
