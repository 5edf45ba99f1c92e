import numpy as np
import pytest

from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_tkd import tkd
from qsmkit_tkd.tkd import truncation_response
from helpers import sphere_field

SHAPE, VS, RADIUS, CHI = (96, 96, 96), (1.0, 1.0, 1.0), 10.0, 0.2


@pytest.mark.parametrize("tilt_deg", [0.0, 30.0])
def test_tkd_recovers_analytic_sphere(tilt_deg):
    t = np.deg2rad(tilt_deg)
    b0 = (np.sin(t), 0.0, np.cos(t))
    field, r = sphere_field(SHAPE, VS, RADIUS, CHI, b0)
    chi = tkd(field, np.ones(SHAPE, bool), VS, b0, threshold=0.15, padding=1.5)
    inside = chi[r < RADIUS - 1.5].mean()
    assert inside == pytest.approx(CHI, rel=0.10)
    # far from the sphere, chi is ~0 (no source)
    assert abs(chi[r > 2.5 * RADIUS].mean()) < 0.05 * CHI


def test_truncation_correction_matches_direction_average():
    u = np.linspace(0, 1, 200001)
    for t in (0.05, 0.15, 0.3):
        assert truncation_response(t) == pytest.approx(np.mean(np.minimum(1, abs(1 / 3 - u ** 2) / t)), abs=1e-5)
    # without the correction TKD underestimates the sphere by about c(0.15) = 0.868
    field, r = sphere_field(SHAPE, VS, RADIUS, CHI, (0, 0, 1))
    raw = tkd(field, np.ones(SHAPE, bool), VS, (0, 0, 1), correct=False)
    assert raw[r < RADIUS - 1.5].mean() / CHI == pytest.approx(truncation_response(0.15), abs=0.04)


def test_tkd_stage_through_registry_keeps_geometry():
    field, _ = sphere_field((32, 32, 32), VS, 5.0, CHI, (0, 0, 1))
    vol = Volume.from_array(field, VS, units="ppm")
    mask = vol.like(np.ones((32, 32, 32), bool))
    cls = load_registry().get("inversion", "tkd")
    out = cls().run(StageContext({"local_field": vol, "mask": mask}), cls.validate_params({"threshold": 0.2}, "t"))
    assert out["chi"].units == "ppm" and np.array_equal(out["chi"].affine, vol.affine)
    assert out["chi"].data.dtype == np.float32
