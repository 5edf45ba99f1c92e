"""Command line: ``qsmkit run | validate | plugins | simulate | evaluate | report | train``, plus the plugins' commands.

Plugins add commands through the ``qsmkit_register_commands`` hook (e.g. ``simulate-kspace``
from the k-space plugin); the group loads them lazily (:class:`qsmkit.commands.PluginGroup`).

User errors (:class:`qsmkit.errors.QsmkitError`) print one line ``error: ...`` on stderr and exit
with status 2; ``--debug`` (or ``QSMKIT_DEBUG=1``) shows the traceback instead. Heavy modules
(torch, SimpleITK, h5py) are imported only by the commands and plugins that use them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .commands import PluginGroup, TrainGroup
from .errors import QsmkitError

SET_HELP = "Override a pipeline key, e.g. --set stages.4.params.lambda=500 (value parsed as YAML); repeatable."


def _floats(text: str, n: int | None, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise click.BadParameter(f"{name}: expected {n} comma-separated numbers, got {text!r}")
    return vals


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="qsmkit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """qsmkit: QSM and k-space reconstruction pipelines built from plugins.

    \b
    Quick start:  qsmkit run pipelines/quickstart.yaml --output-dir out/quickstart
    Plugins:      qsmkit plugins --stage inversion
    """


def _registry():
    from .plugins import load_registry

    return load_registry()


class Terminated(BaseException):
    """SIGTERM (what SLURM sends at a time limit) during a run: unwinds like Ctrl-C, exit 143."""

    exit_code = 128 + signal.SIGTERM


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Overrides output_dir.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--overwrite", is_flag=True,
              help="Write into a folder that holds other files: same-named ones are replaced, others kept.")
@click.option("--quiet", "-q", is_flag=True, help="Only print errors and the output folder.")
@click.option("--bids", "bids_dir", type=click.Path(path_type=Path), metavar="BIDS_DIR",
              help="Run PIPELINE on every multi-echo GRE run of this BIDS dataset (outputs: a BIDS derivative "
                   "dataset, by default BIDS_DIR/derivatives/qsmkit; see docs/cohorts.md).")
@click.option("--participant-label", multiple=True, metavar="LABEL",
              help="With --bids: only these subjects (01 or sub-01; repeatable or comma-separated).")
@click.option("--session-label", multiple=True, metavar="LABEL", help="With --bids: only these sessions.")
@click.option("--run", "run_label", multiple=True, metavar="LABEL", help="With --bids: only these run- labels.")
@click.option("--acq", multiple=True, metavar="LABEL", help="With --bids: only these acq- labels.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default=None,
              help="With --bids: a local process pool (default) or Dask distributed.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --bids: runs side by side (default: cores, at most 4; fewer if memory is short).")
@click.option("--scheduler", metavar="ADDRESS",
              help="With --executor dask: a running scheduler (tcp://host:8786) instead of a LocalCluster.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads per stage (pipeline key 'threads'); default: the cores other processes leave "
                   "free, within the CPU affinity, cgroup quota and OMP_NUM_THREADS.")
def run(pipeline: Path, output_dir: Path | None, overrides: tuple[str, ...], overwrite: bool, quiet: bool,
        bids_dir: Path | None = None, participant_label: tuple[str, ...] = (), session_label: tuple[str, ...] = (),
        run_label: tuple[str, ...] = (), acq: tuple[str, ...] = (), executor: str | None = None,
        workers: int | None = None, scheduler: str | None = None, threads: int | None = None) -> int | None:
    """Validate and run PIPELINE (YAML); write NIfTI outputs and provenance.json.

    With --bids, run it on every run of a BIDS dataset: a failed run never stops the others, a
    table lists every run at the end (exit status 1 if any failed), and a rerun recomputes only
    what changed.
    """
    from .pipeline import load_plan, run_plan

    if threads is not None:  # the same key a pipeline file may set, validated with it
        overrides = (*overrides, f"threads={threads}")
    cohort_only = {"--participant-label": participant_label, "--session-label": session_label,
                   "--run": run_label, "--acq": acq, "--executor": executor, "--workers": workers,
                   "--scheduler": scheduler}
    if bids_dir is not None:
        return _run_bids(pipeline, bids_dir, output_dir, overrides, overwrite, quiet, participant_label,
                         session_label, run_label, acq, executor or "local", workers, scheduler)
    given = [k for k, v in cohort_only.items() if v]
    if given:
        raise click.UsageError(f"{given[0]} needs --bids BIDS_DIR")
    registry = _registry()
    plan = load_plan(pipeline, registry, overrides, output_dir, overwrite=overwrite)
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    for line in plan.summary()[:1]:
        log(line)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = run_plan(plan, registry, log=log)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"outputs: {plan.output_dir}")
    for f in result.files:
        if f.name in ("chi.nii.gz", "image.nii.gz"):
            click.echo(f"{f.name.split('.')[0]}: {f}")
    chi = result.metrics.get("chi") if result.metrics else None
    if chi:
        click.echo(f"chi vs truth: NRMSE {chi['nrmse']:.1f} %, HFEN {chi['hfen']:.1f} %, XSIM {chi['xsim']:.3f} "
                   f"(demeaned over the mask)")
    if result.metrics and {"nmse", "psnr", "ssim"} <= set(result.metrics):
        m = result.metrics
        click.echo(f"image vs target: NMSE {m['nmse']:.4f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} "
                   f"(fastMRI evaluate, centre crop)")


def _run_bids(pipeline: Path, bids_dir: Path, output_dir: Path | None, overrides: tuple[str, ...], overwrite: bool,
              quiet: bool, participant_label, session_label, run_label, acq, executor: str, workers: int | None,
              scheduler: str | None) -> int:
    """``qsmkit run PIPELINE --bids BIDS_DIR``: the cohort (:mod:`qsmkit.pipeline.cohort`)."""
    from .pipeline.cohort import prepare_cohort, run_cohort, summary_table

    if scheduler and executor != "dask":
        raise click.UsageError("--scheduler needs --executor dask")
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    cohort = prepare_cohort(pipeline, bids_dir, _registry(), output_dir, overrides, overwrite, participant_label,
                            session_label, run_label, acq)
    log(f"pipeline '{cohort.name}' on {len(cohort.runs)} run(s) of {bids_dir}: {len(cohort.jobs)} to run, "
        f"{sum(o.status == 'cached' for o in cohort.known)} unchanged, "
        f"{sum(o.status == 'failed' for o in cohort.known)} invalid")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        outcomes = run_cohort(cohort, executor, workers, scheduler, log)
    except (KeyboardInterrupt, Terminated) as exc:
        name, code = ("SIGTERM", Terminated.exit_code) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
        click.echo(f"interrupted ({name}); the runs reported done are complete in {cohort.out_dir}, the others "
                   f"left no partial files: rerun the same command to finish them", err=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in summary_table(outcomes):
        click.echo(line)
    click.echo(f"outputs: {cohort.out_dir}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--output-dir", "-o", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--overwrite", is_flag=True, help="As for 'qsmkit run'.")
def validate(pipeline: Path, output_dir: Path | None, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Check PIPELINE without running it: stages, parameters, input files, output folder."""
    from .pipeline import load_plan

    plan = load_plan(pipeline, _registry(), overrides, output_dir, overwrite=overwrite)
    for line in plan.summary():
        click.echo(line)
    click.echo("valid")


