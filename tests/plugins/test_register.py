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
    # measured (stage default, finest level 2 mm, registered on 2x2x2 block means): rotation errors
    # 0.067-0.083 deg, translations at the brain centre <= 0.011 mm (with the 1 mm level,
    # finest_level_mm 0: 0.007-0.022 deg, <= 0.009 mm)
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


# --------------------------------------------------------------------------- issue 20: reproducible, parallel, known mode
def test_rotation_does_not_depend_on_itk_threads():
    """The 20 deg orientation of the simulator with 1 and 2 ITK threads: the same rotation (a previous
    speed-up found 15.6 deg instead of 19.9 deg depending on the thread count and the test order)."""
    phs = _phantoms()
    ref, mov = phs[0], phs[2]
    angles = []
    for threads in (1, 2):
        res = rigid_register(ref.magnitude.data[..., 0], ref.magnitude.affine, mov.magnitude.data[..., 0],
                             mov.magnitude.affine, ref.mask.data, mov.mask.data, threads=threads)
        assert res.converged
        assert rotation_angle_deg(res.matrix[:3, :3] @ mov.rotation.T) < 0.1
        angles.append(res.rotation_angle_deg)
    assert abs(angles[0] - angles[1]) < 0.05, angles
    assert abs(angles[0] - 20.0) < 0.1


def test_stage_result_does_not_depend_on_workers():
    """One worker or two processes: bit-identical transforms (every registration runs on one ITK thread)
    and resampled arrays (each worker resamples its orientation)."""
    orients = _small_pair(_rot("y", 19.9) @ _rot("x", 4.0), np.array([2.0, -1.0, 3.0]))
    orients.append(_small_pair(_rot("x", -14.0), np.array([-1.0, 2.0, 0.0]))[1])
    out1, out2 = _run(orients, workers=1), _run(orients, workers=2)
    one, two = out1["transforms"], out2["transforms"]
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_array_equal(np.asarray(a["matrix"]), np.asarray(b["matrix"]))
    # the workers also resample their orientation: the same arrays as the serial run
    for a, b in zip(out1["orientations"][1:], out2["orientations"][1:]):
        for key in ("local_field", "mask", "magnitude", "noise_weight"):
            np.testing.assert_array_equal(a[key].data, b[key].data)
    assert rotation_angle_deg(np.asarray(one[1]["matrix"])[:3, :3] @ (_rot("y", 19.9) @ _rot("x", 4.0)).T) < 0.3


def test_resampling_does_not_depend_on_itk_threads():
    """The workers resample with the stage's threads shared among them: B-spline and linear resampling
    (and the masked field resampling built on them) give the same bits for 1 and 3 ITK threads."""
    from qsmkit_register.rigid import _itk_threads, resample_masked

    shape = (36, 40, 30)
    aff = _affine(shape, (2.0, 2.0, 2.0))
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = _rot("y", 13.0) @ _rot("x", -7.0), (1.3, -2.1, 0.7)
    data = np.random.default_rng(2).random(shape).astype(np.float32)
    mask = data > 0.3
    outs = []
    for threads in (1, 3):
        with _itk_threads(threads):
            outs.append((resample_to_reference(data, aff, shape, aff, m, "bspline"),
                         *resample_masked(data, mask, aff, shape, aff, m, "bspline")))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert outs[0][2].sum() > 0.5 * mask.sum()


def test_crop_to_mask_keeps_world_positions():
    from qsmkit_register.rigid import crop_to_mask

    shape = (30, 32, 28)
    aff = _affine(shape, (2.0, 1.5, 3.0), _rot("z", 10.0))
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[10:15, 8:20, 5:9] = True
    box, box_aff, box_mask = crop_to_mask(data, aff, mask, 2)
    assert box.shape == (9, 16, 8) and box_mask.sum() == mask.sum()
    np.testing.assert_allclose(box_aff @ [0, 0, 0, 1], aff @ [8, 6, 3, 1])
    assert box[0, 0, 0] == data[8, 6, 3]


