"""Loading and checking a pipeline's ``inputs:`` section (files, echo times, units, simulation).

Everything here runs before the first stage, so bad input stops the run with a one-line
:class:`~qsmkit.errors.QsmkitError` and nothing is written.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError, GeometryError, InputDataError, UnitsError
from .volume import Volume

#: input keys with a meaning of their own; any other key is an artifact given as a file or value
RESERVED = {"magnitude", "phase", "echo_times", "field_strength", "phase_units", "invert_phase",
            "b0_direction", "simulate", "orientations"}
#: artifacts whose files hold fields in ppm (documented units of inputs given as files)
UNITS = {"total_field": "ppm", "local_field": "ppm", "chi": "ppm", "unwrapped_phase": "rad",
         "phase": "rad", "noise_weight": "1/ppm", "magnitude": "a.u.", "mask": "bool"}
MASK_LIKE = {"mask", "csf_mask"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PHASE_UNITS = ("rad", "deg", "scaled")


def is_nifti_path(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(NIFTI_SUFFIXES)


def resolve_path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def file_inputs(inputs: Mapping[str, Any]) -> dict[str, Path]:
    """``{name: path}`` of every file an ``inputs`` section names (paths already resolved)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Path):
            out[key] = value
    for i, orient in enumerate(inputs.get("orientations") or []):
        for key, value in orient.items():
            if isinstance(value, Path):
                out[f"orientations.{i}.{key}"] = value
    return out


def _as4d(vol: Volume) -> Volume:
    if vol.data.ndim == 3:
        vol.data = vol.data[..., None]
    return vol


def _read_sidecar(path: Path) -> dict:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    side = path.with_name(name + ".json")
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{side}: JSON sidecar is not valid JSON ({exc}); fix or remove it") from None


