"""Commands the k-space plugin adds to ``qsmkit`` (through the ``qsmkit_register_commands`` hook).

- ``qsmkit simulate-kspace OUT [--seed N] [--overwrite]``: small simulated multi-coil files in
  the fastMRI and skm-tea layouts (see :func:`qsmkit_kspace.simulate.simulate_kspace_files`),
  plus ``simulate_kspace.json`` (what was written, with which seed). As ``qsmkit simulate``, it
  refuses a folder that holds files it did not write unless ``--overwrite`` is given; each file
  lands atomically.

Only click is imported here; h5py and the simulator are imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["COMMANDS", "SIMULATED_FILES", "simulate_kspace"]

#: marker of a folder written by ``simulate-kspace`` (an earlier output may be replaced by a rerun)
MARKER = "simulate_kspace.json"
#: every file ``simulate-kspace`` writes
SIMULATED_FILES = frozenset({"fastmri_multicoil.h5", "fastmri_multicoil_test.h5", "fastmri_singlecoil.h5",
                             "skmtea.h5", MARKER})


@click.command("simulate-kspace")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a folder that holds other files (same names replaced).")
def simulate_kspace(out: Path, seed: int, overwrite: bool) -> None:
    """Write small multi-coil k-space files in the fastMRI and skm-tea layouts to OUT."""
    from qsmkit.io.atomic import check_folder_for, write_json

    from .simulate import simulate_kspace_files

    check_folder_for(out, set(SIMULATED_FILES), MARKER, overwrite)
    files = simulate_kspace_files(out, seed=seed)
    write_json({"generated_by": "qsmkit simulate-kspace", "seed": seed,
                "files": sorted(p.name for p in files.values())}, out / MARKER)
    for name, path in files.items():
        click.echo(f"{name}: {path}")


COMMANDS = (simulate_kspace,)
