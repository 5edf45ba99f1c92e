"""Built-in plugin: QSMnet dipole inversion (``stage: inversion, method: qsmnet``) and ``qsmkit train qsmnet``.

QSMnet (Yoon et al., NeuroImage 179:199-206, 2018) is a 3D U-Net that maps a local field to chi,
trained on patches. This plugin holds the network (:mod:`.network`, width a parameter), 64^3 patch
inference with smooth blending (:mod:`.patches`), the B0-aligned training frame with resampling
(:mod:`.frame`), the training loss (:mod:`.loss`), data and augmentation (:mod:`.data`), the
trainer (:mod:`.train`) and the stage (:mod:`.stage`). Shipped weights: ``weights/qsmnet_small.pt``
(see the README for what they are and how they were trained). torch is imported only when the
stage runs or a training starts.
"""

from __future__ import annotations

from qsmkit import hookimpl

from .stage import QSMnetStage, SHIPPED_WEIGHTS

__all__ = ["QSMnetStage", "SHIPPED_WEIGHTS"]


def _run(config, out_dir, resume, overwrite, device):
    from .train import run

    return run(config, out_dir, resume=resume, overwrite=overwrite, device=device)


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(QSMnetStage)


@hookimpl
def qsmkit_register_commands(cli):
    from qsmkit.commands import train_group
    from qsmkit.training import train_command

    from .train import DEFAULTS

    train_group(cli).add_command(train_command(
        "qsmnet", DEFAULTS, _run, "Train QSMnet (3D U-Net dipole inversion) on simulated heads and/or chi NIfTI maps."))
