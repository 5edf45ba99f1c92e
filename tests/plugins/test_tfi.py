"""Total field inversion (inversion/tfi): two-compartment phantom against PDF + MEDI, pipeline, bad input."""

import numpy as np
import pytest

from helpers import run_stage
from qsmkit.errors import GeometryError, InputDataError, MissingArtifactError, StageError
from qsmkit.metrics import nrmse
from qsmkit.operators import Dipole
from qsmkit.volume import Volume

pytest.importorskip("torch")

SHAPE, VS, B0 = (40, 40, 40), (3.0, 3.0, 3.0), (0.0, 0.0, 1.0)
CHI_AIR = 9.4


def _ellipsoid(c_mm, s_mm):
    g = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(SHAPE, VS)]
    x, y, z = np.meshgrid(*g, indexing="ij")
    return ((x - c_mm[0]) / s_mm[0]) ** 2 + ((y - c_mm[1]) / s_mm[1]) ** 2 + ((z - c_mm[2]) / s_mm[2]) ** 2 <= 1


@pytest.fixture(scope="module")
def two_compartment():
    """A head in air: brain with three sources, and an air-filled sinus in the head outside the brain.

    chi relative to tissue; the air (outside the head and in the sinus) is +9.4 ppm. The total field
    is the field of ``chi - 9.4`` over the head on a grid zero-padded 2x (the head is an object in
    air), plus a 0.05 ppm offset (the scanner's frequency offset)."""
    head = _ellipsoid((0, 0, 0), (50, 56, 50))
    brain = _ellipsoid((0, -4, 8), (36, 40, 32))
    sinus = _ellipsoid((0, 38, -14), (10, 7, 8)) & head & ~brain
    chi = np.zeros(SHAPE, np.float32)
    chi[_ellipsoid((-12, 0, 8), (7, 7, 7))] = 0.15
    chi[_ellipsoid((14, -10, 2), (5, 8, 5))] = -0.1
    chi[_ellipsoid((2, 18, 18), (6, 5, 5))] = 0.2
    chi[~brain] = 0.0
    chi_head = np.where(sinus, CHI_AIR, chi) - CHI_AIR
    total = Dipole(SHAPE, VS, B0, padding=2.0).apply(np.where(head, chi_head, 0).astype(np.float32)) + 0.05
    mag = np.where(head, 1.0, 0.0) * np.where(brain, 0.8, 1.0) * ~sinus
    rng = np.random.default_rng(0)
    mag = (mag + rng.normal(0, 0.01, SHAPE)).astype(np.float32)
    nw = np.where(head & ~sinus, 200.0 * np.abs(mag), 0.0).astype(np.float32)
    total = np.where(head & ~sinus, total, 0).astype(np.float32)
    return dict(total=total, chi=chi, brain=brain, head=head, sinus=sinus, mag=mag, nw=nw)


def _vol(a, units=""):
    return Volume.from_array(np.asarray(a), VS, units=units, b0_direction=B0)


def _art(ph, **extra):
    return {"total_field": _vol(ph["total"], "ppm"), "mask": _vol(ph["brain"], "bool"),
            "magnitude": _vol(ph["mag"]), "noise_weight": _vol(ph["nw"]), "field_strength": 3.0,
            "echo_times": np.array([0.005, 0.010, 0.015]), **extra}


def _err(ph, chi):
    b = ph["brain"]
    return nrmse(ph["chi"] - ph["chi"][b].mean(), chi - chi[b].mean(), b)


def test_registered_through_entry_point():
    from qsmkit.plugins import load_registry

    cls = load_registry().get("inversion", "tfi")
    assert cls.reads == ("total_field", "mask") and "head_mask" in cls.optional_reads