@cli.command()
@click.option("--stage", "kind", help="Only this stage kind (e.g. inversion).")
def plugins(kind: str | None) -> None:
    """List stage methods, their parameters, and plugins that failed to load."""
    reg = _registry()
    kinds = reg.kinds()
    if kind is not None and kind not in kinds:
        raise QsmkitError(f"unknown stage kind '{kind}'; known kinds: {', '.join(kinds)}")
    for k in [kind] if kind else kinds:
        methods = reg.methods(k)
        if not methods:
            continue
        click.echo(k)
        for name in methods:
            cls = reg.get(k, name)
            plugin, dist = reg.provider(k, name)
            click.echo(f"  {name}  [plugin {plugin}, from {dist}]" + (f"  {cls.description}" if cls.description else ""))
            click.echo(f"      reads: {', '.join(cls.reads) or '-'}; writes: {', '.join(cls.writes) or '-'}")
            for p in cls.params:
                click.echo(f"      {p.describe()}")
    from .commands import describe_commands, plugin_commands

    for line in describe_commands() if kind is None else ():
        click.echo(line)
    failures = reg.failures + plugin_commands().failures
    if failures:
        click.echo("failed to load:")
        for f in failures:
            click.echo(f"  {f.name}  [from {f.distribution}]  {f.reason}")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shape", default=None, help="Grid, e.g. 128,128,96.")
