"""Tests of the threshold mask plugin (qsmkit_mask)."""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit.errors import InputDataError, ParameterError, StageError
from qsmkit.physics import sphere_mask
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_mask import (ThresholdMask, dilate_mm, erode_mm, fill_enclosed_holes, largest_component,
                         otsu_threshold, threshold_mask)


def _ball(shape, centre, radius, voxel_size=(1.0, 1.0, 1.0)):
    g = np.meshgrid(*[(np.arange(n) - c) * v for n, c, v in zip(shape, centre, voxel_size)], indexing="ij")
    return sum(x * x for x in g) <= radius ** 2


def _run(mag, params=None, voxel_size=(1.0, 1.0, 1.0)):
    vol = Volume.from_array(mag, voxel_size)
    p = ThresholdMask.validate_params(params or {}, "stages.0")
    return ThresholdMask().run(StageContext({"magnitude": vol}, stage_label="mask/threshold", log=lambda s: None), p)


def test_otsu_splits_two_equal_gaussians_at_the_midpoint():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(1.0, 0.4, 200_000), rng.normal(3.0, 0.4, 200_000)]
    # overlapping symmetric classes: the between-class variance peaks half-way (within ~1 bin)
    assert otsu_threshold(v) == pytest.approx(2.0, abs=(v.max() - v.min()) / 256 + 0.02)
    # well-separated unequal classes: any threshold in the gap separates them
    w = np.r_[rng.normal(0.0, 0.05, 900_000), rng.normal(1.0, 0.1, 100_000)]
    assert 0.25 < otsu_threshold(w) < 0.7


def test_fill_enclosed_holes_matches_scipy_and_fills_a_shell():
    rng = np.random.default_rng(1)
    for _ in range(3):
        m = ndimage.binary_opening(rng.random((30, 26, 28)) > 0.45)
        assert np.array_equal(fill_enclosed_holes(m), ndimage.binary_fill_holes(m))
    shell = _ball((32,) * 3, (16,) * 3, 10) & ~_ball((32,) * 3, (16,) * 3, 6)
    assert np.array_equal(fill_enclosed_holes(shell), _ball((32,) * 3, (16,) * 3, 10))
    # max_size: only holes of at most that many voxels are filled
    two = shell | _ball((32,) * 3, (16,) * 3, 2)  # a small ball inside the shell: one hole, 2 < r <= 6
    inner_hole = _ball((32,) * 3, (16,) * 3, 6) & ~_ball((32,) * 3, (16,) * 3, 2)
    assert np.array_equal(fill_enclosed_holes(two, max_size=int(inner_hole.sum()) - 1), two)
    assert np.array_equal(fill_enclosed_holes(two, max_size=int(inner_hole.sum())), _ball((32,) * 3, (16,) * 3, 10))
    # a cavity open to the grid edge is not a hole
    cup = shell.copy()
    cup[16:, 14:18, 14:18] = False
    assert not fill_enclosed_holes(cup)[16, 16, 16]


def test_erode_and_dilate_are_euclidean_balls_in_mm():
    shape, vs = (48, 48, 24), (1.0, 1.0, 2.0)
    big = _ball(shape, (24, 24, 12), 16.0, vs)
    # eroding a (discrete) ball of radius R by r gives a set between the balls of radius R - r and
    # R - r + (largest voxel edge); dilating gives one between R + r - (largest edge) and R + r
    er = erode_mm(big, 5.0, vs)
    assert not (_ball(shape, (24, 24, 12), 11.0, vs) & ~er).any()
    assert not (er & ~_ball(shape, (24, 24, 12), 11.0 + 2.0, vs)).any()
    assert er[24, 24, 12] and not er[24, 24 + 12, 12] and not er[24, 24, 12 + 6]
    dl = dilate_mm(_ball(shape, (24, 24, 12), 8.0, vs), 4.0, vs)
    assert not (dl & ~_ball(shape, (24, 24, 12), 12.0 + 1e-6, vs)).any()
    assert not (_ball(shape, (24, 24, 12), 12.0 - 2.0, vs) & ~dl).any()
    # the grid edge counts as outside: a full grid erodes from its faces
    assert not erode_mm(np.ones((10, 10, 10), bool), 1.0, (1, 1, 1))[0].any()


