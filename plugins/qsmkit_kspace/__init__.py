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
- ``recon``: ``zero_filled``, ``sense``, ``cs_wavelet`` — write ``image`` (magnitude Volume, centre
  crop) and, when a ``target`` exists, fastMRI ``metrics`` (NMSE, PSNR, SSIM).

Inputs read from the pipeline: ``kspace`` (path), and optionally ``format`` (``fastmri`` |
``skmtea``; must match the reader), ``slices`` (int, list or ``"a:b"``) and ``echo`` (skm-tea).

Non-Volume artifacts: ``kspace`` is a :class:`KSpaceData`; ``sampling_mask`` a bool ndarray
broadcastable to ``(H, W)`` (fastMRI column masks are ``(1, W)``); ``maps`` a complex64 ndarray
``(slices, n_maps, coils, H, W)``. These types, and the ``recon`` base class
:class:`~qsmkit.kspace.ReconStage`, live in the public core module :mod:`qsmkit.kspace` (documented
there for plugin authors); the names here are kept for backward compatibility.

Commands (hook ``qsmkit_register_commands``): ``qsmkit simulate-kspace`` (:mod:`.commands`).

The stage classes live in one module per stage kind (:mod:`.stages_read`,
:mod:`.stages_undersample`, :mod:`.stages_coil_maps`, :mod:`.stages_recon`); this module
re-exports them and holds the hook implementations.
"""

from __future__ import annotations

from pathlib import Path

from qsmkit import hookimpl
from qsmkit.kspace import KSpaceData, ReconStage, check_sampling_mask, require_kspace

from .stages_coil_maps import EspiritMaps, FileMaps
from .stages_read import FastMRIRead, SkmTeaRead
from .stages_recon import _COMMON_RECON, CSWavelet, Sense, ZeroFilled, _Recon  # noqa: F401 (older private names)
from .stages_undersample import EquispacedUndersample, FileUndersample, PoissonUndersample, RandomUndersample

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
          EspiritMaps, FileMaps, ZeroFilled, Sense, CSWavelet)


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
