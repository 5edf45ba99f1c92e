"""A pipeline's ``inputs:`` section: checked and completed before planning, loaded before the first stage.

:func:`prepare_inputs` runs at validation time (``qsmkit validate`` and ``qsmkit run`` alike):
every key is known (else "unknown key, did you mean ..."), every file is a supported file whose
header fits the file and the machine, magnitude and phase agree in echoes and grid, and the
acquisition (echo times, field strength) is completed from the pipeline or from the JSON
sidecars of the phase files, which must agree where both give a value.
:func:`qsmkit.io.acquisition.load_acquisition`
then reads the voxel data. So whatever validation accepts does not later fail on its form, and
bad input stops the run with a one-line :class:`~qsmkit.errors.QsmkitError` before anything is
written.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import ConfigError, GeometryError, InputDataError, UnitsError
from .io.sidecars import NIFTI_SUFFIXES, read_sidecar, sidecar_echo_times, sidecar_path

#: acquisition keys of an ``inputs`` section (any other key is an artifact given as a file or value)
ACQUISITION = {"magnitude", "phase", "echo_times", "field_strength", "phase_units", "invert_phase",
               "b0_direction", "ignore_sidecars", "field_units"}
#: keys with a meaning of their own
RESERVED = ACQUISITION | {"simulate", "orientations"}
#: artifacts whose files hold fields in ppm (documented units of inputs given as files)
UNITS = {"total_field": "ppm", "local_field": "ppm", "chi": "ppm", "unwrapped_phase": "rad",
         "phase": "rad", "noise_weight": "1/ppm", "magnitude": "a.u.", "mask": "bool"}
MASK_LIKE = {"mask", "csf_mask", "head_mask"}
HDF5_SUFFIXES = (".h5", ".hdf5", ".mat")
#: inputs that must be files: NIfTI images, or HDF5 for k-space
FILE_KEYS = set(UNITS) | MASK_LIKE | {"kspace"}
PHASE_UNITS = ("rad", "deg", "scaled")
_ECHO_RTOL, _ECHO_ATOL = 1e-3, 1e-6


def is_nifti_path(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(NIFTI_SUFFIXES)


def _is_file_value(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(NIFTI_SUFFIXES + HDF5_SUFFIXES)


def resolve_path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def file_inputs(inputs: Mapping[str, Any]) -> dict[str, Path]:
    """``{name: path}`` of every file an ``inputs`` section names (paths already resolved)."""
    out: dict[str, Path] = {}

    def add(prefix: str, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(value, Path):
                out[prefix + key] = value
            elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
                out.update({f"{prefix}{key}.{i}": v for i, v in enumerate(value)})

    add("", inputs)
    for i, orient in enumerate(inputs.get("orientations") or []):
        add(f"orientations.{i}.", orient)
    return out


# --------------------------------------------------------------------------- scalar checks
def check_echo_times(te: Any, n_echoes: int | None, where: str = "inputs.echo_times") -> np.ndarray:
    """Echo times as a float64 array in seconds; errors for ms, non-positive or miscounted values."""
    try:
        arr = np.atleast_1d(np.asarray(te, dtype=np.float64))
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a list of numbers in seconds, got {te!r}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ConfigError(f"{where} must be a non-empty list of numbers in seconds, got {te!r}")
    if np.any(arr <= 0):
        raise UnitsError(f"{where} must be positive (seconds), got {arr.tolist()}")
    if np.max(arr) > 1.0:
        raise UnitsError(f"{where} look like milliseconds (largest {np.max(arr):g}); give them in "
                         f"seconds, e.g. {np.round(arr / 1000, 6).tolist()}")
    if n_echoes is not None and arr.size != n_echoes:
        raise InputDataError(f"{where} has {arr.size} values but the phase has {n_echoes} echoes; "
                             f"give one echo time per echo")
    if arr.size > 1 and np.any(np.diff(arr) <= 0):
        raise ConfigError(f"{where} must increase strictly, got {arr.tolist()}")
    return arr


def check_field_strength(b0: Any, where: str = "inputs.field_strength") -> float:
    if isinstance(b0, bool) or not isinstance(b0, (int, float)) or not np.isfinite(b0):
        raise ConfigError(f"{where} must be a number in tesla (e.g. 3.0), got {b0!r}")
    if not 0.05 <= float(b0) <= 21.1:
        raise UnitsError(f"{where} = {b0} T is outside 0.05-21.1 T; give it in tesla (e.g. 3.0)")
    return float(b0)


def _check_b0_direction(value: Any) -> None:
    vec = np.asarray(value, dtype=float) if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) else None
    if vec is None or vec.shape != (3,) or not np.all(np.isfinite(vec)) or np.linalg.norm(vec) == 0:
        raise ConfigError(f"inputs.b0_direction must be a non-zero 3-vector in scanner coordinates, got {value!r}")


def _check_flag(inputs: Mapping[str, Any], key: str) -> None:
    if key in inputs and not isinstance(inputs[key], bool):
        raise ConfigError(f"inputs.{key} must be true or false, got {inputs[key]!r}")


def _check_field_units(values: Mapping[str, Any]) -> None:
    """``inputs.field_units`` (units of total_field / local_field files, :mod:`qsmkit.io.units`): a known
    unit, with a field file to apply to and the field strength (and, for ``rad``, one echo time) it needs."""
    from .io.units import FIELD_ARTIFACTS, FIELD_UNITS

    if "field_units" not in values:
        return
    units = values["field_units"]
    if units not in FIELD_UNITS:
        raise ConfigError(f"inputs.field_units = {units!r}; choose one of {', '.join(FIELD_UNITS)} (the units of "
                          f"the total_field / local_field files)")
    if not any(isinstance(values.get(k), Path) for k in FIELD_ARTIFACTS):
        raise ConfigError("inputs.field_units is given but no total_field or local_field file is; remove it, or "
                          "give the field file it describes")
    if units != "ppm" and "field_strength" not in values:
        raise ConfigError(f"inputs.field_units: {units} needs the field strength to convert to ppm; add "
                          f"'field_strength: 3.0' (tesla) under inputs")
    if units == "rad":
        te = values.get("echo_times")
        if not isinstance(te, (list, tuple, int, float)) or isinstance(te, bool) or len(np.atleast_1d(te)) != 1:
            raise ConfigError("inputs.field_units: rad needs the one time over which the phase accrued; give "
                              "'echo_times: [TE]' (seconds, one value; the echo spacing for a phase difference)")


def _agree(a: Iterable[float], b: Iterable[float]) -> bool:
    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=_ECHO_RTOL, atol=_ECHO_ATOL))


# --------------------------------------------------------------------------- preparation
@dataclass
class PreparedInputs:
    """Resolved inputs (paths as :class:`Path`, acquisition completed) and what was assumed."""

    values: dict
    notes: list[str] = field(default_factory=list)


def _resolve_value(key: str, value: Any, where: str, base: Path) -> Any:
    """A file input as a Path (or a list of Paths for per-echo magnitude/phase); values pass through."""
    per_echo_ok = key in ("magnitude", "phase")
    if isinstance(value, list) and per_echo_ok:
        if not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be one NIfTI file or a list of per-echo NIfTI files, got {value!r}")
        return [_resolve_value(key, v, f"{where}.{i}", base) for i, v in enumerate(value)]
    if key in FILE_KEYS or _is_file_value(value):
        if not isinstance(value, str) or not value.strip():
            form = "a NIfTI file (.nii or .nii.gz)" if key != "kspace" else "an HDF5 file (.h5)"
            extra = " or a list of per-echo NIfTI files" if per_echo_ok else ""
            raise ConfigError(f"{where} must be a path to {form}{extra}, got {value!r}")
        if resolve_path(value, base).is_dir():
            raise ConfigError(f"{where}: {resolve_path(value, base)} is a folder; give the file itself (per-echo "
                              f"files as a list)")
        suffixes = HDF5_SUFFIXES if key == "kspace" else NIFTI_SUFFIXES if key in FILE_KEYS else None
        if not _is_file_value(value) or (suffixes and not value.lower().endswith(suffixes)):
            ext = "".join(Path(value).suffixes) or "no extension"
            want = ".h5 / .hdf5" if key == "kspace" else ".nii or .nii.gz"
            raise ConfigError(f"{where}: {value!r} has an unsupported file type ({ext}); give a {want} file "
                              f"(convert other formats first, e.g. mri_convert or dcm2niix)")
        path = resolve_path(value, base)
        if not path.exists():
            raise ConfigError(f"{where}: file not found: {path}; check the path (relative paths resolve against "
                              f"the pipeline file's folder)")
        return path
    return value


def _resolve_section(raw: Mapping[str, Any], allowed: list[str], where: str, base_of) -> dict:
    from .pipeline.spec import check_keys

    check_keys(raw, allowed, where)
    return {k: _resolve_value(k, v, f"{where}.{k}", base_of(f"{where}.{k}")) for k, v in raw.items()}


def _probe_acquisition(acq: dict, where: str, common: Mapping[str, Any], notes: list[str]) -> dict:
    """Check headers, grids and echoes of one acquisition; complete echo times and field strength."""
    from .io.nifti import read_header

    infos = {}
    for key, value in acq.items():
        files = value if isinstance(value, list) else [value]
        if not all(isinstance(f, Path) and is_nifti_path(f.name) for f in files):
            continue
        heads = [read_header(f, f"{where}.{key}")[0] for f in files]
        if isinstance(value, list):
            for i, h in enumerate(heads):
                if len(h.shape) != 3 and not (len(h.shape) == 4 and h.shape[3] == 1):
                    raise GeometryError(f"{where}.{key}.{i}: {h.path} has shape {h.shape}; per-echo files must be "
                                        f"3D (one echo each)")
                if h.shape[:3] != heads[0].shape[:3] or not np.allclose(h.affine, heads[0].affine, atol=1e-4):
                    raise GeometryError(f"{where}.{key}.{i}: {h.path} is not on the grid of {heads[0].path}; all "
                                        f"echoes must share one voxel grid")
        elif key in MASK_LIKE and len(heads[0].shape) == 4 and heads[0].shape[3] != 1:
            raise InputDataError(f"{where}.{key}: a mask must be 3D, got shape {heads[0].shape}")
        n = len(heads) if isinstance(value, list) else (heads[0].shape[3] if len(heads[0].shape) == 4 else 1)
        infos[key] = (heads, n)
    ref = next(iter(infos), None)
    for key, (heads, _) in infos.items():
        h0, r0 = heads[0], infos[ref][0][0]
        if h0.shape[:3] != r0.shape[:3]:
            raise GeometryError(f"{where}: {key} has grid {h0.shape[:3]} but {ref} has {r0.shape[:3]}; all inputs "
                                f"must be on the same voxel grid (resample them first)")
        if not np.allclose(h0.affine, r0.affine, atol=1e-4, rtol=0):
            raise GeometryError(f"{where}: {key} and {ref} have different affines (orientation or position); all "
                                f"inputs must share one voxel grid")
    if "magnitude" in infos and "phase" in infos and infos["magnitude"][1] != infos["phase"][1]:
        raise GeometryError(f"{where}: magnitude has {infos['magnitude'][1]} echo(es) but phase has "
                            f"{infos['phase'][1]}; give both as 3D (one echo) or both as 4D with the same number "
                            f"of echoes")
    if "phase" not in acq:
        return acq
    _reorder_echoes(acq, where, common, notes)
    n_echoes = infos["phase"][1] if "phase" in infos else None
    files = acq["phase"] if isinstance(acq["phase"], list) else [acq["phase"]]
    use_sidecars = not common.get("ignore_sidecars", False)
    sides = [read_sidecar(f) for f in files] if use_sidecars else [{} for _ in files]
    side_te, side_where = sidecar_echo_times(files, sides) if use_sidecars else (None, "")
    te = acq.get("echo_times", common.get("echo_times"))
    if te is not None:
        te = check_echo_times(te, n_echoes, f"{where}.echo_times" if "echo_times" in acq else "inputs.echo_times")
        if side_te is not None and not _agree(te, side_te):
            raise ConfigError(f"{where}: echo_times {np.round(te, 6).tolist()} s in the pipeline disagree with "
                              f"EchoTime {np.round(side_te, 6).tolist()} s in {side_where}; remove echo_times to use "
                              f"the sidecars, or set inputs.ignore_sidecars: true to use the pipeline's")
        notes.append(f"{where}: echo times {np.round(te, 6).tolist()} s from the pipeline")
    elif side_te is not None:
        te = check_echo_times(side_te, n_echoes, f"EchoTime in {side_where}")
        notes.append(f"{where}: echo times {np.round(te, 6).tolist()} s from {side_where}")
    else:
        raise ConfigError(f"{where}: no echo_times; add 'echo_times: [...]' (seconds) under inputs or an "
                          f"EchoTime in the phase image's JSON sidecar")
    acq["echo_times"] = [float(t) for t in te]
    side_b0 = {float(s["MagneticFieldStrength"]) for s in sides if isinstance(s.get("MagneticFieldStrength"),
                                                                             (int, float))}
    b0 = acq.get("field_strength", common.get("field_strength"))
    if len(side_b0) > 1:
        raise InputDataError(f"{where}: the phase sidecars give different MagneticFieldStrength {sorted(side_b0)}; "
                             f"fix the sidecars")
    if b0 is not None:
        b0 = check_field_strength(b0)
        if side_b0 and abs(next(iter(side_b0)) - b0) > 1e-3:
            raise ConfigError(f"{where}: field_strength {b0:g} T in the pipeline disagrees with MagneticFieldStrength "
                              f"{next(iter(side_b0)):g} T in the phase sidecar {sidecar_path(files[0])}; remove "
                              f"field_strength to use the sidecar, or set inputs.ignore_sidecars: true")
        notes.append(f"{where}: field strength {b0:g} T from the pipeline")
    elif side_b0:
        b0 = check_field_strength(next(iter(side_b0)), f"MagneticFieldStrength in {sidecar_path(files[0])}")
        notes.append(f"{where}: field strength {b0:g} T from {sidecar_path(files[0])}")
    else:
        raise ConfigError(f"{where}: no field_strength; add 'field_strength: 3.0' (tesla) under inputs or "
                          f"MagneticFieldStrength in the phase image's JSON sidecar")
    acq["field_strength"] = b0
    return acq


def _reorder_echoes(acq: dict, where: str, common: Mapping[str, Any], notes: list[str]) -> None:
    """Per-echo file lists sorted by their sidecars' EchoTime when the list order differs."""
    phase = acq["phase"]
    if not isinstance(phase, list) or len(phase) < 2 or common.get("ignore_sidecars", False):
        return
    tes = [read_sidecar(f).get("EchoTime") for f in phase]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tes):
        return
    order = sorted(range(len(phase)), key=lambda i: tes[i])
    if order == list(range(len(phase))):
        return
    acq["phase"] = [phase[i] for i in order]
    mag = acq.get("magnitude")
    if isinstance(mag, list) and len(mag) == len(phase):
        acq["magnitude"] = [mag[i] for i in order]
    notes.append(f"{where}: per-echo files reordered by their sidecars' EchoTime")


