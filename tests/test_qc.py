"""QC pictures (qsmkit.qc): windows, orientation, and their place among a run's committed outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsmkit.errors import ConfigError, QsmkitWarning
from qsmkit.qc import CHI_WINDOW_PPM, QC_FILES, field_window, orthogonal_views, qc_pictures, write_qc
from qsmkit.volume import Volume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_SIM = {"shape": [48, 48, 48], "voxel_size": [3.0, 3.0, 3.0], "seed": 0}
STAGES = [{"stage": "mask", "method": "threshold"}, {"stage": "unwrap", "method": "laplacian"},
          {"stage": "echo_combine", "method": "weighted_fit"}, {"stage": "background", "method": "vsharp"},
          {"stage": "inversion", "method": "tkd"}]


def _read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path)


def _run(out, qc=None, registry=None):
    from qsmkit.pipeline import build_plan, run_plan
    from qsmkit.plugins import load_registry

    registry = registry or load_registry()
    spec = {"name": "qc-test", "inputs": {"simulate": dict(SMALL_SIM)}, "stages": STAGES}
    if qc is not None:
        spec["qc"] = qc
    plan = build_plan(spec, registry, output_dir=out)
    return run_plan(plan, registry, log=lambda m: None)


@pytest.fixture(scope="module")
def registry():
    from qsmkit.plugins import load_registry

    return load_registry()


def test_field_window_is_the_percentile_of_abs_field_in_the_mask():
    rng = np.random.default_rng(0)
    field = rng.uniform(-1.0, 1.0, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(field.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    field[~mask] = 50.0  # outside the mask: ignored
    w = field_window(field, mask)
    assert w == pytest.approx(np.percentile(np.abs(field[mask]), 99.0))
    assert 0.97 < w < 1.0


def test_orthogonal_views_cut_through_the_centre_with_the_voxel_aspect():
    a = np.zeros((10, 12, 14), np.float32)
    a[3, 4, 5] = 1.0
    views = orthogonal_views(a, (1.0, 2.0, 3.0), centre=(3, 4, 5))
    ax, asp = views["axial"]
    assert ax.shape == (12, 10) and ax[4, 3] == 1 and asp == 2.0
    cor, asp = views["coronal"]
    assert cor.shape == (14, 10) and cor[5, 3] == 1 and asp == 3.0
    sag, asp = views["sagittal"]
    assert sag.shape == (14, 12) and sag[5, 4] == 1 and asp == 1.5


def test_chi_picture_uses_the_fixed_window_and_ras_orientation(tmp_path):
    """The chi window is fixed; views are reoriented to RAS whatever the voxel order on disk."""
    n = 24
    chi = np.zeros((n, n, n), np.float32)
    chi[2:8, 8:16, 8:16] = 0.5     # low voxel x: with an LAS affine (x flipped) this is the subject's RIGHT
    chi[16:22, 8:16, 8:16] = -0.5
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    vol = Volume(chi, affine, units="ppm")
    mask = Volume(np.ones_like(chi, bool), affine, units="bool")
    pics = qc_pictures({"chi": vol, "mask": mask})
    assert [p.file for p in pics] == ["qc_chi.png"]
    pic = pics[0]
    assert (pic.vmin, pic.vmax) == CHI_WINDOW_PPM == (-0.1, 0.2)
    axial, aspect = pic.views["axial"]
    assert axial.shape == (n, n) and aspect == 1.0
    cols_pos = np.nonzero((axial > 0).any(axis=0))[0]
    cols_neg = np.nonzero((axial < 0).any(axis=0))[0]
    assert cols_pos.min() > cols_neg.max()  # neurological display: the subject's right on the right
    # the same data with an RAS affine: now the positive block is on the left
    ras = qc_pictures({"chi": Volume(chi, np.diag([2.0, 2.0, 2.0, 1.0]), units="ppm")})[0].views["axial"][0]
    assert np.nonzero((ras > 0).any(axis=0))[0].max() < np.nonzero((ras < 0).any(axis=0))[0].min()

    assert write_qc({"chi": vol, "mask": mask}, tmp_path) == ["qc_chi.png"]
    img = _read_png(tmp_path / "qc_chi.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600


def test_field_and_mask_pictures_windows(phantom_small):
    truth = phantom_small.truth
    art = {"local_field": truth["local_field"], "mask": truth["mask"], "magnitude": phantom_small.magnitude}
    pics = {p.file: p for p in qc_pictures(art, title="sub-01")}
    assert set(pics) == {"qc_local_field.png", "qc_mask.png"}
    lf = pics["qc_local_field.png"]
    m = truth["mask"].data > 0.5
    w = np.percentile(np.abs(truth["local_field"].data[m]), 99.0)
    assert lf.vmax == pytest.approx(w, rel=1e-5) and lf.vmin == -lf.vmax
    assert lf.title.startswith("sub-01: local field") and f"±{w:.3g} ppm" in lf.title
    mk = pics["qc_mask.png"]
    assert mk.outline is not None and mk.vmin == 0.0
    for view in ("axial", "coronal", "sagittal"):
        img, _ = mk.views[view]
        outline, _ = mk.outline[view]
        assert img.shape == outline.shape and outline.any() and not outline.all()


def test_a_run_commits_the_qc_pictures_with_its_outputs(tmp_path, registry):
    out = tmp_path / "run"
    res = _run(out, registry=registry)
    prov = json.loads((out / "provenance.json").read_text())
    for name in QC_FILES:
        assert (out / name).is_file(), name
        assert name in prov["outputs"]
        img = _read_png(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 600  # three panels side by side
    assert len({(out / n).read_bytes() for n in QC_FILES}) == 3
    # the mask picture: grey magnitude plus a red outline
    rgb = _read_png(out / "qc_mask.png")[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert red.sum() > 100
    assert {f.name for f in res.files} >= set(QC_FILES)
    assert not [p for p in out.iterdir() if p.name.startswith(".qsmkit")]


def test_qc_false_writes_none_and_a_rerun_removes_the_old_ones(tmp_path, registry):
    out = tmp_path / "run"
    _run(out, registry=registry)
    assert all((out / n).exists() for n in QC_FILES)
    _run(out, qc=False, registry=registry)  # a rerun of the same pipeline replaces the outputs as a set
    assert not any((out / n).exists() for n in QC_FILES)
    prov = json.loads((out / "provenance.json").read_text())
    assert not set(QC_FILES) & set(prov["outputs"])
    assert (out / "chi.nii.gz").is_file()


def test_qc_must_be_a_boolean(tmp_path, registry):
    with pytest.raises(ConfigError, match="qc = 'yes'"):
        _run(tmp_path / "run", qc="yes", registry=registry)


def test_an_interrupted_commit_leaves_no_picture(tmp_path, registry, monkeypatch):
    from qsmkit.pipeline.outputs import OutputFolder

    def killed(self, names):
        assert set(QC_FILES) <= set(names)  # they are staged with everything else...
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputFolder, "commit", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, registry=registry)
    assert not out.exists() or not list(out.iterdir())  # ...and gone with the staging folder


def test_a_drawing_failure_costs_only_the_pictures(tmp_path, registry, monkeypatch):
    import qsmkit.qc

    def broken(*a, **k):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(qsmkit.qc, "write_qc", broken)
    out = tmp_path / "run"
    with pytest.warns(QsmkitWarning, match="QC pictures not drawn"):
        _run(out, registry=registry)
    assert (out / "chi.nii.gz").is_file() and (out / "provenance.json").is_file()
    assert not any((out / n).exists() for n in QC_FILES)


def test_progress_bars_are_silent_off_a_terminal(monkeypatch, capsys):
    from qsmkit import progress as pg

    monkeypatch.delenv(pg.ENV, raising=False)
    it = range(5)
    assert pg.progress(it, "x") is it  # pytest's stderr is not a terminal
    with pg.progress_callback(5, "x") as tick:
        tick(3, None, 0.1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(pg.ENV, "1")
    assert list(pg.progress(range(3), "forced")) == [0, 1, 2]
    with pg.progress_callback(4, "forced") as tick:
        for k in range(1, 5):
            tick(k)
    err = capsys.readouterr().err
    assert "forced" in err and "/4 " in err  # drawn, then cleared (leave=False)
    monkeypatch.setenv(pg.ENV, "0")
    assert not pg.enabled()
