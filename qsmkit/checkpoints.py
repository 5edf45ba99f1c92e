"""Checkpoints of trained methods (QSMnet, U-Net, HFS-SDE, ...): one format, safe loading.

A qsmkit checkpoint is a ``torch.save`` of a plain dictionary (tensors, numbers, strings, lists,
dicts; nothing else)::

    {"format": "qsmkit-checkpoint", "version": 1,
     "method": "qsmnet",                 # which trainer/stage made it
     "arch": {...},                      # constructor arguments of the network (ints, floats, str)
     "model": state_dict,                # weights (the EMA weights where training keeps an EMA)
     "normalisation": {...},             # input/output statistics the stage applies
     "config": {...},                    # the full training config, for provenance
     "training": {...}}                  # optional: optimiser/scheduler/EMA state, epoch, history
                                         # (only in the resumable ``last.pt``; shipped files omit it)

Loading always uses ``torch.load(weights_only=True)``: a pickle that carries code (a class or a
function to call) is refused by torch's restricted unpickler before anything runs, and is reported
as a one-line :class:`~qsmkit.errors.CheckpointError`, as are truncated and corrupt files, bare
state dicts of other projects and checkpoints of another method or architecture.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .io.atomic import atomic_path

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_weights", "to_plain"]

FORMAT = "qsmkit-checkpoint"
VERSION = 1


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, tuples and Paths turned into what ``weights_only`` loads."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(path: str | os.PathLike, *, method: str, arch: dict, model: dict,
                    normalisation: dict | None = None, config: dict | None = None,
                    training: dict | None = None) -> Path:
    """Write a checkpoint atomically (a reader never sees half a file).

    Parameters
    ----------
    path : path
        Output file (``.pt``).
    method : str
        Name of the method (the stage method / trainer name), checked on loading.
    arch : dict
        The network's constructor arguments.
    model : dict
        ``state_dict()`` of the network.
    normalisation : dict, optional
        Input/output statistics (floats) the method applies around the network.
    config : dict, optional
        The training configuration that produced the weights.
    training : dict, optional
        Resumable state (optimiser, scheduler, EMA, epoch, RNG, history).
    """
    import torch

    payload = {"format": FORMAT, "version": VERSION, "method": str(method), "arch": to_plain(dict(arch)),
               "model": {k: v.detach().cpu() for k, v in model.items()},
               "normalisation": to_plain(dict(normalisation or {})), "config": to_plain(dict(config or {}))}
    if training is not None:
        payload["training"] = to_plain(training)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, method: str | None = None, *, need_training: bool = False) -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Parameters
    ----------
    path : path
        The ``.pt`` file.
    method : str, optional
        The method it must belong to (e.g. ``"qsmnet"``).
    need_training : bool
        Require the resumable training state (``--resume``).

    Raises
    ------
    CheckpointError
        One line naming the file and the problem: missing, not a file, code in the pickle,
        truncated/corrupt, not a qsmkit checkpoint, another method, no training state.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a .pt file made by 'qsmkit train'")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            why = "it holds Python objects or code, which qsmkit never loads"
        raise CheckpointError(f"checkpoint {path} was refused: {why}; only plain tensor checkpoints "
                              "(made by 'qsmkit train') are read") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError,
            TypeError, IndexError, MemoryError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {first}); "
                              "re-copy it or retrain with 'qsmkit train'") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qsmkit checkpoint (a bare state dict or another project's file); "
                              "train one with 'qsmkit train <method>'")
    if int(ckpt.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')}, newer than this "
                              f"qsmkit reads ({VERSION}); upgrade qsmkit")
    for key in ("method", "arch", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is incomplete")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"checkpoint {path} has no valid weights ('model' must map names to tensors)")
    if method is not None and ckpt["method"] != method:
        raise CheckpointError(f"checkpoint {path} belongs to method '{ckpt['method']}', not '{method}'")
    if need_training and not isinstance(ckpt.get("training"), dict):
        raise CheckpointError(f"checkpoint {path} holds no training state (a shipped model file); "
                              "resume from the run folder's last.pt")
    ckpt.setdefault("normalisation", {})
    ckpt.setdefault("config", {})
    return ckpt


def load_weights(module, state: dict, path: str | os.PathLike = "checkpoint") -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error when they do not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise CheckpointError(f"checkpoint {path} does not fit the network it declares "
                              f"({type(module).__name__}): {detail[:200]}") from None