def test_threshold_mask_keeps_the_object_fills_holes_and_drops_debris():
    rng = np.random.default_rng(2)
    shape = (48, 48, 48)
    obj = _ball(shape, (24, 24, 24), 15)
    mag = np.abs(rng.normal(0, 0.02, shape) + 1j * rng.normal(0, 0.02, shape))  # Rayleigh background
    mag[obj] = 1.0 + rng.normal(0, 0.05, int(obj.sum()))
    vein = _ball(shape, (24, 24, 24), 3)
    mag[vein] = 0.05  # a dark structure inside the object
    mag[_ball(shape, (4, 4, 4), 2)] = 1.0  # bright debris in a corner
    m = threshold_mask(mag.astype(np.float32))
    assert np.array_equal(m, obj)
    # without hole filling the dark structure stays out, without the component step the debris stays in
    assert not threshold_mask(mag, fill_holes=False)[24, 24, 24]
    assert threshold_mask(mag, keep_largest=False)[4, 4, 4]
    # a manual threshold as a fraction of the 99th percentile
    m2, info = threshold_mask(mag, threshold=0.5, return_info=True)
    assert np.array_equal(m2, obj) and info["threshold"] == pytest.approx(0.5 * np.percentile(mag, 99))


def test_erosion_peels_a_shell_joined_by_a_thin_bridge():
    shape = (64, 64, 64)
    brain = _ball(shape, (32, 32, 32), 18)
    scalp = _ball(shape, (32, 32, 32), 29) & ~_ball(shape, (32, 32, 32), 25)
    bridge = np.zeros(shape, bool)
    bridge[31:33, 31:33, 32:57] = True  # a 2-voxel-wide bridge from brain to scalp
    mag = np.where(brain | scalp | bridge, 1.0, 0.0).astype(np.float32)
    plain = threshold_mask(mag, threshold=0.5)
    assert plain[32, 32, 60] and plain[32, 32, 50]  # the scalp is connected: kept, and the skull filled
    peeled = threshold_mask(mag, threshold=0.5, erode=2.0, dilate=2.0)
    assert not peeled[32, 32, 60] and peeled[32, 32, 32]
    assert abs(int(peeled.sum()) - int(brain.sum())) <= 0.05 * brain.sum()


def test_stage_on_the_phantom_gives_the_intracranial_mask(phantom_small):
    out = _run(phantom_small.magnitude.data)
    m = out["mask"].data
    truth = phantom_small.truth["mask"].data
    assert m.dtype == bool and out["mask"].units == "bool"
    assert np.array_equal(out["mask"].affine, Volume.from_array(m).affine)
    dice = 2 * (m & truth).sum() / (m.sum() + truth.sum())
    assert dice > 0.93  # the threshold mask also holds the outer CSF, which the truth mask leaves out
    labels = phantom_small.truth["labels"].data
    assert np.isin(labels[m], (12, 14)).sum() < 0.005 * m.sum()  # no scalp, no skull
    # the stage uses the requested echo; later echoes are darker but still give the cavity
    m5 = _run(phantom_small.magnitude.data, {"echo": 5})["mask"].data
    assert 2 * (m5 & truth).sum() / (m5.sum() + truth.sum()) > 0.9


def test_stage_errors_are_clear():
    mag = np.zeros((16, 16, 16, 2), np.float32)
    mag[4:12, 4:12, 4:12] = 1.0
    with pytest.raises(ParameterError, match="echo"):
        _run(mag, {"echo": 3})
    with pytest.raises(InputDataError, match="constant"):
        _run(np.ones((8, 8, 8), np.float32))
    bad = mag.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        _run(bad)
    with pytest.raises(StageError, match="empty"):
        _run(mag, {"erode_mm": 6.0})
    with pytest.raises(ParameterError):
        ThresholdMask.validate_params({"threshold": 2.0}, "stages.0")


def test_registered_through_the_plugin_manager():
    assert load_registry().get("mask", "threshold") is ThresholdMask
    assert largest_component(np.zeros((4, 4, 4), bool)).sum() == 0
    assert sphere_mask((8, 8, 8), (1, 1, 1), 1.0).sum() == 7
