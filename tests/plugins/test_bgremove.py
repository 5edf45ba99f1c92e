"""Tests of SHARP, RESHARP, iSMV, LBV and PDF background field removal and of the harmonic limit
(qsmkit_bgremove), issue 17 acceptance 1 (LBV and PDF: see the notes above their tests; a
brain-sized mask: the last section).

Acceptance 1 (per method): the field of a sphere OUTSIDE the mask is removed inside it to < 5 %
of its norm; the field of a sphere INSIDE it (away from the boundary) is kept to within 10 %
(relative error over the method's eroded mask). Measured on the 64^3 ellipsoid below (a 48 mm
"brain"):

============  =====================  ===================  ===========
method        outside sphere left    inside sphere error  mask kept
============  =====================  ===================  ===========
sharp (6 mm)  0.17 %                 1.8 %                43 %
resharp       0.02 %                 17 %  (fails)        60 %
ismv (2 mm)   0.07 %                 6.6 %                80 %
============  =====================  ===================  ===========

RESHARP (published formulation: Tikhonov-regularised least squares over the whole padded grid)
fails the "kept" half on this small mask, and not by a solver defect: the minimum-norm (Tikhonov)
solution removes the least-squares projection of the sphere's field r^-3 Y20 onto fields harmonic
in the eroded mask (the r^2 Y20 component), relative error sqrt(21/4) (a/R)^1.5 for a sphere of
radius a in a ball of radius R (29 % for a = 5 mm, R = 20 mm: measured 28 % with lambda 1e-2;
smaller lambda lets the unknown in the eroded rim absorb part of it: 18 % at 1e-3, 17 % at the
default 1e-4). The error is almost all within a few voxels of the eroded mask's edge. PDF, a
least-squares projection too, shows the same analytic error over the whole mask (tests below).
On a brain-sized mask (a/R four times smaller) RESHARP keeps the sphere to 8.3 % (last section).
"""

import json

import numpy as np
import nibabel as nib
import pytest
from scipy import ndimage

from helpers import run_cli, run_stage, sphere_field, write_nifti
from qsmkit.errors import GeometryError, InputDataError, StageError
from qsmkit.metrics import nrmse
from qsmkit.plugins import load_registry
from qsmkit.volume import Volume
from qsmkit_bgremove import Ismv, Lbv, Pdf, Resharp, Sharp, harmonic_limit, ismv, lbv, pdf, resharp, sharp
from qsmkit_vsharp import vsharp

SHAPE, VS = (64, 64, 64), (1.0, 1.0, 1.0)
METHODS = {"sharp": sharp, "resharp": resharp, "ismv": ismv}
STAGES = {"sharp": Sharp, "resharp": Resharp, "ismv": Ismv}


def _ellipsoid(shape=SHAPE, vs=VS, axes=(24.0, 26.0, 22.0)):
    """Ellipsoid mask with semi-axes ``axes`` (mm) at the grid centre."""
    g = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(shape, vs)], indexing="ij")
    return sum((gi / a) ** 2 for gi, a in zip(g, axes)) < 1


def _mask():
    return _ellipsoid()


def _outside_sphere_field(dz_mm=35.0, shape=SHAPE, vs=VS):
    """Field of a sphere (8 mm, 9.4 ppm: an air-like source) centred ``dz_mm`` above the grid centre
    (35 mm: 13 mm beyond the small mask's top); the helper's sphere is centred, so it is cut from a
    taller grid."""
    tall = tuple(shape[:2]) + (3 * shape[2],)
    big, _ = sphere_field(tall, vs, 8.0, 9.4, (0, 0, 1))
    dz, c, h = int(round(dz_mm / vs[2])), tall[2] // 2, shape[2] // 2
    return np.ascontiguousarray(big[:, :, c - dz - h: c - dz - h + shape[2]])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_acceptance1_outside_sphere_is_removed(method):
    mask = _mask()
    bg = _outside_sphere_field()
    local, eroded = METHODS[method](bg, mask, VS)
    assert eroded.sum() > 0.3 * mask.sum() and not (eroded & ~mask).any()
    # measured 0.17 % (sharp), 0.02 % (resharp), 0.07 % (ismv)
    assert np.linalg.norm(local[eroded]) < 0.01 * np.linalg.norm(bg[eroded])
    assert np.all(local[~eroded] == 0) and local.dtype == np.float32