def check_echo_times(te: Any, n_echoes: int | None) -> np.ndarray:
    """Echo times as a float64 array in seconds; errors for ms, non-positive or miscounted values."""
    try:
        arr = np.atleast_1d(np.asarray(te, dtype=np.float64))
    except (TypeError, ValueError):
        raise ConfigError(f"inputs.echo_times must be a list of numbers in seconds, got {te!r}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ConfigError(f"inputs.echo_times must be a non-empty list of numbers in seconds, got {te!r}")
    if np.any(arr <= 0):
        raise UnitsError(f"inputs.echo_times must be positive (seconds), got {arr.tolist()}")
    if np.max(arr) > 1.0:
        raise UnitsError(f"inputs.echo_times look like milliseconds (largest {np.max(arr):g}); give them in "
                         f"seconds, e.g. {np.round(arr / 1000, 6).tolist()}")
    if n_echoes is not None and arr.size != n_echoes:
        raise InputDataError(f"inputs.echo_times has {arr.size} values but the phase has {n_echoes} echoes; "
                             f"give one echo time per echo")
    if arr.size > 1 and np.any(np.diff(arr) <= 0):
        raise ConfigError(f"inputs.echo_times must increase strictly, got {arr.tolist()}")
    return arr


def check_field_strength(b0: Any) -> float:
    if isinstance(b0, bool) or not isinstance(b0, (int, float)) or not np.isfinite(b0):
        raise ConfigError(f"inputs.field_strength must be a number in tesla (e.g. 3.0), got {b0!r}")
    if not 0.05 <= float(b0) <= 21.1:
        raise UnitsError(f"inputs.field_strength = {b0} T is outside 0.05-21.1 T; give it in tesla (e.g. 3.0)")
    return float(b0)


def convert_phase(vol: Volume, units: str, invert: bool) -> Volume:
    """Phase data to radians in [-pi, pi), checking that ``rad`` data really are radians."""
    data = vol.data
    if units == "rad":
        lo, hi = float(np.min(data)), float(np.max(data))
        if lo < -np.pi * 1.01 or hi > np.pi * 1.01:
            raise UnitsError(f"phase: values span [{lo:g}, {hi:g}], not radians in [-pi, pi]; set "
                             f"inputs.phase_units: scaled (vendor integer range, rescaled to [-pi, pi)) or deg")
    elif units == "deg":
        data = np.deg2rad(data)
    elif units == "scaled":
        lo, hi = float(np.min(data)), float(np.max(data))
        if hi <= lo:
            raise InputDataError("phase: all values are equal; the phase image holds no phase")
        data = (data - lo) / (hi - lo) * np.float32(2 * np.pi) - np.float32(np.pi)
    data = data.astype(np.float32, copy=False)
    if invert:
        data = -data
    vol.data = np.angle(np.exp(1j * data)).astype(np.float32) if units != "rad" or invert else data
    vol.units = "rad"
    return vol


def check_same_grid(vols: Mapping[str, Volume], where: str = "inputs") -> None:
    """Raise :class:`GeometryError` unless every volume shares the first one's grid and affine."""
    items = list(vols.items())
    if not items:
        return
    ref_name, ref = items[0]
    for name, vol in items[1:]:
        if vol.grid_shape != ref.grid_shape:
            raise GeometryError(f"{where}: {name} has grid {vol.grid_shape} but {ref_name} has {ref.grid_shape}; "
                                f"all inputs must be on the same voxel grid (resample them first)")
        if not np.allclose(vol.affine, ref.affine, atol=1e-4, rtol=0):
            raise GeometryError(f"{where}: {name} and {ref_name} have different affines (orientation or position); "
                                f"all inputs must share one voxel grid")


def load_acquisition(spec: Mapping[str, Any], where: str, b0_world, common: Mapping[str, Any]) -> dict:
    """Load one acquisition (``magnitude``/``phase``/extra artifact files) into artifacts."""
    from .io.nifti import load_nifti

    art: dict[str, Any] = {}
    vols: dict[str, Volume] = {}
    for key, value in spec.items():
        if key in RESERVED - {"magnitude", "phase"}:
            continue
        if isinstance(value, Path):
            if value.suffix.lower() in (".h5", ".hdf5", ".mat"):
                art[key] = value
                continue
            vol = load_nifti(value, name=f"{where}.{key}", units=UNITS.get(key, ""), b0_world=b0_world)
            if key in MASK_LIKE:
                if vol.data.ndim != 3:
                    raise InputDataError(f"{where}.{key}: a mask must be 3D, got shape {vol.shape}")
                vol.data = vol.data > 0.5
                if not vol.data.any():
                    raise InputDataError(f"{where}.{key}: the mask is empty (no voxel > 0.5)")
            vols[key] = vol
        else:
            art[key] = value
    if "phase" in vols:
        vols["phase"] = convert_phase(_as4d(vols["phase"]), common.get("phase_units", "rad"),
                                      bool(common.get("invert_phase", False)))
    if "magnitude" in vols:
        _as4d(vols["magnitude"])
    if "magnitude" in vols and "phase" in vols:
        nm, nph = vols["magnitude"].shape[3], vols["phase"].shape[3]
        if nm != nph:
            raise GeometryError(f"{where}: magnitude has {nm} echo(es) but phase has {nph}; give both as 3D "
                                f"(one echo) or both as 4D with the same number of echoes")
    check_same_grid(vols, where)
    art.update(vols)
    return art


def simulate_inputs(options: Mapping[str, Any]) -> tuple[dict, list[dict] | None]:
    """Run the built-in phantom for ``inputs.simulate``; returns (artifacts, per-orientation artifacts)."""
    from . import simulate

    opts = dict(options or {})
    rotations = opts.pop("orientations", None)
    fn = simulate.simulate_orientations if rotations is not None else simulate.simulate_phantom
    valid = [n for n, p in inspect.signature(simulate.simulate_phantom).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ConfigError(f"inputs.simulate: unknown option {', '.join(map(repr, unknown))}; valid options: "
                          f"{', '.join(valid + ['orientations'])}")
    for key in ("shape", "voxel_size", "echo_times", "b0_direction", "rotation_deg"):
        if key in opts and not isinstance(opts[key], (list, tuple)):
            raise ConfigError(f"inputs.simulate.{key} must be a list, got {opts[key]!r}")
    if "echo_times" in opts:
        opts["echo_times"] = tuple(check_echo_times(opts["echo_times"], None))
    try:
        result = fn(rotations, **opts) if rotations is not None else fn(**opts)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"inputs.simulate: {exc}") from None
    if rotations is None:
        return result.artifacts(), None
    per = [ph.artifacts() for ph in result]
    return dict(per[0]), per
