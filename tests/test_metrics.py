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
    assert metrics.rmse(t, e) == pytest.approx(1.0)
    assert metrics.nrmse(t, e) == pytest.approx(100 * 2 / math.sqrt(30))
    assert metrics.nmse(t, e) == pytest.approx(4 / 30)
    # data range 3, MSE 1 -> PSNR = 20 log10(3)
    assert metrics.psnr(t, e) == pytest.approx(20 * math.log10(3.0))
    assert metrics.psnr(t, e, data_range=10.0) == pytest.approx(20.0)
    # mask excludes the wrong voxel -> perfect
    m = np.array([True, True, True, False])
    assert metrics.rmse(t, e, m) == 0.0
    assert metrics.nrmse(t, e, m) == 0.0
    assert metrics.psnr(t, e, m) == math.inf


def test_pearson_hand_values():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.pearson(t, 2 * t + 5) == pytest.approx(1.0)
    assert metrics.pearson(t, -t) == pytest.approx(-1.0)
    # e = (1, 3, 2, 4): centred (-1.5, .5, -.5, 1.5) . (-1.5, -.5, .5, 1.5) = 4; norms^2 = 5, 5
    assert metrics.pearson(t, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_metrics_accept_volumes_and_check_shapes():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    va = Volume.from_array(a)
    assert metrics.rmse(va, va) == 0.0
    with pytest.raises(GeometryError):
        metrics.rmse(a[:2], a)
    with pytest.raises(InputDataError):
        metrics.rmse(a, a, np.zeros(a.shape, bool))


def test_hfen_zero_for_identical_and_scale_invariant():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((20, 20, 20))
    assert metrics.hfen(t, t) == 0.0
    # LoG is linear: est = 1.5 * truth -> HFEN = 50 %, with or without a mask
    assert metrics.hfen(t, 1.5 * t) == pytest.approx(50.0)
    m = np.zeros(t.shape, bool)
    m[3:17, 3:17, 3:17] = True
    assert metrics.hfen(t, 1.5 * t, m) == pytest.approx(50.0)
    # a constant offset has (almost) no high-frequency content: the sampled, truncated LoG of
    # scipy sums to ~0, not exactly 0 (here 3.0 offset on unit-variance noise -> < 0.1 %)
    assert metrics.hfen(t, t + 3.0) < 0.1


def test_hfen_matches_explicit_log():
    from scipy.ndimage import gaussian_laplace

    rng = np.random.default_rng(2)
    t = rng.standard_normal((18, 18, 18))
    e = t + 0.3 * rng.standard_normal(t.shape)
    lt = gaussian_laplace(t, 1.5, mode="reflect", truncate=7.25 / 1.5)
    le = gaussian_laplace(e, 1.5, mode="reflect", truncate=7.25 / 1.5)
    ref = 100 * np.linalg.norm(le - lt) / np.linalg.norm(lt)
    assert metrics.hfen(t, e) == pytest.approx(ref, rel=1e-12)


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
    assert metrics.ssim(t, e, **kw) == pytest.approx(ref, abs=1e-6)
    assert metrics.ssim(t, e, data_range=dr, **kw) == pytest.approx(ref, abs=1e-6)
    # with a mask: the same SSIM map averaged over the mask
    _, smap = skm.structural_similarity(e, t, data_range=dr, full=True, **kw)
    m = np.zeros(t.shape, bool)
    m[4:20, 5:15, 3:17] = True
    assert metrics.ssim(t, e, m, data_range=dr, **kw) == pytest.approx(smap[m].mean(), abs=1e-6)


def test_ssim_hand_value_constant_images():
    # constant images: variances 0, SSIM = (2ab + C1)/(a^2 + b^2 + C1) with C1 = (0.01 L)^2
    a, b, L = 1.0, 2.0, 1.0
    x = np.full((9, 9, 9), a)
    y = np.full((9, 9, 9), b)
    c1 = (0.01 * L) ** 2
    assert metrics.ssim(y, x, data_range=L) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_xsim_properties():
    rng = np.random.default_rng(4)
    t = 0.05 * rng.standard_normal((20, 20, 20))
    assert metrics.xsim(t, t) == pytest.approx(1.0)
    # symmetric in its arguments
    e = t + 0.02 * rng.standard_normal(t.shape)
    assert metrics.xsim(t, e) == pytest.approx(metrics.xsim(e, t))
    # noisier -> lower; a scaled copy is penalised through contrast/luminance
    e2 = t + 0.06 * rng.standard_normal(t.shape)
    assert 0 < metrics.xsim(t, e2) < metrics.xsim(t, e) < 1
    assert metrics.xsim(t, 0.5 * t) < 1
    # native ppm with L = 1: constant images a, b -> (2ab + C1)/(a^2 + b^2 + C1), C1 = 1e-4
    x = np.full((9, 9, 9), 0.1)
    y = np.full((9, 9, 9), 0.05)
    c1 = 1e-4
    assert metrics.xsim(y, x) == pytest.approx((2 * 0.1 * 0.05 + c1) / (0.01 + 0.0025 + c1))


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
    assert metrics.xsim(t, e, m) == pytest.approx(smap[m].mean(), abs=1e-10)


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
    r1 = metrics.evaluate(t, t + 0.3, m, labels=lab)
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
    r2 = metrics.evaluate(t, 0.5 * t, m)
    assert r2["nrmse"] == pytest.approx(50.0)
    assert "roi_means" not in r2


def test_argument_order_is_truth_first():
    """Every metric takes (truth, estimate): the normalisation and the ranges come from the first."""
    t = np.array([2.0, 2.0, 4.0, 4.0])
    e = np.array([1.0, 1.0, 2.0, 2.0])
    assert metrics.nrmse(t, e) == pytest.approx(50.0)      # ||e - t|| / ||t||
    assert metrics.nrmse(e, t) == pytest.approx(100.0)
    assert metrics.nmse(t, e) == pytest.approx(0.25)
    assert metrics.psnr(t, e) == pytest.approx(10 * math.log10(2.0 ** 2 / 2.5))  # range of t = 2, MSE 2.5


def test_precision_input_is_the_fastmri_arithmetic():
    from qsmkit_kspace import metrics as km

    rng = np.random.default_rng(7)
    gt = (rng.random((2, 16, 14)) + 0.5).astype(np.float32)
    pred = (gt + 0.05 * rng.standard_normal(gt.shape)).astype(np.float32)
    assert km.nmse(gt, pred) == metrics.nmse(gt, pred, precision="input")
    assert km.psnr(gt, pred) == metrics.psnr(gt, pred, data_range=gt.max(), precision="input")
    per_slice = [metrics.ssim(gt[i], pred[i], data_range=gt.max(), precision="input") for i in range(2)]
    assert km.ssim(gt, pred) == pytest.approx(np.mean(per_slice), abs=1e-12)
    # float64 arithmetic agrees to float32 rounding
    assert metrics.nmse(gt, pred) == pytest.approx(km.nmse(gt, pred), rel=1e-5)
    assert metrics.ssim(gt[0], pred[0], data_range=float(gt.max())) == pytest.approx(per_slice[0], abs=1e-5)
    with pytest.raises(InputDataError):
        metrics.ssim(gt, pred, precision="half")
