import numpy as np
import pytest
import torch

from qsmkit import fft as qfft


def test_centred_fft_is_unitary_and_inverts():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 12, 10)) + 1j * rng.standard_normal((4, 12, 10))).astype(np.complex64)
    k = qfft.fftnc(x)
    assert np.linalg.norm(k) == pytest.approx(np.linalg.norm(x), rel=1e-5)
    assert np.allclose(qfft.ifftnc(k), x, atol=1e-5)
    y = (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape)).astype(np.complex64)
    assert np.vdot(qfft.fftnc(x), y) == pytest.approx(np.vdot(x, qfft.ifftnc(y)), rel=1e-4)


def test_torch_and_numpy_centred_fft_agree():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 9, 8)) + 1j * rng.standard_normal((3, 9, 8))).astype(np.complex64)
    assert np.allclose(qfft.fftnc_torch(torch.from_numpy(x)).numpy(), qfft.fftnc(x), atol=1e-5)
    assert np.allclose(qfft.ifftnc_torch(torch.from_numpy(x)).numpy(), qfft.ifftnc(x), atol=1e-5)


def test_centred_fft_of_centred_delta_is_flat():
    x = np.zeros((8, 8), np.complex64)
    x[4, 4] = 1.0
    assert np.allclose(qfft.fftnc(x), 1 / 8)


def test_padding_helpers():
    shape = qfft.padded_shape((100, 75, 33), 1.5)
    assert all(s >= 1.5 * n and s % 2 == 0 for s, n in zip(shape, (100, 75, 33)))
    assert qfft.padded_shape((10, 11, 12), 1.0) == (10, 11, 12)
    x = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = qfft.pad_center(x, (9, 10, 12))
    assert p.shape == (9, 10, 12) and p.sum() == x.sum()
    assert np.array_equal(qfft.crop_center(p, x.shape), x)
