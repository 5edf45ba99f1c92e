"""Commands the k-space plugin adds to ``qsmkit`` (through the ``qsmkit_register_commands`` hook).

- ``qsmkit simulate-kspace OUT [--seed N] [--overwrite]``: small simulated multi-coil files in
  the fastMRI and skm-tea layouts (see :func:`qsmkit_kspace.simulate.simulate_kspace_files`),
  plus ``simulate_kspace.json`` (what was written, with which seed). As ``qsmkit simulate``, it
  refuses a folder that holds files it did not write unless ``--overwrite`` is given; each file
  lands atomically. With ``--anatomies N`` it writes N random-anatomy slices as fastMRI training
  files ``anatomy_*.h5`` instead (:func:`qsmkit_kspace.anatomies.write_anatomy_files`).
- ``qsmkit simulate-gre-kspace OUT [--shape X Y Z] [--voxel-size ...] [--coils N] [--snr S]``:
  multi-coil multi-echo 3D GRE k-space of the head phantom in the qsmkit-gre layout with its
  truth (:func:`qsmkit_kspace.simulate_gre.simulate_gre_files`), marker ``simulate_gre.json``.

- ``qsmkit kspace prepare FILES... --out D [--crop H W] [--calib H W] [--slices ...]``: the
  320 x 320 data-preparation recipe (image-space crop, ESPIRiT maps, re-synthesised and
  normalised k-space; per-slice ``.npy`` and HDF5), see :mod:`qsmkit_kspace.prepare`.

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
@click.option("--anatomies", type=click.IntRange(min=1), default=None,
              help="Instead of the phantom files, write N random-anatomy slices (random shapes, textures, "
                   "contrasts, coil arrays, noise) as fastMRI training files anatomy_*.h5 (a training set).")
@click.option("--slices-per-file", type=click.IntRange(min=1), default=8, show_default=True,
              help="--anatomies: slices per file.")
@click.option("--shape", nargs=2, type=click.IntRange(min=8), default=(320, 320), show_default=True,
              help="--anatomies: image (recon) matrix H W.")
@click.option("--coils", nargs=2, type=click.IntRange(min=1), default=(4, 16), show_default=True,
              help="--anatomies: range of the coil count (drawn per file).")
@click.option("--noise", nargs=2, type=click.FloatRange(min=0.0), default=(0.002, 0.03), show_default=True,
              help="--anatomies: range of the relative k-space noise std (log-uniform per slice).")
@click.option("--readout-oversampling", type=click.IntRange(min=1), default=1, show_default=True,
              help="--anatomies: k-space rows = this x H (fastMRI data: 2); the reference is the centre crop.")
def simulate_kspace(out: Path, seed: int, overwrite: bool, anatomies: int | None = None, slices_per_file: int = 8,
                    shape=(320, 320), coils=(4, 16), noise=(0.002, 0.03), readout_oversampling: int = 1) -> None:
    """Write small multi-coil k-space files in the fastMRI and skm-tea layouts to OUT."""
    from qsmkit.io.atomic import check_folder_for, write_json

    from .simulate import simulate_kspace_files

    if anatomies is not None:
        from .anatomies import write_anatomy_files

        n_files = -(-anatomies // slices_per_file)
        check_folder_for(out, {f"anatomy_{i:05d}.h5" for i in range(n_files)} | {MARKER}, MARKER, overwrite)
        paths = write_anatomy_files(out, anatomies, slices_per_file, tuple(shape), tuple(coils), tuple(noise),
                                    readout_oversampling, seed=seed)
        write_json({"generated_by": "qsmkit simulate-kspace --anatomies", "seed": seed, "slices": anatomies,
                    "slices_per_file": slices_per_file, "shape": list(shape), "coils": list(coils),
                    "noise": list(noise), "readout_oversampling": readout_oversampling,
                    "files": [p.name for p in paths]}, out / MARKER)
        click.echo(f"{anatomies} random-anatomy slices in {len(paths)} fastMRI files under {out}")
        return
    check_folder_for(out, set(SIMULATED_FILES), MARKER, overwrite)
    files = simulate_kspace_files(out, seed=seed)
    write_json({"generated_by": "qsmkit simulate-kspace", "seed": seed,
                "files": sorted(p.name for p in files.values())}, out / MARKER)
    for name, path in files.items():
        click.echo(f"{name}: {path}")


#: marker of a folder written by ``simulate-gre-kspace``
GRE_MARKER = "simulate_gre.json"


@click.command("simulate-gre-kspace")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shape", nargs=3, type=int, default=(84, 96, 72), show_default=True, help="Image grid (x, y, z).")
@click.option("--voxel-size", nargs=3, type=float, default=(2.0, 2.0, 2.0), show_default=True, help="Voxel size (mm).")
@click.option("--coils", type=int, default=8, show_default=True, help="Receive coils.")
@click.option("--echo-times", type=str, default="0.004,0.008,0.012,0.016,0.020", show_default=True,
              help="Comma-separated echo times (s).")
@click.option("--field-strength", type=float, default=3.0, show_default=True, help="B0 (T).")
@click.option("--snr", type=float, default=100.0, show_default=True,
              help="First-echo brain SNR of the combined image (0: no noise).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a folder that holds other files (same names replaced).")
def simulate_gre_kspace(out: Path, shape, voxel_size, coils: int, echo_times: str, field_strength: float, snr: float,
                        seed: int, overwrite: bool) -> None:
    """Write multi-coil multi-echo 3D GRE k-space of the head phantom (qsmkit-gre .h5) and its truth to OUT.

    OUT gets gre_kspace.h5 (docs/gre_kspace.md), the truth chi / local_field / total_field / mask /
    labels (NIfTI), the coil-free reference coilfree_magnitude / coilfree_phase and
    simulate_gre.json; run pipelines/gre_kspace_to_qsm.yaml on it.
    """
    from qsmkit.errors import ConfigError
    from qsmkit.io.atomic import check_folder_for

    from .simulate_gre import GRE_SIM_FILES, simulate_gre_files

    try:
        te = [float(t) for t in echo_times.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--echo-times {echo_times!r}: give comma-separated seconds, e.g. 0.004,0.008") from None
    check_folder_for(out, set(GRE_SIM_FILES), GRE_MARKER, overwrite)
    files = simulate_gre_files(out, shape=tuple(shape), voxel_size=tuple(voxel_size), n_coils=coils, echo_times=te,
                               field_strength=field_strength, snr=snr if snr > 0 else None, seed=seed)
    for name, path in files.items():
        click.echo(f"{name}: {path}")


@click.group("kspace")
def kspace_group() -> None:
    """k-space data tools (``qsmkit kspace prepare``)."""


@kspace_group.command("prepare")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--crop", nargs=2, type=int, default=(320, 320), show_default=True,
              help="Image-space centre crop H W (never a k-space crop).")
@click.option("--calib", nargs=2, type=int, default=(24, 24), show_default=True,
              help="ESPIRiT calibration region on the cropped grid.")
@click.option("--slices", default=None, help="Slices (fastMRI) / readout positions (skm-tea): 5, 3,4,5 or a:b.")
@click.option("--format", "layout", type=click.Choice(["auto", "fastmri", "skmtea"]), default="auto", show_default=True)
@click.option("--axes", type=click.Choice(["auto", "fastmri", "skmtea"]), default="auto", show_default=True,
              help="Per-slice axis order: fastmri (coil, H, W), skmtea (H, W, coil); auto: the input's.")
@click.option("--target-key", default="auto", show_default=True, help="fastMRI reference dataset saved as 'reference'.")
@click.option("--echo", type=int, default=0, show_default=True, help="skm-tea echo.")
@click.option("--mask", "mask", type=click.Choice(["auto", "random", "equispaced", "poisson", "none"]), default="auto",
              show_default=True, help="Undersampling mask saved with the data (auto: fastMRI random, skm-tea poisson).")
@click.option("--acceleration", type=float, default=4.0, show_default=True)
@click.option("--center-fraction", type=float, default=0.08, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resynthesis", type=click.Choice(["coils", "maps"]), default="coils", show_default=True,
              help="k-space from the cropped coil images, or from maps x combined image.")
@click.option("--no-npy", is_flag=True, help="Write only the HDF5 file.")
@click.option("--no-h5", is_flag=True, help="Write only the per-slice .npy files.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
def kspace_prepare(files, out, crop, calib, slices, layout, axes, target_key, echo, mask, acceleration,
                   center_fraction, seed, resynthesis, no_npy, no_h5, device) -> None:
    """Crop fastMRI / skm-tea FILES to CROP in image space, estimate ESPIRiT maps, re-synthesise and
    normalise the k-space, and write per-slice .npy files and one HDF5 file per input to OUT."""
    from .prepare import prepare_file

    sel = None
    if slices is not None:
        sel = [int(v) for v in slices.split(",")] if "," in slices else slices
        if isinstance(sel, str) and ":" not in sel:
            try:
                sel = int(sel)
            except ValueError:
                pass
    for f in files:
        res = prepare_file(f, out, crop, calib, sel, layout, axes, target_key, echo, mask, acceleration,
                           center_fraction, seed, resynthesis, not no_npy, not no_h5, device)
        click.echo(f"{Path(f).name}: {len(res['slices'])} slice(s), {res['layout']} -> {crop[0]}x{crop[1]}, "
                   f"axes {res['axes']}, {len(res['files'])} file(s) in {out}")


COMMANDS = (simulate_kspace, simulate_gre_kspace,)
COMMANDS += (kspace_group,)
