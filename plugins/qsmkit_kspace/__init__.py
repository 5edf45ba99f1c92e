"""Built-in plugin: k-space reconstruction for fastMRI and skm-tea data.

Stages (``stage: <kind>, method: <name>``):

- ``kspace_read``: ``fastmri``, ``skmtea`` — read the file given as ``inputs.kspace`` (lazily, only
  the selected slices) and replace the ``kspace`` artifact (a path) by a :class:`KSpaceData`;
  also write ``target`` (reference magnitude Volume) when the file has one, ``sampling_mask``
  (fastMRI test files) and ``maps`` (skm-tea).
- ``undersample``: ``random``, ``equispaced`` (fastMRI-compatible column masks), ``poisson``
  (2D variable-density Poisson disc), ``from_file`` — write the masked ``kspace`` and
  ``sampling_mask``.
- ``coil_maps``: ``espirit``, ``from_file`` — write ``maps``.
- ``recon``: ``zero_filled``, ``sense``, ``cs_wavelet``, ``unet`` (the fastMRI U-Net baseline,
  ``docs/unet.md``) — write ``image`` (magnitude Volume, centre crop) and, when a ``target``
  exists, fastMRI ``metrics`` (NMSE, PSNR, SSIM).

Inputs read from the pipeline: ``kspace`` (path), and optionally ``format`` (``fastmri`` |
``skmtea``; must match the reader), ``slices`` (int, list or ``"a:b"``) and ``echo`` (skm-tea).

Non-Volume artifacts: ``kspace`` is a :class:`KSpaceData`; ``sampling_mask`` a bool ndarray
broadcastable to ``(H, W)`` (fastMRI column masks are ``(1, W)``); ``maps`` a complex64 ndarray
``(slices, n_maps, coils, H, W)``. These types, and the ``recon`` base class
:class:`~qsmkit.kspace.ReconStage`, live in the public core module :mod:`qsmkit.kspace` (documented
there for plugin authors); the names here are kept for backward compatibility.

Multi-echo multi-coil 3D GRE k-space -> QSM (``docs/gre_kspace.md``): ``kspace_read/gre`` (the
``qsmkit-gre`` HDF5 layout, :mod:`.gre_io`), ``undersample/gre`` ((ky, kz) Poisson / uniform),
``coil_combine/sense`` (per-echo SENSE-1 / CG-SENSE with first-echo ESPIRiT maps) and
``coil_combine/aspire`` (per-coil phase offsets removed): they write the 4D ``magnitude`` and
``phase`` Volumes, ``echo_times`` and ``field_strength`` that the QSM stages read (:mod:`.stages_gre`).

``recon/hfs_sde`` (:mod:`.stages_hfs_sde`, :mod:`.hfs_sde`, :mod:`.score_net`): HFS-SDE score-based
diffusion in high-frequency k-space with SENSE data consistency; ``qsmkit train hfs_sde``
(:mod:`.train_hfs_sde`) trains its score network; ``weights/hfs_sde_small.pt`` is the shipped model.

``recon/calibrationless`` (:mod:`.stages_calibrationless`, :mod:`.calibrationless`): multi-coil
images without coil maps, wavelet group-LASSO or OWL with FISTA / POGM (synthesis) or Condat-Vu
(analysis); ``image`` is the RSS of the coil images on the evaluation crop.

Commands (hook ``qsmkit_register_commands``): ``qsmkit simulate-kspace`` (:mod:`.commands`;
``--anatomies N`` writes random-anatomy training sets, :mod:`.anatomies`), ``qsmkit train unet``
(:mod:`.train_unet`: the fastMRI U-Net baseline, ``recon`` method ``unet`` in :mod:`.stages_unet`).
``qsmkit kspace prepare`` (:mod:`.prepare`): fastMRI / skm-tea files -> image-space-cropped
(320 x 320) re-synthesised k-space, ESPIRiT maps and masks per slice (``.npy`` and HDF5).

The stage classes live in one module per stage kind (:mod:`.stages_read`,
:mod:`.stages_undersample`, :mod:`.stages_coil_maps`, :mod:`.stages_recon`); this module
re-exports them and holds the hook implementations.
"""

from __future__ import annotations

from pathlib import Path

from qsmkit import hookimpl
from qsmkit.kspace import KSpaceData, ReconStage, check_sampling_mask, require_kspace

from .stages_coil_maps import EspiritMaps, FileMaps
from .stages_calibrationless import Calibrationless
from .stages_gre import GreAspire, GreRead, GreSense, GreUndersample
from .stages_hfs_sde import HfsSde
from .stages_read import FastMRIRead, SkmTeaRead
from .stages_recon import _COMMON_RECON, CSWavelet, Sense, ZeroFilled, _Recon  # noqa: F401 (older private names)
from .stages_undersample import EquispacedUndersample, FileUndersample, PoissonUndersample, RandomUndersample
from .stages_unet import UNetRecon

__all__ = [
    "KSpaceData", "ReconStage", "FastMRIRead", "SkmTeaRead", "RandomUndersample", "EquispacedUndersample",
    "PoissonUndersample", "FileUndersample", "EspiritMaps", "FileMaps", "ZeroFilled", "Sense", "CSWavelet",
    "simulate_kspace_files",
]


def simulate_kspace_files(out_dir, **kwargs) -> dict[str, Path]:
    """Write small simulated multi-coil files in both layouts (see :mod:`qsmkit_kspace.simulate`)."""
    from .simulate import simulate_kspace_files as _sim

    return _sim(out_dir, **kwargs)


_kspace = require_kspace  # older names of the qsmkit.kspace checks
_mask_2d = check_sampling_mask


STAGES = (FastMRIRead, SkmTeaRead, RandomUndersample, EquispacedUndersample, PoissonUndersample, FileUndersample,
          EspiritMaps, FileMaps, ZeroFilled, Sense, CSWavelet,
          GreRead, GreUndersample, GreSense, GreAspire)
STAGES += (Calibrationless,)
STAGES += (HfsSde,)
STAGES += (UNetRecon,)


@hookimpl
def qsmkit_register_stages(registry):
    for st in STAGES:
        registry.add(st)


@hookimpl
def qsmkit_register_commands(cli):
    """``qsmkit simulate-kspace`` (see :mod:`qsmkit_kspace.commands`)."""
    from .commands import COMMANDS

    for cmd in COMMANDS:
        cli.add_command(cmd)
    from qsmkit.commands import train_group
    from qsmkit.training import train_command

    from .train_unet import DEFAULTS as UNET_DEFAULTS

    train_group(cli).add_command(train_command(
        "unet", UNET_DEFAULTS, _train_unet,
        "Train the fastMRI U-Net baseline (recon method unet) on fastMRI / skm-tea files or simulated anatomies."))

    from .train_hfs_sde import DEFAULTS as _HFS_DEFAULTS, run as _hfs_run

    train_group(cli).add_command(train_command(
        "hfs_sde", _HFS_DEFAULTS, _hfs_run, "Train the HFS-SDE score network (high-frequency k-space diffusion)."))


def _train_unet(config, out_dir, resume, overwrite, device):
    from .train_unet import run

    run(config, out_dir, resume=resume, overwrite=overwrite, device=device)
