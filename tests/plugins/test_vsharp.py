"""Tests of V-SHARP background field removal (qsmkit_vsharp), including issue 3 acceptance 2."""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit.errors import GeometryError, InputDataError, StageError
from qsmkit.physics import dipole_convolve, smv_kernel
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_vsharp import VSharp, default_radii, smv_kernel_half, vsharp


def _grid(shape, vs=(1.0, 1.0, 1.0)):
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, vs)], indexing="ij")


def _external_sphere_field(xyz, centre, radius, chi, b0=(0.0, 0.0, 1.0)):
    """Analytic field (ppm) outside a uniformly magnetised sphere: an exact dipole, harmonic there."""
    d = [g - c for g, c in zip(xyz, centre)]
    r = np.sqrt(sum(x * x for x in d))
    cos = sum(x * b for x, b in zip(d, b0)) / r
    f = chi * radius ** 3 / (3 * r ** 3) * (3 * cos ** 2 - 1)
    f[r <= radius] = 0
    return f


def _nrmse(est, ref, m):
    a = est[m] - est[m].mean()
    b = ref[m] - ref[m].mean()
    return 100 * np.linalg.norm(a - b) / np.linalg.norm(b)


def test_default_radii_follow_the_voxel_size():
    assert default_radii((1, 1, 1)) == [12.0 - k for k in range(11)]  # 12 .. 2 mm
    assert default_radii((1.5, 1.5, 1.5)) == [12.0, 10.5, 9.0, 7.5, 6.0, 4.5, 3.0]
    assert default_radii((1, 1, 2)) == [12.0, 10.0, 8.0, 6.0, 4.0]
    assert default_radii((1, 1, 1), r_min=1.0)[-1] == 1.0
    assert default_radii((0.5, 0.5, 0.5))[-1] == 1.0  # never below 1 mm by default


