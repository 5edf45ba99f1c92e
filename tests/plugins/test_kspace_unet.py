"""fastMRI U-Net baseline: layer structure, training loop and resume, checkpoint safety, the
``recon/unet`` stage, and the random-anatomy training-data generator."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import run_cli, run_stage

torch = pytest.importorskip("torch")
pytest.importorskip("h5py")

from torch import nn  # noqa: E402

from qsmkit.checkpoints import save_checkpoint  # noqa: E402
from qsmkit.errors import CheckpointError, ConfigError, ParameterError  # noqa: E402
from qsmkit.metrics import ssim, ssim_torch  # noqa: E402
from qsmkit.training import check_config  # noqa: E402

from qsmkit_kspace.anatomies import (random_anatomy, random_coil_sensitivities, random_multicoil_batch,  # noqa: E402
                                     random_multicoil_slice, write_anatomy_files)
from qsmkit_kspace.fastmri import read_fastmri  # noqa: E402
from qsmkit_kspace.stages_unet import UNetRecon  # noqa: E402
from qsmkit_kspace.train_unet import DEFAULTS, run  # noqa: E402
from qsmkit_kspace.transforms import center_crop, ifft2c_np, zero_filled_rss  # noqa: E402
from qsmkit_kspace.unet import (SHIPPED, ConvBlock, TransposeConvBlock, Unet, denormalize, load_unet,  # noqa: E402
                                network_input, normalize_instance)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- architecture
def test_unet_has_the_fastmri_layer_structure():
    net = Unet(in_chans=1, out_chans=1, chans=4, num_pool_layers=3, drop_prob=0.1)
    down = net.down_sample_layers
    assert [(b.in_chans, b.out_chans) for b in down] == [(1, 4), (4, 8), (8, 16)]
    assert (net.conv.in_chans, net.conv.out_chans) == (16, 32)
    assert [(t.in_chans, t.out_chans) for t in net.up_transpose_conv] == [(32, 16), (16, 8), (8, 4)]
    assert [(c.in_chans, c.out_chans) for c in net.up_conv[:-1]] == [(32, 16), (16, 8)]
    # ConvBlock = 2 x (conv 3x3 without bias, InstanceNorm, LeakyReLU 0.2, Dropout2d)
    for block in list(down) + [net.conv] + list(net.up_conv[:-1]) + [net.up_conv[-1][0]]:
        assert isinstance(block, ConvBlock)
        kinds = [type(m) for m in block.layers]
        assert kinds == [nn.Conv2d, nn.InstanceNorm2d, nn.LeakyReLU, nn.Dropout2d] * 2
        for conv in (block.layers[0], block.layers[4]):
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
        assert block.layers[2].negative_slope == 0.2 and block.layers[3].p == 0.1
    for t in net.up_transpose_conv:
        assert isinstance(t, TransposeConvBlock)
        tc = t.layers[0]
        assert isinstance(tc, nn.ConvTranspose2d) and tc.kernel_size == (2, 2) and tc.stride == (2, 2)
        assert [type(m) for m in t.layers] == [nn.ConvTranspose2d, nn.InstanceNorm2d, nn.LeakyReLU]
    last = net.up_conv[-1][1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.out_channels == 1
    keys = set(net.state_dict())  # fastMRI's parameter names
    assert {"down_sample_layers.0.layers.0.weight", "conv.layers.4.weight", "up_transpose_conv.2.layers.0.weight",
            "up_conv.2.1.weight", "up_conv.2.1.bias"} <= keys
    # fastMRI's default size (chans 32, 4 pools): 7.76 M parameters
    assert sum(p.numel() for p in Unet().parameters()) == 7_756_097
    net.eval()
    x = torch.randn(2, 1, 37, 45)  # odd sizes: the skip connections are padded back
    assert net(x).shape == (2, 1, 37, 45)


def test_instance_normalisation_round_trip_and_clamp():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=gen) * torch.tensor([1.0, 10.0, 1e-3]).view(3, 1, 1, 1)
    xn, mean, std = normalize_instance(x, clamp=0.0)
    assert torch.allclose(xn.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xn.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-4)
    assert torch.allclose(denormalize(xn, mean, std), x, rtol=1e-4, atol=1e-9)  # float32 round trip
    spike = torch.zeros(1, 1, 16, 16)
    spike[..., 3, 3] = 1.0
    assert float(normalize_instance(spike, clamp=6.0)[0].max()) == 6.0


def test_network_input_is_the_zero_filled_rss_on_the_crop():
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 3, 24, 20)) + 1j * rng.standard_normal((2, 3, 24, 20))).astype(np.complex64)
    m = (rng.random(20) < 0.5).astype(np.float32)
    got = network_input(torch.from_numpy(k * m), torch.from_numpy(m).view(1, 1, 1, 20), (16, 12))
    want = center_crop(zero_filled_rss(k * m), (16, 12))
    assert got.shape == (2, 1, 16, 12)
    np.testing.assert_allclose(got[:, 0].numpy(), want, rtol=1e-5, atol=1e-6)


def test_torch_ssim_equals_the_core_ssim_and_is_differentiable():
    rng = np.random.default_rng(1)
    a = rng.random((2, 1, 30, 26))
    b = a + 0.3 * rng.random(a.shape)
    ta = torch.from_numpy(a)
    tb = torch.from_numpy(b).requires_grad_(True)
    got = ssim_torch(ta, tb, torch.tensor([1.0, 1.3], dtype=torch.float64))
    want = [ssim(a[i, 0], b[i, 0], data_range=d) for i, d in enumerate([1.0, 1.3])]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
    got.sum().backward()
    assert tb.grad is not None and torch.isfinite(tb.grad).all() and float(tb.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------- anatomies
def test_anatomies_vary_with_the_seed_and_are_reproducible():
    shapes = [random_anatomy(np.random.default_rng(s), (64, 64)) for s in range(6)]
    again, _ = random_anatomy(np.random.default_rng(3), (64, 64))
    np.testing.assert_array_equal(again, shapes[3][0])
    areas = [int(sup.sum()) for _, sup in shapes]
    assert len(set(areas)) == 6 and max(areas) > 1.3 * min(areas)  # outlines differ in size
    for i in range(6):
        img, sup = shapes[i]
        assert img.dtype == np.complex64 and abs(float(np.abs(img).max()) - 1.0) < 1e-5
        assert sup.mean() > 0.1 and np.abs(img)[~sup].mean() < 0.05  # nothing outside the body but its soft edge
        for j in range(i):
            assert np.corrcoef(np.abs(img).ravel(), np.abs(shapes[j][0]).ravel())[0, 1] < 0.95
    # textures and phases differ too: the phase is smooth but not constant
    ph = np.angle(shapes[0][0])[shapes[0][1]]
    assert ph.std() > 0.05


def test_coil_arrays_vary_and_maps_are_normalised():
    a = random_multicoil_slice(np.random.default_rng(0), (48, 40), n_coils=(3, 12), noise=0.0)
    b = random_multicoil_slice(np.random.default_rng(1), (48, 40), n_coils=(3, 12), noise=0.0)
    counts = {random_multicoil_slice(np.random.default_rng(s), (24, 24), (3, 12), 0.0)["kspace"].shape[0]
              for s in range(8)}
    assert len(counts) >= 3 and min(counts) >= 3 and max(counts) <= 12
    for d in (a, b):
        np.testing.assert_allclose(np.sum(np.abs(d["maps"]) ** 2, axis=0), 1.0, atol=1e-4)
        # the reference is fastMRI's: RSS of the fully sampled coil images
        np.testing.assert_allclose(d["target"], np.sqrt(np.sum(np.abs(ifft2c_np(d["kspace"])) ** 2, 0)), rtol=1e-5,
                                   atol=1e-6)
        # noise-free data: coil images are the (relative) sensitivities times the object
        coil = ifft2c_np(d["kspace"])
        comb = np.sum(np.conj(d["maps"]) * coil, axis=0)
        sup = d["support"]
        ratio = np.abs(comb[sup]) / np.maximum(np.abs(d["image"][sup]), 1e-6)
        assert ratio.std() / ratio.mean() < 0.9  # a smooth positive field (coil intensity), not a mess
        phase_err = np.angle(comb * np.conj(d["image"]))[sup & (np.abs(d["image"]) > 0.2)]
        assert np.abs(phase_err).max() < 1e-3  # maps carry the coil phase: SENSE-1 recovers the object phase
    # sensitivity magnitudes differ between the two arrays (random geometry)
    sa = np.abs(random_coil_sensitivities(np.random.default_rng(5), (32, 32), 4))
    sb = np.abs(random_coil_sensitivities(np.random.default_rng(6), (32, 32), 4))
    assert not np.allclose(sa, sb, rtol=0.1)


def test_noise_levels_and_readout_oversampling():
    quiet = random_multicoil_slice(np.random.default_rng(2), (32, 32), 4, noise=0.0)
    noisy = random_multicoil_slice(np.random.default_rng(2), (32, 32), 4, noise=0.05)
    assert float(quiet["noise"]) == 0.0 and float(noisy["noise"]) == pytest.approx(0.05, rel=1e-6)
    diff = noisy["kspace"] - quiet["kspace"]
    sd = float(np.abs(ifft2c_np(quiet["kspace"])).max()) * 0.05
    assert 0.6 * sd < float(np.std(diff)) < 1.6 * sd
    over = random_multicoil_slice(np.random.default_rng(4), (32, 24), 6, noise=0.0, readout_oversampling=2)
    assert over["kspace"].shape == (6, 64, 24) and over["target"].shape == (32, 24)
    rss = np.sqrt(np.sum(np.abs(ifft2c_np(over["kspace"])) ** 2, 0))
    np.testing.assert_allclose(center_crop(rss, (32, 24)), over["target"], rtol=1e-5, atol=1e-6)
    assert rss[:12].max() < 1e-3 * rss.max()  # the object sits in the central rows
    batch = random_multicoil_batch(np.random.default_rng(0), 3, (24, 24), (2, 6), noise=0.0)
    assert batch["kspace"].shape[0] == 3 and batch["target"].shape == (3, 24, 24)
    with pytest.raises(ParameterError, match="low must not exceed high"):
        random_multicoil_slice(np.random.default_rng(0), (24, 24), (8, 2))


def test_anatomy_files_are_fastmri_training_files(tmp_path, capsys):
    paths = write_anatomy_files(tmp_path / "a", 5, slices_per_file=2, shape=(32, 40), n_coils=(3, 5),
                                readout_oversampling=2, seed=7, progress_bar=False)
    assert [p.name for p in paths] == ["anatomy_00000.h5", "anatomy_00001.h5", "anatomy_00002.h5"]
    kd, mask, target = read_fastmri(paths[0])
    assert kd.data.shape[0] == 2 and kd.data.shape[2:] == (64, 40) and 3 <= kd.n_coils <= 5
    assert target.shape == (2, 32, 40) and kd.crop_size == (32, 40) and mask is None
    np.testing.assert_allclose(center_crop(zero_filled_rss(kd.data), (32, 40)), target, rtol=1e-5, atol=1e-6)
    again = write_anatomy_files(tmp_path / "b", 2, slices_per_file=2, shape=(32, 40), n_coils=(3, 5),
                                readout_oversampling=2, seed=7, progress_bar=False)
    np.testing.assert_array_equal(read_fastmri(again[0])[0].data, kd.data)  # file i depends on (seed, i) only
    other = write_anatomy_files(tmp_path / "c", 2, slices_per_file=2, shape=(32, 40), n_coils=(3, 5), seed=8,
                                progress_bar=False)
    assert not np.allclose(read_fastmri(other[0])[2], target[:, :, :])  # another seed, other anatomies
    code, out, err = run_cli(["simulate-kspace", tmp_path / "cli", "--anatomies", "3", "--slices-per-file", "2",
                              "--shape", "24", "24", "--coils", "2", "3"], capsys)
    assert code == 0, err
    marker = json.loads((tmp_path / "cli" / "simulate_kspace.json").read_text())
    assert marker["files"] == ["anatomy_00000.h5", "anatomy_00001.h5"] and marker["slices"] == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("x")
    code, out, err = run_cli(["simulate-kspace", tmp_path / "foreign", "--anatomies", "2"], capsys)
    assert code == 2 and "already holds files" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- training
def _tiny_config(**over):
    cfg = {"epochs": 3, "batch_size": 2, "seed": 3, "model": {"chans": 4, "num_pool_layers": 2},
           "masks": {"types": ["random", "equispaced"], "center_fractions": [0.08, 0.04], "accelerations": [4, 8]},
           "loss": {"l1": 1.0, "ssim": 0.5},
           "data": {"simulated": {"shape": [32, 32], "coils": [2, 4], "train_slices": 6, "refresh": 0.5,
                                  "val_slices": 3}}}
    cfg.update(over)
    return check_config(cfg, DEFAULTS)


def test_training_loss_decreases_and_resume_continues_bit_for_bit(tmp_path):
    cfg = _tiny_config(epochs=4)
    hist = run(cfg, tmp_path / "full", device="cpu", log=lambda m: None)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert {"val_ssim", "val_psnr", "val_nmse", "val_ssim_zero_filled"} <= set(hist[0])
    ck = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    assert ck["method"] == "unet" and ck["arch"]["chans"] == 4
    assert ck["normalisation"] == {"input": "zero_filled", "sense_iterations": 10, "clamp": 6.0, "eps": 1e-11}
    assert "training" not in ck  # the shipped file holds no optimiser state
    # interrupted after 2 epochs, resumed to 4: the same weights and history
    run(_tiny_config(epochs=2), tmp_path / "part", device="cpu", log=lambda m: None)
    lines = []
    hist2 = run(cfg, tmp_path / "part", resume=True, device="cpu", log=lines.append)
    assert any("resuming from epoch 2" in ln for ln in lines)
    assert [h["train_loss"] for h in hist2] == [h["train_loss"] for h in hist]
    ck2 = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    for k in ck["model"]:
        assert torch.equal(ck["model"][k], ck2["model"][k]), k
    model, norm = load_unet(tmp_path / "full" / "model.pt")
    assert isinstance(model, Unet) and not model.training and norm["clamp"] == 6.0


def test_training_from_a_folder_of_fastmri_files(tmp_path):
    write_anatomy_files(tmp_path / "train", 4, slices_per_file=2, shape=(32, 32), n_coils=(2, 3), seed=1,
                        progress_bar=False)
    cfg = _tiny_config(epochs=2, data={"source": "files", "train_dir": str(tmp_path / "train"),
                                       "simulated": {"shape": [32, 32], "coils": [2, 3], "val_slices": 2}})
    hist = run(cfg, tmp_path / "out", device="cpu", log=lambda m: None)
    assert len(hist) == 2 and hist[0]["batches"] == 2 and np.isfinite(hist[-1]["val_ssim"])


@pytest.mark.parametrize("over,msg", [
    ({"masks": {"types": ["spiral"]}}, "masks.types"),
    ({"masks": {"center_fractions": [0.08, 0.04], "accelerations": [4]}}, "one per acceleration"),
    ({"data": {"source": "files"}}, "give data.train_dir"),
    ({"loss": {"l1": 0.0, "ssim": 0.0}}, "not both 0"),
])
def test_bad_training_configs_get_one_line_errors(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        run(check_config(over, DEFAULTS), tmp_path / "o", device="cpu", log=lambda m: None)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_foreign_corrupt_code_and_mismatched_checkpoints_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = Unet(chans=4, num_pool_layers=2)
    norm = {"input": "zero_filled", "sense_iterations": 10, "clamp": 6.0, "eps": 1e-11}
    good = save_checkpoint(tmp_path / "good.pt", method="unet", arch=net.arch(), model=net.state_dict(),
                           normalisation=norm)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    evil = tmp_path / "evil.pt"
    torch.save({"format": "qsmkit-checkpoint", "method": "unet", "arch": _Evil(), "model": {}}, evil)
    other_arch = save_checkpoint(tmp_path / "wide.pt", method="unet", arch={**net.arch(), "chans": 8},
                                 model=net.state_dict(), normalisation=norm)
    other_method = save_checkpoint(tmp_path / "q.pt", method="qsmnet", arch=net.arch(), model=net.state_dict())
    no_arch = save_checkpoint(tmp_path / "na.pt", method="unet", arch={"width": 3}, model=net.state_dict(),
                              normalisation=norm)
    no_norm = save_checkpoint(tmp_path / "nn.pt", method="unet", arch=net.arch(), model=net.state_dict())
    cases = {bare: "not a qsmkit checkpoint", cut: "corrupt or truncated", evil: "refused",
             other_arch: "does not fit", other_method: "belongs to method 'qsmnet'", no_arch: "no U-Net architecture",
             no_norm: "lacks the U-Net normalisation", tmp_path / "missing.pt": "does not exist"}
    for path, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as err:
            load_unet(path)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()
    model, _ = load_unet(good)
    assert isinstance(model, Unet)


def test_bad_checkpoint_in_a_pipeline_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from qsmkit_kspace.simulate import simulate_kspace_files

    files = simulate_kspace_files(tmp_path / "k", matrix=(32, 48), n_slices=1, n_coils=4,
                                  skmtea_shape=(2, 24, 16), accelerations=(4.0,))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "qsmkit-checkpoint", "method": "unet", "arch": _Evil(), "model": {}}, bad)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: t\ninputs: {kspace: " + str(files["fastmri"]) + "}\nstages:\n"
        "  - {stage: kspace_read, method: fastmri}\n"
        "  - {stage: undersample, method: random, params: {accelerations: [4], center_fractions: [0.08]}}\n"
        "  - {stage: recon, method: unet, params: {checkpoint: " + str(bad) + "}}\n"
        "output_dir: " + str(tmp_path / "out") + "\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", spec], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "refused" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------- the stage
def _kspace_artifacts(seed=11, shape=(128, 128), acc=4.0, cf=0.08, kind="random", crop=None):
    from qsmkit.kspace import KSpaceData
    from qsmkit.volume import Volume

    from qsmkit_kspace.masks import equispaced_mask, random_mask

    d = random_multicoil_batch(np.random.default_rng([99, seed]), 2, shape, 8, noise=0.005)
    fn = random_mask if kind == "random" else equispaced_mask
    col, _, _ = fn(shape[1], [cf], [acc], seed=seed)
    crop = tuple(crop or shape)
    kd = KSpaceData(data=d["kspace"] * col, layout="fastmri", slice_indices=(0, 1), crop_size=crop)
    target = Volume(np.ascontiguousarray(np.transpose(center_crop(d["target"], crop), (1, 2, 0))), np.eye(4))
    return {"kspace": kd, "sampling_mask": col[None, :], "target": target}, d


def test_stage_writes_the_same_crop_as_zero_filled_and_reports_metrics(tmp_path):
    from qsmkit_kspace.stages_recon import ZeroFilled

    cfg = _tiny_config(epochs=1)
    run(cfg, tmp_path / "m", device="cpu", log=lambda m: None)
    art, _ = _kspace_artifacts(shape=(40, 36), crop=(32, 32))
    zf = run_stage(ZeroFilled, art)
    un = run_stage(UNetRecon, art, {"checkpoint": str(tmp_path / "m" / "model.pt"), "device": "cpu"})
    assert un["image"].shape == zf["image"].shape and un["image"].shape[:2] == (32, 32)
    assert {"nmse", "psnr", "ssim"} <= set(un["metrics"])
    with pytest.raises(ParameterError, match="complex_output"):
        run_stage(UNetRecon, art, {"checkpoint": str(tmp_path / "m" / "model.pt"), "complex_output": "4d"})


@pytest.mark.parametrize("kind,acc,cf", [("random", 4.0, 0.08), ("equispaced", 8.0, 0.04)])
def test_shipped_weights_beat_zero_filled_on_held_out_anatomies(kind, acc, cf):
    from qsmkit_kspace.stages_recon import ZeroFilled

    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 5 << 20
    art, _ = _kspace_artifacts(seed=5, kind=kind, acc=acc, cf=cf)  # seeds never used in training
    zf = run_stage(ZeroFilled, art)["metrics"]
    un = run_stage(UNetRecon, art, {"device": "cpu"})["metrics"]
    assert un["ssim"] > zf["ssim"] + 0.02 and un["psnr"] > zf["psnr"] and un["nmse"] < zf["nmse"]


def test_sense_input_models_train_and_need_maps_in_the_stage(tmp_path):
    from qsmkit.errors import MissingArtifactError

    d = random_multicoil_slice(np.random.default_rng(8), (24, 24), 4, noise=0.0)
    full = torch.ones(1, 1, 1, 24)
    x = network_input(torch.from_numpy(d["kspace"][None]), full, None, torch.from_numpy(d["maps"][None, None]),
                      "sense", 5)
    sense1 = np.abs(np.sum(np.conj(d["maps"]) * ifft2c_np(d["kspace"]), axis=0))  # fully sampled: SENSE-1
    np.testing.assert_allclose(x[0, 0].numpy(), sense1, rtol=1e-3, atol=1e-4 * sense1.max())
    cfg = _tiny_config(epochs=1, normalisation={"input": "sense", "sense_iterations": 3})
    hist = run(cfg, tmp_path / "s", device="cpu", log=lambda m: None)
    assert np.isfinite(hist[0]["train_loss"])
    art, data = _kspace_artifacts(shape=(32, 32))
    with pytest.raises(MissingArtifactError, match="needs 'maps'"):
        run_stage(UNetRecon, art, {"checkpoint": str(tmp_path / "s" / "model.pt")})
    art["maps"] = data["maps"][:, None]
    out = run_stage(UNetRecon, art, {"checkpoint": str(tmp_path / "s" / "model.pt")})
    assert out["image"].shape[:2] == (32, 32) and "ssim" in out["metrics"]


def test_fastmri_unet_pipeline_runs_with_the_shipped_weights(tmp_path):
    from pathlib import Path

    from qsmkit import pipeline
    from qsmkit.plugins import load_registry
    from qsmkit_kspace.simulate import simulate_kspace_files

    files = simulate_kspace_files(tmp_path / "k", matrix=(32, 96), n_slices=2, n_coils=8, skmtea_shape=(3, 40, 32),
                                  accelerations=(4.0,), seed=2)
    reg = load_registry()
    spec = Path(__file__).resolve().parents[2] / "pipelines" / "fastmri_unet.yaml"
    plan = pipeline.load_plan(spec, reg, overrides=[f"inputs.kspace={files['fastmri']}", "stages.2.params.device=cpu"],
                              output_dir=tmp_path / "out")
    pipeline.run_plan(plan, reg, log=lambda m: None)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(m) >= {"nmse", "psnr", "ssim"} and 0 < m["ssim"] <= 1
    import nibabel as nib

    assert nib.load(tmp_path / "out" / "image.nii.gz").shape[:2] == (32, 96)
