"""fastMRI metrics: NMSE, PSNR, SSIM equal fastmri/evaluate.py to 1e-6."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qsmkit.errors import GeometryError
from qsmkit_kspace.metrics import evaluate_volume, nmse, psnr, ssim


def _volumes(dtype, seed):
    rng = np.random.default_rng(seed)
    gt = np.abs(rng.standard_normal((3, 40, 36))).astype(dtype) * 5
    gt[:, 10:30, 8:28] += 3
    pred = (gt + 0.3 * rng.standard_normal(gt.shape)).astype(dtype)
    return gt, pred


def _skimage_reference():
    """fastMRI's evaluate.py functions, written out with scikit-image exactly as it calls them."""
    skm = pytest.importorskip("skimage.metrics")

    def ref_nmse(gt, pred):
        return np.array(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)

    def ref_psnr(gt, pred):
        return skm.peak_signal_noise_ratio(gt, pred, data_range=gt.max())

    def ref_ssim(gt, pred):
        maxval = gt.max()
        s = np.array([0])
        for i in range(gt.shape[0]):
            s = s + skm.structural_similarity(gt[i], pred[i], data_range=maxval)
        return s / gt.shape[0]

    return ref_nmse, ref_psnr, ref_ssim


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_fastmri_formulas(dtype, seed):
    gt, pred = _volumes(dtype, seed)
    r_nmse, r_psnr, r_ssim = _skimage_reference()
    assert nmse(gt, pred) == pytest.approx(float(r_nmse(gt, pred)), abs=1e-6)
    assert psnr(gt, pred) == pytest.approx(float(r_psnr(gt, pred)), abs=1e-6)
    assert ssim(gt, pred) == pytest.approx(float(r_ssim(gt, pred)[0]), abs=1e-6)


def _fastmri_evaluate(monkeypatch):
    spec = importlib.util.find_spec("fastmri")
    if spec is None or spec.origin is None:
        pytest.skip("fastmri is not installed (pip install --no-deps fastmri)")
    pytest.importorskip("skimage.metrics")
    # evaluate.py imports runstats and fastmri.data.transforms at module level; its metric functions
    # use neither, so light stand-ins are enough to load it without pandas & co.
    if importlib.util.find_spec("runstats") is None:
        rs = types.ModuleType("runstats")
        rs.Statistics = object
        monkeypatch.setitem(sys.modules, "runstats", rs)
    data = types.ModuleType("fastmri.data")
    data.transforms = types.ModuleType("fastmri.data.transforms")
    pkg = types.ModuleType("fastmri")
    pkg.data = data
    monkeypatch.setitem(sys.modules, "fastmri", pkg)
    monkeypatch.setitem(sys.modules, "fastmri.data", data)
    path = Path(spec.origin).parent / "evaluate.py"
    s = importlib.util.spec_from_file_location("_fastmri_evaluate_ref", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_equal_fastmri_package(monkeypatch, dtype):
    ev = _fastmri_evaluate(monkeypatch)
    for seed in range(3):
        gt, pred = _volumes(dtype, seed + 10)
        assert nmse(gt, pred) == pytest.approx(float(ev.nmse(gt, pred)), abs=1e-6)
        assert psnr(gt, pred) == pytest.approx(float(ev.psnr(gt, pred)), abs=1e-6)
        assert ssim(gt, pred) == pytest.approx(float(ev.ssim(gt, pred)[0]), abs=1e-6)


def test_metric_limits():
    gt, _ = _volumes(np.float64, 3)
    assert nmse(gt, gt) == 0.0
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    # PSNR of a constant error e: 10 log10(max^2 / e^2)
    assert psnr(gt, gt + 0.5) == pytest.approx(10 * np.log10(gt.max() ** 2 / 0.25), rel=1e-12)


def test_evaluate_volume_square_crop():
    gt, pred = _volumes(np.float64, 4)
    m = evaluate_volume(gt, pred)  # (40, 36) -> centre (36, 36) as fastMRI's evaluate
    g, p = gt[:, 2:38], pred[:, 2:38]
    assert m["ssim"] == pytest.approx(ssim(g, p), abs=1e-12)
    assert m["nmse"] == pytest.approx(nmse(g, p), abs=1e-12)
    m2 = evaluate_volume(gt, pred, square_crop=False)
    assert m2["psnr"] == pytest.approx(psnr(gt, pred))
    with pytest.raises(GeometryError):
        ssim(gt, pred[:, :20])
    with pytest.raises(GeometryError):
        ssim(gt[0], pred[0])
