"""recon/calibrationless: group-LASSO and OWL proxes (against brute force), solvers, 4x recon, the stage."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_stage

torch = pytest.importorskip("torch")
from scipy.optimize import minimize  # noqa: E402

from qsmkit.errors import ParameterError  # noqa: E402
from qsmkit.kspace import mask_tensor, normalization_scale  # noqa: E402

import qsmkit_kspace as K  # noqa: E402
from qsmkit_kspace.calibrationless import (CoilFourierOp, WaveletOp, calibrationless, group_lasso_norm,  # noqa: E402
                                           lipschitz, owl_norm, prox_group_lasso, prox_owl)
from qsmkit_kspace.masks import random_mask  # noqa: E402
from qsmkit_kspace.metrics import evaluate_volume  # noqa: E402
from qsmkit_kspace.simulate import simulate_kspace_files, simulate_multicoil  # noqa: E402
from qsmkit_kspace.transforms import ifft2c_np  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_prox(z: np.ndarray, fun) -> np.ndarray:
    """argmin_x 1/2 ||x - z||^2 + fun(x) over complex x (as real pairs), by Powell from several starts."""
    shp = z.shape

    def obj(v):
        x = (v[: z.size] + 1j * v[z.size:]).reshape(shp)
        return 0.5 * float(np.sum(np.abs(x - z) ** 2)) + fun(x)

    r = minimize(obj, np.concatenate([z.real.ravel(), z.imag.ravel()]), method="Powell",
                 options={"xtol": 1e-8, "ftol": 1e-12, "maxiter": 20000})
    return (r.x[: z.size] + 1j * r.x[z.size:]).reshape(shp), r.fun


def _is_minimum(p: np.ndarray, z: np.ndarray, fun, n: int = 300, eps: float = 1e-3) -> bool:
    """Convex objective: no small random step from ``p`` lowers it (a local minimum is the global one)."""
    rng = np.random.default_rng(5)
    f0 = 0.5 * np.sum(np.abs(p - z) ** 2) + fun(p)
    for _ in range(n):
        d = rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape)
        q = p + eps * d / np.linalg.norm(d)
        if 0.5 * np.sum(np.abs(q - z) ** 2) + fun(q) < f0 - 1e-12:
            return False
    return True


def _crand(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex128)


@pytest.mark.parametrize("thresh", [0.3, 2.5])
def test_group_lasso_prox_against_brute_force(thresh):
    z = _crand((1, 3, 2, 2), 0)                 # 1 slice, 3 coils, 2x2 coefficients
    pen = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # the first coefficient is the (unpenalised) approximation
    got = prox_group_lasso(torch.from_numpy(z), thresh, pen).numpy()

    def fun(x):
        return thresh * float(group_lasso_norm(torch.from_numpy(x), pen)[0])

    ref, fref = _brute_prox(z, fun)
    fgot = 0.5 * np.sum(np.abs(got - z) ** 2) + fun(got)
    assert fgot <= fref + 1e-8
    assert _is_minimum(got, z, fun)
    np.testing.assert_allclose(got, ref, atol=2e-2)  # Powell stalls near kinks
    np.testing.assert_allclose(got[:, :, 0, 0], z[:, :, 0, 0])       # approximation untouched
    _, nrm = prox_group_lasso(torch.from_numpy(z), thresh, pen, return_norm=True)   # the norm the cost reuses
    assert float(nrm[0]) == pytest.approx(float(group_lasso_norm(torch.from_numpy(got), pen)[0]), rel=1e-10)
    if thresh > 2.4:
        assert np.any(np.all(got == 0, axis=1))                         # some whole groups vanish


@pytest.mark.parametrize("alpha,beta", [(0.4, 0.0), (0.1, 0.3)])
def test_owl_prox_against_brute_force(alpha, beta):
    z = _crand((1, 2, 1, 2), 1)                  # one band of 2 coils x 2 coefficients: n = 4
    bands = [(slice(0, 1), slice(0, 2))]
    got = prox_owl(torch.from_numpy(z), alpha, beta, bands).numpy()

    def fun(x):
        return float(owl_norm(torch.from_numpy(x), alpha, beta, bands)[0])

    ref, fref = _brute_prox(z, fun)
    fgot = 0.5 * np.sum(np.abs(got - z) ** 2) + fun(got)
    assert fgot <= fref + 1e-8                        # at least as good as the brute-force search
    assert _is_minimum(got, z, fun)
    if beta == 0:                                     # no ties: Powell finds the same point
        np.testing.assert_allclose(got, ref, atol=2e-2)  # Powell stalls near kinks
    # OWL keeps phases and orders
    nz = np.abs(got) > 0
    np.testing.assert_allclose(np.angle(got[nz]), np.angle(z[nz]), atol=1e-6)


def test_owl_and_group_lasso_prox_batched_thresholds():
    """Per-slice thresholds (POGM's zeta) act slice by slice."""
    z = torch.from_numpy(_crand((2, 3, 4, 4), 2).astype(np.complex64))
    both = prox_group_lasso(z, np.array([0.1, 0.7]))
    np.testing.assert_allclose(both[1:].numpy(), prox_group_lasso(z[1:], 0.7).numpy(), rtol=1e-6)
    bands = [(slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 4))]
    ob = prox_owl(z, np.array([0.1, 0.3]), 0.05, bands)
    np.testing.assert_allclose(ob[:1].numpy(), prox_owl(z[:1], 0.1, 0.05, bands).numpy(), rtol=1e-5)