def test_tfi_beats_pdf_plus_medi_next_to_an_air_sinus(two_compartment, one_torch_thread):
    """Acceptance 1 (issue 17): chi inside the brain matches the truth better than PDF + MEDI."""
    from qsmkit.plugins import load_registry

    ph = two_compartment
    reg = load_registry()
    art = _art(ph)
    gn = run_stage(reg.get("inversion", "tfi"), art, {"solver": "gauss-newton", "max_iter": 30, "cg_max_iter": 30,
                                                      "tol": 0.0})
    admm = run_stage(reg.get("inversion", "tfi"), art)     # defaults: ADMM, offset fitted
    e_gn, e_admm = _err(ph, gn["chi"].data), _err(ph, admm["chi"].data)
    loc = run_stage(reg.get("background", "pdf"), art)
    two = run_stage(reg.get("inversion", "medi"), {**art, **loc})
    e_two = _err(ph, two["chi"].data)
    assert e_gn < 0.85 * e_two, (e_gn, e_two)       # measured: 31 % vs 41 %
    assert e_admm < 0.25 * e_two, (e_admm, e_two)   # measured: 1.4 %
    for out in (gn, admm):
        # chi is returned over the support: the sinus (air) comes out strongly paramagnetic
        chi = out["chi"].data
        assert np.median(chi[ph["sinus"]]) > 3.0
        assert (chi[~ph["head"]] != 0).mean() < 0.02          # zero outside the support (derived: about the head)


def test_given_head_mask_and_offset_free(two_compartment, one_torch_thread):
    """A given support gives the same kind of result, and a constant added to the field changes nothing."""
    from qsmkit_tfi import tfi

    ph = two_compartment
    kw = dict(field_strength=3.0, echo_times=[0.005, 0.01, 0.015], max_iter=6, cg_max_iter=20)
    a = tfi(ph["total"], ph["brain"], VS, B0, ph["head"], ph["mag"], ph["nw"], **kw)
    b = tfi(np.where(ph["head"], ph["total"] + 0.3, 0), ph["brain"], VS, B0, ph["head"], ph["mag"], ph["nw"], **kw)
    assert a.support.sum() == ph["head"].sum()
    assert nrmse(a.chi, b.chi, ph["brain"]) < 5.0
    assert a.cost[-1] < a.cost[0]
    assert all(c2 <= c1 * (1 + 1e-6) for c1, c2 in zip(a.cost, a.cost[1:]))


def test_head_mask_from_magnitude_contains_brain_and_sinus(two_compartment):
    from qsmkit_tfi import head_mask

    ph = two_compartment
    h = head_mask(ph["mag"], ph["brain"], VS)
    assert h[ph["brain"]].all() and h[ph["sinus"]].mean() > 0.95
    assert h.sum() < 1.1 * ph["head"].sum()


def test_bad_input(two_compartment):
    cls = __import__("qsmkit_tfi").TFI
    ph = two_compartment
    with pytest.raises(StageError, match="empty"):
        run_stage(cls, _art(ph, mask=_vol(np.zeros(SHAPE, bool), "bool")))
    small = _ellipsoid((0, 0, 8), (20, 20, 20))
    with pytest.raises(InputDataError, match="must contain the brain"):
        run_stage(cls, _art(ph, head_mask=_vol(small, "bool")))
    with pytest.raises(GeometryError, match="grid"):
        run_stage(cls, _art(ph, magnitude=Volume.from_array(np.ones((20, 20, 20), np.float32), VS)))
    art = _art(ph)
    del art["magnitude"]
    with pytest.raises(MissingArtifactError, match="magnitude"):
        run_stage(cls, art)


def test_pipeline_without_background_stage_validates(tmp_path):
    """unwrap -> mask -> echo_combine -> inversion(tfi) -> reference: no background stage needed."""
    from pathlib import Path

    from qsmkit.pipeline.plan import load_plan
    from qsmkit.plugins import load_registry

    root = Path(__file__).resolve().parents[2]
    spec = (root / "pipelines" / "tfi.yaml").read_text()
    assert "background" not in [ln.split("stage:")[1].split(",")[0].strip() for ln in spec.splitlines()
                                if "stage:" in ln and not ln.lstrip().startswith("#")]
    p = tmp_path / "tfi_sim.yaml"
    p.write_text(spec.replace("  magnitude: sub-01/mag.nii.gz\n  phase: sub-01/phase.nii.gz\n",
                              "  simulate: {shape: [32, 32, 32], voxel_size: [4, 4, 4], oversample: 1}\n"))
    plan = load_plan(p, load_registry(), output_dir=tmp_path / "out")
    steps = {s.kind: s for s in plan.steps}
    assert steps["inversion"].method == "tfi" and all(s.run for s in plan.steps)
    with pytest.raises(MissingArtifactError, match="total_field"):   # without echo_combine nothing makes it
        text = p.read_text()
        start = text.index("  - stage: echo_combine")
        end = text.index("  - stage: inversion")
        p.write_text(text[:start] + text[end:])
        load_plan(p, load_registry(), output_dir=tmp_path / "out2")


