import nibabel as nib
import numpy as np
import pytest

from qsmkit.errors import InputDataError
from qsmkit.io import load_nifti, save_nifti
from helpers import oblique_affine, write_nifti


@pytest.mark.parametrize("shape", [(10, 12, 6), (10, 12, 6, 3)])
@pytest.mark.parametrize("codes", [(1, 1), (2, 1), (4, 0)])
def test_output_keeps_geometry_bit_for_bit(tmp_path, shape, codes):
    a = oblique_affine((0.6, 0.6, 2.0), 20.0, "x")
    src = write_nifti(tmp_path / "in.nii.gz", np.random.default_rng(0).integers(0, 100, shape).astype(np.int16), a, *codes)
    vol = load_nifti(src, "phase")
    assert np.allclose(vol.voxel_size, (0.6, 0.6, 2.0), atol=1e-6)
    out = save_nifti(vol.like(vol.data[..., 0] if vol.data.ndim == 4 else vol.data, units="ppm"), tmp_path / "out.nii.gz")
    i, o = nib.load(str(src)), nib.load(str(out))
    assert np.array_equal(i.affine, o.affine)
    for key in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z"):
        assert np.array_equal(i.header[key], o.header[key]), key
    assert np.array_equal(i.header["pixdim"][1:4], o.header["pixdim"][1:4])
    assert o.shape == shape[:3] and o.get_data_dtype() == np.float32


def test_4d_output_and_mask_dtype(tmp_path):
    a = oblique_affine()
    vol = load_nifti(write_nifti(tmp_path / "m.nii", np.ones((4, 5, 6, 2), np.float32), a), "magnitude")
    save_nifti(vol, tmp_path / "o4.nii.gz")
    assert nib.load(str(tmp_path / "o4.nii.gz")).shape == (4, 5, 6, 2)
    save_nifti(vol.like(vol.data[..., 0] > 0), tmp_path / "mask.nii.gz")
    m = nib.load(str(tmp_path / "mask.nii.gz"))
    assert m.get_data_dtype() == np.uint8 and np.array_equal(m.affine, vol.affine)


def test_b0_direction_of_loaded_volume(tmp_path):
    a = oblique_affine((0.6, 0.6, 2.0), 20.0, "x")
    vol = load_nifti(write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.float32), a), "x")
    rot = vol.affine[:3, :3] / np.asarray(vol.voxel_size)
    assert np.allclose(vol.b0_direction, rot.T @ [0, 0, 1], atol=1e-6)


def test_failed_write_leaves_nothing(tmp_path):
    vol = load_nifti(write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.float32)), "x")
    with pytest.raises(ValueError):
        save_nifti(vol.like(np.zeros((4, 4, 4), np.complex64)), tmp_path / "bad.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_bad_files(tmp_path):
    with pytest.raises(InputDataError, match="file not found"):
        load_nifti(tmp_path / "nope.nii.gz", "phase")
    (tmp_path / "t.nii.gz").write_text("not an image")
    with pytest.raises(InputDataError, match="not a readable NIfTI"):
        load_nifti(tmp_path / "t.nii.gz", "phase")
    d = np.zeros((4, 4, 4), np.float32)
    d[1, 1, 1] = np.nan
    with pytest.raises(InputDataError, match="1 NaN/inf"):
        load_nifti(write_nifti(tmp_path / "n.nii.gz", d), "phase")
