"""Brain masks (issue 11): ``mask/bet`` (BET-like surface) and ``mask/phase_quality`` (ROMEO quality).

Phantoms: the simulator's life-size head on a coarse (56, 64, 48) grid at 3 mm (168 x 192 x 144 mm
field of view, the default grid's geometry), at 3 T, at 7 T (six echoes to 30 ms) and at 3 T with
the haematoma (``haemorrhage=True``); the truth is ``phantom.truth["mask"]`` (brain, ventricles,
sulci and the inner half of the subarachnoid CSF), not the intracranial cavity.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmkit.errors import GeometryError, InputDataError, ParameterError
from qsmkit.pipeline import build_plan, run_plan
from qsmkit.plugins import load_registry
from qsmkit.simulate import simulate_phantom
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_mask import (BetMask, PhaseQualityMask, bet_surface, brain_mask, icosphere, mesh_to_mask,
                         phase_quality_mask, quality_threshold, robust_threshold, surface_to_mask, threshold_mask)
from qsmkit_unwrap import romeo_unwrap

GRID = dict(shape=(56, 64, 48), voxel_size=(3.0, 3.0, 3.0), seed=0)
TE_7T = (0.004, 0.008, 0.012, 0.016, 0.020, 0.030)
CASES = {"3T": {}, "7T": dict(field_strength=7.0, echo_times=TE_7T), "haemorrhage": dict(haemorrhage=True)}
HAEMORRHAGE = 11  # label


def dice(a, b):
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantoms():
    """The three cases with the ROMEO quality map of each (unwrapped without a mask, as in a pipeline)."""
    out = {}
    for name, kw in CASES.items():
        ph = simulate_phantom(**GRID, **kw)
        _, q = romeo_unwrap(ph.phase.data, ph.magnitude.data, None, ph.artifacts()["echo_times"],
                            return_quality=True)
        out[name] = (ph, q)
    return out


def _ctx(art, cls):
    return StageContext(art, stage_label=f"{cls.kind}/{cls.name}", log=lambda s: None,
                        declared=(*cls.reads, *cls.optional_reads))


def _run(cls, art, params=None):
    return cls().run(_ctx(art, cls), cls.validate_params(params or {}, "stages.0"))


# ----------------------------------------------------------------------------- surface geometry
def test_icosphere_and_mesh_filling_give_the_analytic_ball_on_anisotropic_voxels():
    v, f = icosphere(3)
    assert v.shape == (10 * 4 ** 3 + 2, 3) and f.shape == (20 * 4 ** 3, 3)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    assert (np.sum(np.cross(b - a, c - a) * (a + b + c), axis=1) > 0).all()  # every face points outward
    vs = np.array([1.0, 1.5, 2.5])
    shape, centre, radius = (40, 30, 20), np.array([19.3, 22.1, 24.6]), 15.0  # mm
    sphere = centre + radius * icosphere(5)[0]
    inside = mesh_to_mask(sphere / vs, icosphere(5)[1], shape)
    g = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, vs)], indexing="ij")
    r = np.sqrt(sum((x - c0) ** 2 for x, c0 in zip(g, centre)))
    # exact away from the surface (the mesh's chords lie within 0.03 mm of the sphere)
    assert inside[r < radius - 0.05].all() and not inside[r > radius + 0.05].any()


# ----------------------------------------------------------------------------- bet
@pytest.mark.parametrize("case", list(CASES))
def test_bet_matches_the_true_brain_mask(phantoms, case):
    ph, _ = phantoms[case]
    out = _run(BetMask, {"magnitude": ph.magnitude})
    m, truth = out["mask"].data, ph.truth["mask"].data
    assert m.dtype == bool and out["mask"].units == "bool"
    assert dice(m, truth) >= 0.95  # measured 0.98-0.99 on this grid
    labels = ph.truth["labels"].data
    assert np.isin(labels[m], (12, 13, 14)).mean() < 0.01  # no scalp, sinus or skull to speak of
    assert m[labels == HAEMORRHAGE].all()  # the (dark) haemorrhage is inside, not a hole


def test_bet_margin_moves_the_border_inward_and_the_cavity_lies_outside(phantoms):
    ph, _ = phantoms["3T"]
    mag, vs, truth = ph.magnitude.data[..., 0], ph.magnitude.voxel_size, ph.truth["mask"].data
    v, faces, info = bet_surface(mag, vs)
    assert info["iterations"] < 1000  # converged before BET's fixed 1000 updates
    m0 = surface_to_mask(v, faces, mag.shape, vs, 0.0)
    m3 = surface_to_mask(v, faces, mag.shape, vs, 3.0)
    assert not (m3 & ~m0).any() and m3.sum() < 0.9 * m0.sum()
    # without a margin the surface stops at the inner skull: it holds the true mask plus CSF
    assert (m0 & truth).sum() >= 0.99 * truth.sum()


def test_bet_does_not_leak_through_an_opening_in_the_skull(phantoms):
    """A tube of soft tissue through the skull base (like the foramen magnum) joins brain and neck:
    the threshold mask then takes the head; the BET surface stays smooth and does not follow it."""
    ph, _ = phantoms["3T"]
    mag, vs = ph.magnitude.data[..., 0].copy(), ph.magnitude.voxel_size
    truth, labels = ph.truth["mask"].data, ph.truth["labels"].data
    c = np.array(np.nonzero(truth)).mean(axis=1)
    i, j, k = np.meshgrid(*[np.arange(n) for n in mag.shape], indexing="ij")
    tube = (((i - c[0]) * vs[0]) ** 2 + ((j - c[1]) * vs[1]) ** 2 <= 8.0 ** 2) & (k < c[2]) & ~truth
    mag[tube & np.isin(labels, (0, 1, 12, 13, 14))] = 0.6
    assert dice(threshold_mask(mag, vs), truth) < 0.9
    assert dice(brain_mask(mag, vs), truth) >= 0.95


def test_bet_on_thick_anisotropic_slices_and_a_smaller_head():
    """2.5 x 2.5 x 4 mm voxels, head semi-axes 60 x 68 x 54 mm (the default head is 71 x 81 x 60):
    through 4 mm slices the skull's partial volume joins scalp and brain in the threshold mask."""
    ph = simulate_phantom(shape=(64, 72, 36), voxel_size=(2.5, 2.5, 4.0), head_semi_axes_mm=(60, 68, 54))
    mag, vs, truth = ph.magnitude.data[..., 0], ph.magnitude.voxel_size, ph.truth["mask"].data
    assert dice(brain_mask(mag, vs), truth) >= 0.95  # measured 0.988
    assert dice(threshold_mask(mag, vs), truth) < 0.9  # measured 0.73


