"""Multi-echo multi-coil GRE k-space -> magnitude/phase -> QSM: layout reader, combination, pipeline, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("torch")

from qsmkit.errors import (ConfigError, GeometryError, InputDataError, MissingArtifactError,  # noqa: E402
                           ParameterError, UnitsError)

from qsmkit_kspace import gre  # noqa: E402
from qsmkit_kspace.gre_io import GreKSpace, noise_whitener, read_gre, write_gre  # noqa: E402
from qsmkit_kspace.simulate_gre import simulate_gre  # noqa: E402
from qsmkit_kspace.stages_gre import gre_mask  # noqa: E402

TE = (0.004, 0.008, 0.012, 0.016, 0.020)
SHAPE, VS = (32, 36, 28), (5.0, 5.0, 5.0)


def one_line(e: BaseException) -> str:
    s = str(e)
    assert s and "\n" not in s
    return s


@pytest.fixture(scope="module")
def clean(one_torch_thread):
    """Noise-free 8-coil 5-echo head without an object phase offset: the true phase is omega TE."""
    return simulate_gre(shape=SHAPE, voxel_size=VS, n_coils=8, snr=None, phase_offset="none", oversample=1)


@pytest.fixture(scope="module")
def clean_maps(clean):
    h0 = gre.hybrid(clean.kspace[0])
    maps = gre.espirit_3d(h0, calib=(24, 24))
    first, _ = gre.sense_echo(h0, maps)
    return gre.reference_maps(maps, gre.virtual_reference(maps, np.abs(first)))


def _small_file(path: Path, E=3, C=4, shape=(10, 12, 10), **kw) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((E, C) + shape) + 1j * rng.standard_normal((E, C) + shape)).astype(np.complex64)
    A = np.diag([1.5, 2.0, 2.5, 1.0])
    A[:3, 3] = (10.0, -5.0, 3.0)
    args = dict(echo_times=TE[:E], field_strength=3.0, affine=A, b0_direction=(0.0, 0.1, 1.0))
    args.update(kw)
    return write_gre(path, k, **args), k


def _circ_err(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> np.ndarray:
    """|wrap(arg a - arg b - c)| in the mask, with c the best global constant."""
    d = np.angle(a * np.conj(b))
    c = np.angle(np.mean(np.exp(1j * d[m])))
    return np.abs(np.angle(np.exp(1j * (d - c))))[m]


# ------------------------------------------------------------------------------------------ layout
def test_roundtrip_geometry_and_lazy_echo(tmp_path):
    path, k = _small_file(tmp_path / "g.h5")
    kd = read_gre(path)
    assert kd.shape == k.shape and kd.n_echoes == 3 and kd.n_coils == 4
    np.testing.assert_allclose(kd.echo_times, TE[:3])
    assert kd.field_strength == 3.0 and kd.voxel_size == (1.5, 2.0, 2.5)
    np.testing.assert_allclose(kd.b0_direction, np.array([0, 0.1, 1.0]) / np.linalg.norm([0, 0.1, 1.0]), atol=1e-12)
    np.testing.assert_array_equal(kd.echo(2), k[2])
    assert kd.data is None  # lazy: nothing held but the header


def test_voxel_size_attribute_instead_of_affine(tmp_path):
    path, _ = _small_file(tmp_path / "g.h5")
    with h5py.File(path, "a") as f:
        del f["affine"]
        f.attrs["voxel_size"] = [2.0, 2.0, 3.0]
    kd = read_gre(path)
    assert kd.voxel_size == (2.0, 2.0, 3.0)
    np.testing.assert_allclose(kd.affine[:3, 3], -np.array([2.0, 2.0, 3.0]) * (np.array([10, 12, 10]) - 1) / 2)


@pytest.mark.parametrize("edit, err, text", [
    (lambda f: f.attrs.__setitem__("format", "fastmri"), InputDataError, "not a qsmkit-gre file"),
    (lambda f: f.__delitem__("echo_times"), InputDataError, "has no 'echo_times'"),
    (lambda f: (f.__delitem__("echo_times"), f.create_dataset("echo_times", data=[0.004, 0.008])),
     InputDataError, "2 values but kspace has 3 echoes"),
    (lambda f: (f.__delitem__("echo_times"), f.create_dataset("echo_times", data=[4.0, 8.0, 12.0])),
     UnitsError, "milliseconds"),
    (lambda f: f.create_dataset("noise", data=np.ones((3, 64), np.complex64)), InputDataError,
     "noise has 3 coils but kspace has 4"),
    (lambda f: f.create_dataset("sampling_mask", data=np.ones((12, 9), np.uint8)), GeometryError, "sampling_mask"),
    (lambda f: (f.__delitem__("kspace"), f.create_dataset("kspace", data=np.ones((4, 10, 12, 10), np.complex64))),
     InputDataError, "(echo, coil, kx, ky, kz)"),
    (lambda f: (f.__delitem__("kspace"), f.create_dataset("kspace", data=np.ones((3, 4, 10, 12, 10), np.float32))),
     InputDataError, "complex"),
    (lambda f: f.attrs.__delitem__("field_strength"), InputDataError, "field_strength"),
    (lambda f: (f.__delitem__("affine"),), InputDataError, "neither an 'affine'"),
])
def test_bad_layout_one_line_errors(tmp_path, edit, err, text):
    path, _ = _small_file(tmp_path / "g.h5")
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(err) as e:
        read_gre(path)
    assert text in one_line(e.value)


def test_truncated_file_one_line(tmp_path):
    path, _ = _small_file(tmp_path / "g.h5")
    data = path.read_bytes()
    bad = tmp_path / "t.h5"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputDataError) as e:
        read_gre(bad)
    one_line(e.value)


def test_noise_prewhitening_decorrelates(tmp_path):
    rng = np.random.default_rng(1)
    mix = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, 0.3, 0.5j]])
    n = mix @ (rng.standard_normal((3, 20000)) + 1j * rng.standard_normal((3, 20000)))
    W = noise_whitener(n)
    w = W @ n
    np.testing.assert_allclose(w @ w.conj().T / n.shape[1], np.eye(3), atol=1e-5)
    path, k = _small_file(tmp_path / "g.h5", C=3, noise=n.astype(np.complex64))
    kd = read_gre(path)
    np.testing.assert_allclose(kd.echo(0), np.einsum("dc,c...->d...", W, k[0]), rtol=1e-4, atol=1e-4)
    assert read_gre(path, prewhiten=False).whitener is None


# ------------------------------------------------------------------------------------ combination
def test_sense1_phase_equals_true_phase_up_to_constant(clean, clean_maps):
    """Noise-free: after removing the echo-independent phase the combined phase is the true phase
    (omega TE, phi0 = 0) up to one global constant; magnitude is the object's times ||S||."""
    m = clean.phantom.truth["mask"].data.astype(bool)
    imgs = np.stack([gre.sense_echo(gre.hybrid(clean.kspace[e]), clean_maps)[0] for e in range(5)], -1)
    # before removal: combined = truth * exp(i psi), psi the same for every echo (coil phase only)
    psi = np.angle(imgs * np.conj(clean.signal))
    assert np.abs(np.angle(np.exp(1j * (psi - psi[..., :1]))))[m].max() < 1e-4
    off = gre.phase_offset_phasor(imgs[..., 0], imgs[..., 1], TE)
    out = gre.remove_phase_offset(imgs, off[..., None])
    err = _circ_err(out, clean.signal, np.broadcast_to(m[..., None], out.shape))
    assert err.max() < 1e-3
    snorm = np.sqrt(np.sum(np.abs(clean.sens) ** 2, axis=0))
    ratio = np.abs(out[..., 0])[m] / (np.abs(clean.signal[..., 0]) * snorm)[m]
    assert np.percentile(np.abs(ratio - 1), 95) < 0.05


