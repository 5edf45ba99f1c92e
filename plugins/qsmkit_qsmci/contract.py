"""The QSM-CI algorithm contract (github.com/QSMxT/QSM-CI, ``CONTRACT.md`` and ``stages.yml``) run by qsmkit.

A QSM-CI submission implements one *stage* or *span* of QSM: it reads the canonical artifacts the
stage consumes from an input folder and writes the ones it produces to an output folder.

==================  ==========================================  ===========  ========================================
QSM-CI stage        consumes                                    produces     qsmkit stage kinds (defaults)
==================  ==========================================  ===========  ========================================
``field-mapping``   phase, magnitude, mask, params              totalfield   unwrap (laplacian), echo_combine
                                                                             (weighted_fit)
``bfr``             totalfield, mask, params                    localfield   background (vsharp)
``dipole``          localfield, mask, params                    chimap       inversion of the local field (tkd)
``bfr+dipole``      totalfield, mask, params, magnitude         chimap       background + inversion, or one
                                                                             inversion of the total field (tfi)
``end-to-end``      phase, magnitude, mask, params              chimap       all four
==================  ==========================================  ===========  ========================================

Files: ``phase.nii.gz`` (rad, 4D x,y,z,echo or 3D), ``magnitude.nii.gz`` (same shape),
``mask.nii.gz`` (3D binary), ``totalfield.nii.gz`` / ``localfield.nii.gz`` / ``chimap.nii.gz`` (3D,
**ppm**), ``params.json`` (``TE`` echo times in s (a list), ``B0`` in T, ``B0_dir`` the unit B0
direction in image (voxel) coordinates, ``voxel_size`` in mm) and, optionally, ``config.json``:
a flat ``{name: value}`` mapping of parameter overrides. Every 3D output is on the grid, voxel
size and affine of ``mask.nii.gz``. The magnitude is the one negotiable input: used when present
(e.g. MEDI's edge prior, the echo fit's weights), required only by a qsmkit stage that reads it.

``--method`` names the qsmkit methods of the span, joined by ``+`` (``romeo``, ``vsharp+medi``,
``romeo+pdf+tv``); a name that two stage kinds of the span share is written ``kind/method``.
Kinds not named take the defaults above. An inversion of the total field (one that reads
``total_field``, e.g. ``tfi``) replaces the background stage.

Parameters in ``config.json`` are a stage's declared parameter names (``threshold``); when two
stages of the span declare the same name, prefix it with the method (``vsharp.threshold``).
A value given as a string for a list parameter is parsed as YAML (``"[12, 8, 4]"``).

The run is an ordinary qsmkit pipeline built through :mod:`qsmkit.pipeline` (validation, the
stages' own checks, the run device), run without writing its folder; the canonical outputs are then
written atomically.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qsmkit.errors import ConfigError, InputDataError, ParameterError, QsmkitWarning

#: stage/span -> (consumed artifacts, produced artifacts), as QSM-CI's stages.yml
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "field-mapping": (("phase", "magnitude", "mask", "params"), ("totalfield",)),
    "bfr": (("totalfield", "mask", "params"), ("localfield",)),
    "dipole": (("localfield", "mask", "params"), ("chimap",)),
    "bfr+dipole": (("totalfield", "mask", "params", "magnitude"), ("chimap",)),
    "end-to-end": (("phase", "magnitude", "mask", "params"), ("chimap",)),
}
#: QSM-CI artifact -> file name
FILES = {"phase": "phase.nii.gz", "magnitude": "magnitude.nii.gz", "mask": "mask.nii.gz", "params": "params.json",
         "totalfield": "totalfield.nii.gz", "localfield": "localfield.nii.gz", "chimap": "chimap.nii.gz"}
#: QSM-CI artifact <-> qsmkit artifact
QSMKIT_NAME = {"phase": "phase", "magnitude": "magnitude", "mask": "mask", "totalfield": "total_field",
               "localfield": "local_field", "chimap": "chi"}
QSMCI_NAME = {v: k for k, v in QSMKIT_NAME.items()}
#: qsmkit stage kinds each QSM-CI stage spans, in order
KINDS: dict[str, tuple[str, ...]] = {
    "field-mapping": ("unwrap", "echo_combine"),
    "bfr": ("background",),
    "dipole": ("inversion",),
    "bfr+dipole": ("background", "inversion"),
    "end-to-end": ("unwrap", "echo_combine", "background", "inversion"),
}
#: the method a kind gets when ``--method`` does not name one
DEFAULTS = {"unwrap": "laplacian", "echo_combine": "weighted_fit", "background": "vsharp", "inversion": "tkd"}
CONFIG = "config.json"


@dataclass
class Acquisition:
    """What ``params.json`` says, checked."""

    echo_times: list[float] | None
    field_strength: float | None
    b0_dir_voxel: list[float]
    voxel_size: list[float] | None


def _inverts_total_field(cls) -> bool:
    return cls.kind == "inversion" and "total_field" in cls.reads


def choose_methods(stage: str, method: str, registry) -> list[tuple[str, str]]:
    """The qsmkit ``(kind, method)`` steps that run QSM-CI ``stage`` with ``--method`` (module docstring)."""
    if stage not in STAGES:
        raise ConfigError(f"qsm-ci: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    kinds = KINDS[stage]
    chosen: dict[str, str] = {}
    for token in [t.strip() for t in str(method).split("+")]:
        if not token:
            raise ConfigError(f"qsm-ci: --method {method!r} has an empty part; join method names with '+', e.g. "
                              f"vsharp+tkd")
        if "/" in token:
            kind, name = token.split("/", 1)
            if kind not in kinds:
                raise ConfigError(f"qsm-ci: --method {token!r}: the {stage} stage spans {', '.join(kinds)}, not "
                                  f"{kind!r}")
            if name not in registry.methods(kind):
                raise ConfigError(f"qsm-ci: no {kind} method {name!r}; available: {', '.join(registry.methods(kind))}")
            hits = [kind]
        else:
            name = token
            hits = [k for k in kinds if name in registry.methods(k)]
            if not hits:
                avail = "; ".join(f"{k}: {', '.join(registry.methods(k))}" for k in kinds)
                raise ConfigError(f"qsm-ci: {name!r} is not a method of the {stage} stage ({avail})")
            if len(hits) > 1:
                raise ConfigError(f"qsm-ci: {name!r} is a method of {' and '.join(hits)}; write "
                                  f"{' or '.join(f'{k}/{name}' for k in hits)}")
        if hits[0] in chosen:
            raise ConfigError(f"qsm-ci: --method {method!r} names two {hits[0]} methods; give one")
        chosen[hits[0]] = name
    steps = [(k, chosen.get(k, DEFAULTS[k])) for k in kinds]
    inv = next(((k, m) for k, m in steps if k == "inversion"), None)
    if inv is not None:
        cls = registry.get(*inv)
        if cls.scope == "joint":
            raise ConfigError(f"qsm-ci: inversion {inv[1]!r} combines several head orientations; QSM-CI gives one")
        if _inverts_total_field(cls):
            if stage == "dipole":
                raise ConfigError(f"qsm-ci: {inv[1]!r} inverts the total field; run it as --stage bfr+dipole or "
                                  f"end-to-end")
            if "background" in chosen:
                raise ConfigError(f"qsm-ci: {inv[1]!r} inverts the total field and needs no background stage; "
                                  f"drop {chosen['background']!r} from --method")
            steps = [(k, m) for k, m in steps if k != "background"]
        elif "local_field" not in cls.reads:
            raise ConfigError(f"qsm-ci: inversion {inv[1]!r} reads neither a local nor a total field")
    return steps


def stage_params(steps: list[tuple[str, str]], registry) -> list[tuple[str, int, Any]]:
    """``(config name, step index, Param)`` of every declared parameter (``device`` excluded).

    A name is bare when only one step of the span declares it, else ``method.name``.
    """
    counts: dict[str, int] = {}
    decl = []
    for i, (kind, method) in enumerate(steps):
        for p in registry.get(kind, method).params:
            if p.name == "device":
                continue
            decl.append((i, method, p))
            counts[p.name] = counts.get(p.name, 0) + 1
    return [(p.name if counts[p.name] == 1 else f"{method}.{p.name}", i, p) for i, method, p in decl]


def apply_config(steps: list[tuple[str, str]], config: Mapping[str, Any], registry) -> list[dict]:
    """Per-step ``params`` mappings from ``config.json`` (names as :func:`stage_params`)."""
    table = stage_params(steps, registry)
    by_name = {name: (i, p) for name, i, p in table}
    for name, i, p in table:  # "method.name" is always accepted, also when the bare name is unique
        by_name.setdefault(f"{steps[i][1]}.{p.name}", (i, p))
    params: list[dict] = [{} for _ in steps]
    for key, value in config.items():
        if key not in by_name:
            shown = ", ".join(name for name, _, _ in table) or "(none)"
            raise ParameterError(f"qsm-ci: {CONFIG} sets {key!r}, which no stage of this method declares; valid: "
                                 f"{shown}")
        i, p = by_name[key]
        if p.type is list and isinstance(value, str):
            from qsmkit.pipeline.spec import parse_yaml

            value = parse_yaml(value, f"{CONFIG} {key}")
        params[i][p.name] = value
    return params


# --------------------------------------------------------------------------- inputs
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputDataError(f"qsm-ci: cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputDataError(f"qsm-ci: {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {what}") from None
    if not isinstance(data, dict):
        raise InputDataError(f"qsm-ci: {path} must hold a JSON object; {what}")
    return data


def _numbers(value: Any, n: int | None, where: str) -> list[float]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in vals):
        raise InputDataError(f"qsm-ci: params.json {where} must be {'a list of ' if n != 1 else ''}number(s), "
                             f"got {value!r}")
    if n is not None and len(vals) != n:
        raise InputDataError(f"qsm-ci: params.json {where} must have {n} numbers, got {value!r}")
    return [float(v) for v in vals]


def read_params(in_dir: Path, stage: str) -> Acquisition:
    """Check ``params.json``: ``TE`` (s, list) and ``B0`` (T) needed to map fields from phase."""
    path = in_dir / FILES["params"]
    data = _read_json(path, 'give {"TE": [s, ...], "B0": T, "B0_dir": [x, y, z], "voxel_size": [mm, mm, mm]}')
    needs_acq = "phase" in STAGES[stage][0]
    te = data.get("TE")
    b0 = data.get("B0")
    for key, value, hint in (("TE", te, "echo times in seconds, a list"), ("B0", b0, "field strength in tesla")):
        if value is None and needs_acq:
            raise InputDataError(f"qsm-ci: params.json has no {key!r} ({hint}); the {stage} stage needs it")
    echo_times = _numbers(te, None, "TE") if te is not None else None
    field = _numbers(b0, 1, "B0")[0] if b0 is not None else None
    b0_dir = _numbers(data["B0_dir"], 3, "B0_dir") if data.get("B0_dir") is not None else [0.0, 0.0, 1.0]
    if not np.linalg.norm(b0_dir) > 0:
        raise InputDataError(f"qsm-ci: params.json B0_dir {b0_dir} is the zero vector; give the unit B0 direction")
    vs = _numbers(data["voxel_size"], 3, "voxel_size") if data.get("voxel_size") is not None else None
    return Acquisition(echo_times, field, b0_dir, vs)


def read_config(in_dir: Path) -> dict:
    """``config.json`` (parameter overrides) or ``{}`` when absent."""
    path = in_dir / CONFIG
    return _read_json(path, "give a flat {name: value} object") if path.is_file() else {}


def required_inputs(stage: str, steps: list[tuple[str, str]], registry) -> tuple[list[str], list[str]]:
    """(required, optional) QSM-CI artifacts: the stage's consumes, magnitude optional unless a step reads it."""
    reads = {r for k, m in steps for r in registry.get(k, m).reads}
    optional_reads = {r for k, m in steps for r in registry.get(k, m).optional_reads}
    consumed = list(STAGES[stage][0])
    required = [a for a in consumed if a != "magnitude" or "magnitude" in reads]
    optional = [a for a in consumed if a not in required]
    if stage == "dipole" and "magnitude" in reads | optional_reads:  # outside the dipole contract: opted in
        (required if "magnitude" in reads else optional).append("magnitude")
    return required, optional