def test_operators_orthogonal_and_lipschitz():
    psi = WaveletOp((2, 3, 32, 16), "db2", 2, "pywt")
    assert psi.wt.levels == 2 and len(psi.bands) == 6
    x = torch.from_numpy(_crand((2, 3, 32, 16), 3).astype(np.complex64))
    np.testing.assert_allclose(psi.adjoint(psi.apply(x)).numpy(), x.numpy(), atol=1e-5)
    assert float(psi.apply(x).abs().square().sum()) == pytest.approx(float(x.abs().square().sum()), rel=1e-5)
    col = np.zeros(16, bool)
    col[::3] = True
    A = CoilFourierOp(mask_tensor(col, 2, (32, 16), "cpu"), (2, 3, 32, 16), dims=(-1,))
    assert CoilFourierOp.reduced_dims(A.mask) == (-1,)
    assert lipschitz(A) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ParameterError):
        calibrationless(x, A.mask, regularizer="tv")


@pytest.fixture(scope="module")
def slice4x():
    """One 8-coil slice, 4x random column undersampling (8 % centre)."""
    sim = simulate_multicoil((1, 96, 96), 8, extent=(1.1, 1.1, 0.6), noise=0.002, seed=0)
    k = sim["kspace"]
    col, _, _ = random_mask(96, [0.08], [4], seed=1)
    ku = (k * col).astype(np.complex64)
    scale = normalization_scale(ku)
    ref = np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=1))
    zf = np.sqrt(np.sum(np.abs(ifft2c_np(ku)) ** 2, axis=1))
    return torch.from_numpy(ku / scale), mask_tensor(col, 1, (96, 96), "cpu"), scale, ref, zf


def _metrics(x, scale, ref):
    img = np.sqrt((x.abs() ** 2).sum(1)).numpy() * scale
    return evaluate_volume(ref, img, square_crop=False)


def test_4x_group_lasso_beats_zero_filled_and_pogm_is_faster(slice4x):
    y, m, scale, ref, zf = slice4x
    res = {"zero_filled": evaluate_volume(ref, zf, square_crop=False)}
    costs = {}
    for form, solver in (("synthesis", "fista"), ("synthesis", "pogm"), ("analysis", "condat_vu")):
        x, info = calibrationless(y, m, 0.01, 40, "group_lasso", form, solver if form == "synthesis" else "fista",
                                  "db4", 3)
        res[solver] = _metrics(x, scale, ref)
        costs[solver] = info["cost"][:, 0]
        assert info["solver"] == solver and info["cost"].shape == (40, 1)
    for name, r in res.items():
        print(f"4x calibrationless group-LASSO {name:11s} SSIM {r['ssim']:.4f} NMSE {r['nmse']:.4f} PSNR {r['psnr']:.2f}")
    for solver in ("fista", "pogm", "condat_vu"):
        assert res[solver]["ssim"] > res["zero_filled"]["ssim"] + 0.02
        assert res[solver]["nmse"] < 0.85 * res["zero_filled"]["nmse"]
    target = costs["fista"][-1]
    n_pogm = int(np.argmax(costs["pogm"] <= target)) + 1
    print(f"POGM reaches FISTA's final cost ({target:.6g} after 40 iterations) at iteration {n_pogm}")
    assert costs["pogm"][-1] <= target and n_pogm < 40
    assert costs["fista"][-1] < costs["fista"][0] and costs["condat_vu"][-1] < costs["condat_vu"][0]


