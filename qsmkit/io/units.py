"""Units of field maps given as input files: ppm is expected; Hz, rad/s and radians are detected or converted.

A total or local field brought from another tool (``inputs.total_field`` / ``inputs.local_field``)
must be in ppm of B0. Other tools often write Hz (SEPIA, ROMEO's B0 map), rad/s, or the phase
in radians accrued at one echo time. :func:`check_field_units` looks at the values: the 99th
percentile of ``|f - median(f)|`` in the mask (every non-zero voxel without one) is compared with
the largest value plausible in ppm (:data:`PPM_LIMITS`: a few ppm for a total field, much less
for a local field). Above it, the field is not in ppm, and the :class:`~qsmkit.errors.UnitsError`
names the unit that makes the values most plausible (the implied ppm amplitude closest to
:data:`TYPICAL_PPM`), with the numbers, and the declaration that converts it.

Declaration: ``inputs.field_units`` (:data:`FIELD_UNITS`), for every field given as a file:

* ``ppm`` (default): used as it is, after the check above;
* ``hz``: divided by ``GAMMA_BAR * 1e-6 * B0`` (needs ``field_strength``);
* ``rad_s``: divided by ``2 pi GAMMA_BAR * 1e-6 * B0`` (needs ``field_strength``);
* ``rad``: an unwrapped phase (or phase difference) accrued over one time ``TE``: divided by
  ``2 pi GAMMA_BAR * 1e-6 * B0 * TE`` (needs ``field_strength`` and ``echo_times`` with exactly one
  value, that ``TE``; for a phase difference between echoes, the echo spacing).

A declared unit is converted without the plausibility check (the user said what it is).
Wrapped phase cannot be told from a small field by its values alone; unwrap it first (or start
the pipeline from ``phase``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, UnitsError
from ..physics import GAMMA_BAR

__all__ = ["FIELD_UNITS", "FIELD_ARTIFACTS", "PPM_LIMITS", "TYPICAL_PPM", "field_amplitude", "ppm_per_unit",
           "check_field_units", "convert_field_units", "apply_field_units"]

#: declarable units of field inputs
FIELD_UNITS = ("ppm", "hz", "rad_s", "rad")
#: artifacts whose files hold a field (ppm)
FIELD_ARTIFACTS = ("total_field", "local_field")
#: largest plausible robust amplitude (99th percentile of |f - median f| in the mask) in ppm
PPM_LIMITS = {"total_field": 15.0, "local_field": 3.0}
#: typical robust amplitude in ppm (the unit whose implied ppm amplitude is closest wins)
TYPICAL_PPM = {"total_field": 1.0, "local_field": 0.1}
_NAMES = {"ppm": "ppm", "hz": "Hz", "rad_s": "rad/s", "rad": "radians of phase"}


def field_amplitude(data: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust amplitude of a field: the 99th percentile of ``|f - median f|`` over the mask (or non-zero voxels)."""
    f = np.asarray(data, dtype=np.float32)
    if f.ndim == 4 and f.shape[3] == 1:
        f = f[..., 0]
    sel = (np.asarray(mask) > 0) if mask is not None and np.shape(mask) == f.shape else (f != 0)
    v = f[sel & np.isfinite(f)]
    if v.size > 2_000_000:
        v = v[:: v.size // 1_000_000]
    if v.size == 0:
        return 0.0
    return float(np.percentile(np.abs(v - np.median(v)), 99))


def ppm_per_unit(units: str, field_strength: float | None, echo_time: float | None = None) -> float:
    """ppm of B0 per unit of ``units`` (``hz``, ``rad_s``, ``rad`` with ``echo_time`` in s; ``ppm`` -> 1)."""
    if units == "ppm":
        return 1.0
    b0 = float(field_strength)
    hz_per_ppm = GAMMA_BAR * 1e-6 * b0
    if units == "hz":
        return 1.0 / hz_per_ppm
    if units == "rad_s":
        return 1.0 / (2.0 * math.pi * hz_per_ppm)
    if units == "rad":
        return 1.0 / (2.0 * math.pi * hz_per_ppm * float(echo_time))
    raise ConfigError(f"field units {units!r} unknown; choose one of {', '.join(FIELD_UNITS)}")


def check_field_units(data: np.ndarray, mask: np.ndarray | None, artifact: str, field_strength: float | None,
                      echo_times: Any = None, where: str | None = None) -> float:
    """Raise a one-line :class:`UnitsError` if a field said to be in ppm is not; returns its amplitude (ppm).

    Parameters
    ----------
    data : ndarray
        The field as given.
    mask : ndarray or None
        Region of valid field (non-zero voxels without one).
    artifact : str
        ``total_field`` or ``local_field`` (sets the plausible range).
    field_strength : float or None
        B0 in T, for the implied ppm values in the message (3 T assumed without it).
    echo_times : sequence of float or None
        Echo times in s; the first is used for the radians hypothesis (10 ms without).
    where : str, optional
        Where the field came from, for the message (default ``inputs.<artifact>``).
    """
    amp = field_amplitude(data, mask)
    limit = PPM_LIMITS.get(artifact, PPM_LIMITS["total_field"])
    if amp <= limit:
        return amp
    where = where or f"inputs.{artifact}"
    b0 = float(field_strength) if field_strength else 3.0
    te_list = [] if echo_times is None else [float(t) for t in np.atleast_1d(np.asarray(echo_times, float))]
    te = te_list[0] if len(te_list) == 1 else 0.01
    typical = TYPICAL_PPM.get(artifact, 1.0)
    implied = {u: amp * ppm_per_unit(u, b0, te) for u in ("hz", "rad_s", "rad")}
    best = min(implied, key=lambda u: abs(math.log(implied[u] / typical)))
    b0_note = f"{b0:g} T" + ("" if field_strength else " assumed")
    te_note = f"TE {te * 1e3:.3g} ms" + ("" if len(te_list) == 1 else " assumed")
    need = "field_strength" if best != "rad" else "field_strength and echo_times: [TE]"
    raise UnitsError(
        f"{where}: values too large for ppm (99th percentile of |f - median| = {amp:.4g}, more than {limit:g} "
        f"ppm); probably {_NAMES[best]} ({implied[best]:.3g} ppm if so; as Hz {implied['hz']:.3g} ppm, as rad/s "
        f"{implied['rad_s']:.3g} ppm at {b0_note}, as radians {implied['rad']:.3g} ppm at {te_note}); declare it "
        f"with 'field_units: {best}' under inputs (with {need}) to convert it to ppm")


def convert_field_units(data: np.ndarray, units: str, field_strength: float | None, echo_times: Any = None,
                        where: str = "inputs.field_units") -> np.ndarray:
    """``data`` in ``units`` converted to ppm (float32); one-line errors for missing B0 / TE."""
    if units not in FIELD_UNITS:
        raise ConfigError(f"{where} = {units!r}; choose one of {', '.join(FIELD_UNITS)}")
    if units == "ppm":
        return np.asarray(data, dtype=np.float32)
    if field_strength is None:
        raise ConfigError(f"{where}: {units} needs the field strength to convert to ppm; add 'field_strength: 3.0' "
                          f"(tesla) under inputs")
    te = None
    if units == "rad":
        te_arr = None if echo_times is None else np.atleast_1d(np.asarray(echo_times, dtype=np.float64))
        if te_arr is None or te_arr.size != 1:
            raise ConfigError(f"{where}: rad needs the one time over which the phase accrued; give 'echo_times: "
                              f"[TE]' (seconds, one value; the echo spacing for a phase difference) under inputs")
        te = float(te_arr[0])
    scale = np.float32(ppm_per_unit(units, field_strength, te))
    return (np.asarray(data, dtype=np.float32) * scale).astype(np.float32)


def apply_field_units(art: dict, inputs: Mapping[str, Any]) -> list[str]:
    """Check or convert every field artifact given as a file (in ``art``, loaded); returns notes for the log.

    With ``inputs.field_units`` the fields are converted to ppm; without it they are checked by
    :func:`check_field_units` (mask: the ``mask`` artifact when given).
    """
    from ..volume import Volume

    notes: list[str] = []
    units = inputs.get("field_units", "ppm")
    b0 = inputs.get("field_strength")
    te = inputs.get("echo_times")
    mask = art.get("mask")
    mask_data = mask.data if isinstance(mask, Volume) else None
    for key in FIELD_ARTIFACTS:
        vol = art.get(key)
        if not isinstance(vol, Volume):
            continue
        if units == "ppm":
            check_field_units(vol.data, mask_data, key, b0, te)
            continue
        vol.data = convert_field_units(vol.data, units, b0, te)
        vol.units = "ppm"
        notes.append(f"inputs.{key}: converted from {_NAMES[units]} to ppm (x {ppm_per_unit(units, b0, None if units != 'rad' else float(np.atleast_1d(te)[0])):.4g})")
    return notes
