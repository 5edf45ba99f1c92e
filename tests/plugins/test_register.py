"""Tests of the ``register/simpleitk`` plugin: rigid registration, resampling, B0 composition, errors.

Truths used: (1) the simulator's head rotations (issue 5 acceptance 1: five orientations rotated
by 10-25 deg about two axes, every rotation recovered within 0.5 deg and 0.5 mm); (2) analytic
B0 directions for an oblique reference acquisition with anisotropic voxels (acceptance 3);
(3) an analytic structured "head" sampled exactly on any grid, so resampled fields can be
compared with the analytic values.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from qsmkit import Volume
from qsmkit.errors import InputDataError, ParameterError, StageError
from qsmkit.physics import b0_direction_from_affine
from qsmkit.stage import StageContext

sitk = pytest.importorskip("SimpleITK")

from qsmkit_register import SimpleITKRegister  # noqa: E402
from qsmkit_register.rigid import (b0_in_reference_frame, euler_matrix, fov_fraction,  # noqa: E402
                                   resample_to_reference, rigid_register, rotation_angle_deg)

ROTATIONS = [(0, 0, 0), (15, 0, 0), (0, 20, 0), (-10, 12, 0), (25, 0, 0)]


# --------------------------------------------------------------------------- analytic head
def _rot(axis: str, deg: float) -> np.ndarray:
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array({"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
                     "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis], dtype=float)


def _head(p: np.ndarray) -> np.ndarray:
    """Structured, asymmetric object (a.u.) at head-frame points ``p`` (..., 3) in mm."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]

    def ell(c, r, w=1.0):
        d = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
        return 1.0 / (1.0 + np.exp((d - 1.0) * r[0] / w))

    v = ell((0, 0, 0), (44, 54, 34)) - 0.4 * ell((0, 2, 2), (40, 50, 30))
    v += 0.5 * ell((12, 10, 5), (8, 12, 6)) + 0.3 * ell((-15, -12, -8), (10, 6, 9))
    v += 0.6 * ell((5, -25, 12), (6, 6, 6)) + 0.4 * ell((-10, 22, -15), (9, 5, 7))
    v += 0.25 * ell((0, 0, -20), (20, 25, 8)) + 0.5 * ell((-20, 5, 10), (5, 15, 5))
    v += 0.35 * ell((20, -5, -5), (6, 4, 14)) + 0.45 * ell((0, 35, 0), (15, 4, 4))
    return v.astype(np.float32)