def test_virtual_reference_phase_has_no_singularities(clean, clean_maps):
    """The coil phase psi left by SENSE-1 on the virtual reference coil has no phase residues in the head."""
    m = clean.phantom.truth["mask"].data.astype(bool)
    img, _ = gre.sense_echo(gre.hybrid(clean.kspace[0]), clean_maps)
    psi = np.angle(img * np.conj(clean.signal[..., 0]))
    w = lambda a: np.angle(np.exp(1j * a))  # noqa: E731
    for ax in ((0, 1), (1, 2), (0, 2)):
        p = np.moveaxis(psi, ax, (0, 1))
        mm = np.moveaxis(m, ax, (0, 1))
        curl = w(p[1:, :-1] - p[:-1, :-1]) + w(p[1:, 1:] - p[1:, :-1]) - w(p[1:, 1:] - p[:-1, 1:]) \
            - w(p[:-1, 1:] - p[:-1, :-1])
        inside = mm[1:, :-1] & mm[:-1, :-1] & mm[1:, 1:] & mm[:-1, 1:]
        assert np.abs(curl[inside]).max() < 1.0


def test_aspire_phase_equals_true_phase_up_to_constant(clean):
    from qsmkit_kspace.transforms import ifft2c_np

    m = clean.phantom.truth["mask"].data.astype(bool)
    coils = [np.moveaxis(ifft2c_np(gre.hybrid(clean.kspace[e])), 1, 0) for e in range(5)]
    off = gre.phase_offset_phasor(coils[0], coils[1], TE)
    out = np.stack([gre.aspire_combine(c, off) for c in coils], -1)
    assert _circ_err(out, clean.signal, np.broadcast_to(m[..., None], out.shape)).max() < 1e-3


