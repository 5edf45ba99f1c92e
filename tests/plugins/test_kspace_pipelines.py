"""The shipped k-space pipelines validate, and run end to end on simulated files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("h5py")

from qsmkit_kspace.simulate import simulate_kspace_files  # noqa: E402

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
CASES = [
    ("fastmri_zero_filled.yaml", "fastmri", []),
    ("fastmri_sense.yaml", "fastmri", ["stages.3.params.max_iter=10"]),
    ("fastmri_cs.yaml", "fastmri", ["stages.3.params.max_iter=10"]),
    ("skmtea_sense.yaml", "skmtea", ["stages.3.params.max_iter=10"]),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return simulate_kspace_files(tmp_path_factory.mktemp("kspace_pipes"), matrix=(32, 96), n_slices=2, n_coils=8,
                                 skmtea_shape=(3, 40, 32), accelerations=(4.0,), seed=2)


@pytest.mark.parametrize("name,key,extra", CASES)
def test_pipeline_runs(name, key, extra, files, tmp_path):
    pipeline = pytest.importorskip("qsmkit.pipeline")
    from qsmkit.plugins import load_registry

    reg = load_registry()
    out = tmp_path / "out"
    plan = pipeline.load_plan(PIPELINES / name, reg, overrides=[f"inputs.kspace={files[key]}", *extra],
                              output_dir=out)
    reader = plan.steps[0]
    assert reader.kind == "kspace_read" and all(s.run for s in plan.steps)
    pipeline.run_plan(plan, reg, log=lambda m: None)
    names = {p.name for p in out.iterdir()}
    assert {"image.nii.gz", "metrics.json", "provenance.json"} <= names
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"nmse", "psnr", "ssim"} and 0 < m["ssim"] <= 1
    import nibabel as nib

    img = nib.load(out / "image.nii.gz")
    if key == "fastmri":
        assert img.shape == (32, 96, 2)
        assert img.header.get_zooms()[:3] == pytest.approx((0.5, 0.5, 3.0))
    else:
        assert img.shape == (3, 40, 32)
