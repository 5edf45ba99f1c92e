"""TV-ADMM and RTS inversion (plugins/qsmkit_tv; issue 17)."""

import numpy as np
import pytest

from qsmkit import metrics as qm
from qsmkit.errors import GeometryError, InputDataError
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_tkd import tkd
from qsmkit_tv import rts, tv_admm
from helpers import run_cli, sphere_field

VS = (1.0, 1.0, 1.0)


def demeaned_nrmse(est, truth, mask):
    return qm.nrmse(np.where(mask, truth - truth[mask].mean(), 0), np.where(mask, est - est[mask].mean(), 0), mask)


@pytest.fixture(scope="module")
def phantom():
    from qsmkit.simulate import simulate_phantom

    ph = simulate_phantom(shape=(64, 64, 64), voxel_size=VS, seed=0)
    f = ph.truth["local_field"]
    return f.data, ph.truth["mask"].data > 0, ph.truth["chi"].data, f.voxel_size, f.b0_direction


def test_tv_and_rts_beat_tkd_on_phantom(phantom):
    f, m, chi, vs, b0 = phantom
    e_tkd = demeaned_nrmse(tkd(f, m, vs, b0), chi, m)
    e_tv = demeaned_nrmse(tv_admm(f, m, vs, b0), chi, m)
    e_rts = demeaned_nrmse(rts(f, m, vs, b0), chi, m)
    # measured (defaults): TKD 35.2 %, TV 19.4 %, RTS 24.0 % (25.9 % with the published step 1)
    assert e_tv <= 0.65 * e_tkd, (e_tv, e_tkd)
    assert e_rts <= 0.8 * e_tkd, (e_rts, e_tkd)


def test_rts_step1_recovers_the_well_conditioned_spectrum():
    """Step 1 on the field of a mask-supported chi (linear convolution, no wrap-around): with the
    step-1 padding, MINRES recovers chi's spectrum on the cone; on the unpadded periodic grid
    the field of the brain's periodic copies spoils it."""
    import importlib

    import torch
    from scipy import ndimage

    from qsmkit.operators import Dipole
    from qsmkit_tv.tv import WorkGrid

    step1 = importlib.import_module("qsmkit_tv.rts")._step1
    shape, b0 = (48, 48, 48), (0.0, 0.0, 1.0)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = (g[0] / 18) ** 2 + (g[1] / 20) ** 2 + (g[2] / 16) ** 2 < 1
    smooth = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), 2.0)
    chi = np.where(mask, 0.3 * smooth + 0.05, 0).astype(np.float32)
    big = tuple(3 * n for n in shape)
    x = torch.zeros(big)
    x[:48, :48, :48] = torch.from_numpy(chi)
    f = Dipole(big, VS, b0, padding=1.0).apply(x)[:48, :48, :48].numpy()
    grid = WorkGrid.make(f, mask, VS, b0, 1.0, 4, "rts")
    cone = Dipole(grid.fft_shape, VS, b0, padding=1.0, device="cpu").kernel.abs() > 0.15
    ref = torch.fft.rfftn(grid.to_work(chi, "cpu"))[cone]

    def err(pad, it):
        x1, n, fs1 = step1(grid, f, VS, b0, it, 0.03, pad, "cpu")
        assert n == it and all(a >= b + 40 for a, b in zip(fs1, grid.sub_shape)) == (pad > 0)
        return float((torch.fft.rfftn(x1)[cone] - ref).abs().norm() / ref.abs().norm())

    # measured: padded 15.1 % (8 iterations, the default), 6.3 % (30); unpadded 56 % and 91 %
    assert err(40.0, 30) < 0.10 and err(40.0, 8) < 0.20
    assert err(0.0, 8) > 0.4


def test_zero_field_gives_zero_chi(phantom):
    _, m, _, vs, b0 = phantom
    z = np.zeros(m.shape, np.float32)
    for chi in (tv_admm(z, m, vs, b0, max_iter=5), rts(z, m, vs, b0, max_iter=5)):
        assert chi.dtype == np.float32 and chi.shape == m.shape
        assert np.abs(chi).max() == 0


@pytest.mark.parametrize("method", ["tv", "rts"])
def test_sphere_field_inverts_to_positive_sphere(method):
    shape, radius, c = (48, 48, 48), 8.0, 0.2
    b0 = (0.0, 0.0, 1.0)
    field, r = sphere_field(shape, VS, radius, c, b0)
    m = r < 20
    inv = tv_admm if method == "tv" else rts
    chi = inv(field, m, VS, b0)
    inside = chi[r < radius - 1.5].mean() - chi[m & (r > radius + 3)].mean()
    assert inside == pytest.approx(c, rel=0.2)
    assert abs(chi[m & (r > radius + 4)].mean()) < 0.1 * c


def test_bad_inputs_raise_one_line_errors():
    f = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(InputDataError, match="mask is empty"):
        tv_admm(f, np.zeros_like(f, bool), VS, (0, 0, 1))
    with pytest.raises(GeometryError):
        rts(f, np.ones((8, 8, 7), bool), VS, (0, 0, 1))
    with pytest.raises(InputDataError, match="b0_dir"):
        tv_admm(f, np.ones_like(f, bool), VS, (0, 0, 0))
    with pytest.raises(InputDataError, match="delta"):
        rts(f, np.ones_like(f, bool), VS, (0, 0, 1), delta=0.9)


@pytest.mark.parametrize("name", ["tv", "rts"])
def test_stage_through_registry_keeps_geometry(name):
    field, r = sphere_field((32, 32, 32), VS, 5.0, 0.2, (0, 0, 1))
    vol = Volume.from_array(field, VS, units="ppm")
    mask = vol.like(r < 14)
    cls = load_registry().get("inversion", name)
    assert cls.reads == ("local_field", "mask") and cls.writes == ("chi",)
    p = cls.validate_params({"max_iter": 10, "device": "cpu"}, "t")
    out = cls().run(StageContext({"local_field": vol, "mask": mask}, log=lambda s: None), p)
    chi = out["chi"]
    assert chi.units == "ppm" and np.array_equal(chi.affine, vol.affine)
    assert chi.data.dtype == np.float32 and chi.data.shape == (32, 32, 32)


@pytest.mark.parametrize("name", ["tv", "rts"])
def test_pipeline_run_from_local_field_files(tmp_path, capsys, name):
    sim = tmp_path / "sim"
    assert run_cli(["simulate", sim, "--shape", "24,24,20", "--voxel-size", "2,2,2"], capsys)[0] == 0
    p = tmp_path / "q.yaml"
    p.write_text(f"name: q\ninputs: {{local_field: {sim}/local_field.nii.gz, mask: {sim}/mask.nii.gz}}\n"
                 f"stages:\n  - {{stage: inversion, method: {name}, params: {{max_iter: 20}}}}\n"
                 "  - {stage: reference, method: mean}\noutput_dir: out\n")
    code, _, err = run_cli(["run", p], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "chi.nii.gz").exists()