@pytest.mark.parametrize("beta", [0.0, 1e-7])
def test_4x_owl_runs_and_beats_zero_filled(slice4x, beta):
    y, m, scale, ref, zf = slice4x
    x, info = calibrationless(y, m, 0.005, 25, "owl", "synthesis", "pogm", "db4", 3, owl_beta=beta)
    r = _metrics(x, scale, ref)
    print(f"4x calibrationless OWL beta={beta:g}: SSIM {r['ssim']:.4f} NMSE {r['nmse']:.4f}")
    assert np.isfinite(info["cost"]).all() and info["cost"][-1, 0] < info["cost"][0, 0]
    assert r["ssim"] > evaluate_volume(ref, zf, square_crop=False)["ssim"]


def test_stage_chain_and_metrics(tmp_path):
    files = simulate_kspace_files(tmp_path, matrix=(32, 64), n_slices=2, n_coils=6, skmtea_shape=(2, 32, 32),
                                  accelerations=(4.0,), noise=0.001, seed=1)
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "format": "fastmri"})
    art = run_stage(K.RandomUndersample, art, {"accelerations": [4], "center_fractions": [0.16], "seed": 0})
    zf = run_stage(K.ZeroFilled, art)
    for params in ({"max_iter": 15, "wavelet": "db2", "levels": 2},
                   {"max_iter": 15, "wavelet": "db2", "levels": 2, "formulation": "analysis"},
                   {"max_iter": 8, "wavelet": "db2", "levels": 2, "regularizer": "owl", "owl_beta": 1e-7,
                    "solver": "pogm", "lambda": 0.005}):
        out = run_stage(K.Calibrationless, art, params)
        img = out["image"]
        assert img.shape == (32, 64, 2) and img.data.dtype == np.float32
        cm = out["metrics"]["calibrationless"]
        assert cm["iterations"] == params["max_iter"] and len(cm["cost"]) == params["max_iter"]
        assert cm["cost"][-1] < cm["cost"][0] and cm["lipschitz"] == pytest.approx(1.01, rel=1e-2)
        assert out["metrics"]["ssim"] > zf["metrics"]["ssim"], params
    with pytest.raises(ParameterError):
        run_stage(K.Calibrationless, art, {"complex_output": "4d"})


@pytest.mark.parametrize("name,H,W,levels", [("sym8", 64, 96, 2), ("db1", 16, 32, 3), ("db4", 48, 40, 2),
                                             ("coif1", 64, 64, 3)])
def test_torch_dwt_equals_pywt_periodization(name, H, W, levels):
    """The torch periodic DWT (WaveletOp / Wavelet2D) has PyWavelets' periodization coefficients and layout."""
    import pywt

    x = _crand((2, 3, H, W), 7).astype(np.complex64)
    psi = WaveletOp(x.shape, name, levels, "auto")
    assert psi.wt.backend == "torch" and psi.wt.levels == levels
    c = psi.apply(torch.from_numpy(x)).numpy()

    def ref(a):
        return pywt.coeffs_to_array(pywt.wavedec2(a, name, mode="periodization", level=levels, axes=(-2, -1)),
                                    axes=(-2, -1))[0]

    np.testing.assert_allclose(c, ref(x.real) + 1j * ref(x.imag), atol=1e-5)
    np.testing.assert_allclose(psi.adjoint(torch.from_numpy(c)).numpy(), x, atol=1e-5)