@pytest.mark.parametrize("shape", [(20, 18, 16), (21, 17, 15)])
def test_half_spectrum_kernel_matches_the_physics_smv_kernel(shape):
    vs = (1.0, 1.2, 0.9)
    full = smv_kernel(shape, vs, 3.0)
    half, n = smv_kernel_half(shape, vs, 3.0, return_count=True)
    np.testing.assert_allclose(half, full[..., : shape[2] // 2 + 1], atol=1e-6)
    assert half[0, 0, 0] == pytest.approx(1.0) and n > 1


def test_harmonic_background_is_removed():
    """Fields of sources outside the mask (and a linear gradient) are harmonic inside it."""
    shape = (64, 64, 64)
    xyz = _grid(shape)
    x, y, z = xyz
    mask = (x / 22) ** 2 + (y / 25) ** 2 + (z / 20) ** 2 < 1
    bg = (_external_sphere_field(xyz, (0, 0, -30), 7.0, 9.4)      # an "air sinus" below
          + _external_sphere_field(xyz, (27, 12, 5), 5.0, -9.4)     # and one to the side
          + 0.02 * x - 0.01 * z + 0.3)                             # gradient and offset
    local, eroded = vsharp(bg.astype(np.float32), mask, (1, 1, 1))
    assert eroded.sum() > 0.5 * mask.sum()
    ref = bg[eroded] - bg[eroded].mean()
    # measured 0.4 %: what is left is the discretisation of the balls
    assert np.linalg.norm(local[eroded]) < 0.02 * np.linalg.norm(ref)
    assert np.all(local[~eroded] == 0)


def test_local_field_is_recovered_from_total_field():
    shape, vs = (64, 64, 64), (1.0, 1.0, 1.0)
    xyz = _grid(shape)
    x, y, z = xyz
    mask = (x / 22) ** 2 + (y / 25) ** 2 + (z / 20) ** 2 < 1
    rng = np.random.default_rng(0)
    chi = np.zeros(shape, np.float32)
    for _ in range(12):  # small susceptibility sources well inside the brain
        c = rng.uniform(-8, 8, 3)
        chi[(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < rng.uniform(2, 4.5) ** 2] = rng.uniform(-0.1, 0.3)
    chi *= mask
    local_true = dipole_convolve(chi, vs, (0, 0, 1), padding=2.0)
    bg = _external_sphere_field(xyz, (0, 0, -30), 7.0, 9.4) + _external_sphere_field(xyz, (27, 12, 5), 5.0, -9.4)
    local, eroded = vsharp((local_true + bg).astype(np.float32), mask, vs)
    assert np.std(bg[eroded]) > 10 * np.std(local_true[eroded])  # background ~11x the local field
    # measured 25 %: the error is V-SHARP's own on the local field (sources near the edge have
    # fields that look harmonic in the eroded mask, and the TSVD drops the lowest frequencies) ...
    assert _nrmse(local, local_true, eroded) < 35
    assert local.dtype == np.float32
    # ... as the background adds almost nothing to it (the method is linear)
    alone, _ = vsharp(local_true, mask, vs)
    assert np.linalg.norm((local - alone)[eroded]) < 0.03 * np.linalg.norm(local_true[eroded])


def test_eroded_mask_is_the_mask_eroded_by_the_smallest_radius():
    shape, vs = (48, 40, 36), (1.0, 1.0, 1.5)
    x, y, z = _grid(shape, vs)
    mask = (x / 18) ** 2 + (y / 15) ** 2 + (z / 22) ** 2 < 1
    mask[20:30, 18:22, 10:14] = False  # an irregular notch
    f = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    radii = [6.0, 4.5, 3.0]
    _, eroded = vsharp(f, mask, vs, radii, reject=0)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    # the ball of radius 3 mm centred at a voxel lies in the mask iff no outside voxel is within 3 mm
    assert np.array_equal(eroded, dist > 3.0 + 1e-6)


def test_edge_rejection_drops_unreliable_edge_voxels():
    shape = (56, 56, 56)
    xyz = _grid(shape)
    x, y, z = xyz
    mask = (x / 20) ** 2 + (y / 22) ** 2 + (z / 18) ** 2 < 1
    rng = np.random.default_rng(2)
    f = 0.01 * rng.normal(size=shape).astype(np.float32)
    rim = mask & ~ndimage.binary_erosion(mask)
    spikes = rim & (rng.random(shape) < 0.05)
    f[spikes] += 3.0  # a few corrupt edge voxels (e.g. partial volume with bone)
    clean = vsharp(f * ~spikes, mask, (1, 1, 1))[0]
    plain, er0 = vsharp(f, mask, (1, 1, 1), reject=0)
    kept, er6, info = vsharp(f, mask, (1, 1, 1), reject=6, return_info=True)
    assert info["rejected"] > 0 and er6.sum() >= 0.9 * er0.sum()
    both = er6 & er0
    # the small balls that touch a corrupt voxel are dropped; larger balls dilute it (measured -30 %)
    assert np.linalg.norm((kept - clean)[both]) < 0.8 * np.linalg.norm((plain - clean)[both])
    # only voxels whose small balls reach a corrupt voxel were dropped (default radii end at 2 mm)
    dist = ndimage.distance_transform_edt(~spikes)
    assert np.all(dist[er0 & ~er6] <= 3.0)


def test_acceptance2_phantom_local_field(phantom_small):
    """Issue 3 acceptance 2 (V-SHARP part) on the 64^3 test phantom.

    From the true total field and the true mask: NRMSE vs the true local field <= 50 % in the
    eroded mask (measured 43 %). From wrapped phase through the threshold mask, Laplacian
    unwrapping and the echo fit: <= 70 % (measured 61 %; the extra error comes from voxels next
    to veins and haemorrhage whose late-echo phase no spatial unwrapping follows).
    The remaining error of V-SHARP itself is mostly a smooth harmonic part of the true local
    field (from sources between the eroded and the full mask) that no background removal can see.
    """
    from qsmkit_echofit import weighted_fit
    from qsmkit_mask import threshold_mask
    from qsmkit_unwrap import laplacian_unwrap

    ph = phantom_small
    vs = ph.magnitude.voxel_size
    tot, loc, truth = (ph.truth[k].data for k in ("total_field", "local_field", "mask"))
    local, eroded = vsharp(tot, truth, vs)
    assert eroded.sum() > 0.7 * truth.sum()
    assert _nrmse(local, loc, eroded) <= 50

    mask = threshold_mask(ph.magnitude.data[..., 0], vs)
    u = laplacian_unwrap(ph.phase.data, vs, mask)
    f = weighted_fit(u, ph.magnitude.data, ph.echo_times, ph.field_strength, mask)["field"]
    local2, eroded2 = vsharp(f, mask, vs)
    assert _nrmse(local2, loc, eroded2) <= 70


def _ctx(field, mask, vs=(1.0, 1.0, 1.0)):
    return StageContext({"total_field": Volume.from_array(field, vs, units="ppm"),
                         "mask": Volume.from_array(mask, vs, units="bool")},
                        stage_label="background/vsharp", log=lambda s: None)


def test_stage_outputs_and_errors():
    shape = (40, 40, 40)
    x, y, z = _grid(shape)
    mask = x ** 2 + y ** 2 + z ** 2 < 15 ** 2
    field = (0.01 * x + 0.05 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / 20)).astype(np.float32)
    p = VSharp.validate_params({"radii_mm": [8, 6, 4, 2]}, "stages.3")
    out = VSharp().run(_ctx(field, mask), p)
    assert set(out) == {"local_field", "mask"}
    assert out["local_field"].units == "ppm" and out["local_field"].data.dtype == np.float32
    em = out["mask"].data
    assert em.dtype == bool and em.sum() < mask.sum() and not (em & ~mask).any()
    assert np.all(out["local_field"].data[~em] == 0)
    with pytest.raises(StageError, match="empty"):
        VSharp().run(_ctx(field, np.zeros(shape, bool)), p)
    thin = np.zeros(shape, bool)
    thin[10:30, 10:30, 19:21] = True
    with pytest.raises(StageError, match="thinner"):
        VSharp().run(_ctx(field, thin), p)
    with pytest.raises(GeometryError):
        VSharp().run(_ctx(field, mask[:-1]), p)
    bad = field.copy()
    bad[20, 20, 20] = np.inf
    with pytest.raises(InputDataError, match="NaN or infinite"):
        VSharp().run(_ctx(bad, mask), p)
    assert load_registry().get("background", "vsharp") is VSharp