def test_bet_errors_are_one_line():
    zero = Volume.from_array(np.zeros((16, 16, 16), np.float32))
    with pytest.raises(InputDataError, match="zero everywhere") as e:
        _run(BetMask, {"magnitude": zero})
    assert "\n" not in str(e.value)
    with pytest.raises(ParameterError, match="echo"):
        _run(BetMask, {"magnitude": Volume.from_array(np.ones((8, 8, 8, 2), np.float32))}, {"echo": 3})
    with pytest.raises(ParameterError, match="out of range"):
        BetMask.validate_params({"fractional_threshold": 1.5}, "stages.0")


# ----------------------------------------------------------------------------- phase_quality
@pytest.mark.parametrize("case", list(CASES))
def test_phase_quality_matches_the_true_brain_mask(phantoms, case):
    ph, q = phantoms[case]
    quality = ph.magnitude.like(q, units="1")
    out = _run(PhaseQualityMask, {"quality": quality, "magnitude": ph.magnitude}, {"two_pass": True})
    m, rel = out["mask"].data, out["reliable_mask"].data
    truth, labels = ph.truth["mask"].data, ph.truth["labels"].data
    assert dice(m, truth) >= 0.95  # measured 0.97-0.99 on this grid
    assert m[labels == HAEMORRHAGE].all()  # filled, not a hole
    assert not (rel & ~m).any() and rel.sum() > 0.9 * m.sum()
    if case == "7T":  # at 7 T the phase around the strongest sources is unreliable: holes of the reliable mask
        assert not rel[labels == HAEMORRHAGE].any()


