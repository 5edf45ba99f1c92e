"""Undersampling masks: fastMRI column choices for the same seed, Poisson disc, padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qsmkit.errors import ParameterError
from qsmkit_kspace.masks import (apply_padding, equispaced_mask, fastmri_seed, fully_sampled_center,
                                 poisson_disc_mask, random_mask)

# Columns selected by fastMRI's RandomMaskFunc / EquispacedMaskFractionFunc
# (fastmri/data/subsample.py, v0.3.0) for num_cols = 64, called as mask_func((1, 64, 2), seed=seed):
# legacy RandomState re-seeded with the seed, one randint(len(center_fractions)) draw, then
# uniform(size=64) < prob (random) or randint(0, round(adjusted_accel)) as the offset (equispaced).
FASTMRI_COLUMNS = [
    ("random", [0.08], [4], 0, 5,
     [14, 15, 16, 24, 26, 30, 31, 32, 33, 34, 43, 47, 53, 55, 60, 61, 63]),
    ("random", [0.08, 0.04], [4, 8], 1234, 3, [10, 15, 17, 31, 32, 33, 39, 50, 53, 56, 62]),
    ("equispaced", [0.08], [4], 0, 5, [4, 9, 15, 20, 25, 30, 31, 32, 33, 34, 36, 42, 47, 52, 58]),
    ("equispaced", [0.08, 0.04], [4, 8], "file1000001.h5", 3, [11, 23, 31, 32, 33, 35, 48, 60]),
]


@pytest.mark.parametrize("kind,cf,acc,seed,nlow,cols", FASTMRI_COLUMNS)
def test_fastmri_columns_hard_coded(kind, cf, acc, seed, nlow, cols):
    s = fastmri_seed(seed) if isinstance(seed, str) else seed
    fn = random_mask if kind == "random" else equispaced_mask
    mask, n_low, _ = fn(64, cf, acc, seed=s)
    assert n_low == nlow
    assert np.flatnonzero(mask).tolist() == cols


def _fastmri_subsample():
    spec = importlib.util.find_spec("fastmri")
    if spec is None or spec.origin is None:
        pytest.skip("fastmri is not installed (pip install --no-deps fastmri)")
    pytest.importorskip("torch")
    path = Path(spec.origin).parent / "data" / "subsample.py"
    s = importlib.util.spec_from_file_location("_fastmri_subsample_ref", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)  # needs only numpy and torch
    return mod


@pytest.mark.parametrize("num_cols", [368, 320, 372, 97])
def test_masks_equal_fastmri_package(num_cols):
    ref = _fastmri_subsample()
    cases = [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8]), ([0.16, 0.08, 0.04], [2, 4, 8])]
    seeds = [0, 1, 42, 2 ** 31 - 1, fastmri_seed("file1000001.h5"), fastmri_seed("file_brain_AXT2_200_2000019.h5")]
    for cf, acc in cases:
        for seed in seeds:
            m_ref, n_ref = ref.RandomMaskFunc(cf, acc)((1, num_cols, 2), seed=seed)
            m, n, _ = random_mask(num_cols, cf, acc, seed=seed)
            assert n == n_ref
            np.testing.assert_array_equal(m, m_ref.numpy().ravel() > 0)
            m_ref, n_ref = ref.EquispacedMaskFractionFunc(cf, acc)((1, num_cols, 2), seed=seed)
            m, n, _ = equispaced_mask(num_cols, cf, acc, seed=seed)
            assert n == n_ref
            np.testing.assert_array_equal(m, m_ref.numpy().ravel() > 0)
            m_ref, n_ref = ref.EquiSpacedMaskFunc(cf, acc)((1, num_cols, 2), seed=seed)
            m, n, _ = equispaced_mask(num_cols, cf, acc, seed=seed, exact_spacing=True)
            np.testing.assert_array_equal(m, m_ref.numpy().ravel() > 0)


def test_random_mask_properties():
    m, nlow, acc = random_mask(368, [0.08], [4], seed=7)
    assert nlow == 29 and acc == 4
    pad = (368 - 29 + 1) // 2
    assert m[pad:pad + 29].all()
    assert abs(368 / m.sum() - 4) < 0.8  # expected acceleration 4
    m2, _, _ = random_mask(368, [0.08], [4], seed=7)
    np.testing.assert_array_equal(m, m2)
    assert fully_sampled_center(m[None], (640, 368))[1] >= 29


def test_equispaced_fraction_acceleration():
    m, nlow, _ = equispaced_mask(368, [0.08], [4], seed=3)
    assert abs(m.sum() - 368 / 4) <= 2


def test_mask_parameter_errors():
    with pytest.raises(ParameterError):
        random_mask(64, [0.08, 0.04], [4], seed=0)
    with pytest.raises(ParameterError):
        random_mask(64, [1.5], [4], seed=0)
    with pytest.raises(ParameterError):
        equispaced_mask(64, [0.08], [0.99], seed=0)
    with pytest.raises(ParameterError):
        equispaced_mask(64, [0.08], [2.5], seed=0, exact_spacing=True)


def test_apply_padding():
    m = np.ones((1, 10), bool)
    p = apply_padding(m, (2, 8))
    assert p[0].tolist() == [False, False] + [True] * 6 + [False, False]
    assert apply_padding(m, None) is m


def test_poisson_disc():
    shape = (64, 48)
    m, acc = poisson_disc_mask(shape, 4.0, calib=(12, 12), seed=1)
    assert m.shape == shape and m.dtype == bool
    assert abs(acc - 4.0) <= 0.1
    assert abs(m.size / m.sum() - acc) < 1e-9
    assert m[32 - 6:32 + 6, 24 - 6:24 + 6].all()  # calibration box
    m2, _ = poisson_disc_mask(shape, 4.0, calib=(12, 12), seed=1)
    np.testing.assert_array_equal(m, m2)
    m3, _ = poisson_disc_mask(shape, 4.0, calib=(12, 12), seed=2)
    assert (m != m3).any()
    # variable density: denser near the centre (outside the calibration box) than at the edge
    yy, xx = np.mgrid[:64, :48]
    r = np.hypot((yy - 32) / 32, (xx - 24) / 24)
    ring_in = (r > 0.3) & (r < 0.5)
    ring_out = (r > 0.75) & (r < 0.95)
    assert m[ring_in].mean() > 1.5 * m[ring_out].mean()
    # crop_corner: nothing beyond the ellipse of the (calibration-adjusted) normalised radius
    dx = np.maximum(np.abs(xx - 24) - 6, 0) / 18
    dy = np.maximum(np.abs(yy - 32) - 6, 0) / 26
    assert not m[np.hypot(dx, dy) >= 1].any()
    # Poisson-disc property: no two samples outside the calibration box are adjacent in both axes at the edge
    m8, acc8 = poisson_disc_mask(shape, 8.0, calib=(8, 8), seed=0)
    assert abs(acc8 - 8) <= 0.1
    full, a1 = poisson_disc_mask(shape, 1.0)
    assert full.all() and a1 == 1.0


def test_poisson_impossible():
    with pytest.raises(ParameterError):
        poisson_disc_mask((16, 16), 8.0, calib=(12, 12))


def test_fully_sampled_center():
    m = np.zeros((32, 24), bool)
    m[10:22, 8:16] = True
    m[::4] = True
    h, w = fully_sampled_center(m, (32, 24))
    assert (h, w) == (12, 8)
    col = np.zeros((1, 24), bool)
    col[0, 9:15] = True  # 6 centre columns around 12
    assert fully_sampled_center(col, (40, 24)) == (40, 6)
