"""Every stage with a ``device`` parameter gives the CPU's answer on CUDA (issue 20, "GPU").

One catalogue, :data:`CASES`, holds a small case for every registered stage that declares
``device`` (``kind/method`` -> inputs, parameters, the artifacts to compare and a tolerance with
its reason). :func:`compare_devices` runs a case's stage twice, on ``dev_a`` and on ``dev_b``, and
checks the outputs against each other:

* ``test_cuda_matches_cpu`` (skipped without a GPU) runs every case with ("cpu", "cuda"); for a
  torch stage it also checks that the CUDA run allocated GPU memory (so a stage that ignores its
  ``device`` fails), for a numpy-only stage that it allocated none.
* ``test_catalogue_covers_every_stage_with_a_device_parameter`` (CPU): a new stage that declares
  ``device`` fails until it has a case here.
* ``test_harness_cpu_vs_cpu`` (CPU, marked ``slow``) runs every torch case with ("cpu", "cpu"), so
  the harness and those cases' inputs are exercised where no GPU is (and each repeats itself).
* ``test_numpy_only_stages_accept_cuda`` (CPU) runs each numpy-only stage with ("cpu", "cuda")
  even where torch sees no GPU: they must accept the value and give the same answer bit for bit.
  Together with the previous test every case runs on this machine.
* ``test_hfs_sde_tolerance_covers_two_seeds`` (CPU, ``slow``): HFS-SDE's statistics tolerance holds
  for two CPU seeds (the stand-in for CPU vs CUDA noise streams), and the images do differ.
* ``test_espirit_maps_do_not_depend_on_the_svd_phase`` (CPU): ESPIRiT's maps are the same when the
  SVD returns its singular vectors with other phases (as cuSOLVER and LAPACK do).

Tolerances (relative L2 difference ``||a - b|| / ||a||`` over the compared arrays, masks as the
fraction of voxels that differ) follow from what differs between the two runs: numpy-only
stages run the same code, so 0; torch stages differ by the FFT library (pocketfft/MKL vs cuFFT)
and the order of float32 reductions (about 1e-7 relative per operation), which a Krylov or
ADMM solver carries forward over its iterations, so the iterative cases run few iterations and
allow 1e-3 .. 5e-3; convolutional networks run with cuDNN's TF32 convolutions on Ampere and later
(torch's default, 10-bit mantissa: about 1e-3 relative per layer), so 2e-2; HFS-SDE's sampler
draws its noise from a ``torch.Generator`` on the device, whose CUDA stream differs from the
CPU's, so it is compared where it is deterministic (the low-frequency samples it keeps) and by
statistics of the image (within the spread of two CPU seeds).
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from helpers import run_stage

torch = pytest.importorskip("torch")

from qsmkit.params import CPU_DEVICE, DEVICE  # noqa: E402
from qsmkit.plugins import load_registry  # noqa: E402
from qsmkit.volume import Volume  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------ inputs
@functools.lru_cache(maxsize=1)
def _phantom():
    """40^3 head at 2 mm (80 mm FOV), 3 echoes 4-12 ms, 3 T, SNR 100, oversample 1, seed 0."""
    from qsmkit.simulate import simulate_phantom

    return simulate_phantom(shape=(40, 40, 40), voxel_size=(2.0, 2.0, 2.0), echo_times=(0.004, 0.008, 0.012),
                            seed=0, oversample=1)


@functools.lru_cache(maxsize=1)
def _qsm() -> dict:
    """Artifacts of the phantom for every QSM step: the acquisition, the truth's mask/fields/chi and,
    made once on the CPU, ``unwrapped_phase`` (laplacian), ``quality`` (ROMEO) and ``noise_weight``."""
    ph = _phantom()
    reg = load_registry()
    art = {"magnitude": ph.magnitude, "phase": ph.phase, "echo_times": np.asarray(ph.echo_times),
           "field_strength": float(ph.field_strength), "mask": ph.truth["mask"],
           "total_field": ph.truth["total_field"], "local_field": ph.truth["local_field"], "chi": ph.truth["chi"]}
    art["unwrapped_phase"] = run_stage(reg.get("unwrap", "laplacian"), art, {"device": "cpu"})["unwrapped_phase"]
    art["quality"] = run_stage(reg.get("unwrap", "romeo"), art, {"device": "cpu"})["quality"]
    art["noise_weight"] = run_stage(reg.get("echo_combine", "weighted_fit"), art, {"device": "cpu"})["noise_weight"]
    return art


def _pick(*names: str) -> Callable[[], dict]:
    return lambda: {k: _qsm()[k] for k in names}


def _coarse(*names: str, voxel_size: tuple | None = None) -> Callable[[], dict]:
    """Every second voxel of the phantom's artifacts (20^3 at 4 mm, or labelled ``voxel_size``): for the
    stages whose CPU cost grows fastest with the grid (DIP's fit, QSMnet's tiles)."""
    def build() -> dict:
        out = {}
        for k in names:
            v = _qsm()[k]
            if not isinstance(v, Volume):
                out[k] = v
                continue
            d = np.ascontiguousarray(np.asarray(v.data)[::2, ::2, ::2])
            vs = voxel_size or tuple(2 * s for s in v.voxel_size)
            out[k] = Volume.from_array(d, vs, units=v.units, b0_direction=v.b0_direction)
        return out

    return functools.lru_cache(maxsize=1)(build)


@functools.lru_cache(maxsize=1)
def _cosmos_orientations() -> list:
    """Three orientations of the phantom's chi (B0 tilted 0, 20 and 25 deg), exact fields plus 1 %
    noise, on the reference grid (as after registration)."""
    from qsmkit.operators import Dipole
    from qsmkit.simulate import rotation_matrix

    q = _qsm()
    chi, mask, vs = np.asarray(q["chi"].data), np.asarray(q["mask"].data) > 0, q["chi"].voxel_size
    rng = np.random.default_rng(3)
    out = []
    for i, ang in enumerate(((0, 0, 0), (20, 0, 0), (0, -25, 0))):
        b = rotation_matrix(ang) @ np.array([0.0, 0.0, 1.0])
        f = Dipole(chi.shape, vs, b).apply(chi).astype(np.float32)
        f = np.where(mask, f + 0.01 * float(np.std(f[mask])) * rng.standard_normal(f.shape), 0).astype(np.float32)
        vol = functools.partial(Volume.from_array, voxel_size=vs, b0_direction=b, source=f"ori-{i + 1}.nii.gz")
        out.append({"local_field": vol(f, units="ppm"), "mask": vol(mask, units="bool"),
                    "magnitude": vol(mask[..., None].astype(np.float32)), "noise_weight":
                    vol(np.where(mask, 50.0, 0).astype(np.float32)), "echo_times": np.array([0.004, 0.008]),
                    "field_strength": 3.0})
    return out


@functools.lru_cache(maxsize=1)
def _register_orientations() -> list:
    """Two acquisitions of a 32^3 head at 3 mm, the second rotated by 10 deg about x."""
    from qsmkit.simulate import simulate_orientations

    out = []
    for ph in simulate_orientations([(0, 0, 0), (10, 0, 0)], shape=(32, 32, 32), voxel_size=(3.0, 3.0, 3.0),
                                    echo_times=(0.004, 0.008), seed=0, oversample=1):
        m = ph.truth["mask"]
        out.append({"magnitude": ph.magnitude, "mask": m, "local_field": ph.truth["local_field"],
                    "noise_weight": m.like(np.where(m.data > 0, 10.0, 0).astype(np.float32)),
                    "echo_times": np.asarray(ph.echo_times), "field_strength": float(ph.field_strength)})
    return out


@functools.lru_cache(maxsize=1)
def _fastmri() -> dict:
    """Two 8-coil 64 x 64 slices (random anatomies), 4x random column mask, ESPIRiT maps (CPU)."""
    from qsmkit.kspace import KSpaceData

    from qsmkit_kspace.anatomies import random_multicoil_batch
    from qsmkit_kspace.masks import random_mask
    from qsmkit_kspace.transforms import center_crop

    shape = (64, 64)
    d = random_multicoil_batch(np.random.default_rng([99, 7]), 2, shape, 8, noise=0.005)
    col, _, _ = random_mask(shape[1], [0.12], [4.0], seed=7)
    kd = KSpaceData(data=(d["kspace"] * col).astype(np.complex64), layout="fastmri", slice_indices=(0, 1),
                    crop_size=shape)
    target = Volume(np.ascontiguousarray(np.transpose(center_crop(d["target"], shape), (1, 2, 0))), np.eye(4))
    art = {"kspace": kd, "sampling_mask": col[None, :], "target": target}
    art["maps"] = run_stage(load_registry().get("coil_maps", "espirit"), art,
                            {"device": "cpu", "calib": [16, 16]})["maps"]
    return art


_TMP: list = []  # keeps the temporary directory of the GRE file alive for the session


@functools.lru_cache(maxsize=1)
def _gre() -> dict:
    """A 6-coil 3-echo GRE k-space file of a 24 x 28 x 20 head at 6 mm, read by kspace_read/gre."""
    from qsmkit_kspace.simulate_gre import simulate_gre_files

    _TMP.append(tempfile.TemporaryDirectory(prefix="qsmkit_cuda_"))
    files = simulate_gre_files(Path(_TMP[-1].name), shape=(24, 28, 20), voxel_size=(6.0, 6.0, 6.0), n_coils=6,
                               echo_times=(0.004, 0.008, 0.012), snr=200, oversample=1, seed=2)
    return run_stage(load_registry().get("kspace_read", "gre"), {"kspace": files["kspace"]})


# ------------------------------------------------------------------------------------ statistics
#: HFS-SDE's deterministic low-frequency region in the case: the 6 central columns (all sampled)
HFS_LOW_FREQUENCY = ("low_frequency", 6)


def _hfs_statistics(out: dict, art: dict) -> dict[str, np.ndarray]:
    """What HFS-SDE fixes whatever the noise: the low-frequency k-space samples it keeps (replaced by
    the data's), and the energy and NMSE of the image (sampling statistics)."""
    from qsmkit_kspace.hfs_sde import _fft, low_frequency_mask

    img = np.asarray(out["image_real"].data) + 1j * np.asarray(out["image_imag"].data)  # (H, W, S)
    k = _fft(torch.from_numpy(np.ascontiguousarray(np.transpose(img, (2, 0, 1))).astype(np.complex64))).numpy()
    L = np.broadcast_to(low_frequency_mask(k.shape[-2:], *HFS_LOW_FREQUENCY) > 0, k.shape[-2:])
    tgt = np.asarray(art["target"].data)
    mag = np.abs(img)
    return {"low_frequencies": k[:, L], "energy": np.array([np.linalg.norm(mag)]),
            "nmse": np.array([np.linalg.norm(mag - tgt) ** 2 / np.linalg.norm(tgt) ** 2])}


# ------------------------------------------------------------------------------------ catalogue
@dataclass(frozen=True)
class Case:
    """A small run of one stage and how to compare two of them.

    ``inputs`` builds the artifacts (cached); ``params`` are the stage's parameters (``device``
    is added); ``outputs`` the artifacts compared; ``rtol`` the relative L2 tolerance (per output,
    or per statistic when ``statistic`` is given); ``why`` the reason for the tolerance;
    ``statistic(out, inputs)`` turns a stochastic stage's outputs into deterministic numbers.
    """

    inputs: Callable[[], Any]
    params: dict = field(default_factory=dict)
    outputs: tuple = ()
    rtol: float = 0.0
    why: str = "numpy-only: the same code runs whatever the device"
    statistic: Callable[[dict, dict], dict] | None = None


_CG = "float32 CG/FFT round-off (pocketfft vs cuFFT, reduction order) over {} iterations"
_NET = "one network forward pass; cuDNN TF32 convolutions (~1e-3 per layer) on CUDA"

CASES: dict[tuple[str, str], Case] = {
    # background removal: sharp family numpy-only; PDF torch CG
    ("background", "ismv"): Case(_pick("total_field", "mask"), {"max_iter": 50}, ("local_field", "mask")),
    ("background", "lbv"): Case(_pick("total_field", "mask"), {"max_iter": 50}, ("local_field", "mask")),
    ("background", "pdf"): Case(_pick("total_field", "mask", "noise_weight"), {"max_iter": 15},
                                ("local_field", "mask"), 1e-3, _CG.format(15)),
    ("background", "resharp"): Case(_pick("total_field", "mask"), {"max_iter": 50}, ("local_field", "mask")),
    ("background", "sharp"): Case(_pick("total_field", "mask"), {}, ("local_field", "mask")),
    ("background", "vsharp"): Case(_pick("total_field", "mask"), {"radii_mm": [8.0, 6.0, 4.0]},
                                   ("local_field", "mask")),
    # k-space GRE -> magnitude/phase
    ("coil_combine", "aspire"): Case(_gre, {}, ("magnitude", "phase")),
    ("coil_combine", "sense"): Case(_gre, {"calib": [12, 12], "max_iter": 10}, ("magnitude", "phase"), 2e-3,
                                    "ESPIRiT power iterations + " + _CG.format(10) + " (torch on the device)"),
    ("coil_maps", "espirit"): Case(_fastmri, {"calib": [16, 16], "max_iter": 20}, ("maps",), 1e-3,
                                   "float32 power iterations per voxel after a float32 SVD on the device (its "
                                   "arbitrary phase is fixed: the reference's largest entry is real); 20 iterations"),
    # echo combination: numpy-only
    ("echo_combine", "nonlinear_fit"): Case(_pick("phase", "magnitude", "unwrapped_phase", "echo_times",
                                                  "field_strength", "mask"), {"max_iter": 5},
                                            ("total_field", "noise_weight")),
    ("echo_combine", "weighted_fit"): Case(_pick("unwrapped_phase", "echo_times", "field_strength", "magnitude",
                                                 "mask"), {}, ("total_field", "noise_weight")),
    # inversion
    ("inversion", "cosmos"): Case(lambda: {"orientations": _cosmos_orientations(),
                                           "mask": _cosmos_orientations()[0]["mask"]},
                                  {"solver": "cg", "max_iter": 10, "tol": 1e-6}, ("chi",), 1e-3,
                                  "scipy (CPU) vs torch (CUDA) CG, " + _CG.format(10)),
    ("inversion", "dip"): Case(_coarse("local_field", "mask", "noise_weight"),
                               {"max_iter": 8, "min_iterations": 0, "early_stop": False, "channels": 4,
                                "skip_channels": 2, "input_channels": 4, "depth": 2, "seed": 0}, ("chi",), 2e-2,
                               "same seed, weights and z made on the CPU; Tikhonov start by CG (1e-5) plus 8 Adam "
                               "steps through TF32 convolutions (the network's share of chi is small)"),
    ("inversion", "medi"): Case(_pick("local_field", "mask", "magnitude", "noise_weight", "field_strength",
                                      "echo_times"), {"max_iter": 3, "cg_max_iter": 10}, ("chi",), 5e-3,
                                "3 Gauss-Newton steps x 10 CG, IRLS weights recomputed from chi: " + _CG.format(30)),
    ("inversion", "qsmnet"): Case(_coarse("local_field", "mask", voxel_size=(1.0, 1.0, 1.0)),
                                  {"patch": 16, "overlap": 0.25}, ("chi",), 2e-2,
                                  _NET + " per tile; the same tiles and blending"),
    ("inversion", "rts"): Case(_pick("local_field", "mask"), {"max_iter": 5}, ("chi",), 5e-3,
                               "4 CG steps then 5 ADMM steps (soft thresholds are continuous): " + _CG.format(9)),
    ("inversion", "tfi"): Case(_pick("total_field", "mask", "magnitude", "noise_weight", "field_strength",
                                     "echo_times"), {"solver": "gauss-newton", "max_iter": 3, "cg_max_iter": 10},
                               ("chi",), 5e-3,
                               "3 Gauss-Newton steps x 10 preconditioned CG: " + _CG.format(30)),
    ("inversion", "tkd"): Case(_pick("local_field", "mask"), {}, ("chi",)),
    ("inversion", "tv"): Case(_pick("local_field", "mask"), {"max_iter": 5}, ("chi",), 5e-3,
                              "5 ADMM steps with CG sub-solves: " + _CG.format(5)),
    # masks: numpy-only
    ("mask", "bet"): Case(_pick("magnitude"), {"subdivisions": 3, "max_iter": 200}, ("mask",)),
    ("mask", "phase_quality"): Case(_pick("quality", "magnitude", "mask"), {}, ("mask",)),
    ("mask", "threshold"): Case(_pick("magnitude"), {}, ("mask",)),
    ("phase_offset", "mcpc3ds"): Case(_pick("phase", "magnitude", "echo_times", "mask"), {},
                                      ("phase", "phase_offset")),
    # k-space reconstruction (torch)
    ("recon", "calibrationless"): Case(_fastmri, {"max_iter": 10, "levels": 2, "wavelet": "db4"}, ("image",), 2e-3,
                                       "10 FISTA steps with orthogonal wavelets (backend auto, the same transform on both devices): "
                                       + _CG.format(10)),
    ("recon", "cs_wavelet"): Case(_fastmri, {"max_iter": 10, "levels": 2}, ("image",), 2e-3,
                                  "10 FISTA steps with orthogonal wavelets (backend auto, the same transform on both devices): "
                                  + _CG.format(10)),
    ("recon", "hfs_sde"): Case(_fastmri, {"n_steps": 3, "complex_output": "real_imag", "crop": False,
                                          "low_frequency": HFS_LOW_FREQUENCY[0], "acs": HFS_LOW_FREQUENCY[1],
                                          "support": False},
                               ("image_real", "image_imag"), 0.15,
                               "the noise comes from a torch.Generator on the device (CUDA's stream differs "
                               "from the CPU's): kept low frequencies to 1e-3 in the statistic's first entry "
                               "via its own check, energy and NMSE within the spread of two CPU seeds; support "
                               "off (zeroing the background outside cropped maps changes the image's low "
                               "frequencies by the sampled background's)",
                               _hfs_statistics),
    ("recon", "sense"): Case(_fastmri, {"max_iter": 10}, ("image",), 1e-3, _CG.format(10)),
    ("recon", "unet"): Case(_fastmri, {}, ("image",), 2e-2, _NET + " (shipped weights)"),
    ("recon", "zero_filled"): Case(_fastmri, {}, ("image",), 1e-5, "one inverse FFT and a sum over coils"),
    # reference: numpy-only
    ("reference", "mean"): Case(_pick("chi", "mask"), {}, ("chi",)),
    ("reference", "none"): Case(_pick("chi"), {}, ("chi",)),
    # registration: SimpleITK on the CPU
    ("register", "simpleitk"): Case(lambda: {"orientations": _register_orientations()},
                                    {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "max_iter": 100,
                                     "search_range_deg": 0.0, "require_convergence": False},
                                    ("transforms",)),
    ("register", "known"): Case(lambda: {"orientations": _register_orientations()}, {"source": "affines"},
                                ("orientations", "transforms")),
    # unwrapping: numpy / numba
    ("unwrap", "laplacian"): Case(_pick("phase", "mask"), {}, ("unwrapped_phase",)),
    ("unwrap", "romeo"): Case(_pick("phase", "magnitude", "mask", "echo_times"), {}, ("unwrapped_phase", "quality")),
}

#: tolerance of HFS-SDE's kept low-frequency samples (they are the data's, up to float32 FFTs)
HFS_LOW_FREQUENCY_RTOL = 1e-3


def device_stages() -> dict[tuple[str, str], type]:
    """Every registered stage that declares a ``device`` parameter itself."""
    return {k: cls for k, cls in load_registry()._stages.items() if any(p.name == "device" for p in cls.params)}


def is_torch_stage(cls) -> bool:
    """Whether a stage runs torch on its device (declares :data:`qsmkit.params.DEVICE`)."""
    return cls.param_map()["device"] == DEVICE


# ------------------------------------------------------------------------------------ harness
def _arrays(value: Any, name: str) -> dict[str, np.ndarray]:
    """Flatten an artifact (Volume, array, number, list / dict of them) to named arrays."""
    if isinstance(value, Volume):
        return {name: np.asarray(value.data)}
    if isinstance(value, dict):
        out: dict = {}
        for k in sorted(value, key=str):
            out.update(_arrays(value[k], f"{name}.{k}"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(_arrays(v, f"{name}[{i}]"))
        return out
    if hasattr(value, "data") and isinstance(getattr(value, "data"), np.ndarray):
        return {name: np.asarray(value.data)}
    try:
        return {name: np.asarray(value, dtype=np.complex128 if np.iscomplexobj(value) else np.float64)}
    except (TypeError, ValueError):
        return {}  # strings, paths: nothing numeric to compare


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 difference of two arrays (fraction of differing entries for booleans)."""
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    if a.dtype == bool or b.dtype == bool:
        return float(np.mean(a != b)) if a.size else 0.0
    a, b = a.astype(np.complex128), b.astype(np.complex128)
    bad_a, bad_b = ~np.isfinite(a), ~np.isfinite(b)
    if bad_a.any() or bad_b.any():  # e.g. a metric a registration could not evaluate: same places only
        assert np.array_equal(bad_a, bad_b), "non-finite values in one run only"
        a, b = a[~bad_a], b[~bad_b]
    den = float(np.linalg.norm(a))
    num = float(np.linalg.norm(a - b))
    return num / den if den > 0 else num


def run_case(kind: str, method: str, device: str, **override) -> tuple[dict, dict, float]:
    """Run the catalogue case of ``kind/method`` on ``device``: (outputs, inputs, wall seconds)."""
    case = CASES[(kind, method)]
    cls = load_registry().get(kind, method)
    art = case.inputs()
    t0 = time.perf_counter()
    out = run_stage(cls, art, {**case.params, **override, "device": device})
    return out, art, time.perf_counter() - t0


def compare_devices(kind: str, method: str, dev_a: str, dev_b: str, **override) -> dict[str, float]:
    """Run ``kind/method``'s case on ``dev_a`` and on ``dev_b`` and check that they agree.

    Returns ``{output (or statistic) name: relative difference}``; raises ``AssertionError`` naming
    the stage, the output and the tolerance when one is above the case's ``rtol``. ``override``
    changes case parameters in both runs (e.g. a different seed).
    """
    case = CASES[(kind, method)]
    out_a, art, _ = run_case(kind, method, dev_a, **override)
    out_b, _, _ = run_case(kind, method, dev_b, **override)
    diffs: dict[str, float] = {}
    if case.statistic is not None:
        sa, sb = case.statistic(out_a, art), case.statistic(out_b, art)
        for name in sa:
            diffs[name] = _difference(sa[name], sb[name])
        low = diffs.pop("low_frequencies", None)
        if low is not None:
            assert low <= HFS_LOW_FREQUENCY_RTOL, (
                f"{kind}/{method} on {dev_a} vs {dev_b}: kept low frequencies differ by {low:.3g} "
                f"(> {HFS_LOW_FREQUENCY_RTOL:g})")
            diffs["low_frequencies"] = low
    else:
        for name in case.outputs:
            assert name in out_a and name in out_b, f"{kind}/{method} did not write '{name}'"
            fa, fb = _arrays(out_a[name], name), _arrays(out_b[name], name)
            assert fa and set(fa) == set(fb), f"{kind}/{method}: '{name}' has different parts on the two devices"
            for k in fa:
                diffs[k] = _difference(fa[k], fb[k])
    for name, d in diffs.items():
        if name == "low_frequencies":
            continue
        assert d <= case.rtol, (f"{kind}/{method}: '{name}' differs by {d:.3g} between {dev_a} and {dev_b} "
                                f"(tolerance {case.rtol:g}: {case.why})")
    return diffs


def _ids(keys) -> list[str]:
    return [f"{k}/{m}" for k, m in keys]


# ------------------------------------------------------------------------------------ tests
def test_catalogue_covers_every_stage_with_a_device_parameter():
    """A stage that declares ``device`` needs a CUDA case here; no case may name a missing stage."""
    have, want = set(CASES), set(device_stages())
    assert not want - have, f"stages with a device parameter but no CUDA case in tests/test_cuda.py: " \
                            f"{', '.join(_ids(sorted(want - have)))}; add one to CASES"
    assert not have - want, f"CUDA cases for stages without a device parameter: {', '.join(_ids(sorted(have - want)))}"
    for key, case in CASES.items():
        assert case.outputs and case.why, key
        torch_stage = is_torch_stage(device_stages()[key])
        # a numpy-only stage runs the same code on every device: nothing may differ
        assert torch_stage or case.rtol == 0.0, f"{key}: numpy-only stage with a non-zero tolerance"
        assert not torch_stage or case.rtol > 0.0, f"{key}: torch stage compared bit for bit"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("key", sorted(CASES), ids=_ids(sorted(CASES)))
def test_cuda_matches_cpu(key):
    kind, method = key
    cls = load_registry().get(kind, method)
    run_case(kind, method, "cuda")  # warm-up: CUDA context, cuFFT plans, model loading
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()  # e.g. a model another case left in a stage's cache
    diffs = compare_devices(kind, method, "cpu", "cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    print(f"{kind}/{method}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f"; GPU peak {peak / 2**20:.1f} MiB above the {held / 2**20:.1f} MiB held before")
    if is_torch_stage(cls):
        assert peak > 0, f"{kind}/{method} with device: cuda allocated no GPU memory (does it ignore device?)"
    else:
        assert peak == 0, f"{kind}/{method} is declared numpy-only but allocated GPU memory"


NUMPY_ONLY = sorted(k for k, cls in device_stages().items() if not is_torch_stage(cls))


@pytest.mark.parametrize("key", NUMPY_ONLY, ids=_ids(NUMPY_ONLY))
def test_numpy_only_stages_accept_cuda(key):
    """Numpy-only stages (CPU_DEVICE) take ``device: cuda`` and give the CPU's answer, GPU or not."""
    assert load_registry().get(*key).param_map()["device"] == CPU_DEVICE
    diffs = compare_devices(*key, "cpu", "cuda")
    assert all(d == 0.0 for d in diffs.values()), diffs


TORCH_CASES = sorted(k for k, cls in device_stages().items() if is_torch_stage(cls))

#: stage parameters that select a second solver of a stage: also compared across devices
SOLVER_VARIANTS = {("inversion", "tfi"): {"solver": "admm", "offset": "0", "admm_iter": 20}}


@pytest.mark.parametrize("key", sorted(SOLVER_VARIANTS), ids=_ids(sorted(SOLVER_VARIANTS)))
def test_solver_variants_cuda_matches_cpu(key):
    """The second solver of a stage on CUDA against CPU (CPU twice without a GPU: the harness runs)."""
    diffs = compare_devices(*key, "cpu", "cuda" if HAS_CUDA else "cpu", **SOLVER_VARIANTS[key])
    assert diffs and all(np.isfinite(d) for d in diffs.values())


@pytest.mark.slow
@pytest.mark.parametrize("key", TORCH_CASES, ids=_ids(TORCH_CASES))
def test_harness_cpu_vs_cpu(key):
    """The harness on this machine: every torch case runs, writes its outputs and repeats itself."""
    diffs = compare_devices(*key, "cpu", "cpu")
    assert diffs and all(np.isfinite(d) for d in diffs.values())
    assert max(diffs.values()) <= CASES[key].rtol


@pytest.mark.slow
def test_hfs_sde_tolerance_covers_two_seeds():
    """Two CPU seeds differ as CPU and CUDA noise streams do: the statistics' tolerance holds for them,
    and the compared statistics are not trivially equal (the check can fail)."""
    key = ("recon", "hfs_sde")
    case = CASES[key]
    a, art, _ = run_case(*key, "cpu", seed=0)
    b, _, _ = run_case(*key, "cpu", seed=1)
    sa, sb = case.statistic(a, art), case.statistic(b, art)
    assert _difference(sa["low_frequencies"], sb["low_frequencies"]) <= HFS_LOW_FREQUENCY_RTOL
    d = {k: _difference(sa[k], sb[k]) for k in ("energy", "nmse")}
    assert max(d.values()) <= case.rtol, d
    ia, ib = (np.asarray(x["image_real"].data) for x in (a, b))
    assert _difference(ia, ib) > 1e-3  # the two seeds do give different images


def test_espirit_maps_do_not_depend_on_the_svd_phase(monkeypatch):
    """cuSOLVER and LAPACK return singular vectors with different (arbitrary) phases: ESPIRiT's phase
    reference must not pass that phase on to the maps, or CPU and CUDA maps differ per slice."""
    from qsmkit_kspace.espirit import espirit_maps

    k = _fastmri()["kspace"].data[:1]
    a, _ = espirit_maps(k, None, calib=(16, 16), iterations=10)
    svd = torch.linalg.svd

    def rotated_svd(A, full_matrices=True):
        u, s, vh = svd(A, full_matrices=full_matrices)
        ph = torch.exp(1j * torch.linspace(0.3, 2.9, u.shape[-1])).to(u.dtype)
        return u * ph, s, vh * ph.conj()[:, None]

    monkeypatch.setattr(torch.linalg, "svd", rotated_svd)
    b, _ = espirit_maps(k, None, calib=(16, 16), iterations=10)
    assert np.abs(a).max() > 0.1
    assert _difference(a, b) < 1e-5