def world_direction(affine: np.ndarray, b0_dir_voxel) -> list[float]:
    """B0 direction given in voxel coordinates -> world coordinates (qsmkit's ``inputs.b0_direction``).

    qsmkit takes the voxel-frame direction as ``R.T @ b_world`` with ``R = A[:3, :3] / voxel sizes``
    (:func:`qsmkit.physics.b0_direction_from_affine`), so ``b_world = R @ b_voxel`` (R orthonormal).
    """
    from qsmkit.physics import voxel_sizes

    a = np.asarray(affine, float)
    rot = a[:3, :3] / voxel_sizes(a)[None, :]
    b = rot @ np.asarray(b0_dir_voxel, float)
    return [float(v) for v in b / np.linalg.norm(b)]


def build_spec(stage: str, method: str, in_dir: str | Path, registry, out_dir: Path) -> tuple[dict, list]:
    """The qsmkit pipeline mapping that runs ``stage`` on the canonical files of ``in_dir``; also the steps."""
    from qsmkit.io.nifti import read_header
    from qsmkit.physics import voxel_sizes

    in_dir = Path(in_dir)
    steps = choose_methods(stage, method, registry)
    if not in_dir.is_dir():
        state = "is a file" if in_dir.exists() else "does not exist"
        raise InputDataError(f"qsm-ci: input folder {in_dir} {state}; give the folder holding "
                             f"{', '.join(FILES[a] for a in STAGES[stage][0])}")
    required, optional = required_inputs(stage, steps, registry)
    missing = [FILES[a] for a in required if not (in_dir / FILES[a]).is_file()]
    if missing:
        raise InputDataError(f"qsm-ci: {in_dir} has no {', '.join(missing)}; the {stage} stage reads "
                             f"{', '.join(FILES[a] for a in STAGES[stage][0])} (see 'qsmkit qsm-ci run --help')")
    acq = read_params(in_dir, stage)
    config = apply_config(steps, read_config(in_dir), registry)
    mask_info, _ = read_header(in_dir / FILES["mask"], "mask")
    header_vs = [float(v) for v in voxel_sizes(mask_info.affine)]
    if acq.voxel_size is not None and not np.allclose(acq.voxel_size, header_vs, rtol=1e-2, atol=1e-3):
        warnings.warn(f"qsm-ci: params.json voxel_size {acq.voxel_size} mm differs from the NIfTI header's "
                      f"{[round(v, 4) for v in header_vs]} mm; using the header (the grid of mask.nii.gz)",
                      QsmkitWarning, stacklevel=2)
    inputs: dict[str, Any] = {}
    for art in (*required, *optional):
        if art != "params" and (in_dir / FILES[art]).is_file():
            inputs[QSMKIT_NAME[art]] = str((in_dir / FILES[art]).resolve())
    if acq.echo_times is not None:
        inputs["echo_times"] = acq.echo_times
    if acq.field_strength is not None:
        inputs["field_strength"] = acq.field_strength
    inputs["b0_direction"] = world_direction(mask_info.affine, acq.b0_dir_voxel)
    if "phase" in inputs:
        inputs["ignore_sidecars"] = True  # params.json is the contract's acquisition record
    spec = {"name": f"qsm-ci {stage} {method}", "qc": False, "inputs": inputs,
            "stages": [{"stage": k, "method": m, "params": p} for (k, m), p in zip(steps, config)],
            "output_dir": str(out_dir)}
    return spec, steps


