"""Torch device selection shared by plugins that run on CPU or GPU (``device: auto|cpu|cuda``)."""

from __future__ import annotations

from .errors import ConfigError
from .stage import Param

#: the standard ``device`` parameter for torch-based stages
DEVICE_PARAM = Param("device", str, "auto", choices=("auto", "cpu", "cuda"),
                     doc="torch device: auto uses CUDA when torch sees a GPU")


def resolve_device(name: str = "auto"):
    """A ``torch.device`` for ``auto``, ``cpu`` or ``cuda`` (error if CUDA is asked for but absent)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA GPU; use device: auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device(name)