def _tilted_orientations(rotations, shape=(64, 72, 56), voxel_size=3.0):
    """Simulated head orientations whose voxel grids followed the head: orientation i's affine is
    ``T_i @ A_0`` with ``T_i`` the head rotation about the FOV centre (the true reference world ->
    orientation world transform), as a scanner's auto-align would record it."""
    from qsmkit.simulate import simulate_phantom

    ref = simulate_phantom(shape=shape, voxel_size=(voxel_size,) * 3, snr=None, seed=0)
    a0, c = ref.magnitude.affine, np.asarray(ref.meta["rotation_center_mm"])
    phs, mats = [ref], [np.eye(4)]
    for k, (rx, ry, rz) in enumerate(rotations[1:], 1):
        t = np.eye(4)
        t[:3, :3] = _rot("z", rz) @ _rot("y", ry) @ _rot("x", rx)
        t[:3, 3] = c - t[:3, :3] @ c
        ph = simulate_phantom(shape=shape, affine=t @ a0, rotation_deg=(rx, ry, rz), snr=None, seed=k)
        np.testing.assert_allclose(ph.rotation, t[:3, :3], atol=1e-12)
        phs.append(ph)
        mats.append(t)
    orients = [{"magnitude": ph.magnitude, "mask": ph.truth["mask"], "local_field": ph.truth["local_field"],
                "echo_times": ph.echo_times, "field_strength": ph.field_strength} for ph in phs]
    return phs, mats, orients


def _cosmos_chi(out: dict) -> dict:
    """``inversion/cosmos`` (default parameters) of a register stage's output."""
    from helpers import run_stage

    from qsmkit.plugins import load_registry

    return run_stage(load_registry().get("inversion", "cosmos"), {"orientations": out["orientations"]})


def _chi_nrmse(chi_a: dict, chi_b: dict) -> float:
    """NRMSE (fraction) of COSMOS chi ``chi_a`` against ``chi_b`` (demeaned, on the intersection of their masks)."""
    region = chi_a["mask"].data & chi_b["mask"].data
    assert region.sum() > 0.95 * chi_a["mask"].data.sum()
    a, b = chi_a["chi"].data[region], chi_b["chi"].data[region]
    return float(np.linalg.norm((a - a.mean()) - (b - b.mean())) / np.linalg.norm(b - b.mean()))


def test_known_matrices_give_the_chi_of_registration():
    """Acceptance 2 (issue 20): register/known skips registration and gives the chi of registration
    within 1 % NRMSE when its rotations are those of the registration, and the exact (simulator)
    rotations give a chi at least as close to the truth as registration's.

    The exact rotations do not give registration's chi within 1 %, because registration is not exact:
    at the stage default (finest level 2 mm) on this 1 mm dataset it is off by 0.06-0.20 deg, which
    changes the resampled local fields by 1.6-5.1 % inside the brain (vessels and edges are sharp) and
    COSMOS chi by 2.3 %; with the 1 mm level (0.007-0.022 deg) still 0.2-0.7 % and 1.7 % (closed form
    1.2 %), so no registration setting brings that comparison below 1 %. It is registration error,
    not a known-mode defect: the known chi's NRMSE against the truth is 16.66 %, registration's 16.73 %
    (16.60 % with the 1 mm level)."""
    from helpers import run_stage

    from qsmkit import metrics as qm

    from qsmkit_register import KnownRegister

    phs = _phantoms()
    orients = [{"magnitude": ph.magnitude, "mask": ph.truth["mask"], "local_field": ph.truth["local_field"],
                "echo_times": ph.echo_times, "field_strength": ph.field_strength} for ph in phs]
    exact = []
    for ph in phs[1:]:  # simulator: reference x <-> orientation R (x - c) + c
        c, m = np.asarray(ph.meta["rotation_center_mm"]), np.eye(4)
        m[:3, :3], m[:3, 3] = ph.rotation, c - ph.rotation @ c
        exact.append(m.tolist())
    registered = _registered()
    known = run_stage(KnownRegister, {"orientations": orients}, {"source": "matrices", "matrices": exact})
    for o, ph in zip(known["orientations"], phs):
        np.testing.assert_allclose(o["local_field"].b0_direction, ph.rotation.T @ [0, 0, 1.0], atol=1e-9)
    same = run_stage(KnownRegister, {"orientations": orients},
                     {"source": "matrices", "matrices": [t["matrix"] for t in registered["transforms"][1:]]})
    chi_reg, chi_known, chi_same = _cosmos_chi(registered), _cosmos_chi(known), _cosmos_chi(same)
    assert _chi_nrmse(chi_same, chi_reg) < 0.01  # measured 0 (the same resampling, B0 rotation and inversion)
    truth, ref_mask = phs[0].truth["chi"].data, phs[0].truth["mask"].data
    e_reg = qm.evaluate(truth, chi_reg["chi"].data, chi_reg["mask"].data & ref_mask)["nrmse"]
    e_known = qm.evaluate(truth, chi_known["chi"].data, chi_known["mask"].data & ref_mask)["nrmse"]
    assert e_known <= 1.01 * e_reg, (e_known, e_reg)  # measured 16.66 % vs 16.73 %
    # known vs registration directly: the registration error above (measured 2.3 %)
    assert _chi_nrmse(chi_known, chi_reg) < 0.04