def test_cg_sense_2x_uniform_recovers_fully_sampled(clean, clean_maps):
    m = clean.phantom.truth["mask"].data.astype(bool)
    h0 = gre.hybrid(clean.kspace[0])
    full, it0 = gre.sense_echo(h0, clean_maps)
    mask = gre_mask(h0.shape[2:], "uniform", 2, (8, 8), 0)
    assert it0 == 0 and abs(mask[:, 0].mean() - (18 + 4) / 36) < 1e-9
    und, it = gre.sense_echo(h0 * mask, clean_maps, mask, max_iter=30, tol=1e-7)
    assert it > 1
    assert np.linalg.norm((und - full)[m]) / np.linalg.norm(full[m]) < 0.01


def test_homogenize_removes_a_smooth_receive_profile():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 44, 36)], indexing="ij")
    obj = (x ** 2 / 0.7 + y ** 2 / 0.8 + z ** 2 / 0.7 < 1).astype(np.float32)
    obj *= 1.0 + 0.3 * (np.abs(x) < 0.1)  # a small structure: kept
    bias = (0.4 + np.exp(-((x - 1.2) ** 2 + y ** 2) / 1.5)).astype(np.float32)
    out = gre.homogenize(np.stack([obj * bias, 0.5 * obj * bias], -1), (5, 5, 5))
    inner = (x ** 2 / 0.5 + y ** 2 / 0.6 + z ** 2 / 0.5 < 1) & (np.abs(x) > 0.2)
    cv = lambda a: np.std(a[inner]) / np.mean(a[inner])  # noqa: E731
    assert cv(obj * bias) > 0.2 and cv(out[..., 0]) < 0.3 * cv(obj * bias)
    np.testing.assert_allclose(out[..., 1], 0.5 * out[..., 0], rtol=1e-5)
    stripe = (np.abs(x) < 0.05) & inner.any(axis=0)[None]
    assert out[..., 0][stripe & (obj > 0)].mean() > 1.15 * out[..., 0][inner].mean()