def test_auto_preconditioner_follows_the_background_field(two_compartment):
    from qsmkit_tfi import auto_preconditioner
    from qsmkit_tfi.tfi import AUTO_P_RANGE

    ph = two_compartment
    data, brain = ph["head"] & ~ph["sinus"], ph["brain"]
    f = ph["total"] - np.median(ph["total"][brain])
    p1 = auto_preconditioner(f, brain, data)
    p2 = auto_preconditioner(np.where(brain, f, 0.5 * f), brain, data)
    assert AUTO_P_RANGE[0] <= p2 <= p1 <= AUTO_P_RANGE[1]
    if AUTO_P_RANGE[0] < p2 and p1 < AUTO_P_RANGE[1]:
        assert p2 == pytest.approx(0.5 * p1, rel=0.05)


# --------------------------------------------------------------------------- solver: admm
@pytest.fixture(scope="module")
def head2mm():
    """The simulator's head at 2 mm (90x108x90, its default oversampling 2: tissue boundaries inside
    voxels, as in real data): true total field, magnitude, noise weight, truth."""
    from qsmkit.physics import GAMMA_BAR
    from qsmkit.simulate import simulate_phantom

    ph = simulate_phantom(shape=(90, 108, 90), voxel_size=(2.0,) * 3, seed=0)
    mag, te = ph.magnitude.data, np.asarray(ph.echo_times)
    nw = np.sqrt(np.sum((mag * te) ** 2, axis=3)) * (2 * np.pi * GAMMA_BAR * ph.field_strength * 1e-6
                                                     / ph.meta["noise_sigma"])
    g = ph.magnitude
    vol = lambda a, u="": Volume.from_array(np.asarray(a), g.voxel_size, units=u, b0_direction=g.b0_direction)  # noqa: E731
    art = {"total_field": vol(ph.truth["total_field"].data, "ppm"), "mask": vol(ph.truth["mask"].data > 0, "bool"),
           "magnitude": vol(mag), "noise_weight": vol(nw.astype(np.float32)), "field_strength": ph.field_strength,
           "echo_times": te}
    return art, ph.truth["chi"].data, ph.truth["mask"].data > 0, ph.truth["local_field"].data


def test_admm_beats_every_two_step_result_on_the_simulated_head(head2mm, one_torch_thread):
    """Acceptance 2 (issue 17) on a realistic head: default TFI below PDF + MEDI and below MEDI from the
    harmonic-free local field (the limit of every background method that removes harmonic fields).

    Measured (bench_inversion.py, 2 mm): TFI 37.3 %, PDF + MEDI 54.2 %, harmonic-free + MEDI 48.4 %
    (MEDI from the TRUE local field 14.4 %). At 1 mm (2 mm first, bench_inversion.py): 14.6 %
    against 15.2 % for the one-level solve."""
    from qsmkit.plugins import load_registry
    from qsmkit_bgremove import harmonic_limit

    art, chi_t, m, local = head2mm
    reg = load_registry()
    err = lambda chi: nrmse(chi_t - chi_t[m].mean(), chi - chi[m].mean(), m)  # noqa: E731
    e_tfi = err(run_stage(reg.get("inversion", "tfi"), art)["chi"].data)
    # coarse to fine (by default for 1 mm data, 2 mm first; here 4 mm first, then 150 iterations at 2 mm)
    e_c2f = err(run_stage(reg.get("inversion", "tfi"), art, {"coarse_mm": 4.0})["chi"].data)
    medi = lambda loc: err(run_stage(reg.get("inversion", "medi"), {**art, **loc})["chi"].data)  # noqa: E731
    e_pdf = medi(run_stage(reg.get("background", "pdf"), art))
    hf = harmonic_limit(local, m, art["mask"].voxel_size)
    e_hf = medi({"local_field": art["total_field"].like(np.where(m, hf, 0).astype(np.float32), units="ppm")})
    assert e_tfi < 42.0 and e_tfi < min(e_pdf, e_hf) - 5.0, (e_tfi, e_pdf, e_hf)
    assert e_c2f < e_tfi + 7.0 and e_c2f < min(e_pdf, e_hf), (e_c2f, e_tfi)   # measured 42.1 %


