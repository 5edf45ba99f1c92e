"""k-space readers: fastMRI / skm-tea layouts, header-derived sizes, lazy reading, bad input."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import run_stage

h5py = pytest.importorskip("h5py")

from qsmkit.errors import ConfigError, GeometryError, InputDataError, ParameterError, QsmkitError  # noqa: E402

import qsmkit_kspace as K  # noqa: E402
from qsmkit_kspace.fastmri import FastMRIFile, parse_ismrmrd_header, read_fastmri  # noqa: E402
from qsmkit_kspace.simulate import ismrmrd_header_xml, simulate_kspace_files  # noqa: E402
from qsmkit_kspace.skmtea import SkmTeaFile, read_skmtea  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kspace_files")
    return simulate_kspace_files(d, matrix=(32, 40), n_slices=3, n_coils=4, skmtea_shape=(4, 32, 24),
                                 accelerations=(4.0, 6.0), noise=0.001, seed=3)


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s and s
    return s


# ---------------------------------------------------------------------------------------- header
# A knee-like header written by hand. fastMRI's SliceDataset._retrieve_metadata derives
#   padding_left  = enc_y // 2 - center          = 368 // 2 - 183 = 1
#   padding_right = padding_left + (maximum + 1) = 1 + 367       = 368
KNEE_XML = ismrmrd_header_xml(enc_size=(640, 368, 1), recon_size=(320, 320, 1), enc_fov=(280.0, 161.0, 4.5),
                              recon_fov=(140.0, 140.0, 3.0), center=183, maximum=366)


def test_parse_ismrmrd_header_hand_checked():
    h = parse_ismrmrd_header(KNEE_XML.encode())
    assert h["encoding_size"] == (640, 368, 1)
    assert h["recon_size"] == (320, 320, 1)
    assert h["enc_limits_center"] == 183
    assert h["enc_limits_max"] == 367
    assert (h["padding_left"], h["padding_right"]) == (1, 368)
    assert h["encoded_fov_mm"] == (280.0, 161.0, 4.5)
    assert h["recon_fov_mm"] == (140.0, 140.0, 3.0)


def test_parse_header_errors_are_one_line():
    with pytest.raises(InputDataError) as e:
        parse_ismrmrd_header(b"<ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'><encoding/></ismrmrdHeader>")
    assert "encodedSpace" in one_line(e.value)
    with pytest.raises(InputDataError) as e:
        parse_ismrmrd_header(b"<not xml")
    one_line(e.value)


def _load_fastmri_module(rel: str, stubs: dict[str, types.ModuleType], monkeypatch):
    spec = importlib.util.find_spec("fastmri")
    if spec is None or spec.origin is None:
        pytest.skip("fastmri is not installed (pip install --no-deps fastmri)")
    for name, mod in stubs.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, mod)
    path = Path(spec.origin).parent / rel
    s = importlib.util.spec_from_file_location(f"_fastmri_ref_{path.stem}", path)
    mod = importlib.util.module_from_spec(s)
    try:
        s.loader.exec_module(mod)
    except Exception as e:  # pragma: no cover - depends on the installed fastmri
        pytest.skip(f"cannot load fastmri's {rel}: {e}")
    return mod


def test_header_matches_fastmri_slice_dataset(tmp_path, monkeypatch):
    """If fastmri is installed, its own _retrieve_metadata gives the same sizes and padding."""
    f = tmp_path / "knee.h5"
    with h5py.File(f, "w") as h:
        h["kspace"] = np.zeros((2, 3, 640, 368), np.complex64)
        h["ismrmrd_header"] = np.bytes_(KNEE_XML.encode())
        h.attrs["acquisition"] = "CORPD_FBK"
    pytest.importorskip("torch")  # imported for real before any stub is in place

    def _any_attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object

    stubs = {n: types.ModuleType(n) for n in ("pandas", "requests", "tqdm")}
    for m in stubs.values():  # fastmri only looks these up at import time
        m.__getattr__ = _any_attr
    mri_data = _load_fastmri_module("data/mri_data.py", stubs, monkeypatch)
    meta, n = mri_data.SliceDataset._retrieve_metadata(None, f)
    with FastMRIFile(f) as fm:
        h = fm.header
        assert n == fm.n_slices == 2
    for key in ("padding_left", "padding_right", "encoding_size", "recon_size"):
        assert tuple(np.atleast_1d(meta[key])) == tuple(np.atleast_1d(h[key])), key


# --------------------------------------------------------------------------------------- fastMRI
def test_fastmri_roundtrip_and_sizes(files):
    kd, mask, target = read_fastmri(files["fastmri"], slices=[0, 2])
    with h5py.File(files["fastmri"], "r") as f:
        k = f["kspace"][()]
        ref = f["reconstruction_rss"][()]
        hdr = parse_ismrmrd_header(f["ismrmrd_header"][()])
    assert kd.data.dtype == np.complex64 and kd.data.shape == (2, 4, 64, 46)
    np.testing.assert_array_equal(kd.data, k[[0, 2]])
    np.testing.assert_array_equal(target, ref[[0, 2]])
    assert mask is None
    assert kd.slice_indices == (0, 2)
    # simulated header: 2x oversampled readout 64, W = 40 + 40 // 8 = 45 -> 46 columns, the outer 2 (left)
    # and 1 (right) not acquired: center = 46 // 2 - 2 = 21, maximum = 46 - 1 - 2 - 1 = 42
    assert hdr["encoding_size"] == (64, 46, 1) and hdr["recon_size"] == (32, 40, 1)
    assert (hdr["padding_left"], hdr["padding_right"]) == (2, 45)  # 23 - 21, 2 + 43
    assert kd.padding == (2, 45)
    assert kd.crop_size == (32, 40)
    assert kd.voxel_size == pytest.approx((0.5, 0.5, 3.0))  # FOV / matrix in mm
    assert kd.header["attrs"]["acquisition"] == "CORPD_FBK"
    assert kd.header["attrs"]["max"] == pytest.approx(float(ref.max()))
    # padding columns hold no data
    assert not kd.data[..., :2].any() and not kd.data[..., 45:].any()


def test_fastmri_reader_stage(files):
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "format": "fastmri", "slices": "1:3"})
    kd = art["kspace"]
    assert kd.slice_indices == (1, 2)
    t = art["target"]
    assert t.shape == (32, 40, 2)  # (x, y, slice)
    assert t.voxel_size == pytest.approx((0.5, 0.5, 3.0))
    assert "sampling_mask" not in art
    with pytest.raises(ConfigError) as e:
        run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "format": "skmtea"})
    one_line(e.value)


def test_fastmri_test_file_mask(files):
    kd, mask, target = read_fastmri(files["fastmri_test"])
    assert target is None
    assert mask.dtype == bool and mask.shape == (46,)
    assert not mask[:2].any() and not mask[45:].any()
    np.testing.assert_array_equal(kd.data[..., ~mask], 0)
    attrs = kd.header["attrs"]
    assert attrs["acceleration"] == 4 and attrs["num_low_frequencies"] == round(46 * 0.08)
    assert kd.crop_size == (32, 40)  # from the header's recon matrix
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri_test"]})
    assert art["sampling_mask"].shape == (1, 46)
    art = run_stage(K.FileUndersample, art)
    np.testing.assert_array_equal(art["sampling_mask"][0], mask)


def test_fastmri_singlecoil(files):
    kd, mask, target = read_fastmri(files["fastmri_singlecoil"])
    assert kd.data.shape == (3, 1, 64, 46)
    assert kd.header["multicoil"] is False
    with h5py.File(files["fastmri_singlecoil"], "r") as f:
        np.testing.assert_array_equal(target, f["reconstruction_esc"][()])
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri_singlecoil"]})
    out = run_stage(K.ZeroFilled, art)
    assert out["metrics"]["nmse"] < 1e-10  # zero-filled of full data is the reference


# ---------------------------------------------------------------------------------------- skm-tea
def test_skmtea_roundtrip(files):
    kd, maps, target = read_skmtea(files["skmtea"], slices=[1, 3], echo=1)
    with h5py.File(files["skmtea"], "r") as f:
        k = f["kspace"][()]
        mp = f["maps"][()]
        tg = f["target"][()]
        m6 = f["masks/poisson_6.0x"][()]
    assert kd.layout == "skmtea" and kd.data.shape == (2, 4, 32, 24)
    np.testing.assert_array_equal(kd.data, np.moveaxis(k[[1, 3], :, :, 1, :], -1, 1))
    assert maps.shape == (2, 1, 4, 32, 24)
    np.testing.assert_array_equal(maps, np.transpose(mp[[1, 3]], (0, 4, 3, 1, 2)))
    np.testing.assert_allclose(target, np.abs(tg[[1, 3], :, :, 1, 0]), rtol=1e-6)
    assert kd.echo == 1 and kd.crop_size is None
    with SkmTeaFile(files["skmtea"]) as sf:
        assert sf.mask_keys() == ["poisson_4.0x", "poisson_6.0x"]
        m = sf.read_mask(6)
    # stored at the acquired matrix (28 x 18), zero-padded in the centre to the 32 x 24 grid
    assert m6.shape == (28, 18) and m.shape == (32, 24)
    np.testing.assert_array_equal(m[2:30, 3:21], m6 != 0)
    assert not m[:2].any() and not m[:, :3].any()


def test_skmtea_stage_volume_axes(files):
    art = run_stage(K.SkmTeaRead, {"kspace": files["skmtea"], "echo": 0}, {"slices": [0, 1, 2]})
    assert art["maps"].shape == (3, 1, 4, 32, 24)
    t = art["target"]
    assert t.shape == (3, 32, 24)  # (x, y, z): x = the readout slices
    assert t.voxel_size == pytest.approx((0.3125, 0.3125, 0.8))
    art = run_stage(K.FileUndersample, art, {"acceleration": 4})
    assert art["sampling_mask"].shape == (32, 24)
    with pytest.raises(ParameterError):
        run_stage(K.SkmTeaRead, {"kspace": files["skmtea"]}, {"echo": 5})
    with pytest.raises(InputDataError) as e:
        run_stage(K.FileUndersample, art, {"acceleration": 12})
    assert "poisson_4.0x" in one_line(e.value)


def test_wrong_reader_for_layout(files):
    with pytest.raises(InputDataError) as e:
        read_fastmri(files["skmtea"])
    assert "skmtea" in one_line(e.value)
    with pytest.raises(InputDataError) as e:
        read_skmtea(files["fastmri"])
    assert "fastmri" in one_line(e.value)


# ------------------------------------------------------------------------------------ lazy reading
def test_lazy_per_slice_reading(tmp_path):
    """Reading one slice touches only its chunk: a corrupt later slice does not stop it."""
    f = tmp_path / "lazy.h5"
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((3, 2, 16, 12)) + 1j * rng.standard_normal((3, 2, 16, 12))).astype(np.complex64)
    with h5py.File(f, "w") as h:
        h.create_dataset("kspace", data=k, chunks=(1, 2, 16, 12), compression="gzip")
        h["ismrmrd_header"] = np.bytes_(ismrmrd_header_xml((16, 12, 1), (8, 12, 1), (8.0, 6.0, 3.0),
                                                           (4.0, 6.0, 3.0), 6, 11).encode())
        info = h["kspace"].id.get_chunk_info(2)
    raw = bytearray(f.read_bytes())
    start = info.byte_offset + 10
    raw[start:start + 64] = b"\xff" * 64  # destroy the compressed stream of slice 2
    f.write_bytes(bytes(raw))
    kd, _, _ = read_fastmri(f, slices=[0, 1])
    np.testing.assert_array_equal(kd.data, k[:2])
    with pytest.raises(InputDataError) as e:
        read_fastmri(f, slices=[2])
    assert "slice 2" in one_line(e.value)


# ----------------------------------------------------------------------------------------- bad input
def test_truncated_file(files, tmp_path):
    bad = tmp_path / "truncated.h5"
    data = Path(files["fastmri"]).read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputDataError) as e:
        run_stage(K.FastMRIRead, {"kspace": bad})
    assert "truncated" in one_line(e.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(InputDataError):
        read_fastmri(junk)
    with pytest.raises(InputDataError) as e:
        read_fastmri(tmp_path / "missing.h5")
    assert "does not exist" in one_line(e.value)


def test_missing_dataset(tmp_path):
    f = tmp_path / "nokspace.h5"
    with h5py.File(f, "w") as h:
        h["reconstruction_rss"] = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(InputDataError) as e:
        read_fastmri(f)
    assert "'kspace'" in one_line(e.value)
    with pytest.raises(InputDataError):
        read_skmtea(f)


def test_coils_last_layout(tmp_path):
    f = tmp_path / "coils_last.h5"
    with h5py.File(f, "w") as h:
        h["kspace"] = np.zeros((2, 640, 368, 15), np.complex64)
        h["ismrmrd_header"] = np.bytes_(KNEE_XML.encode())
    with pytest.raises(InputDataError) as e:
        read_fastmri(f)
    assert "coils" in one_line(e.value)
    g = tmp_path / "coils_last_nohdr.h5"
    with h5py.File(g, "w") as h:
        h["kspace"] = np.zeros((1, 128, 96, 8), np.complex64)
    with pytest.raises(InputDataError):
        read_fastmri(g)


def test_mask_shape_mismatch(tmp_path, files):
    f = tmp_path / "badmask.h5"
    with h5py.File(f, "w") as h:
        h["kspace"] = np.zeros((1, 2, 16, 12), np.complex64)
        h["mask"] = np.ones(10, bool)
    with pytest.raises(InputDataError) as e:
        read_fastmri(f)
    assert "mask" in one_line(e.value)
    art = run_stage(K.FastMRIRead, {"kspace": files["fastmri"]}, {"slices": [0]})
    art["sampling_mask"] = np.ones((1, 40), bool)
    with pytest.raises(GeometryError) as e:
        run_stage(K.Sense, art)
    assert "46" in one_line(e.value)


def test_acceleration_below_one(files):
    with pytest.raises(ParameterError) as e:
        K.RandomUndersample.validate_params({"accelerations": [0.5]}, where="stages.1")
    one_line(e.value)
    with pytest.raises(ParameterError):
        K.PoissonUndersample.validate_params({"acceleration": 0.9}, where="stages.1")
    from qsmkit_kspace.masks import poisson_disc_mask, random_mask

    with pytest.raises(ParameterError) as e:
        random_mask(64, [0.08], [0.5], seed=0)
    assert ">= 1" in one_line(e.value)
    with pytest.raises(ParameterError):
        poisson_disc_mask((32, 32), 0.5)


def test_slices_selection_errors(files):
    with pytest.raises(ConfigError) as e:
        run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "slices": [7]})
    assert "outside" in one_line(e.value)
    with pytest.raises(ConfigError):
        run_stage(K.FastMRIRead, {"kspace": files["fastmri"], "slices": "a:b"})


def test_all_errors_are_qsmkit_errors(tmp_path):
    f = tmp_path / "real.h5"
    with h5py.File(f, "w") as h:
        h["kspace"] = np.zeros((1, 2, 16, 12), np.float32)
    with pytest.raises(QsmkitError):
        read_fastmri(f)
