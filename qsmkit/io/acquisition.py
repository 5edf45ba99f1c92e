"""Reading a prepared acquisition's voxel data: phase units, per-echo stacks, masks, the phantom.

The inputs were checked by :func:`qsmkit.inputs.prepare_inputs` (keys, files, headers, echoes,
sidecars); what is left to check here needs the voxel values (NaN/inf, phase range, empty masks).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, GeometryError, InputDataError, QsmkitWarning, UnitsError
from ..inputs import MASK_LIKE, UNITS, is_nifti_path, simulate_options
from ..volume import Volume
from .nifti import load_nifti


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


def _as4d(vol: Volume) -> Volume:
    if vol.data.ndim == 3:
        vol.data = vol.data[..., None]
    return vol


def _load_echoes(files: list[Path], where: str, units: str, b0_world) -> Volume:
    """Per-echo 3D files stacked into one 4D volume (geometry and header of the first)."""
    vols = [load_nifti(f, name=f"{where}.{i}", units=units, b0_world=b0_world) for i, f in enumerate(files)]
    first = vols[0]
    data = np.stack([v.data.reshape(v.grid_shape) for v in vols], axis=3)
    return first.like(data, sources=[str(f) for f in files])


def _binarise(vol: Volume, where: str) -> Volume:
    if vol.data.ndim == 4:
        vol.data = vol.data[..., 0]
    values = np.unique(vol.data) if vol.data.size <= 1 << 24 else np.unique(vol.data[::7])
    if not np.all(np.isin(values, (0.0, 1.0))):
        warnings.warn(f"{where}: mask values span {values.min():g}..{values.max():g}, not 0/1; voxels > 0.5 are "
                      f"taken as the mask (give a 0/1 mask to make this explicit)", QsmkitWarning, stacklevel=2)
    vol.data = vol.data > 0.5
    if not vol.data.any():
        raise InputDataError(f"{where}: the mask is empty (no voxel > 0.5)")
    return vol


def load_acquisition(spec: Mapping[str, Any], where: str, b0_world, common: Mapping[str, Any]) -> dict:
    """Load one prepared acquisition (``magnitude``/``phase``/extra artifact files) into artifacts."""
    art: dict[str, Any] = {}
    vols: dict[str, Volume] = {}
    for key, value in spec.items():
        if key in ("phase_units", "invert_phase", "b0_direction", "ignore_sidecars"):
            continue
        if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            vols[key] = _load_echoes(value, f"{where}.{key}", UNITS.get(key, ""), b0_world)
        elif isinstance(value, Path) and is_nifti_path(value.name):
            vol = load_nifti(value, name=f"{where}.{key}", units=UNITS.get(key, ""), b0_world=b0_world)
            vols[key] = _binarise(vol, f"{where}.{key}") if key in MASK_LIKE else vol
        elif key == "echo_times":
            art[key] = np.asarray(value, dtype=np.float64)
        else:
            art[key] = value
    if "phase" in vols:
        vols["phase"] = convert_phase(_as4d(vols["phase"]), common.get("phase_units", "rad"),
                                      bool(common.get("invert_phase", False)))
    if "magnitude" in vols:
        _as4d(vols["magnitude"])
    check_same_grid(vols, where)
    art.update(vols)
    return art


def simulate_inputs(options: Mapping[str, Any]) -> tuple[dict, list[dict] | None]:
    """Run the built-in phantom for ``inputs.simulate``; returns (artifacts, per-orientation artifacts)."""
    fn, rotations, opts = simulate_options(options)
    try:
        result = fn(rotations, **opts) if rotations is not None else fn(**opts)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"inputs.simulate: {exc}") from None
    if rotations is None:
        return result.artifacts(), None
    per = [ph.artifacts() for ph in result]
    return dict(per[0]), per