@pytest.mark.parametrize("method", ["sharp", "ismv"])
def test_acceptance1_inside_sphere_is_kept(method):
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))  # 5 mm sphere at the centre, chi 1 ppm
    local, eroded = METHODS[method](f, mask, VS)
    err = np.linalg.norm((local - f)[eroded]) / np.linalg.norm(f[eroded])
    assert err < 0.10  # measured 1.8 % (sharp), 6.6 % (ismv)


def test_resharp_inside_sphere_error_is_what_was_measured():
    """RESHARP's measured error on the inside sphere (see the module docstring), so a change shows."""
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    local, eroded, info = resharp(f, mask, VS, return_info=True)
    err = np.linalg.norm((local - f)[eroded]) / np.linalg.norm(f[eroded])
    assert 0.15 < err < 0.22 and info.converged  # measured 17.0 % (lambda 1e-4, 44 CG iterations)


def test_methods_are_linear_and_remove_the_background_from_a_sum():
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    bg = _outside_sphere_field()
    for fn in (sharp, ismv):
        alone, e = fn(f, mask, VS)
        both, e2 = fn(f + bg, mask, VS)
        assert np.array_equal(e, e2)
        assert np.linalg.norm((both - alone)[e]) < 0.05 * np.linalg.norm(alone[e])


def test_eroded_mask_is_the_mask_eroded_by_the_radius():
    from scipy import ndimage

    mask = _mask()
    mask[30:36, 20:24, 10:14] = False  # a notch
    f = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    for fn, r in ((sharp, 4.0), (ismv, 2.0)):
        _, e = fn(f, mask, VS, radius_mm=r)
        assert np.array_equal(e, dist > r + 1e-6)


def test_phantom_local_field_nrmse_against_vsharp(phantom_small):
    """Local-field NRMSE (%) vs the truth over each method's own eroded mask, 64^3 phantom, true total field.

    Measured: vsharp 43.2 (77 % of the mask kept), sharp 34.7 (38 %), resharp 20.6 (56 %),
    ismv 40.0 (77 %). The smaller masks of sharp and resharp drop the edge, where the error is largest.
    """
    ph = phantom_small
    vs = ph.magnitude.voxel_size
    tot, loc, m = (ph.truth[k].data for k in ("total_field", "local_field", "mask"))
    m = m > 0
    lv, ev = vsharp(tot, m, vs)
    ref = nrmse(loc, lv, ev)
    got = {}
    for name, fn in METHODS.items():
        lo, e = fn(tot, m, vs)
        got[name] = (nrmse(loc, lo, e), e.sum() / m.sum())
    assert ref < 46
    assert got["sharp"][0] < 38 and got["sharp"][0] < ref
    assert got["resharp"][0] < 23
    assert got["ismv"][0] < 43 and got["ismv"][0] < ref
    assert got["ismv"][1] >= ev.sum() / m.sum() - 0.01  # iSMV keeps at least V-SHARP's mask


def _art(field, mask):
    return {"total_field": Volume.from_array(field, VS, units="ppm"), "mask": Volume.from_array(mask, VS, units="bool")}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_stage_through_the_registry(method):
    cls = load_registry().get("background", method)
    assert cls is STAGES[method] and cls.reads == ("total_field", "mask") and cls.writes == ("local_field", "mask")
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    out = run_stage(cls, _art(f, mask))
    lf, em = out["local_field"], out["mask"].data
    assert lf.units == "ppm" and lf.data.dtype == np.float32
    assert em.dtype == bool and 0 < em.sum() < mask.sum() and not (em & ~mask).any()
    assert np.all(lf.data[~em] == 0)
    with pytest.raises(StageError, match="empty"):
        run_stage(cls, _art(f, np.zeros(SHAPE, bool)))
    thin = np.zeros(SHAPE, bool)
    thin[10:50, 10:50, 31:33] = True
    with pytest.raises(StageError, match="thinner"):
        run_stage(cls, _art(f, thin))
    with pytest.raises(GeometryError):
        run_stage(cls, _art(f, mask[:-1]))
    bad = f.copy()
    bad[32, 32, 32] = np.nan
    with pytest.raises(InputDataError, match="NaN or infinite"):
        run_stage(cls, _art(bad, mask))