@click.option("--voxel-size", default=None, help="mm, e.g. 1.5,1.5,1.5.")
@click.option("--echo-times", default=None, help="Seconds, e.g. 0.004,0.008,0.012.")
@click.option("--field-strength", type=float, default=None, help="Tesla.")
@click.option("--b0-direction", default=None, help="World B0 direction, e.g. 0,0,1.")
@click.option("--rotation", default=None, help="Head rotation in degrees about x,y,z.")
@click.option("--snr", type=float, default=None, help="First-echo brain SNR (inf for noise-free).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--phase-offset", type=click.Choice(["smooth", "coil", "none"]), default="smooth", show_default=True,
              help="Phase offset phi0: smooth, coil-like (wraps; for MCPC-3D-S) or none.")
@click.option("--bipolar", type=float, default=0.0, show_default=True,
              help="Bipolar readout: rad added to the even echoes (constant + readout ramp).")
@click.option("--haemorrhage", is_flag=True, help="Add a 9 mm haematoma (+1.0 ppm, T2* 5 ms) in deep white matter.")
@click.option("--overwrite", is_flag=True, help="Write into a folder that holds other files (same names replaced).")
def simulate(out: Path, shape, voxel_size, echo_times, field_strength, b0_direction, rotation, snr, seed,
             phase_offset: str, bipolar: float, haemorrhage: bool, overwrite: bool) -> None:
    """Write the numerical head phantom (magnitude, phase, truths) to OUT."""
    from .simulate import simulate_phantom
    from .inputs import check_echo_times, check_field_strength

    kw: dict = {"seed": seed, "phase_offset": phase_offset, "bipolar": bipolar, "haemorrhage": haemorrhage}
    if shape:
        kw["shape"] = tuple(int(v) for v in _floats(shape, 3, "--shape"))
    if voxel_size:
        kw["voxel_size"] = _floats(voxel_size, 3, "--voxel-size")
    if echo_times:
        kw["echo_times"] = tuple(check_echo_times(_floats(echo_times, None, "--echo-times"), None))
    if field_strength is not None:
        kw["field_strength"] = check_field_strength(field_strength)
    if b0_direction:
        kw["b0_direction"] = _floats(b0_direction, 3, "--b0-direction")
    if rotation:
        kw["rotation_deg"] = _floats(rotation, 3, "--rotation")
    if snr is not None:
        kw["snr"] = snr
    from .io.atomic import check_folder_for
    from .simulate import PHANTOM_FILES

    check_folder_for(out, PHANTOM_FILES, "phantom.json", overwrite)
    phantom = simulate_phantom(**kw)
    files = phantom.write(out)
    click.echo(f"wrote {len(files)} files to {out}")


