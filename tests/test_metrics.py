"""Tests of qsmkit.metrics: hand-computed values, scikit-image equivalence, XSIM properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsmkit import metrics
from qsmkit.errors import GeometryError, InputDataError
from qsmkit.volume import Volume


def test_rmse_nrmse_psnr_hand_values():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1.0, 2.0, 3.0, 6.0])
    # error (0, 0, 0, 2): MSE = 1, RMSE = 1; ||t|| = sqrt(30) -> NRMSE = 100*2/sqrt(30)
    assert metrics.rmse(e, t) == pytest.approx(1.0)
    assert metrics.nrmse(e, t) == pytest.approx(100 * 2 / math.sqrt(30))
    assert metrics.nmse(e, t) == pytest.approx(4 / 30)
    # data range 3, MSE 1 -> PSNR = 20 log10(3)
    assert metrics.psnr(e, t) == pytest.approx(20 * math.log10(3.0))
    assert metrics.psnr(e, t, data_range=10.0) == pytest.approx(20.0)
    # mask excludes the wrong voxel -> perfect
    m = np.array([True, True, True, False])
    assert metrics.rmse(e, t, m) == 0.0
    assert metrics.nrmse(e, t, m) == 0.0
    assert metrics.psnr(e, t, m) == math.inf


def test_pearson_hand_values():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.pearson(2 * t + 5, t) == pytest.approx(1.0)
    assert metrics.pearson(-t, t) == pytest.approx(-1.0)
    # e = (1, 3, 2, 4): centred (-1.5, .5, -.5, 1.5) . (-1.5, -.5, .5, 1.5) = 4; norms^2 = 5, 5
    assert metrics.pearson(np.array([1.0, 3.0, 2.0, 4.0]), t) == pytest.approx(0.8)


def test_metrics_accept_volumes_and_check_shapes():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    va = Volume.from_array(a)
    assert metrics.rmse(va, va) == 0.0
    with pytest.raises(GeometryError):
        metrics.rmse(a, a[:2])
    with pytest.raises(InputDataError):
        metrics.rmse(a, a, np.zeros(a.shape, bool))


def test_hfen_zero_for_identical_and_scale_invariant():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((20, 20, 20))
    assert metrics.hfen(t, t) == 0.0
    # LoG is linear: est = 1.5 * truth -> HFEN = 50 %, with or without a mask
    assert metrics.hfen(1.5 * t, t) == pytest.approx(50.0)
    m = np.zeros(t.shape, bool)
    m[3:17, 3:17, 3:17] = True
    assert metrics.hfen(1.5 * t, t, m) == pytest.approx(50.0)
    # a constant offset has (almost) no high-frequency content: the sampled, truncated LoG of
    # scipy sums to ~0, not exactly 0 (here 3.0 offset on unit-variance noise -> < 0.1 %)
    assert metrics.hfen(t + 3.0, t) < 0.1


def test_hfen_matches_explicit_log():
    from scipy.ndimage import gaussian_laplace

    rng = np.random.default_rng(2)
    t = rng.standard_normal((18, 18, 18))
    e = t + 0.3 * rng.standard_normal(t.shape)
    lt = gaussian_laplace(t, 1.5, mode="reflect", truncate=7.25 / 1.5)
    le = gaussian_laplace(e, 1.5, mode="reflect", truncate=7.25 / 1.5)
    ref = 100 * np.linalg.norm(le - lt) / np.linalg.norm(lt)
    assert metrics.hfen(e, t) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("kw", [
    {},
    {"gaussian_weights": True},
    {"win_size": 5, "K1": 0.02, "K2": 0.05},
    {"gaussian_weights": True, "use_sample_covariance": False, "sigma": 1.0},
])
def test_ssim_matches_skimage(kw):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    t = rng.standard_normal((24, 22, 20)).cumsum(axis=0) * 0.05
    e = t + 0.02 * rng.standard_normal(t.shape)
    dr = float(t.max() - t.min())
    ref = skm.structural_similarity(e, t, data_range=dr, **kw)
    assert metrics.ssim(e, t, **kw) == pytest.approx(ref, abs=1e-6)
    assert metrics.ssim(e, t, data_range=dr, **kw) == pytest.approx(ref, abs=1e-6)
    # with a mask: the same SSIM map averaged over the mask
    _, smap = skm.structural_similarity(e, t, data_range=dr, full=True, **kw)
    m = np.zeros(t.shape, bool)
    m[4:20, 5:15, 3:17] = True
    assert metrics.ssim(e, t, m, data_range=dr, **kw) == pytest.approx(smap[m].mean(), abs=1e-6)


def test_ssim_hand_value_constant_images():
    # constant images: variances 0, SSIM = (2ab + C1)/(a^2 + b^2 + C1) with C1 = (0.01 L)^2
    a, b, L = 1.0, 2.0, 1.0
    x = np.full((9, 9, 9), a)
    y = np.full((9, 9, 9), b)
    c1 = (0.01 * L) ** 2
    assert metrics.ssim(x, y, data_range=L) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_xsim_properties():
    rng = np.random.default_rng(4)
    t = 0.05 * rng.standard_normal((20, 20, 20))
    assert metrics.xsim(t, t) == pytest.approx(1.0)
    # symmetric in its arguments
    e = t + 0.02 * rng.standard_normal(t.shape)
    assert metrics.xsim(e, t) == pytest.approx(metrics.xsim(t, e))
    # noisier -> lower; a scaled copy is penalised through contrast/luminance
    e2 = t + 0.06 * rng.standard_normal(t.shape)
    assert 0 < metrics.xsim(e2, t) < metrics.xsim(e, t) < 1
    assert metrics.xsim(0.5 * t, t) < 1
    # native ppm with L = 1: constant images a, b -> (2ab + C1)/(a^2 + b^2 + C1), C1 = 1e-4
    x = np.full((9, 9, 9), 0.1)
    y = np.full((9, 9, 9), 0.05)
    c1 = 1e-4
    assert metrics.xsim(x, y) == pytest.approx((2 * 0.1 * 0.05 + c1) / (0.01 + 0.0025 + c1))


def test_xsim_matches_explicit_formula():
    """XSIM = SSIM map with a 7^3 Gaussian (sigma 1.5, replicate padding), K = (0.01, 0.001), L = 1."""
    from scipy.ndimage import convolve

    rng = np.random.default_rng(5)
    t = 0.1 * rng.standard_normal((12, 12, 12))
    e = t + 0.05 * rng.standard_normal(t.shape)
    r = np.arange(-3, 4)
    g1 = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    w /= w.sum()

    def f(a):
        return convolve(a, w, mode="nearest")

    mu1, mu2 = f(t), f(e)
    s1 = f(t * t) - mu1 ** 2
    s2 = f(e * e) - mu2 ** 2
    s12 = f(t * e) - mu1 * mu2
    c1, c2 = 1e-4, 1e-6
    smap = (2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    m = rng.random(t.shape) > 0.3
    assert metrics.xsim(e, t, m) == pytest.approx(smap[m].mean(), abs=1e-10)


def test_roi_means_hand_values():
    chi = np.array([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
    lab = np.array([[[0, 1], [1, 2]], [[2, 2], [3, 0]]])
    out = metrics.roi_means(chi, lab, names={1: "a", 2: "b"})
    assert out == {"a": 1.5, "b": 4.0, "label_3": 6.0}
    # with the simulator's names
    out2 = metrics.roi_means(chi, lab)
    assert out2["csf"] == 1.5 and out2["grey_matter"] == 4.0


def test_evaluate_demeans_and_reports():
    rng = np.random.default_rng(6)
    t = 0.05 * rng.standard_normal((16, 16, 16))
    m = np.zeros(t.shape, bool)
    m[2:14, 2:14, 2:14] = True
    lab = np.where(m, 1 + (np.arange(16)[:, None, None] > 8).astype(int), 0) * np.ones(t.shape, int)
    # a constant offset of the estimate does not change any metric (demeaned over the mask)
    r0 = metrics.evaluate(t, t, m, labels=lab)
    r1 = metrics.evaluate(t + 0.3, t, m, labels=lab)
    assert r1["demeaned_over_mask"] is True
    for k in ("rmse", "nrmse", "hfen", "ssim", "xsim", "pearson"):
        assert r1[k] == pytest.approx(r0[k], abs=1e-9)
    assert r0["nrmse"] == 0.0 and r0["rmse"] == 0.0 and r0["ssim"] == pytest.approx(1.0)
    assert r0["xsim"] == pytest.approx(1.0) and r0["pearson"] == pytest.approx(1.0)
    assert r0["n_voxels"] == int(m.sum())
    # ROI means: demeaned truth vs demeaned estimate
    tm = t - t[m].mean()
    assert r1["roi_means"]["truth"]["csf"] == pytest.approx(tm[m & (lab == 1)].mean())
    assert r1["roi_means"]["error"]["csf"] == pytest.approx(0.0, abs=1e-12)
    # half the estimate -> NRMSE 50 %
    r2 = metrics.evaluate(0.5 * t, t, m)
    assert r2["nrmse"] == pytest.approx(50.0)
    assert "roi_means" not in r2
