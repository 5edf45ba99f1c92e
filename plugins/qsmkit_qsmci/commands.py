"""The ``qsmkit qsm-ci`` commands (added through the ``qsmkit_register_commands`` hook).

- ``qsmkit qsm-ci run --stage STAGE --method M IN OUT``: run a QSM-CI stage with qsmkit methods
  on the canonical files of IN and write the canonical outputs to OUT (:mod:`.contract`).
- ``qsmkit qsm-ci export DIR``: write ``DIR/algorithms/<slug>/`` submission folders (:mod:`.export`).

Only click is imported here; numpy, nibabel and the engine are imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

STAGE_CHOICES = ("field-mapping", "bfr", "dipole", "bfr+dipole", "end-to-end")


@click.group("qsm-ci")
def qsm_ci() -> None:
    """Run qsmkit methods under the QSM-CI algorithm contract, or export them as QSM-CI submissions."""


@qsm_ci.command("run")
@click.option("--stage", required=True, type=click.Choice(STAGE_CHOICES),
              help="QSM-CI stage or span: field-mapping (-> totalfield), bfr (-> localfield), dipole, "
                   "bfr+dipole, end-to-end (-> chimap).")
@click.option("--method", "-m", required=True, metavar="M",
              help="qsmkit method(s) of the span joined by '+', e.g. tkd, romeo, vsharp+medi, "
                   "romeo+weighted_fit+pdf+tv (kind/method where a name is ambiguous; others take defaults).")
@click.option("--quiet", "-q", is_flag=True, help="Only print errors and the files written.")
@click.argument("in_dir", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
def run_cmd(stage: str, method: str, quiet: bool, in_dir: Path, out_dir: Path) -> None:
    """Read IN's canonical QSM-CI inputs (phase, magnitude, mask, totalfield, localfield .nii.gz, params.json,
    optional config.json) and write the stage's canonical outputs (ppm) to OUT."""
    from .contract import run_contract

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    for art, path in run_contract(stage, method, in_dir, out_dir, log=log).items():
        click.echo(f"{art}: {path}")


@qsm_ci.command("export")
@click.argument("out", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGE_CHOICES[:4]),
              help="Only this stage (repeatable); default: field-mapping, bfr, dipole, bfr+dipole.")
@click.option("--image", metavar="IMAGE",
              help="A prebuilt environment image with qsmkit installed (else each folder gets a Dockerfile).")
@click.option("--overwrite", is_flag=True, help="Replace submission folders that qsmkit did not write.")
def export_cmd(out: Path, stages: tuple[str, ...], image: str | None, overwrite: bool) -> None:
    """Write DIR/algorithms/<slug>/ (algorithm.yml, run.sh) for each built-in method of the QSM-CI stages."""
    from .export import export_algorithms

    folders = export_algorithms(out, stages=stages or None, image=image, overwrite=overwrite)
    for f in folders:
        click.echo(str(f))
    click.echo(f"wrote {len(folders)} submission folders to {Path(out) / 'algorithms'}")


COMMANDS = (qsm_ci,)