def test_echo_ratio_rule():
    assert gre.echo_ratio([0.004, 0.008]) == 1
    assert gre.echo_ratio([0.01, 0.015]) == 2
    with pytest.raises(ParameterError) as e:
        gre.echo_ratio([0.0045, 0.0095])
    assert "mcpc3ds" in one_line(e.value)


# --------------------------------------------------------------------------------- stages, pipeline
def _stages(extra=()):
    return ([{"stage": "kspace_read", "method": "gre"}, *extra,
             {"stage": "coil_combine", "method": "sense", "params": {"calib": [24, 24], "sigma_mm": 0}}])


def _plan(spec, out):
    from qsmkit.pipeline.plan import build_plan
    from qsmkit.plugins import load_registry

    reg = load_registry()
    return build_plan(spec, reg, None, out), reg


@pytest.fixture(scope="module")
def gre_file(tmp_path_factory, one_torch_thread):
    from qsmkit_kspace.simulate_gre import simulate_gre_files

    d = tmp_path_factory.mktemp("gre")
    return simulate_gre_files(d, shape=SHAPE, voxel_size=VS, n_coils=6, snr=200, oversample=1, seed=2)


def test_pipeline_kspace_to_chi_with_geometry(gre_file, tmp_path):
    """kspace_read -> coil_combine -> unwrap -> mask -> echo_combine -> background -> inversion, with
    the file's affine on every NIfTI output and chi close to the truth."""
    import nibabel as nib

    from qsmkit import metrics as qm
    from qsmkit.pipeline import run_plan

    stages = _stages() + [{"stage": "unwrap", "method": "romeo"}, {"stage": "mask", "method": "phase_quality"},
                          {"stage": "echo_combine", "method": "nonlinear_fit"}, {"stage": "background", "method": "pdf"},
                          {"stage": "inversion", "method": "tkd"}]
    spec = {"name": "t", "inputs": {"kspace": str(gre_file["kspace"]), "format": "gre"}, "stages": stages, "qc": False}
    plan, reg = _plan(spec, tmp_path / "out")
    res = run_plan(plan, reg, log=lambda m: None)
    names = {Path(f).name for f in res.files}
    assert {"magnitude.nii.gz", "phase.nii.gz", "chi.nii.gz", "total_field.nii.gz"} <= names
    truth_img = nib.load(str(gre_file["chi"]))
    for n in ("phase.nii.gz", "chi.nii.gz"):
        img = nib.load(str(tmp_path / "out" / n))
        np.testing.assert_allclose(img.affine, truth_img.affine, atol=1e-5)
    assert nib.load(str(tmp_path / "out" / "phase.nii.gz")).shape == SHAPE + (5,)
    chi = res.artifacts["chi"].data
    region = (np.asarray(truth_img.dataobj) != 0) & (res.artifacts["mask"].data > 0)
    tf_truth = np.asarray(nib.load(str(gre_file["total_field"])).dataobj)
    assert qm.nrmse(tf_truth - tf_truth[region].mean(),
                    res.artifacts["total_field"].data - res.artifacts["total_field"].data[region].mean(), region) < 15
    assert qm.evaluate(np.asarray(truth_img.dataobj), chi, region)["pearson"] > 0.5


def test_undersample_stage_and_aspire_refusal(gre_file, tmp_path):
    from qsmkit.pipeline import run_plan

    und = [{"stage": "undersample", "method": "gre", "params": {"pattern": "uniform", "acceleration": 2,
                                                                  "calib": [8, 8]}}]
    spec = {"name": "u", "inputs": {"kspace": str(gre_file["kspace"])}, "stages": _stages(und), "qc": False}
    plan, reg = _plan(spec, tmp_path / "o1")
    res = run_plan(plan, reg, write=False, log=lambda m: None)
    assert res.artifacts["sampling_mask"].shape == SHAPE[1:]
    assert res.artifacts["phase"].data.shape == SHAPE + (5,)
    spec["stages"] = [_stages(und)[0], und[0], {"stage": "coil_combine", "method": "aspire"}]
    plan, reg = _plan(spec, tmp_path / "o2")
    with pytest.raises(ParameterError) as e:
        run_plan(plan, reg, write=False, log=lambda m: None)
    assert "fully sampled" in one_line(e.value)


