"""``qsmkit kspace prepare``: the 320 x 320 image-space-crop recipe on tiny fastMRI / skm-tea-layout files."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_cli

pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from qsmkit.errors import InputDataError, ParameterError  # noqa: E402
from qsmkit.kspace import center_crop, rss  # noqa: E402

from qsmkit_kspace.prepare import detect_layout, prepare_file, prepare_slice  # noqa: E402
from qsmkit_kspace.simulate import ismrmrd_header_xml, simulate_multicoil  # noqa: E402
from qsmkit_kspace.transforms import fft2c_np, ifft2c_np  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_COILS = 4


def _fastmri_file(path, width: int, n_slices: int = 1, height: int = 640, seed: int = 0):
    """A fastMRI multi-coil layout file: 2x oversampled readout, ``width`` phase columns, 320x320 reference."""
    sim = simulate_multicoil((n_slices, height, width), N_COILS, extent=(2.0, width / 320, 0.5), noise=0.001,
                             seed=seed)
    k = sim["kspace"]
    ref = center_crop(rss(ifft2c_np(k), dim=1), (320, 320)).astype(np.float32)
    hdr = ismrmrd_header_xml((height, width, 1), (320, 320, 1), (height * 0.5, width * 0.5, 3.0),
                             (160.0, 160.0, 3.0), width // 2, width - 1)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k)
        f.create_dataset("reconstruction_rss", data=ref)
        f.create_dataset("ismrmrd_header", data=np.bytes_(hdr.encode()))
        f.attrs["acquisition"] = "AXT2"
    return path, k, ref


@pytest.fixture(scope="module")
def fm368(tmp_path_factory):
    return _fastmri_file(tmp_path_factory.mktemp("prep") / "file_brain_368.h5", 368, n_slices=2)


def test_resynthesised_kspace_rss_equals_image_space_crop(fm368, tmp_path):
    path, k, ref = fm368
    res = prepare_file(path, tmp_path, crop=(320, 320), calib=(24, 24), write_npy=False)
    with h5py.File(tmp_path / "file_brain_368_prepared.h5") as f:
        ks, scale, target = f["kspace"][()], f["scale"][()], f["target"][()]
        assert f.attrs["axes"] == "(coil, H, W)" and ks.shape == (2, N_COILS, 320, 320)
        assert f["maps"].shape == (2, N_COILS, 320, 320) and f["mask"].shape == (320, 320)
        reference = f["reference"][()]
    zf = rss(ifft2c_np(ks), dim=1) * scale[:, None, None]
    err = np.linalg.norm(zf - ref) / np.linalg.norm(ref)
    print(f"re-synthesised 320x320 RSS vs image-space crop: relative error {err:.2e}")
    assert err < 0.01
    np.testing.assert_allclose(reference * scale[:, None, None], ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(target.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert res["layout"] == "fastmri" and len(res["scale"]) == 2


def test_kspace_crop_does_not_reproduce_the_reference(fm368):
    """The contrast the recipe documents: cropping k-space to 320x320 keeps only low frequencies
    (and with the 2x oversampled readout a halved field of view), nothing like the reference."""
    _, k, ref = fm368
    k_crop = center_crop(k, (320, 320))
    zf = rss(ifft2c_np(k_crop), dim=1)
    zf *= np.linalg.norm(ref) / np.linalg.norm(zf)   # even with the best scale
    err = np.linalg.norm(zf - ref) / np.linalg.norm(ref)
    print(f"k-space crop vs image-space crop: relative error {err:.2f}")
    assert err > 0.2


def test_normalisation_by_the_combined_max_keeps_relative_coil_intensities(fm368):
    _, k, _ = fm368
    r = prepare_slice(k[0], (320, 320), (24, 24))
    raw = fft2c_np(center_crop(ifft2c_np(k[0]), (320, 320)))
    e_raw = np.linalg.norm(raw.reshape(N_COILS, -1), axis=1)
    e_new = np.linalg.norm(r["kspace"].reshape(N_COILS, -1), axis=1)
    np.testing.assert_allclose(e_new / e_new.max(), e_raw / e_raw.max(), rtol=1e-5)   # same ratios
    assert e_raw.max() / e_raw.min() > 1.5           # the coils really differ
    np.testing.assert_allclose(e_new * r["scale"], e_raw, rtol=1e-5)                   # one factor for all
    assert float(rss(ifft2c_np(r["kspace"]), dim=0).max()) == pytest.approx(1.0, rel=1e-5)
    # maps: unit norm over coils inside the object
    norms = np.sqrt(np.sum(np.abs(r["maps"]) ** 2, axis=0))
    assert np.median(norms[r["target"] > 0.2]) == pytest.approx(1.0, abs=1e-3)
    # the "maps" re-synthesis explains nearly all of the data
    rm = prepare_slice(k[0], (320, 320), (24, 24), resynthesis="maps")
    assert np.linalg.norm(rm["target"] - r["target"]) / np.linalg.norm(r["target"]) < 0.05


@pytest.mark.parametrize("width", [368, 372])
def test_widths_368_and_372_and_npy_layout(width, tmp_path):
    path, k, ref = _fastmri_file(tmp_path / f"w{width}.h5", width, seed=width)
    out = tmp_path / "out"
    code = run_cli(["kspace", "prepare", path, "--out", out, "--no-h5"])
    assert code == 0
    ks = np.load(out / f"w{width}_000_kspace.npy")
    assert ks.shape == (N_COILS, 320, 320) and ks.dtype == np.complex64
    assert np.load(out / f"w{width}_000_maps.npy").shape == (N_COILS, 320, 320)
    m = np.load(out / f"w{width}_000_mask.npy")
    assert m.shape == (320, 320) and 0.2 < m.mean() < 0.35        # 4x random columns
    zf = rss(ifft2c_np(ks), dim=0)
    zf *= ref[0].max() / zf.max()
    assert np.linalg.norm(zf - ref[0]) / np.linalg.norm(ref[0]) < 0.01
    assert not list(out.glob(".*"))   # no temporary files left


def test_skmtea_layout_axes(tmp_path):
    X, Y, Z = 2, 64, 48
    sim = simulate_multicoil((X, Y, Z), N_COILS, extent=(1.2, 1.2, 0.5), noise=0.001, seed=3)
    k = np.transpose(sim["kspace"], (0, 2, 3, 1))[:, :, :, None, :]           # (x, ky, kz, echo, coil)
    path = tmp_path / "skm.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k.astype(np.complex64))
        f.create_dataset("maps", data=np.transpose(sim["sens"], (0, 2, 3, 1))[..., None].astype(np.complex64))
    assert detect_layout(path) == "skmtea"
    res = prepare_file(path, tmp_path / "o", crop=(48, 40), calib=(16, 16), slices="0:2", acceleration=3)
    assert res["axes"] == "(H, W, coil)"
    ks = np.load(tmp_path / "o" / "skm_001_kspace.npy")
    assert ks.shape == (48, 40, N_COILS)
    ref = center_crop(rss(ifft2c_np(sim["kspace"][1]), dim=0), (48, 40))
    zf = rss(ifft2c_np(np.moveaxis(ks, -1, 0)), dim=0) * res["scale"][1]
    assert np.linalg.norm(zf - ref) / np.linalg.norm(ref) < 0.01
    with h5py.File(tmp_path / "o" / "skm_prepared.h5") as f:
        assert f["kspace"].shape == (2, 48, 40, N_COILS) and f.attrs["layout"] == "skmtea"
        assert 2.0 < f["mask"].size / f["mask"][()].sum() < 4.5      # Poisson disc


def test_bad_input_one_line_errors(fm368, tmp_path, capsys):
    path = fm368[0]
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("data", data=np.zeros((3, 4), np.float32))
    with pytest.raises(InputDataError, match="neither a fastMRI multi-coil file"):
        detect_layout(foreign)
    with pytest.raises(ParameterError, match="crop 700x320 is larger than the 640x368 image"):
        prepare_file(path, tmp_path / "a", crop=(700, 320))
    # calibration region larger than the fully sampled centre of undersampled data
    under = tmp_path / "under.h5"
    with h5py.File(path) as src, h5py.File(under, "w") as f:
        k = src["kspace"][()]
        cols = np.zeros(k.shape[-1], bool)
        cols[::4] = True
        cols[k.shape[-1] // 2 - 5:k.shape[-1] // 2 + 5] = True           # 10 central columns
        f.create_dataset("kspace", data=k * cols)
    with pytest.raises(InputDataError, match=r"calibration region 24x24 is larger than the fully sampled k-space centre"):
        prepare_file(under, tmp_path / "b")
    for args, needle in [([foreign], "neither a fastMRI"), ([path, "--crop", "700", "320"], "is larger than the"),
                         ([under], "larger than the fully sampled")]:
        code, _, err = run_cli(["kspace", "prepare", *args, "--out", tmp_path / "c"], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