def _field(p: np.ndarray) -> np.ndarray:
    """Smooth analytic 'local field' (ppm) at head-frame points."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return (0.05 * np.sin(x / 12.0) * np.cos(y / 17.0) + 0.03 * np.sin(z / 9.0 + 0.3)).astype(np.float32)


def _points(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _affine(shape, voxel_size, rot=np.eye(3), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(voxel_size)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def _acquire(shape, affine, q=np.eye(3), t=np.zeros(3), source=None):
    """Orientation dict of the head moved by ``y = q x + t`` (world), sampled on ``affine``."""
    head_pts = (_points(shape, affine) - t) @ q  # q.T @ (y - t)
    mag = _head(head_pts)
    mask = mag > 0.5
    fld = np.where(mask, _field(head_pts), 0).astype(np.float32)
    meta = {"source": source} if source else {}
    vol = functools.partial(Volume, affine=affine, meta=meta)
    return {"magnitude": vol(mag[..., None], units="a.u."), "mask": vol(mask, units="bool"),
            "local_field": vol(fld, units="ppm"), "noise_weight": vol(np.where(mask, 10.0, 0).astype(np.float32)),
            "echo_times": np.array([0.004, 0.008]), "field_strength": 3.0}


def _run(orients, **params):
    p = SimpleITKRegister.validate_params(params, where="stages.4")
    return SimpleITKRegister().run(StageContext({"orientations": orients}, stage_label="register/simpleitk",
                                                log=lambda m: None), p)


# --------------------------------------------------------------------------- pure functions
def test_b0_composition_analytic_oblique_anisotropic():
    """Reference tilted by a about x with 0.8 x 1.0 x 2.5 mm voxels; head rotated by b about y."""
    a, b = 20.0, 15.0
    ref_aff = _affine((40, 50, 20), (0.8, 1.0, 2.5), _rot("x", a), centre=(3.0, -7.0, 11.0))
    m = np.eye(4)
    m[:3, :3] = _rot("y", b)
    m[:3, 3] = (2.0, -1.0, 4.0)
    got = b0_in_reference_frame(ref_aff, m)
    ra, rb = np.radians(a), np.radians(b)
    expected = np.array([-np.sin(rb), np.sin(ra) * np.cos(rb), np.cos(ra) * np.cos(rb)])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # no head rotation: the reference's own B0 (physics convention), not inv(A) @ z
    np.testing.assert_allclose(b0_in_reference_frame(ref_aff, np.eye(4)), b0_direction_from_affine(ref_aff),
                               atol=1e-12)
    naive = np.linalg.inv(ref_aff[:3, :3]) @ [0, 0, 1.0]
    assert np.degrees(np.arccos(abs(naive @ b0_direction_from_affine(ref_aff)) / np.linalg.norm(naive))) > 1.0


def test_euler_convention_matches_simpleitk():
    t = sitk.Euler3DTransform()
    t.SetRotation(0.1, -0.2, 0.3)
    np.testing.assert_allclose(np.reshape(t.GetMatrix(), (3, 3)), euler_matrix((0.1, -0.2, 0.3)), atol=1e-12)
    assert rotation_angle_deg(_rot("y", 17.0)) == pytest.approx(17.0)


def test_fov_fraction_analytic():
    shape = (20, 20, 20)
    aff = _affine(shape, (2.0, 2.0, 2.0))
    mask = np.ones(shape, bool)
    assert fov_fraction(mask, aff, shape, aff, np.eye(4)) == 1.0
    shift = np.eye(4)
    shift[0, 3] = 20.0  # half the 40 mm FOV: half of the moving voxels land outside the reference
    assert fov_fraction(mask, aff, shape, aff, shift) == pytest.approx(0.5, abs=0.03)


def test_resample_identity_and_translation():
    shape = (24, 20, 16)
    aff = _affine(shape, (2.0, 2.0, 2.0))
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_allclose(resample_to_reference(data, aff, shape, aff, np.eye(4)), data, atol=1e-6)
    m = np.eye(4)
    m[1, 3] = 4.0  # reference point x maps to moving point x + 4 mm along y = 2 voxels
    out = resample_to_reference(data, aff, shape, aff, m, "nearest")
    np.testing.assert_allclose(out[:, :-2], data[:, 2:], atol=1e-6)


# --------------------------------------------------------------------------- acceptance 3 (stage)
def test_stage_oblique_reference_anisotropic_b0_and_fields():
    """Oblique reference with 2 x 2 x 3 mm voxels, axial 2 mm moving scan of the rotated head."""
    a, b = 20.0, 15.0
    q, t = _rot("y", b), np.array([3.0, -2.0, 4.0])
    ref_aff = _affine((64, 72, 40), (2.0, 2.0, 3.0), _rot("x", a), centre=(1.0, 2.0, -1.0))
    mov_aff = _affine((64, 72, 56), (2.0, 2.0, 2.0))
    orients = [_acquire((64, 72, 40), ref_aff), _acquire((64, 72, 56), mov_aff, q, t)]
    out = _run(orients)
    tr = out["transforms"][1]
    mat = np.asarray(tr["matrix"])
    assert rotation_angle_deg(mat[:3, :3] @ q.T) < 0.5
    centre = _points((64, 72, 40), ref_aff)[orients[0]["mask"].data].mean(0)
    assert np.linalg.norm(mat[:3, :3] @ centre + mat[:3, 3] - (q @ centre + t)) < 0.5
    ra, rb = np.radians(a), np.radians(b)
    expected = np.array([-np.sin(rb), np.sin(ra) * np.cos(rb), np.cos(ra) * np.cos(rb)])
    reg = out["orientations"][1]
    for key in ("local_field", "mask", "magnitude", "noise_weight"):
        assert reg[key].grid_shape == (64, 72, 40)
        np.testing.assert_allclose(reg[key].affine, ref_aff)
        assert np.degrees(np.arccos(np.clip(reg[key].b0_direction @ expected, -1, 1))) < 0.5
    np.testing.assert_allclose(out["orientations"][0]["local_field"].b0_direction, [0, np.sin(ra), np.cos(ra)],
                               atol=1e-9)
    # the resampled field equals the analytic field at the reference voxels (interior of both masks)
    from scipy import ndimage

    inner = ndimage.binary_erosion(reg["mask"].data & orients[0]["mask"].data, iterations=2)
    truth = _field(_points((64, 72, 40), ref_aff))
    err = np.linalg.norm(reg["local_field"].data[inner] - truth[inner]) / np.linalg.norm(truth[inner])
    assert err < 0.03
    m0, m1 = orients[0]["mask"].data, reg["mask"].data
    dice = 2 * np.sum(m0 & m1) / (m0.sum() + m1.sum())
    assert dice > 0.97
    assert np.all(reg["noise_weight"].data[~reg["mask"].data] == 0)


# --------------------------------------------------------------------------- acceptance 1 and 2 (simulator)
# One 5-orientation dataset serves both: 128^3 at 1 mm (a 128 mm field of view, so a scaled-down
# head sampled like a life-size one at ~1.5 mm), simulated on the 2x finer grid, noise free.
# The resolution matters for acceptance 2: the simulator's sub-voxel forward model differs from
# any single-grid dipole kernel by 8-16 % of the local field at 1 mm but 13-26 % at 2 mm, and
# that mismatch, not the inversion, bounds COSMOS (see benchmarks/bench_cosmos.py).
@functools.lru_cache(maxsize=1)
def _phantoms():
    from qsmkit.simulate import simulate_orientations

    return simulate_orientations(ROTATIONS, shape=(128, 128, 128), voxel_size=(1.0, 1.0, 1.0), seed=0)


@functools.lru_cache(maxsize=1)
def _registered():
    orients = [{"magnitude": ph.magnitude, "mask": ph.truth["mask"], "local_field": ph.truth["local_field"],
                "echo_times": ph.echo_times, "field_strength": ph.field_strength} for ph in _phantoms()]
    return _run(orients)


def test_five_orientations_rotations_recovered():
    phs = _phantoms()
    out = _registered()
    ref = phs[0]
    aff = ref.magnitude.affine
    centre = _points(ref.mask.grid_shape, aff)[ref.mask.data].mean(0)
    rot_err, trans_err = [], []
    for ph, tr in zip(phs[1:], out["transforms"][1:]):
        mat = np.asarray(tr["matrix"])
        # simulator: head point of world p is R.T (p - c): reference x <-> orientation R (x - c) + c
        c = np.asarray(ph.meta["rotation_center_mm"])
        true = np.eye(4)
        true[:3, :3] = ph.rotation
        true[:3, 3] = c - ph.rotation @ c
        rot_err.append(rotation_angle_deg(mat[:3, :3] @ ph.rotation.T))
        trans_err.append(np.linalg.norm((mat - true)[:3, :3] @ centre + (mat - true)[:3, 3]))
        assert tr["converged"] and tr["mask_dice"] > 0.95
        assert abs(tr["rotation_angle_deg"] - rotation_angle_deg(ph.rotation)) < 0.5
    # measured: rotation errors 0.007-0.031 deg, translations at the brain centre <= 0.007 mm
    assert max(rot_err) < 0.5, rot_err
    assert max(trans_err) < 0.5, trans_err
    # B0 of every orientation in the reference voxel frame = R.T @ z (axial reference)
    for ph, o in zip(phs, out["orientations"]):
        exp = ph.rotation.T @ [0.0, 0.0, 1.0]
        assert np.degrees(np.arccos(np.clip(o["local_field"].b0_direction @ exp, -1, 1))) < 0.5
    assert len(out["transforms"]) == 5 and out["transforms"][0]["reference"]


def test_cosmos_from_registered_local_fields_beats_tkd_by_factor():
    """Acceptance 2: COSMOS NRMSE <= 0.6 x single-orientation TKD on the reference orientation.

    Both start from the simulator's local fields (the field of the brain's own susceptibility,
    computed on the finer grid), COSMOS after registration and resampling, through the stages
    with their default parameters (COSMOS: CG from the closed form; TKD: threshold 0.15, corrected).
    """
    from helpers import run_stage

    from qsmkit import metrics as qm
    from qsmkit.plugins import load_registry

    ref = _phantoms()[0]
    reg = load_registry()
    cos = run_stage(reg.get("inversion", "cosmos"), {"orientations": _registered()["orientations"]})
    tkd = run_stage(reg.get("inversion", "tkd"), {"local_field": ref.truth["local_field"], "mask": ref.truth["mask"]})
    region = cos["mask"].data & ref.truth["mask"].data
    assert region.sum() > 0.95 * ref.truth["mask"].data.sum()
    e_c = qm.evaluate(ref.truth["chi"].data, cos["chi"].data, region)
    e_t = qm.evaluate(ref.truth["chi"].data, tkd["chi"].data, region)
    # measured: COSMOS 16.8 % NRMSE, HFEN 8.1 %, XSIM 0.92; TKD 34.0 %, 34.3 %, 0.71 (ratio 0.49)
    assert e_c["nrmse"] <= 0.6 * e_t["nrmse"], (e_c["nrmse"], e_t["nrmse"])
    assert e_c["hfen"] <= 0.6 * e_t["hfen"]
    assert e_c["xsim"] > e_t["xsim"] + 0.1
    assert cos["metrics"]["cosmos"]["solver"] == "cg"


# --------------------------------------------------------------------------- errors
def _small_pair(q=np.eye(3), t=np.zeros(3), ref_shape=(40, 44, 32), ref_vs=(3.0, 3.0, 3.0)):
    ref_aff = _affine(ref_shape, ref_vs)
    mov_aff = _affine((40, 44, 32), (3.0, 3.0, 3.0))
    return [_acquire(ref_shape, ref_aff, source="ori-1_mag.nii.gz"),
            _acquire((40, 44, 32), mov_aff, q, t, source="ori-2_mag.nii.gz")]


def test_different_echo_times_or_field_strength_is_an_error():
    orients = _small_pair() + [_small_pair()[1]]
    orients[2] = dict(orients[2], echo_times=np.array([0.005, 0.010]))
    with pytest.raises(InputDataError, match=r"orientation 2 \(ori-2_mag.nii.gz\).*echo times"):
        _run(orients)
    orients[2] = dict(orients[2], echo_times=np.array([0.004, 0.008]), field_strength=7.0)
    with pytest.raises(InputDataError, match=r"orientation 2.*7.0 T"):
        _run(orients)
    with pytest.raises(InputDataError, match="at least 2 orientations"):
        _run(orients[:1])


def test_inputs_on_different_grids_are_an_error_naming_the_orientation():
    orients = _small_pair()
    nw = orients[1]["noise_weight"]
    orients[1] = dict(orients[1], noise_weight=Volume(np.ones((20, 22, 16), np.float32), nw.affine))
    with pytest.raises(InputDataError, match=r"orientation 1 \(ori-2_mag.nii.gz\).*noise_weight are on different grids"):
        _run(orients)


def test_not_converged_is_an_error_naming_the_orientation():
    orients = _small_pair(_rot("x", 12.0), np.array([2.0, 0.0, 0.0]))
    with pytest.raises(StageError, match=r"orientation 1 \(ori-2_mag.nii.gz\) did not converge"):
        _run(orients, iterations=2, search_range_deg=0.0)


def test_brain_out_of_field_of_view_is_an_error():
    """Reference is a 36 mm slab through the head; the moving scan covers all of it."""
    orients = _small_pair(ref_shape=(40, 44, 12))
    with pytest.raises(StageError, match=r"orientation 1 \(ori-2_mag.nii.gz\).*field of view"):
        _run(orients)


def test_registered_through_plugin_manager_and_params():
    from qsmkit.plugins import load_registry

    assert load_registry().get("register", "simpleitk") is SimpleITKRegister
    with pytest.raises(ParameterError):
        SimpleITKRegister.validate_params({"metric": "ssd"}, where="stages.4")
    with pytest.raises(ParameterError):
        SimpleITKRegister.validate_params({"sampling_percentage": 0.0}, where="stages.4")


def test_rigid_register_recovers_known_motion_correlation():
    q, t = _rot("z", 18.0) @ _rot("x", -8.0), np.array([4.0, -3.0, 2.0])
    aff = _affine((48, 56, 40), (2.5, 2.5, 2.5))
    f = _head(_points((48, 56, 40), aff))
    m = _head((_points((48, 56, 40), aff) - t) @ q)
    res = rigid_register(f, aff, m, aff, f > 0.5, m > 0.5, metric="correlation")
    assert res.converged
    assert rotation_angle_deg(res.matrix[:3, :3] @ q.T) < 0.3
    assert np.linalg.norm(res.matrix[:3, 3] - t) < 0.3
