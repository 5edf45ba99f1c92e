"""Torch device selection shared by every stage (``device: auto|cpu|cuda``).

:func:`resolve_device` is the one way a stage or a pure function turns the ``device`` parameter
(or a ``torch.device`` it was handed) into a ``torch.device``. The parameter itself is declared
once, in :mod:`qsmkit.params` (:data:`DEVICE_PARAM` is :data:`qsmkit.params.DEVICE`).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .params import DEVICE as DEVICE_PARAM

__all__ = ["DEVICE_PARAM", "resolve_device"]


def resolve_device(name: Any = "auto"):
    """A ``torch.device`` for ``auto``, ``cpu``, ``cuda`` or ``cuda:<n>`` (error if CUDA is asked
    for but absent). A ``torch.device`` is returned as it is; ``None`` means ``auto``."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} was asked for but torch sees no CUDA GPU; use device: auto or cpu")
    return torch.device(name)