def test_stage_params_use_the_shared_spellings():
    assert {p.name for p in Resharp.params} >= {"radius_mm", "lambda", "tol", "max_iter"}
    assert {p.name for p in Ismv.params} >= {"radius_mm", "tol", "max_iter"}
    p = Resharp.validate_params({"lambda": 1e-3, "max_iter": 50}, "stages.0")
    assert p["lambda"] == 1e-3 and p.max_iter == 50


@pytest.mark.parametrize("method", ["sharp", "ismv"])
def test_pipeline_run(method, tmp_path, capsys):
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 0.2, (0, 0, 1))
    total = f + 0.02 * _outside_sphere_field()
    write_nifti(tmp_path / "tf.nii.gz", total)
    write_nifti(tmp_path / "mask.nii.gz", mask.astype(np.uint8))
    (tmp_path / "p.yaml").write_text(
        f"name: bg-test\ninputs: {{total_field: tf.nii.gz, mask: mask.nii.gz}}\n"
        f"stages:\n  - {{stage: background, method: {method}}}\n"
        "  - {stage: inversion, method: tkd, params: {threshold: 0.2}}\noutput_dir: results\n")
    code, _, err = run_cli(["run", tmp_path / "p.yaml"], capsys)
    assert code == 0, err
    assert f"background/{method}" in err and "% kept" in err
    res = tmp_path / "results"
    chi = nib.load(str(res / "chi.nii.gz")).get_fdata()
    assert chi.shape == SHAPE and np.isfinite(chi).all()
    prov = json.loads((res / "provenance.json").read_text())
    assert prov["stages"][0]["plugin"] == "bgremove" and prov["stages"][0]["status"] != "skipped"


# =========================================================================== LBV, PDF, harmonic limit
# Analytic reference (continuous, spherical mask of radius R, a sphere of radius a at its centre):
# the sphere's field outside it is the irregular solid harmonic r^-3 Y20. LBV removes the harmonic
# function with the same boundary values, (r/R)^2 R^-3 Y20: relative error sqrt(3/7) (a/R)^1.5
# over the mask (6.2 % for a = 5, R = 24). PDF removes its least-squares projection onto fields
# of outside sources (regular harmonics r^2 Y20): relative error sqrt(21/4) (a/R)^1.5 (21.8 %),
# almost all of it within a few mm of the mask edge. PDF therefore keeps the inside sphere to
# within 10 % only away from the boundary (measured 8.6 % on the mask eroded by 6 mm, the SHARP
# mask), and its whole-mask error is the projection's (measured 21.3 % on the sphere, 22.2 % on
# the ellipsoid): a property of the method, not a defect of the solver.
#
# ============  =====================  ============================  ===========
# method        outside sphere left    inside sphere error           mask kept
# ============  =====================  ============================  ===========
# lbv           0.13 %                 7.1 % (whole mask)            100 %
# pdf           0.34 %                 8.6 % (eroded 6 mm), 22 %     100 %
# ============  =====================  ============================  ===========

KEEP_ALL = {"lbv": lbv, "pdf": pdf}