@cli.command()
@click.option("--truth", required=True, type=click.Path(dir_okay=False, path_type=Path), help="True chi NIfTI.")
@click.option("--estimate", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Estimated chi NIfTI.")
@click.option("--mask", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Evaluation mask NIfTI.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help="Label map for ROI means.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(truth: Path, estimate: Path, mask: Path, labels: Path | None, as_json: bool) -> None:
    """Compare an estimate with a ground truth (both demeaned over the mask)."""
    from .io.acquisition import check_same_grid
    from .io import load_nifti
    from .metrics import evaluate as _evaluate

    vols = {"truth": load_nifti(truth, "truth"), "estimate": load_nifti(estimate, "estimate"),
            "mask": load_nifti(mask, "mask")}
    if labels is not None:
        vols["labels"] = load_nifti(labels, "labels")
    check_same_grid(vols, "evaluate")
    lab = vols["labels"].data.astype(int) if labels is not None else None
    names = None
    if lab is not None:
        from .simulate import LABELS
        names = LABELS
    res = _evaluate(vols["truth"].data, vols["estimate"].data, vols["mask"].data > 0.5, labels=lab, label_names=names)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for key, value in res.items():
        if isinstance(value, float):
            click.echo(f"{key:>20s}  {value:.4f}")
        elif isinstance(value, dict):
            click.echo(f"{key:>20s}")
            for k, v in value.items():
                click.echo(f"{k:>28s}  {v}")
        else:
            click.echo(f"{key:>20s}  {value}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path),
              help="Label map (NIfTI, the runs' grid) for a table of ROI means of chi; names from a dseg-style TSV "
                   "beside it.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="HTML file to write (default: FOLDER/report.html).")
@click.option("--overwrite", is_flag=True, help="Replace an existing HTML file that qsmkit did not write.")
def report(folder: Path, labels: Path | None, output: Path | None, overwrite: bool) -> None:
    """Write an HTML index of the runs at or below FOLDER: status, duration, QC pictures, ROI means."""
    from .report import describe, write_report

    path, runs = write_report(folder, output, labels, overwrite)
    for line in describe(runs):
        click.echo(line, err=True)
    click.echo(f"report: {path}")


@cli.group(cls=TrainGroup)
def train() -> None:
    """Train a learned method: qsmkit train <method> --config train.yaml --out DIR.

    \b
    Each method comes from its plugin (qsmkit plugins lists them); qsmkit train <method>
    --print-defaults shows its config keys. Runs resume with --resume; the trained model is
    DIR/model.pt, the file a stage's 'checkpoint' parameter takes.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """qsmkit's own warnings as one ``warning: ...`` line on stderr; others as Python shows them."""
    from .errors import QsmkitWarning

    if issubclass(category, QsmkitWarning):
        click.echo(f"warning: {' '.join(str(message).split())}", err=True)
    else:
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))


def _interrupted(exc: BaseException) -> int:
    """Report Ctrl-C (exit 130) or SIGTERM (exit 143) after the run has cleaned up."""
    from .pipeline.outputs import COMMITTED

    name, code = ("SIGTERM", Terminated.exit_code) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    done = f"the outputs in {COMMITTED[-1]} are complete" if COMMITTED else "nothing was written"
    click.echo(f"interrupted ({name}); {done}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the click group, turning user errors into one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    from .threads import prepare_environment

    prepare_environment()  # before torch is imported: idle OpenMP workers sleep (qsmkit.threads)
    debug = "--debug" in args or os.environ.get("QSMKIT_DEBUG", "") not in ("", "0")
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        rv = cli.main(args=args, prog_name="qsmkit", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except QsmkitError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        if debug:
            raise
        msg = " ".join(exc.format_message().split())
        cmd = getattr(getattr(exc, "ctx", None), "command_path", "qsmkit")
        hint = f" (see '{cmd} --help')" if isinstance(exc, click.UsageError) else ""
        click.echo(f"error: {msg}{hint}", err=True)
        code = 2
    except click.Abort as exc:
        code = _interrupted(exc.__cause__) if isinstance(exc.__cause__, KeyboardInterrupt) else 1
        if code == 1:
            click.echo("aborted", err=True)
    except (KeyboardInterrupt, Terminated) as exc:
        code = _interrupted(exc)
    except Exception as exc:  # a bug, not a user error: still no traceback unless asked for

        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback and "
                   f"please report it)", err=True)
        code = 1
    finally:
        warnings.showwarning = shown
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