def run_contract(stage: str, method: str, in_dir: str | Path, out_dir: str | Path, registry=None,
                 log=lambda m: None) -> dict[str, Path]:
    """Run QSM-CI ``stage`` with qsmkit ``method`` on ``in_dir``; write the canonical outputs to ``out_dir``.

    Returns ``{artifact: path}`` of the files written (ppm, on the grid of ``mask.nii.gz``).
    """
    from qsmkit.errors import OutputError
    from qsmkit.io import save_nifti
    from qsmkit.pipeline import build_plan, run_plan
    from qsmkit.plugins import load_registry

    registry = registry if registry is not None else load_registry()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"qsm-ci: output {out_dir} is a file; give a folder")
    spec, steps = build_spec(stage, method, in_dir, registry, out_dir / ".qsmkit-run")
    plan = build_plan(spec, registry)
    log(f"qsm-ci {stage}: " + " -> ".join(f"{k}/{m}" for k, m in steps))
    res = run_plan(plan, registry, log=log, write=False)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"qsm-ci: cannot create {out_dir} ({exc.strerror}); choose a folder you can "
                          f"write to") from None
    mask = res.artifacts.get("mask")
    written: dict[str, Path] = {}
    for art in STAGES[stage][1]:
        vol = res.artifacts.get(QSMKIT_NAME[art])
        if vol is None:  # pragma: no cover - the plan's checks guarantee it
            raise OutputError(f"qsm-ci: the pipeline produced no {QSMKIT_NAME[art]}")
        data = np.asarray(vol.data, np.float32)
        if mask is not None and getattr(mask, "grid_shape", None) == vol.grid_shape:
            data = np.where(np.asarray(mask.data) > 0.5, data, np.float32(0))  # defined inside the (eroded) mask
        written[art] = save_nifti(vol.like(data, units="ppm"), out_dir / FILES[art])
        log(f"wrote {written[art]} (ppm)")
    return written