def _sphere_mask(radius=24):
    g = np.meshgrid(*[np.arange(n) - n // 2 for n in SHAPE], indexing="ij")
    return sum(x ** 2 for x in g) < radius ** 2


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_acceptance1_outside_sphere_is_removed_keeping_the_mask(method):
    mask = _mask()
    bg = _outside_sphere_field()
    local, kept = KEEP_ALL[method](bg, mask, VS)
    assert np.array_equal(kept, mask) and local.dtype == np.float32
    # measured 0.13 % (lbv), 0.34 % (pdf)
    assert np.linalg.norm(local[mask]) < 0.01 * np.linalg.norm(bg[mask])
    assert np.all(local[~mask] == 0)


def test_acceptance1_lbv_keeps_the_inside_sphere_over_the_whole_mask():
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    local, kept = lbv(f, mask, VS)
    assert np.linalg.norm((local - f)[kept]) < 0.10 * np.linalg.norm(f[kept])  # measured 7.1 %


def test_acceptance1_pdf_keeps_the_inside_sphere_away_from_the_boundary():
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    local, _ = pdf(f, mask, VS)
    deep = ndimage.distance_transform_edt(mask) > 6.0
    assert np.linalg.norm((local - f)[deep]) < 0.10 * np.linalg.norm(f[deep])  # measured 8.6 %


def test_inside_sphere_errors_match_the_continuous_theory_on_a_spherical_mask():
    """LBV: sqrt(3/7) (a/R)^1.5 = 6.2 %; PDF: sqrt(21/4) (a/R)^1.5 = 21.8 % (module notes above)."""
    mask = _sphere_mask(24)
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    q = (5.0 / 24.0) ** 1.5
    err = {name: np.linalg.norm((fn(f, mask, VS)[0] - f)[mask]) / np.linalg.norm(f[mask])
           for name, fn in KEEP_ALL.items()}
    assert abs(err["lbv"] - np.sqrt(3 / 7) * q) < 0.015   # measured 6.7 %
    assert abs(err["pdf"] - np.sqrt(21 / 4) * q) < 0.03   # measured 21.3 %


def test_harmonic_limit_removes_a_harmonic_field_and_keeps_inside_sources():
    mask = _mask()
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) - n // 2 for n in SHAPE], indexing="ij")
    h = 1e-3 * (x ** 2 - y ** 2 + 0.5 * x * z + 2 * z + 3)   # harmonic (also for the 7-point Laplacian)
    left = harmonic_limit(h, mask, VS)
    assert np.linalg.norm(left[mask]) < 1e-4 * np.linalg.norm(h[mask])  # measured 3e-8
    bg = _outside_sphere_field()
    assert np.linalg.norm(harmonic_limit(bg, mask, VS)[mask]) < 0.01 * np.linalg.norm(bg[mask])
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    kept = harmonic_limit(f, mask, VS)
    assert np.linalg.norm((kept - f)[mask]) < 0.10 * np.linalg.norm(f[mask])  # measured 6.9 %
    # linear: the limit of local + harmonic is the limit of local
    both = harmonic_limit(f + h, mask, VS)
    assert np.linalg.norm((both - kept)[mask]) < 1e-3 * np.linalg.norm(kept[mask])


def test_lbv_keeps_the_mask_less_the_peeled_layers():
    mask = _mask()
    mask[30:36, 20:24, 10:14] = False  # a notch
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    for peel in (0, 2):
        local, kept, info = lbv(f, mask, VS, peel=peel, return_info=True)
        expect = mask if peel == 0 else ndimage.binary_erosion(mask, iterations=peel)
        assert np.array_equal(kept, expect) and info["cg"].converged and info["levels"] >= 2
        edge = kept & ~ndimage.binary_erosion(kept)
        assert np.all(local[edge] == 0) and np.all(local[~kept] == 0)   # boundary layer: local = 0
        assert np.linalg.norm((local - f)[kept]) < 0.10 * np.linalg.norm(f[kept])
    with pytest.raises(InputDataError, match="peel"):
        lbv(f, mask, VS, peel=-1)


def test_pdf_noise_weight_excludes_corrupted_voxels(one_torch_thread):
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    g = np.meshgrid(*[np.arange(n) - n // 2 for n in SHAPE], indexing="ij")
    bad = mask & ((g[0] - 18) ** 2 + g[1] ** 2 + g[2] ** 2 < 16)
    corrupt = f.copy()
    corrupt[bad] += 0.5
    clean, _ = pdf(f, mask, VS)
    assert np.array_equal(pdf(f, mask, VS, noise_weight=np.full(SHAPE, 3.0, np.float32))[0], clean)  # scale-free
    ok = mask & ~bad
    weighted, _ = pdf(corrupt, mask, VS, noise_weight=np.where(bad, 0.0, 1.0).astype(np.float32))
    uniform, _ = pdf(corrupt, mask, VS)
    dev = lambda x: np.linalg.norm((x - clean)[ok]) / np.linalg.norm(clean[ok])  # noqa: E731
    assert dev(weighted) < 0.01 and dev(uniform) > 0.2   # measured 0.13 % and 38 %
    torch_cpu, _ = pdf(f, mask, VS, device="cpu")        # the torch path gives the same field
    assert np.linalg.norm(torch_cpu - clean) < 1e-4 * np.linalg.norm(clean)
    with pytest.raises(InputDataError, match="noise_weight"):
        pdf(f, mask, VS, noise_weight=np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputDataError, match="zero everywhere"):
        pdf(f, mask, VS, noise_weight=np.zeros(SHAPE, np.float32))
    with pytest.raises(InputDataError, match="same 3D grid"):
        pdf(f, mask[:-1], VS)
    with pytest.raises(InputDataError, match="same 3D grid"):
        lbv(f[:-1], mask, VS)
    empty = np.zeros(SHAPE, bool)
    for fn in (pdf, lbv):
        lo, kept = fn(f, empty, VS)
        assert not lo.any() and not kept.any()


def test_phantom_lbv_pdf_against_the_harmonic_limit(phantom_small):
    """64^3 phantom, true total field, local-field NRMSE (%) against the truth over the mask.

    Measured: harmonic limit (true local field minus its harmonic part in the mask) 55.0; LBV
    63.0 on the whole mask (22 % from the limit: the total field's outermost voxel layer, next to
    the skull, is not harmonic); LBV with peel 1: 47.3 on its mask (88.5 % kept) against that
    mask's limit 47.0; PDF 45.6 on the whole mask, below the limit (it keeps harmonic information).
    """
    ph = phantom_small
    vs = ph.magnitude.voxel_size
    tot, loc, m = (ph.truth[k].data for k in ("total_field", "local_field", "mask"))
    m = m > 0
    hl = harmonic_limit(loc, m, vs)
    limit = nrmse(loc, hl, m)
    lo_lbv, kept = lbv(tot, m, vs)
    lo_pdf, _ = pdf(tot, m, vs, ph.magnitude.b0_direction)
    assert np.array_equal(kept, m)
    assert 50 < limit < 60
    assert nrmse(loc, lo_lbv, m) < limit + 10
    assert nrmse(loc, lo_pdf, m) < limit - 5
    lo1, kept1 = lbv(tot, m, vs, peel=1)
    assert nrmse(loc, lo1, kept1) < nrmse(loc, harmonic_limit(loc, kept1, vs), kept1) + 1.0


@pytest.mark.parametrize("method", ["lbv", "pdf"])
def test_keep_all_stages_through_the_registry(method, one_torch_thread):
    cls = load_registry().get("background", method)
    assert cls is {"lbv": Lbv, "pdf": Pdf}[method]
    assert cls.reads == ("total_field", "mask") and cls.writes == ("local_field", "mask")
    mask = _mask()
    f, _ = sphere_field(SHAPE, VS, 5.0, 1.0, (0, 0, 1))
    params = {"device": "cpu"} if method == "pdf" else {}
    out = run_stage(cls, _art(f, mask), params)
    lf, em = out["local_field"], out["mask"].data
    assert lf.units == "ppm" and lf.data.dtype == np.float32 and np.array_equal(em, mask)
    if method == "pdf":
        art = _art(f, mask)
        art["noise_weight"] = Volume.from_array(np.ones(SHAPE, np.float32), VS)
        assert np.allclose(run_stage(cls, art, params)["local_field"].data, lf.data, atol=1e-6)
        art["noise_weight"] = Volume.from_array(np.ones((8, 8, 8), np.float32), VS)
        with pytest.raises(GeometryError, match="noise_weight"):
            run_stage(cls, art, params)
    else:
        thin = np.zeros(SHAPE, bool)
        thin[10:50, 10:50, 31:33] = True
        with pytest.raises(StageError, match="peel"):
            run_stage(cls, _art(f, thin), {"peel": 1})
    with pytest.raises(StageError, match="empty"):
        run_stage(cls, _art(f, np.zeros(SHAPE, bool)), params)
    with pytest.raises(GeometryError):
        run_stage(cls, _art(f, mask[:-1]), params)
    bad = f.copy()
    bad[32, 32, 32] = np.nan
    with pytest.raises(InputDataError, match="NaN or infinite"):
        run_stage(cls, _art(bad, mask), params)


# =========================================================================== life-size brain
# Acceptance 1 again on a brain-sized ellipsoid (132 x 160 x 116 mm, 2 mm voxels): a 6 mm sphere
# at its centre (chi 1 ppm) and an 8 mm air-like sphere 13 mm above its top. The two inside-sphere
# limits above scale in opposite ways with the mask: RESHARP's and PDF's harmonic projection as
# (a/R)^1.5 (smaller here), SHARP's TSVD loss of the low frequencies with the eroded mask's size
# (larger here). Measured (own mask; whole mask for lbv and pdf):
#
# ============  =====================  ===================  ===========
# method        outside sphere left    inside sphere error  mask kept
# ============  =====================  ===================  ===========
# sharp (6 mm)  0.14 %                 13.8 % (fails)       76 %
# resharp       0.05 %                 8.3 %                85 %
# ismv (2 mm)   0.09 %                 2.0 %                85 %
# lbv           0.16 %                 2.3 %                100 %
# pdf           0.31 %                 7.1 %                100 %
# vsharp        0.19 %                 3.2 %                85 %
# ============  =====================  ===================  ===========
#
# SHARP passes here with SEPIA's threshold 0.03 (6.8 %), but that costs 7 points of local-field
# NRMSE on the simulator's whole head (26.9 -> 33.9 %), so the default stays Schweser's 0.05.

LIFE_SHAPE, LIFE_VS, LIFE_AXES = (80, 96, 72), (2.0, 2.0, 2.0), (66.0, 80.0, 58.0)
LIFE = {"sharp": sharp, "resharp": resharp, "ismv": ismv, "lbv": lbv, "pdf": pdf, "vsharp": vsharp}


@pytest.fixture(scope="module")
def life_size():
    mask = _ellipsoid(LIFE_SHAPE, LIFE_VS, LIFE_AXES)
    inside, _ = sphere_field(LIFE_SHAPE, LIFE_VS, 6.0, 1.0, (0, 0, 1))
    outside = _outside_sphere_field(LIFE_AXES[2] + 13 + 8, LIFE_SHAPE, LIFE_VS)
    return mask, inside, outside


def _life_error(method, field, life_size):
    mask = life_size[0]
    local, kept = LIFE[method](field, mask, LIFE_VS)[:2]
    assert not (kept & ~mask).any() and np.all(local[~kept] == 0)
    return local, kept


@pytest.mark.parametrize("method", sorted(LIFE))
def test_acceptance1_life_size_brain_removes_the_outside_sphere(method, life_size, one_torch_thread):
    _, _, outside = life_size
    local, kept = _life_error(method, outside, life_size)
    assert np.linalg.norm(local[kept]) < 0.01 * np.linalg.norm(outside[kept])  # measured 0.05-0.31 %


@pytest.mark.parametrize("method", ["resharp", "ismv", "lbv", "pdf", "vsharp"])
def test_acceptance1_life_size_brain_keeps_the_inside_sphere(method, life_size, one_torch_thread):
    _, inside, _ = life_size
    local, kept = _life_error(method, inside, life_size)
    assert np.linalg.norm((local - inside)[kept]) < 0.10 * np.linalg.norm(inside[kept])  # table above


def test_sharp_tsvd_loss_on_the_life_size_brain_is_what_was_measured(life_size):
    """SHARP's inside-sphere error on the brain-sized mask (table above), so a change shows."""
    mask, inside, _ = life_size
    err = {}
    for th in (0.05, 0.03):
        local, kept = sharp(inside, mask, LIFE_VS, threshold=th)
        err[th] = np.linalg.norm((local - inside)[kept]) / np.linalg.norm(inside[kept])
    assert 0.11 < err[0.05] < 0.17 and err[0.03] < 0.10   # measured 13.8 % and 6.8 %
