"""BIDS-style JSON sidecars of NIfTI images (``EchoTime`` in s, ``MagneticFieldStrength`` in T)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputDataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of an image: same name with ``.json`` instead of ``.nii``/``.nii.gz``."""
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")


def read_sidecar(path: Path) -> dict:
    """The JSON sidecar of ``path`` as a dict (``{}`` when there is none)."""
    side = sidecar_path(path)
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{side}: JSON sidecar is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise InputDataError(f"{side}: JSON sidecar must be an object with keys such as EchoTime; fix or remove it")
    return data


def sidecar_echo_times(files: list[Path], sides: list[dict]) -> tuple[list[float] | None, str]:
    """Echo times (s) from the sidecars of a 4D file or of per-echo files; (None, '') when absent."""
    if not any(sides):
        return None, ""
    if len(files) == 1:
        te = sides[0].get("EchoTimes", sides[0].get("EchoTime"))
        if te is None:
            return None, ""
        return list(np.atleast_1d(np.asarray(te, dtype=float)).tolist()), str(sidecar_path(files[0]))
    values = []
    for f, s in zip(files, sides):
        te = s.get("EchoTime")
        if te is None or isinstance(te, (list, dict, bool)):
            raise InputDataError(f"{sidecar_path(f)}: no single EchoTime; every per-echo file needs its EchoTime "
                                 f"(seconds), or remove the sidecars and give inputs.echo_times")
        values.append(float(te))
    return values, f"the sidecars of {files[0].parent}/{files[0].name} ... {files[-1].name}"
