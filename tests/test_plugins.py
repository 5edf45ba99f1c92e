"""Plugin discovery: built-ins and a separately packaged third-party plugin through entry points."""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qsmkit import Stage, hookimpl
from qsmkit.errors import PluginError
from qsmkit.plugins import load_registry
from helpers import run_cli_subprocess, sphere_field, write_nifti

HERE = Path(__file__).parent


def _module(name, hook):
    mod = types.ModuleType(name)
    mod.qsmkit_register_stages = hook
    return mod


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The example third-party and broken plugin distributions, pip-installed into a private folder."""
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")
    for dist in ("thirdparty", "broken"):
        src = shutil.copytree(HERE / "plugins" / dist, sources / dist)  # builds leave nothing in the checkout
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], check=True)
    return target


def test_builtin_plugins_register_through_entry_points():
    reg = load_registry()
    assert reg.get("inversion", "tkd").name == "tkd"
    assert reg.provider("inversion", "tkd") == ("tkd", "qsmkit")


def test_unknown_kind_and_method_messages():
    reg = load_registry()
    with pytest.raises(PluginError, match="unknown stage kind 'nope'; known kinds: mask, unwrap"):
        reg.get("nope", "x")
    with pytest.raises(PluginError, match="unknown inversion method 'tkdd'; valid methods: .*tkd"):
        reg.get("inversion", "tkdd")


def test_plugin_raising_in_hook_is_isolated():
    @hookimpl
    def qsmkit_register_stages(registry):
        raise RuntimeError("boom")

    bad = _module("bad_direct", qsmkit_register_stages)
    reg = load_registry(extra_plugins=[bad])
    assert any(f.name == "bad_direct" and "boom" in f.reason for f in reg.failures)
    assert reg.get("inversion", "tkd")


def test_duplicate_registration_is_reported():
    class Dup(Stage):
        kind, name = "inversion", "tkd"

    @hookimpl
    def qsmkit_register_stages(registry):
        registry.add(Dup)

    p = _module("dup", qsmkit_register_stages)
    reg = load_registry(extra_plugins=[p])
    assert any("registered twice" in f.reason for f in reg.failures)
    assert reg.get("inversion", "tkd") is not Dup


def test_third_party_plugin_found_and_broken_one_reported(site):
    code, out, err = run_cli_subprocess(["plugins", "--stage", "inversion"], {"PYTHONPATH": str(site)})
    assert code == 0, err
    assert "example_tikhonov  [plugin example_tikhonov, from qsmkit-example-tikhonov]" in out
    assert "alpha (float) = 0.01" in out
    assert "tkd  [plugin tkd, from qsmkit]" in out and "threshold (float) = 0.15" in out
    assert "broken_example  [from qsmkit-broken-example]  ModuleNotFoundError" in out


def test_autoload_switch_and_block_list(site):
    env = {"PYTHONPATH": str(site), "QSMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    code, out, _ = run_cli_subprocess(["plugins"], env)
    assert code == 0 and "example_tikhonov" not in out and "broken_example" not in out and "tkd" in out
    code, out, _ = run_cli_subprocess(["plugins"], {"PYTHONPATH": str(site), "QSMKIT_BLOCK_PLUGINS": "broken_example,tkd"})
    assert code == 0 and "broken_example" not in out and "  tkd  " not in out and "example_tikhonov" in out


def test_third_party_inverter_runs_from_yaml(site, tmp_path):
    field, r = sphere_field((48, 48, 48), (1, 1, 1), 6.0, 0.2, (0, 0, 1))
    write_nifti(tmp_path / "lf.nii.gz", field)
    write_nifti(tmp_path / "mask.nii.gz", np.ones((48, 48, 48), np.uint8))
    (tmp_path / "p.yaml").write_text(
        "inputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\n"
        "stages:\n  - {stage: inversion, method: example_tikhonov, params: {alpha: 0.001}}\n"
        "output_dir: out\n")
    code, out, err = run_cli_subprocess(["run", tmp_path / "p.yaml"], {"PYTHONPATH": str(site)})
    assert code == 0, err
    import nibabel as nib

    chi = np.asarray(nib.load(str(tmp_path / "out" / "chi.nii.gz")).dataobj)
    assert chi[r < 4].mean() == pytest.approx(0.2, rel=0.25)
    assert "example_tikhonov" in (tmp_path / "out" / "provenance.json").read_text()
