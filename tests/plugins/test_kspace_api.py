"""The public k-space extension points (``qsmkit.kspace``): a third-party recon method on ReconStage."""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("h5py")

import qsmkit.kspace as K  # noqa: E402
from qsmkit import hookimpl  # noqa: E402
from qsmkit.plugins import load_registry  # noqa: E402
from helpers import run_stage  # noqa: E402


class MapsAdjoint(K.ReconStage):
    """A third-party method written only against the public core API: ``sum_c conj(S_c) ifft(y_c)``."""

    name = "maps_adjoint_example"
    reads = ("kspace", "maps")
    params = K.RECON_PARAMS + (K.DEVICE_PARAM,)

    def reconstruct(self, y, maps, mask, p, ctx):
        from qsmkit.fft import ifftnc_torch

        return (maps.conj() * ifftnc_torch(y).unsqueeze(1)).sum(2)


@pytest.fixture(scope="module")
def skmtea(tmp_path_factory):
    from qsmkit_kspace.simulate import simulate_kspace_files

    files = simulate_kspace_files(tmp_path_factory.mktemp("api"), matrix=(32, 40), n_slices=2, n_coils=4,
                                  skmtea_shape=(3, 32, 24), seed=3)
    import qsmkit_kspace

    return run_stage(qsmkit_kspace.SkmTeaRead, {"kspace": files["skmtea"]})


def test_old_names_are_the_public_ones():
    import qsmkit_kspace
    from qsmkit_kspace import kdata, transforms

    assert qsmkit_kspace.KSpaceData is kdata.KSpaceData is K.KSpaceData
    assert qsmkit_kspace.ReconStage is K.ReconStage and issubclass(qsmkit_kspace._Recon, K.ReconStage)
    assert transforms.center_crop is K.center_crop and transforms.normalization_scale is K.normalization_scale
    assert all(issubclass(c, K.ReconStage) for c in (qsmkit_kspace.ZeroFilled, qsmkit_kspace.Sense,
                                                   qsmkit_kspace.CSWavelet))


def test_third_party_recon_registers_and_matches_the_builtin(skmtea):
    import qsmkit_kspace

    plugin = types.ModuleType("maps_adjoint_plugin")
    plugin.qsmkit_register_stages = hookimpl(lambda registry: registry.add(MapsAdjoint))
    reg = load_registry(extra_plugins=[plugin])
    assert reg.get("recon", "maps_adjoint_example") is MapsAdjoint
    mine = run_stage(MapsAdjoint, skmtea)
    builtin = run_stage(qsmkit_kspace.ZeroFilled, skmtea, {"combine": "maps"})
    assert mine["image"].data.shape == builtin["image"].data.shape == (3, 32, 24)
    np.testing.assert_allclose(mine["image"].data, builtin["image"].data, rtol=1e-5, atol=1e-6)
    assert "metrics" not in mine  # the core base reports none by default; the built-ins report fastMRI's
    assert set(builtin["metrics"]) == {"nmse", "psnr", "ssim"}


def test_missing_maps_and_wrong_artifacts_are_one_line_errors(skmtea):
    from qsmkit.errors import GeometryError, MissingArtifactError

    no_maps = {k: v for k, v in skmtea.items() if k != "maps"}
    with pytest.raises(MissingArtifactError, match="needs 'maps'; add a coil_maps stage"):
        run_stage(MapsAdjoint, no_maps)
    with pytest.raises(MissingArtifactError, match="needs k-space data but 'kspace' is str"):
        run_stage(MapsAdjoint, {**skmtea, "kspace": "file.h5"})
    with pytest.raises(GeometryError, match="sampling mask of shape \\(5,\\) does not match"):
        run_stage(MapsAdjoint, {**skmtea, "sampling_mask": np.ones(5, bool)})