def test_phase_quality_without_erosion_joins_the_scalp_on_coarse_voxels(phantoms):
    """At 3 mm the skull is ~1.5 voxels thick: partial-volume voxels of passing quality bridge the
    cavity and the scalp, and hole filling then fills the skull; the default 3 mm opening cuts them."""
    ph, q = phantoms["3T"]
    vs, truth = ph.magnitude.voxel_size, ph.truth["mask"].data
    raw = phase_quality_mask(q, vs)
    opened = phase_quality_mask(q, vs, erode=3.0, dilate=3.0)
    assert dice(raw, truth) < 0.9 < 0.95 <= dice(opened, truth)


def _synthetic_quality(shape=(48, 48, 48), fill=0.3, seed=0):
    """A ball of reliable phase (0.9 +- 0.03) holding a small unreliable source (0.1), in noise (~0.02)."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in shape], indexing="ij")
    r = np.sqrt(sum(x * x for x in g))
    radius = (3 * fill * np.prod(shape) / (4 * np.pi)) ** (1 / 3)
    ball = r <= radius
    q = np.abs(rng.normal(0.0, 0.02, shape))
    q[ball] = np.clip(rng.normal(0.9, 0.03, int(ball.sum())), 0, 1)
    source = r <= 3.0
    q[source] = 0.1
    return q.astype(np.float32), ball, source


def test_robust_threshold_behaviour_on_a_synthetic_quality_map():
    q, ball, source = _synthetic_quality()
    noise = q[~ball].mean()  # the background is 70 % of the grid: its values are all below p15
    high = q[ball & ~source].mean()
    t = robust_threshold(q)
    assert t == pytest.approx(max(5 * noise, high / 5), rel=0.03) and t == pytest.approx(high / 5, rel=0.03)
    # hot outliers (0.5 % of the grid at 1.0) lie above the 99th percentile: the threshold does not move
    hot = q.copy()
    hot.ravel()[np.random.default_rng(1).choice(q.size, q.size // 200, replace=False)] = 1.0
    assert robust_threshold(hot) == pytest.approx(t, rel=0.02)
    # a noise floor well above zero (0.06 +- 0.01, like a Rician background): 5 * noise now sets
    # the threshold, above high / 5 and above every background voxel
    floor = q.copy()
    floor[~ball] = np.random.default_rng(2).normal(0.06, 0.01, int((~ball).sum()))
    t_floor = robust_threshold(floor)
    assert t_floor == pytest.approx(5 * floor[floor <= np.quantile(floor, 0.15)].mean(), rel=1e-6)
    assert t_floor > high / 5 and t_floor > floor[~ball].max()
    # the object fills the grid (no background): no noise floor is found, the threshold is high / 5
    full = np.clip(np.random.default_rng(3).normal(0.8, 0.05, (24, 24, 24)), 0, 1)
    assert robust_threshold(full) == pytest.approx(full[full >= np.quantile(full, 0.8)].mean() / 5, rel=0.02)
    # the mask: the ball with the unreliable source filled; the reliable mask leaves the source out
    m, info = phase_quality_mask(q, method="robust", erode=0, dilate=0, return_info=True)
    assert np.array_equal(m, ball) and np.array_equal(info["reliable"], ball & ~source)
    # factor scales the automatic threshold; percentile and value rules
    assert quality_threshold(q, "robust", factor=2.0) == pytest.approx(2 * t)
    assert quality_threshold(q, "percentile", percentile=50.0) == pytest.approx(np.percentile(q, 50.0))
    assert quality_threshold(q, "value", value=0.42) == 0.42
    assert 0.1 < quality_threshold(q, "otsu") < 0.8


def test_phase_quality_stage_errors_are_one_line():
    q, _, _ = _synthetic_quality((16, 16, 16))
    vol = Volume.from_array(q, units="1")
    for bad, exc, text in [(np.zeros((16, 16, 16), np.float32), InputDataError, "zero everywhere"),
                           (np.where(q > 0.5, np.nan, q), InputDataError, "NaN"),
                           (np.full((16, 16, 16), 0.5, np.float32), InputDataError, "constant")]:
        with pytest.raises(exc, match=text) as e:
            _run(PhaseQualityMask, {"quality": Volume.from_array(bad.astype(np.float32))})
        assert "\n" not in str(e.value)
    with pytest.raises(ParameterError, match="needs 'value'"):
        _run(PhaseQualityMask, {"quality": vol}, {"method": "value"})
    with pytest.raises(ParameterError, match="only used with method: value"):
        _run(PhaseQualityMask, {"quality": vol}, {"value": 0.5})
    with pytest.raises(GeometryError, match="differs"):
        small = Volume.from_array(np.ones((8, 8, 8), np.float32) + q[:8, :8, :8])
        _run(PhaseQualityMask, {"quality": vol, "magnitude": small})
    # the magnitude is optional; without two_pass no reliable_mask
    out = _run(PhaseQualityMask, {"quality": vol}, {"erode_mm": 0.0, "dilate_mm": 0.0})
    assert out["mask"].data.sum() > 1000 and "reliable_mask" not in out


# ----------------------------------------------------------------------------- pipelines
def test_pipeline_unwraps_with_romeo_then_masks_from_its_quality(tmp_path, phantoms):
    spec = {"name": "pq", "inputs": {"simulate": {"shape": [56, 64, 48], "voxel_size": [3.0, 3.0, 3.0]}},
            "stages": [{"stage": "unwrap", "method": "romeo"},
                       {"stage": "mask", "method": "phase_quality", "params": {"two_pass": True}}],
            "output_dir": str(tmp_path / "out")}
    reg = load_registry()
    assert reg.get("mask", "phase_quality") is PhaseQualityMask and reg.get("mask", "bet") is BetMask
    plan = build_plan(spec, reg)
    assert [s.run for s in plan.steps] == [True, True]
    res = run_plan(plan, reg, log=lambda m: None)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"mask.nii.gz", "reliable_mask.nii.gz", "quality.nii.gz"} <= names
    truth = phantoms["3T"][0].truth["mask"].data  # the same simulation (seed 0, same grid)
    assert dice(res.artifacts["mask"].data, truth) >= 0.95
    assert not (res.artifacts["reliable_mask"].data & ~res.artifacts["mask"].data).any()


def test_phase_quality_without_an_unwrap_stage_is_refused_at_validation(tmp_path):
    from qsmkit.errors import MissingArtifactError

    spec = {"inputs": {"simulate": {"shape": [24, 24, 24], "voxel_size": [4.0, 4.0, 4.0]}},
            "stages": [{"stage": "mask", "method": "phase_quality"}], "output_dir": str(tmp_path / "out")}
    with pytest.raises(MissingArtifactError, match="needs 'quality'.*add a 'unwrap' stage before it"):
        build_plan(spec, load_registry())


def test_a_mask_file_skips_the_bet_and_phase_quality_stages(tmp_path):
    from helpers import write_nifti

    ph = simulate_phantom(shape=(24, 24, 24), voxel_size=(4.0, 4.0, 4.0), snr=None)
    aff = ph.magnitude.affine
    write_nifti(tmp_path / "chi.nii.gz", ph.truth["chi"].data, aff)
    write_nifti(tmp_path / "mask.nii.gz", ph.truth["mask"].data.astype(np.uint8), aff)
    reg = load_registry()
    for stage in ({"stage": "mask", "method": "bet"}, {"stage": "mask", "method": "phase_quality"}):
        spec = {"inputs": {"chi": "chi.nii.gz", "mask": "mask.nii.gz"},
                "stages": [stage, {"stage": "reference", "method": "mean"}], "output_dir": "out"}
        plan = build_plan(spec, reg, source=tmp_path / "p.yaml")
        assert not plan.steps[0].run and "given as inputs" in plan.steps[0].reason
        res = run_plan(plan, reg, log=lambda m: None)
        assert np.array_equal(res.artifacts["mask"].data > 0, ph.truth["mask"].data)