def test_known_rotations_from_affines():
    """register/known (source affines) on orientations whose grids followed the head: the exact
    transforms, B0 = R.T @ z in the reference voxel frame, and the COSMOS chi of the truth."""
    from helpers import run_stage

    from qsmkit import metrics as qm
    from qsmkit.plugins import load_registry

    from qsmkit_register import KnownRegister

    phs, mats, orients = _tilted_orientations([(0, 0, 0), (15, 0, 0), (0, 20, 0)])
    known = run_stage(KnownRegister, {"orientations": orients})
    for tr, t in zip(known["transforms"], mats):
        np.testing.assert_allclose(np.asarray(tr["matrix"]), t, atol=1e-9)
    for o, t in zip(known["orientations"], mats):
        np.testing.assert_allclose(o["local_field"].b0_direction, t[:3, :3].T @ [0, 0, 1.0], atol=1e-9)
    chi = run_stage(load_registry().get("inversion", "cosmos"), {"orientations": known["orientations"]})
    tkd = run_stage(load_registry().get("inversion", "tkd"), {"local_field": orients[0]["local_field"],
                                                              "mask": orients[0]["mask"]})
    region = chi["mask"].data & phs[0].truth["mask"].data
    e_c = qm.evaluate(phs[0].truth["chi"].data, chi["chi"].data, region)
    e_t = qm.evaluate(phs[0].truth["chi"].data, tkd["chi"].data, region)
    assert e_c["nrmse"] < 0.8 * e_t["nrmse"], (e_c["nrmse"], e_t["nrmse"])


def test_known_matrices_run_no_registration(monkeypatch):
    """register/known with given matrices: no SimpleITK optimisation runs; the transforms are the given ones."""
    from qsmkit_register import KnownRegister

    q, t = _rot("x", 12.0), np.array([2.0, 0.0, -1.0])
    orients = _small_pair(q, t)

    def no_registration(*a, **k):
        raise AssertionError("register/known ran a SimpleITK registration")

    monkeypatch.setattr(sitk, "ImageRegistrationMethod", no_registration)
    monkeypatch.setattr("qsmkit_register.rigid.rigid_register", no_registration)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = q, t
    p = KnownRegister.validate_params({"source": "matrices", "matrices": [m.tolist()]}, where="stages.4")
    out = KnownRegister().run(StageContext({"orientations": orients}, stage_label="register/known",
                                           log=lambda msg: None), p)
    tr = out["transforms"][1]
    np.testing.assert_allclose(np.asarray(tr["matrix"]), m)
    assert tr["iterations"] == 0 and tr["metric_value"] is None and tr["mask_dice"] > 0.97
    assert tr["rotation_angle_deg"] == pytest.approx(12.0)
    np.testing.assert_allclose(euler_matrix(np.radians(tr["rotation_deg"])), q, atol=1e-12)
    reg = out["orientations"][1]
    np.testing.assert_allclose(reg["local_field"].b0_direction, q.T @ [0, 0, 1.0], atol=1e-9)


def test_known_matrices_errors():
    from qsmkit_register import KnownRegister

    orients = _small_pair(_rot("x", 12.0))

    def run(params):
        p = KnownRegister.validate_params(params, where="stages.4")
        return KnownRegister().run(StageContext({"orientations": orients}, stage_label="register/known",
                                                log=lambda msg: None), p)

    with pytest.raises(ParameterError, match="needs matrices"):
        run({"source": "matrices"})
    with pytest.raises(ParameterError, match="3 entries for 1 orientations"):
        run({"source": "matrices", "matrices": [np.eye(4).tolist()] * 3})
    with pytest.raises(ParameterError, match="first .* is not the identity"):
        run({"source": "matrices", "matrices": [(2 * np.eye(4)).tolist(), np.eye(4).tolist()]})
    scaled = np.eye(4)
    scaled[0, 0] = 1.2
    with pytest.raises(ParameterError, match="not a rotation plus translation"):
        run({"source": "matrices", "matrices": [scaled.tolist()]})
    with pytest.raises(ParameterError, match=r"matrices\[0\] is not a 4x4"):
        run({"source": "matrices", "matrices": [[1, 2, 3]]})
    # a wrong matrix (30 mm off along z): the mask overlap check says so
    far = np.eye(4)
    far[2, 3] = 30.0
    with pytest.raises(StageError, match=r"orientation 1 \(ori-2_mag.nii.gz\).*Dice"):
        run({"source": "matrices", "matrices": [far.tolist()], "min_fov_fraction": 0.0})
