"""Plugin commands (hook ``qsmkit_register_commands``): discovery, isolation, blocking, a light --help."""

import json
import subprocess
import sys
import types

import click
import numpy as np

from qsmkit import hookimpl
from qsmkit.commands import load_commands
from helpers import run_cli, write_nifti

BUILTINS = ("run", "validate", "plugins", "simulate", "evaluate")


def _plugin(name, hook):
    mod = types.ModuleType(name)
    mod.qsmkit_register_commands = hookimpl(hook)
    return mod


def _command(name):
    @click.command(name)
    def cmd():
        """A test command."""
        click.echo(f"{name} ran")

    return cmd


def test_simulate_kspace_comes_from_the_kspace_plugin():
    pc = load_commands(reserved=BUILTINS)
    assert "simulate-kspace" in pc.commands
    assert pc.providers["simulate-kspace"] == ("kspace", "qsmkit")
    assert not pc.failures


def test_failing_command_hook_is_isolated_and_its_commands_discarded():
    def boom(cli):
        cli.add_command(_command("half-done"))
        raise RuntimeError("boom")

    def takes_run(cli):
        cli.add_command(_command("run"))

    def good(cli):
        cli.add_command(_command("good-tool"))

    def dup(cli):
        cli.add_command(_command("good-tool"))

    plugins = [_plugin("p_boom", boom), _plugin("p_run", takes_run), _plugin("p_good", good), _plugin("p_dup", dup)]
    pc = load_commands(reserved=BUILTINS, extra_plugins=plugins)
    reasons = {f.name: f.reason for f in pc.failures}
    assert reasons["p_boom"] == "registering commands: RuntimeError: boom"
    assert "'run' is a built-in qsmkit command" in reasons["p_run"]
    assert "half-done" not in pc.commands and "run" not in pc.commands
    assert "good-tool" in pc.commands and "simulate-kspace" in pc.commands
    assert len([n for n in ("p_good", "p_dup") if n in reasons]) == 1  # the second of the two fails
    assert "already added by plugin" in next(r for n, r in reasons.items() if n in ("p_good", "p_dup"))


def _write_dist(folder, modname, dist, ep_name, source):
    """A minimal installed distribution (module + dist-info with an entry point) in ``folder``."""
    (folder / f"{modname}.py").write_text(source)
    info = folder / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qsmkit]\n{ep_name} = {modname}\n")


def test_cli_lists_a_failing_command_plugin_and_keeps_working(tmp_path, monkeypatch, capsys):
    _write_dist(tmp_path, "qsmkit_cmdboom", "qsmkit-cmdboom", "cmdboom",
                "from qsmkit import hookimpl\n\n@hookimpl\ndef qsmkit_register_commands(cli):\n"
                "    raise RuntimeError('no commands today')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(["plugins"], capsys)
    assert code == 0, err
    assert "cmdboom  [from qsmkit-cmdboom]  registering commands: RuntimeError: no commands today" in out
    assert "tkd  [plugin tkd, from qsmkit]" in out
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and "simulate-kspace" in out and "evaluate" in out


def test_blocked_kspace_plugin_removes_the_command_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSMKIT_BLOCK_PLUGINS", "kspace")
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and "simulate-kspace" not in out and "simulate " in out
    code, out, err = run_cli(["simulate-kspace", tmp_path / "k"], capsys)
    assert code == 2 and "No such command 'simulate-kspace'" in err and "QSMKIT_BLOCK_PLUGINS: kspace" in err
    assert not (tmp_path / "k").exists()
    code, out, err = run_cli(["plugins"], capsys)
    assert code == 0 and "  tkd  " in out and "zero_filled" not in out and "simulate-kspace" not in out
    # everything else works: a QSM pipeline runs
    write_nifti(tmp_path / "lf.nii.gz", np.zeros((10, 10, 10), np.float32))
    write_nifti(tmp_path / "mask.nii.gz", np.ones((10, 10, 10), np.uint8))
    (tmp_path / "p.yaml").write_text("inputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\n"
                                     "stages:\n  - {stage: inversion, method: tkd}\noutput_dir: out\n")
    code, out, err = run_cli(["run", tmp_path / "p.yaml"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "chi.nii.gz").exists()


def test_simulate_kspace_command_writes_files_and_keeps_other_folders(tmp_path, capsys):
    files = ["fastmri_multicoil.h5", "fastmri_multicoil_test.h5", "fastmri_singlecoil.h5", "simulate_kspace.json",
             "skmtea.h5"]
    code, out, err = run_cli(["simulate-kspace", tmp_path / "k", "--seed", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == files
    assert run_cli(["simulate-kspace", tmp_path / "k", "--seed", "2"], capsys)[0] == 0  # its own earlier output
    user = tmp_path / "data"
    user.mkdir()
    (user / "skmtea.h5").write_bytes(b"the user's own file")
    code, out, err = run_cli(["simulate-kspace", user], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "already holds files (skmtea.h5)" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in user.iterdir()) == ["skmtea.h5"]
    assert (user / "skmtea.h5").read_bytes() == b"the user's own file"
    assert run_cli(["simulate-kspace", user, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in user.iterdir()) == files


def test_help_and_version_import_nothing_heavy():
    script = ("import io, sys, contextlib, json\nfrom qsmkit.cli import main\nbuf = io.StringIO()\n"
              "with contextlib.redirect_stdout(buf):\n    codes = [main(['--help']), main(['--version'])]\n"
              "heavy = [m for m in ('torch', 'h5py', 'SimpleITK', 'pywt', 'ptwt') if m in sys.modules]\n"
              "print(json.dumps({'codes': codes, 'heavy': heavy, 'out': buf.getvalue()}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["codes"] == [0, 0]
    assert res["heavy"] == []
    assert "simulate-kspace" in res["out"] and "qsmkit, version" in res["out"]
