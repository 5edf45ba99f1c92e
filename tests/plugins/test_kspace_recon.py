"""k-space reconstruction: adjoint tests, ESPIRiT, CG-SENSE, L1-wavelet CS, stage chains."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_stage

torch = pytest.importorskip("torch")

from qsmkit.errors import MissingArtifactError, ParameterError  # noqa: E402

import qsmkit_kspace as K  # noqa: E402
from qsmkit_kspace.cs import Wavelet2D, cs_wavelet, fista, pogm  # noqa: E402
from qsmkit_kspace.espirit import espirit_maps  # noqa: E402
from qsmkit_kspace.masks import random_mask  # noqa: E402
from qsmkit_kspace.metrics import evaluate_volume  # noqa: E402
from qsmkit_kspace.sense import SenseOp, cg_sense, mask_tensor  # noqa: E402
from qsmkit_kspace.simulate import simulate_multicoil, simulate_kspace_files  # noqa: E402
from qsmkit_kspace.transforms import center_crop, fft2c, ifft2c, ifft2c_np, normalization_scale  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def crandn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def inner(a, b):
    return complex((a.conj() * b).sum())


# ------------------------------------------------------------------------------- adjoint tests
@pytest.mark.parametrize("mask_kind", ["full", "columns", "2d"])
def test_masked_fft_adjoint(mask_kind):
    H, W = 24, 20
    rng = np.random.default_rng(1)
    m = {"full": None, "columns": rng.random(W) < 0.4, "2d": rng.random((H, W)) < 0.3}[mask_kind]
    mt = mask_tensor(m, 2, (H, W), "cpu")
    x, y = crandn(2, 3, H, W, seed=1), crandn(2, 3, H, W, seed=2)
    lhs = inner(fft2c(x) * mt, y)
    rhs = inner(x, ifft2c(y * mt))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    # orthonormal: ||F x|| = ||x||
    assert float(fft2c(x).abs().square().sum()) == pytest.approx(float(x.abs().square().sum()), rel=1e-5)


@pytest.mark.parametrize("n_maps", [1, 2])
@pytest.mark.parametrize("mask_kind", ["full", "columns", "rows", "2d", "per_slice"])
def test_sense_adjoint_and_normal(n_maps, mask_kind):
    S, C, H, W = 2, 4, 16, 12
    rng = np.random.default_rng(3)
    m = {"full": None, "columns": rng.random((1, W)) < 0.5, "rows": rng.random((H, 1)) < 0.5,
         "2d": rng.random((H, W)) < 0.4, "per_slice": rng.random((S, 1, W)) < 0.5}[mask_kind]
    maps = crandn(S, n_maps, C, H, W, seed=4)
    maps[..., :3, :] = 0  # empty rows (cropped maps): the normal operator skips them when it can
    maps[..., H - 2:, :] = 0
    op = SenseOp(maps, mask_tensor(m, S, (H, W), "cpu"))
    if mask_kind in ("full", "columns", "per_slice"):
        assert op.rows == slice(3, H - 2)
    x, y = crandn(S, n_maps, H, W, seed=5), crandn(S, C, H, W, seed=6)
    lhs = inner(op.forward(x), y)
    rhs = inner(x, op.adjoint(y))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    np.testing.assert_allclose(op.normal(x).numpy(), op.adjoint(op.forward(x)).numpy(), atol=2e-5 * float(x.abs().max()) * C)
    # the Lipschitz bound holds: ||A^H A x|| <= L ||x|| slice by slice
    nx = op.normal(x).abs().square().sum((1, 2, 3)).sqrt()
    assert bool((nx <= op.lipschitz_bound() * x.abs().square().sum((1, 2, 3)).sqrt() * (1 + 1e-5)).all())


@pytest.mark.parametrize("crop", [None, (7, 8), (8, 5)])
def test_zero_filled_coils_equals_cropped_ifft(crop):
    from qsmkit_kspace.transforms import zero_filled_coils

    k = crandn(2, 3, 15, 14, seed=11)
    k[..., ::3] = 0
    ref = center_crop(ifft2c(k), crop)
    np.testing.assert_allclose(zero_filled_coils(k, crop).numpy(), ref.numpy(), atol=1e-5)
    m = (k != 0).any(0, keepdim=True).any(1, keepdim=True)[..., :1, :].float()
    np.testing.assert_allclose(zero_filled_coils(k, crop, m).numpy(), ref.numpy(), atol=1e-5)
    per_slice = (k != 0).any(1).any(1, keepdim=True)  # (S, 1, W): one column mask per slice
    np.testing.assert_allclose(zero_filled_coils(k, crop, per_slice).numpy(), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(zero_filled_coils(k, crop, m[0, 0]).numpy(), ref.numpy(), atol=1e-5)  # (1, W)


@pytest.mark.parametrize("shape", [(15, 12), (16, 13), (15, 13)])
def test_sense_normal_odd_sizes(shape):
    """Odd sizes take the fftshift path of the normal operator; even ones the modulated-maps path."""
    H, W = shape
    rng = np.random.default_rng(5)
    for m in (rng.random((1, W)) < 0.5, rng.random((H, W)) < 0.5):
        op = SenseOp(crandn(1, 1, 3, H, W, seed=9), mask_tensor(m, 1, (H, W), "cpu"))
        x = crandn(1, 1, H, W, seed=10)
        np.testing.assert_allclose(op.normal(x).numpy(), op.adjoint(op.forward(x)).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------- wavelets
@pytest.mark.parametrize("backend", ["pywt", "ptwt"])
def test_wavelet_prox_is_exact(backend):
    w = Wavelet2D((32, 24), "db4", 3, backend)
    x = crandn(2, 1, 32, 24, seed=7)
    np.testing.assert_allclose(w.prox_l1(x, 0.0).numpy(), x.numpy(), atol=1e-5)  # orthogonal: W^T W = I
    big = w.prox_l1(x, 1e6)  # everything but the approximation band is removed
    assert float(big.abs().square().sum()) < float(x.abs().square().sum())
    # prox is non-expansive
    y = crandn(2, 1, 32, 24, seed=8)
    d = (w.prox_l1(x, 0.3) - w.prox_l1(y, 0.3)).abs().square().sum().sqrt()
    assert float(d) <= float((x - y).abs().square().sum().sqrt()) * (1 + 1e-5)


def test_wavelet_bad_parameters():
    with pytest.raises(ParameterError):
        Wavelet2D((32, 32), "bior2.2", 2)
    with pytest.raises(ParameterError):
        Wavelet2D((32, 32), "nonsense", 2)


@pytest.mark.parametrize("algo", [fista, pogm])
def test_proximal_solvers_converge(algo):
    """min 1/2 ||Dx - b||^2 + lam ||x||_1 with diagonal D: closed-form soft threshold."""
    rng = np.random.default_rng(0)
    d = torch.from_numpy(rng.uniform(0.5, 1.0, 50))
    b = torch.from_numpy(rng.standard_normal(50))
    lam = 0.3
    xs = torch.sign(b / d) * torch.clamp(torch.abs(d * b) - lam, min=0) / d ** 2

    def prox(z, c):
        return torch.sign(z) * torch.clamp(z.abs() - c * lam, min=0)

    x = algo(lambda x: d * (d * x - b), prox, torch.zeros(50, dtype=torch.float64), 1.0, 200)
    assert float((x - xs).abs().max()) < 1e-6


# ----------------------------------------------------------------------------------- simulation
@pytest.fixture(scope="module")
def sim15():
    """One 15-coil slice, 2x oversampled readout, 128 phase-encoding columns."""
    return simulate_multicoil((1, 128, 128), 15, extent=(2.0, 1.1, 0.6), noise=0.002, seed=0)


def test_espirit_reproduces_sensitivities(sim15):
    maps, eig = espirit_maps(sim15["kspace"], None)
    sup = sim15["support"]
    s_true, s_est = sim15["sens"], maps[:, 0]
    # remove the per-voxel phase ambiguity
    ph = np.sum(np.conj(s_est) * s_true, axis=1, keepdims=True)
    ph = ph / np.maximum(np.abs(ph), 1e-12)
    err = np.sum(np.abs(s_est * ph - s_true) ** 2, axis=1)
    nrmse = np.sqrt(err[sup].sum() / np.sum(np.abs(s_true) ** 2, axis=1)[sup].sum())
    print(f"ESPIRiT 15 coils: NRMSE in object {nrmse * 100:.2f}%")
    assert nrmse < 0.05
    assert eig[:, 0][sup].min() > 0.8 and (eig[:, 0][~sup] < 0.8).mean() > 0.3
    norms = np.sqrt(np.sum(np.abs(maps[:, 0]) ** 2, axis=1))
    np.testing.assert_allclose(norms[sup], 1.0, atol=1e-4)


def test_espirit_two_maps_orthogonal(sim15):
    maps, eig = espirit_maps(sim15["kspace"][:, :, 32:96], None, calib=(20, 20), n_maps=2, iterations=20)
    a, b = torch.from_numpy(maps[:, 0]), torch.from_numpy(maps[:, 1])
    both = (a.abs().sum(1) > 0) & (b.abs().sum(1) > 0)
    ip = (a.conj() * b).sum(1).abs()
    assert float(ip[both].max()) < 1e-2 if bool(both.any()) else True
    kept = eig[:, 0] > 0.8
    assert (eig[:, 1][kept] <= eig[:, 0][kept] + 1e-4).all()


def test_cg_sense_fully_sampled_reproduces_image(sim15):
    k = sim15["kspace"]
    maps, _ = espirit_maps(k, None)
    x, n = cg_sense(torch.from_numpy(k), torch.from_numpy(maps), mask_tensor(None, 1, k.shape[-2:], "cpu"), 30, 1e-6)
    rss = np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=1))
    sup = sim15["support"]
    err = np.linalg.norm((np.abs(x[:, 0].numpy()) - rss)[sup]) / np.linalg.norm(rss[sup])
    print(f"CG-SENSE fully sampled: {n} iterations, relative error {err * 100:.4f}%")
    assert err < 0.01
    # with the true maps, the complex image itself is recovered
    xt, _ = cg_sense(torch.from_numpy(k), torch.from_numpy(sim15["sens"][:, None]), mask_tensor(None, 1, k.shape[-2:], "cpu"),
                     30, 1e-6)
    obj = sim15["coil_images"] / np.where(np.abs(sim15["sens"]) > 0, sim15["sens"], 1)
    ref = np.sum(np.conj(sim15["sens"]) * sim15["coil_images"], axis=1)
    e2 = np.linalg.norm((xt[:, 0].numpy() - ref)[sup]) / np.linalg.norm(ref[sup])
    assert e2 < 0.01 and obj.shape[1] == 15


def test_undersampled_4x_sense_and_cs_beat_zero_filled(sim15):
    k = sim15["kspace"]
    crop = (64, 116)
    rss = center_crop(np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=1)), crop)
    col, nlow, _ = random_mask(128, [0.08], [4], seed=1)
    ku = (k * col).astype(np.complex64)
    zf = center_crop(np.sqrt(np.sum(np.abs(ifft2c_np(ku)) ** 2, axis=1)), crop)
    scale = normalization_scale(ku)
    maps, _ = espirit_maps(ku, col[None])
    mt = mask_tensor(col, 1, k.shape[-2:], "cpu")
    y = torch.from_numpy(ku / scale)
    res = {"zero_filled": evaluate_volume(rss, zf)}
    x, _ = cg_sense(y, torch.from_numpy(maps), mt, 30, 0.0)
    res["sense"] = evaluate_volume(rss, center_crop(np.abs(x[:, 0].numpy()), crop) * scale)
    for solver in ("fista", "pogm"):
        x = cs_wavelet(y, torch.from_numpy(maps), mt, 0.002, 30, solver)
        res[f"cs_{solver}"] = evaluate_volume(rss, center_crop(np.abs(x[:, 0].numpy()), crop) * scale)
    for name, m in res.items():
        print(f"4x random ({col.sum()}/128 columns): {name:12s} SSIM {m['ssim']:.4f} PSNR {m['psnr']:.2f} NMSE {m['nmse']:.4f}")
    zf_ssim = res["zero_filled"]["ssim"]
    assert res["sense"]["ssim"] > zf_ssim + 0.1
    assert res["cs_fista"]["ssim"] > zf_ssim + 0.15
    assert res["cs_pogm"]["ssim"] > zf_ssim + 0.15
    assert res["sense"]["nmse"] < 0.5 * res["zero_filled"]["nmse"]
    assert res["cs_fista"]["nmse"] < 0.5 * res["zero_filled"]["nmse"]


# --------------------------------------------------------------------------------- stage chains
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kspace_recon")
    return simulate_kspace_files(d, matrix=(32, 64), n_slices=2, n_coils=8, skmtea_shape=(3, 40, 32),
                                 accelerations=(4.0,), noise=0.001, seed=1)


def test_fastmri_pipeline_chain(files):
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "format": "fastmri"})
    full = run_stage(K.ZeroFilled, art)
    assert full["metrics"]["nmse"] < 1e-10 and full["metrics"]["ssim"] > 0.9999
    art = run_stage(K.EquispacedUndersample, art, {"accelerations": [3], "center_fractions": [0.25]})
    m = art["sampling_mask"]
    assert m.shape == (1, 72) and not m[0, :2].any() and not m[0, 71:].any()  # padding columns never sampled
    kd = art["kspace"]
    assert not kd.data[..., ~m[0]].any()
    with pytest.raises(MissingArtifactError):
        run_stage(K.Sense, art)
    art = run_stage(K.EspiritMaps, art, {"calib": [24, 24]})
    assert art["maps"].shape == (2, 1, 8, 64, 72)
    zf = run_stage(K.ZeroFilled, art)
    se = run_stage(K.Sense, art, {"complex_output": "real_imag", "iterations": 15})
    cs = run_stage(K.CSWavelet, art, {"complex_output": "4d", "iterations": 10})
    img = se["image"]
    assert img.shape == (32, 64, 2) and img.data.dtype == np.float32
    assert img.voxel_size == pytest.approx((0.5, 0.5, 3.0))
    assert se["image_real"].shape == (32, 64, 2) and se["image_imag"].shape == (32, 64, 2)
    np.testing.assert_allclose(np.hypot(se["image_real"].data, se["image_imag"].data), img.data, rtol=1e-4, atol=1e-6)
    assert cs["image_complex"].shape == (32, 64, 2, 2)
    for out in (zf, se, cs):
        assert set(out["metrics"]) == {"nmse", "psnr", "ssim"}
    assert se["metrics"]["ssim"] > zf["metrics"]["ssim"]
    assert cs["metrics"]["ssim"] > zf["metrics"]["ssim"]
    with pytest.raises(ParameterError):
        run_stage(K.ZeroFilled, art, {"complex_output": "4d"})
    zfm = run_stage(K.ZeroFilled, art, {"combine": "maps", "complex_output": "real_imag"})
    assert "image_imag" in zfm


def test_cs_is_scale_invariant(files):
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri"]}, {"slices": [0]})
    art = run_stage(K.RandomUndersample, art, {"accelerations": [3], "center_fractions": [0.25], "seed": 2})
    art = run_stage(K.EspiritMaps, art)
    a = run_stage(K.CSWavelet, art, {"iterations": 10})["image"].data
    art2 = dict(art)
    art2["kspace"] = art["kspace"].with_data(art["kspace"].data * 1000)
    b = run_stage(K.CSWavelet, art2, {"iterations": 10})["image"].data
    np.testing.assert_allclose(b, 1000 * a, rtol=2e-3, atol=1e-3 * float(b.max()))


def test_skmtea_pipeline_chain(files):
    art = run_stage(K.SkmTeaRead, {"kspace": files["skmtea"], "format": "skmtea"})
    art = run_stage(K.FileUndersample, art, {"acceleration": 4})
    art = run_stage(K.FileMaps, art)
    zf = run_stage(K.ZeroFilled, art, {"combine": "maps"})
    se = run_stage(K.Sense, art, {"iterations": 20})
    cs = run_stage(K.CSWavelet, art, {"iterations": 20, "solver": "pogm"})
    assert se["image"].shape == (3, 40, 32)
    assert se["image"].voxel_size == pytest.approx((0.3125, 0.3125, 0.8))
    assert se["metrics"]["nmse"] < zf["metrics"]["nmse"]
    assert cs["metrics"]["nmse"] < zf["metrics"]["nmse"]
    # ESPIRiT on the Poisson-sampled data works too (2D mask, calibration box from the mask)
    art_e = run_stage(K.EspiritMaps, art, {"kernel": 4})
    assert art_e["maps"].shape == art["maps"].shape
    # the poisson undersample stage makes a 2D mask zero-padded to the grid
    art_p = run_stage(K.SkmTeaRead, {"kspace": files["skmtea"]})
    art_p = run_stage(K.PoissonUndersample, art_p, {"acceleration": 3, "calib": [8, 8], "acq_shape": [36, 28]})
    m = art_p["sampling_mask"]
    assert m.shape == (40, 32) and not m[:2].any() and not m[:, :2].any()


def test_registry_has_kspace_stages():
    from qsmkit.plugins import load_registry

    reg = load_registry()
    for kind, name in [("kspace_read", "fastmri"), ("kspace_read", "skmtea"), ("undersample", "random"),
                       ("undersample", "equispaced"), ("undersample", "poisson"), ("undersample", "from_file"),
                       ("coil_maps", "espirit"), ("coil_maps", "from_file"), ("recon", "zero_filled"),
                       ("recon", "sense"), ("recon", "cs_wavelet")]:
        assert reg.get(kind, name).name == name