def test_validation_errors(gre_file, tmp_path):
    base = {"name": "v", "stages": _stages()}
    with pytest.raises(ConfigError) as e:
        _plan({**base, "inputs": {"kspace": str(gre_file["kspace"]), "format": "fastmri"}}, tmp_path / "a")
    assert "format" in one_line(e.value)
    with pytest.raises(ConfigError) as e:
        _plan({**base, "inputs": {"kspace": str(gre_file["kspace"]), "echo_times": [0.005, 0.01, 0.015, 0.02, 0.025]}},
              tmp_path / "b")
    assert "disagree" in one_line(e.value)
    with pytest.raises(InputDataError):  # a fastMRI-style file is not a qsmkit-gre file
        bad = tmp_path / "x.h5"
        with h5py.File(bad, "w") as f:
            f.create_dataset("kspace", data=np.ones((2, 4, 16, 16), np.complex64))
        _plan({**base, "inputs": {"kspace": str(bad)}}, tmp_path / "c")


def test_combine_needs_gre_kspace():
    from qsmkit.kspace import KSpaceData
    from qsmkit.stage import StageContext

    from qsmkit_kspace.stages_gre import GreSense

    ctx = StageContext({"kspace": KSpaceData(np.zeros((1, 2, 8, 8), np.complex64))}, "coil_combine/sense")
    with pytest.raises(MissingArtifactError) as e:
        GreSense().run(ctx, GreSense.validate_params({}, "t"))
    assert "kspace_read, method: gre" in one_line(e.value)


def test_gre_kspace_with_mask_checks_shape():
    kd = GreKSpace(shape=(1, 1, 8, 8, 8), echo_times=np.array([0.004]), field_strength=3.0, affine=np.eye(4),
                   data=np.ones((1, 1, 8, 8, 8), np.complex64))
    with pytest.raises(GeometryError):
        kd.with_mask(np.ones((8, 7), bool))
    m = np.zeros((8, 8), bool)
    m[::2] = True
    assert kd.with_mask(m).echo(0)[0, 0, 1].sum() == 0


def test_cli_simulate_gre_kspace(tmp_path, capsys):
    from qsmkit.cli import main

    out = tmp_path / "sim"
    code = main(["simulate-gre-kspace", str(out), "--shape", "24", "24", "20", "--voxel-size", "7", "7", "7",
                 "--coils", "4", "--echo-times", "0.005,0.01,0.015"])
    assert code == 0, capsys.readouterr().err
    kd = read_gre(out / "gre_kspace.h5")
    assert kd.shape == (3, 4, 24, 24, 20) and kd.whitener is not None
    assert (out / "chi.nii.gz").exists() and (out / "coilfree_phase.nii.gz").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    capsys.readouterr()
    code = main(["simulate-gre-kspace", str(tmp_path / "other"), "--shape", "24", "24", "20"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds files" in err and len(err.strip().splitlines()) == 1


def test_shipped_pipeline_validates(gre_file, tmp_path):
    from qsmkit.pipeline import load_plan
    from qsmkit.plugins import load_registry

    path = Path(__file__).resolve().parents[2] / "pipelines" / "gre_kspace_to_qsm.yaml"
    plan = load_plan(path, load_registry(), overrides=[f"inputs.kspace={gre_file['kspace']}"],
                     output_dir=tmp_path / "out")
    assert [s.kind for s in plan.steps if s.run] == ["kspace_read", "coil_combine", "unwrap", "mask", "echo_combine",
                                                      "background", "inversion", "reference"]
