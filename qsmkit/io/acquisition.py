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


#: vendor integer phase ranges are ``[0, 2^b - 1]`` or ``[-2^b, 2^b - 1]`` for b >= this
_MIN_SCALED_BITS = 8


def _is_integer_valued(data: np.ndarray) -> bool:
    if np.issubdtype(data.dtype, np.integer):
        return True
    sample = data.ravel()[:: max(1, data.size // 1_000_000)]
    return bool(np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)))


def scaled_phase_range(data: np.ndarray) -> tuple[float, float, str]:
    """The vendor's range ``(low, high)`` of scaled phase data and how it was found.

    Integer-valued data: the smallest ``[0, 2^b - 1]`` (``low >= 0``, e.g. 0..4095 for 12 bits) or
    ``[-2^b, 2^b - 1]`` (e.g. -4096..4095) that holds the data (b >= 8); ``low`` maps to -pi and
    ``high + 1`` to +pi (``N = 2^b`` steps of ``2 pi / N``). Other data: their own min and max.
    The data must reach past half of the vendor's range (a wrapped phase image spans all of it):
    a signed 13-bit image whose values all lie within -2048..2047 is taken as 12-bit, which the
    ``warning:`` line stating the range shows.
    """
    lo, hi = float(np.min(data)), float(np.max(data))
    if _is_integer_valued(data):
        if lo >= 0:
            b = max(_MIN_SCALED_BITS, int(np.ceil(np.log2(hi + 1.0))) if hi > 0 else _MIN_SCALED_BITS)
            return 0.0, float(2 ** b - 1), f"integer range 0..{2 ** b - 1} ({b}-bit)"
        b = max(_MIN_SCALED_BITS, int(np.ceil(np.log2(max(-lo, hi + 1.0)))))
        return float(-(2 ** b)), float(2 ** b - 1), f"integer range {-(2 ** b)}..{2 ** b - 1} ({b + 1}-bit signed)"
    return lo, hi, f"data range {lo:g}..{hi:g} (not integers: min and max taken as -pi and pi)"


def _not_radians_error(lo: float, hi: float) -> UnitsError:
    """The one-line error for undeclared phase outside [-pi, pi], naming the likely phase_units."""
    if lo >= -180.0 * 1.01 and hi <= 360.0 * 1.01 and (hi - lo) <= 360.0 * 1.01:
        return UnitsError(f"phase: values span [{lo:g}, {hi:g}], which looks like degrees, not radians in "
                          f"[-pi, pi]; set inputs.phase_units: deg")
    return UnitsError(f"phase: values span [{lo:g}, {hi:g}], which looks like a vendor's integer scale, not radians "
                      f"in [-pi, pi]; set inputs.phase_units: scaled (rescaled to [-pi, pi)), or deg for degrees")


def convert_phase(vol: Volume, units: str, invert: bool, where: str = "inputs.phase") -> Volume:
    """Phase data to radians in [-pi, pi), checking that the data fit the declared ``units``.

    ``rad``: values must lie in [-pi, pi] (1 % slack), else a one-line :class:`UnitsError` that
    says which ``phase_units`` the values look like (``deg`` or ``scaled``). ``deg``: values must
    lie within [-360, 360]. ``scaled``: rescaled from the vendor's range found by
    :func:`scaled_phase_range`; the range used is stated in one ``warning:`` line (a
    :class:`QsmkitWarning`) and kept in ``vol.meta["phase_scaling"]``.
    """
    data = vol.data
    lo, hi = float(np.min(data)), float(np.max(data))
    if units == "rad":
        if lo < -np.pi * 1.01 or hi > np.pi * 1.01:
            raise _not_radians_error(lo, hi)
    elif units == "deg":
        if lo < -360.0 * 1.01 or hi > 360.0 * 1.01:
            raise UnitsError(f"phase: inputs.phase_units is deg but the values span [{lo:g}, {hi:g}], beyond "
                             f"+-360 degrees; set inputs.phase_units: scaled for vendor integers")
        data = np.deg2rad(data.astype(np.float64)).astype(np.float32)
    elif units == "scaled":
        if hi <= lo:
            raise InputDataError("phase: all values are equal; the phase image holds no phase")
        low, high, how = scaled_phase_range(data)
        steps = high - low + 1.0 if _is_integer_valued(data) else high - low
        data = ((data.astype(np.float64) - low) / steps * (2 * np.pi) - np.pi).astype(np.float32)
        vol.meta["phase_scaling"] = {"low": low, "high": high, "how": how}
        warnings.warn(f"{where}: phase_units scaled: {how} rescaled to [-pi, pi)", QsmkitWarning, stacklevel=2)
    data = data.astype(np.float32, copy=False)
    if invert:
        data = -data
    vol.data = np.angle(np.exp(1j * data)).astype(np.float32) if units != "rad" or invert else data
    vol.units = "rad"
    return vol


def check_magnitude(vol: Volume, where: str) -> None:
    """Raise :class:`InputDataError` when the magnitude holds no signal (all zero)."""
    if not np.any(vol.data):
        raise InputDataError(f"{where}: the magnitude is zero everywhere; check the file (a phase image given as "
                             f"magnitude, or an empty export)")


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
                                      bool(common.get("invert_phase", False)), f"{where}.phase")
    if "magnitude" in vols:
        _as4d(vols["magnitude"])
        check_magnitude(vols["magnitude"], f"{where}.magnitude")
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