def prepare_inputs(raw: Any, base: Path, touched: set[str], artifacts: Iterable[str]) -> PreparedInputs:
    """Check, resolve and complete a pipeline's ``inputs`` mapping (see the module docstring).

    Parameters
    ----------
    raw : mapping
        The ``inputs`` section as read from YAML (with ``--set`` overrides applied).
    base : Path
        Folder that relative paths resolve against (the pipeline file's).
    touched : set of str
        Dotted keys set with ``--set``; their relative paths resolve against the current folder.
    artifacts : iterable of str
        Artifact names any registered stage reads or writes: the keys an ``inputs`` section may
        give besides the reserved acquisition keys.
    """
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("pipeline: 'inputs' must be a mapping (files, echo_times, field_strength, or simulate)")
    allowed = sorted(RESERVED) + sorted(set(artifacts) - RESERVED)

    def base_of(key: str) -> Path:
        return Path.cwd() if key in touched or any(key.startswith(t + ".") for t in touched) else base

    values = _resolve_section(raw, allowed, "inputs", base_of)
    for key in ("invert_phase", "ignore_sidecars"):
        _check_flag(values, key)
    if "b0_direction" in values:
        _check_b0_direction(values["b0_direction"])
    if values.get("phase_units", "rad") not in PHASE_UNITS:
        raise ConfigError(f"inputs.phase_units = {values['phase_units']!r}; choose one of {', '.join(PHASE_UNITS)}")
    _check_field_units(values)
    notes: list[str] = []
    if "simulate" in values:
        if not isinstance(values["simulate"], dict):
            raise ConfigError("inputs.simulate must be a mapping of phantom options (or {} for the defaults)")
        files = file_inputs(values)
        if files or "orientations" in values:
            raise ConfigError("inputs: 'simulate' cannot be combined with input files; use one or the other")
        simulate_options(values["simulate"])
        return PreparedInputs(values, notes)
    if "orientations" in values:
        orients = values["orientations"]
        if not isinstance(orients, list) or len(orients) < 2:
            raise ConfigError("inputs.orientations must be a list of at least two {magnitude, phase} mappings "
                              "(the first is the reference)")
        per_allowed = [k for k in allowed if k not in ("orientations", "simulate", "b0_direction", "phase_units",
                                                        "invert_phase", "ignore_sidecars")]
        resolved = []
        for i, o in enumerate(orients):
            if not isinstance(o, dict):
                raise ConfigError(f"inputs.orientations.{i} must be a mapping with magnitude and phase")
            where = f"inputs.orientations.{i}"
            resolved.append(_probe_acquisition(_resolve_section(o, per_allowed, where, base_of), where, values, notes))
        keys = [set(o) for o in resolved]
        if any(k != keys[0] for k in keys):
            raise ConfigError("inputs.orientations: every orientation must give the same keys "
                              f"(the first gives {', '.join(sorted(keys[0]))})")
        ref = resolved[0]
        for i, o in enumerate(resolved[1:], 1):
            if "echo_times" in ref and not _agree(o["echo_times"], ref["echo_times"]):
                raise InputDataError(f"inputs.orientations.{i}: echo times differ from the reference "
                                     f"orientation's; COSMOS needs the same echo times for every orientation")
            if "field_strength" in ref and o["field_strength"] != ref["field_strength"]:
                raise InputDataError(f"inputs.orientations.{i}: field strength differs from the reference "
                                     f"orientation's")
        values["orientations"] = resolved
        for key in ("echo_times", "field_strength"):
            if key in ref:
                values[key] = ref[key]
        return PreparedInputs(values, notes)
    acq = {k: v for k, v in values.items() if k not in ("phase_units", "invert_phase", "b0_direction",
                                                       "ignore_sidecars", "field_units")}
    values.update(_probe_acquisition(acq, "inputs", values, notes))
    if "phase" not in values:  # echo times or field strength given alone (e.g. with an unwrapped phase)
        if "echo_times" in values:
            values["echo_times"] = check_echo_times(values["echo_times"], None).tolist()
        if "field_strength" in values:
            values["field_strength"] = check_field_strength(values["field_strength"])
    return PreparedInputs(values, notes)


def simulate_options(options: Mapping[str, Any]) -> tuple[Any, Any, dict]:
    """Check ``inputs.simulate``; returns (simulator function, orientations or None, keyword options)."""
    from . import simulate

    opts = dict(options or {})
    rotations = opts.pop("orientations", None)
    fn = simulate.simulate_orientations if rotations is not None else simulate.simulate_phantom
    valid = [n for n, p in inspect.signature(simulate.simulate_phantom).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        from .pipeline.spec import did_you_mean

        raise ConfigError(f"inputs.simulate: unknown option {unknown[0]!r}{did_you_mean(unknown[0], valid)}; valid "
                          f"options: {', '.join(valid + ['orientations'])}")
    for key in ("shape", "voxel_size", "echo_times", "b0_direction", "rotation_deg"):
        if key in opts and not isinstance(opts[key], (list, tuple)):
            raise ConfigError(f"inputs.simulate.{key} must be a list, got {opts[key]!r}")
    if "echo_times" in opts:
        opts["echo_times"] = tuple(check_echo_times(opts["echo_times"], None))
    return fn, rotations, opts