def test_admm_fitted_offset_is_equivariant_and_reported(two_compartment, one_torch_thread):
    """offset: fit gives the same map when a constant is added to the field, and reports the offset."""
    from qsmkit_tfi import tfi_admm

    ph = two_compartment
    kw = dict(field_strength=3.0, echo_times=[0.005, 0.01, 0.015], max_iter=60)
    a = tfi_admm(ph["total"], ph["brain"], VS, B0, ph["head"], ph["mag"], ph["nw"], **kw)
    b = tfi_admm(np.where(ph["head"], ph["total"] + 0.3, 0), ph["brain"], VS, B0, ph["head"], ph["mag"], ph["nw"],
                 **kw)
    assert abs((b.offsets[-1] - a.offsets[-1]) - 0.3) < 1e-3
    assert nrmse(a.chi, b.chi, ph["brain"]) < 0.5
    assert a.n_iter == 60 and len(a.update) == 6


def test_admm_bad_offset_is_a_parameter_error(two_compartment):
    from qsmkit.errors import ParameterError
    from qsmkit.plugins import load_registry

    with pytest.raises(ParameterError, match="offset must be 'fit', 'search' or a number"):
        run_stage(load_registry().get("inversion", "tfi"), _art(two_compartment), {"offset": "zero"})


def test_admm_prolongation_reproduces_a_linear_field(two_compartment):
    """The coarse level's variables reach the input grid by trilinear interpolation at the block centres."""
    import torch
    from qsmkit_tfi.admm import _coarsen, _Level, _prolong, _State
    from qsmkit_tfi.tfi import _checked_inputs

    ph = two_compartment
    f, brain, sup, _, mag, w, data = _checked_inputs(ph["total"], ph["brain"], ph["head"], ph["mag"], ph["nw"], VS, 0.9)
    kw = dict(edge_percentage=0.9, background_tv=0.05, chi_air=CHI_AIR, margin_mm=10.0, thr_scale=0.01,
              dev=torch.device("cpu"))
    fine = _Level.build(f, brain, sup, mag, w, data, VS, B0, **kw)
    coarse = _Level.build(*_coarsen(f, brain, sup, mag, w, data, (2, 2, 2)), (6.0,) * 3, B0, **kw)
    off = lambda lev, a: lev.pb.box[a].start - lev.pb.inner[a].start  # noqa: E731  work index -> input index
    # input-grid coordinate along x, as the coarse grid holds it and as the fine grid must get it
    xc = 2 * (np.arange(coarse.pb.shape[0]) + off(coarse, 0)) + 0.5
    vol = torch.from_numpy(np.broadcast_to(xc[:, None, None], coarse.pb.shape).astype(np.float32).copy())
    state = _prolong(_State(vol, vol, vol, torch.stack([vol] * 3), torch.stack([vol] * 3), 0.1), coarse, fine, (2, 2, 2))
    want = np.arange(fine.pb.shape[0]) + off(fine, 0)
    inside = (want >= xc[0]) & (want <= xc[-1])
    assert inside.sum() > 0.8 * len(want) and state.c == 0.1
    for got in (state.x, state.v, state.u[2]):
        assert got.shape == fine.pb.shape
        np.testing.assert_allclose(got.numpy()[inside, 3, 5], want[inside], atol=1e-4)

