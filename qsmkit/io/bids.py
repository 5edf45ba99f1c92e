"""BIDS input: find the multi-echo GRE runs of a dataset and turn each into a pipeline ``inputs`` section.

A small discovery of our own rather than pybids: pybids pulls pandas, SQLAlchemy and formulaic
and takes seconds to index a dataset, while a QSM run needs only one datatype (``anat``) and a
handful of suffixes. What is found:

* ``sub-<label>/[ses-<label>/]anat/<entities>_echo-<n>_part-{mag,phase}_<suffix>.nii[.gz]``:
  one 3D file per echo and part (what dcm2niix and qsm-forward write);
* the same without ``echo-``: one file per part holding one echo (3D) or all echoes (4D);
* ``<suffix>`` is ``MEGRE``, ``T2starw`` or ``GRE`` (:data:`SUFFIXES`).

Files under ``derivatives/``, ``sourcedata/``, ``code/`` and hidden folders are not inputs.

Sidecars follow the BIDS inheritance principle: every JSON file from the dataset root down to the
image's folder whose entities are a subset of the image's (same suffix, no other entity) applies,
the more specific one (deeper, then more entities) overriding the less specific one. From them a
run gets ``EchoTime`` (s, per echo; a list in a 4D file's sidecar), ``MagneticFieldStrength`` (T),
``B0_dir`` (optional: the B0 direction in the image's voxel frame, as qsm-forward and QSM-CI
write it; converted to the scanner frame with the phase image's affine) and the phase ``Units``
(``rad``, or ``arbitrary`` for a vendor integer range, which qsmkit rescales to [-pi, pi); without
``Units`` the phase is taken as radians, and values outside [-pi, pi] stop the run with a one-line
error that names the likely units).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError, InputDataError

#: image suffixes of a multi-echo gradient-echo acquisition
SUFFIXES = ("MEGRE", "T2starw", "GRE")
#: top-level folders of a BIDS dataset that hold no raw inputs
SKIP_DIRS = ("derivatives", "sourcedata", "code", "stimuli", "phenotype")
#: BIDS phase ``Units`` -> qsmkit ``phase_units``
PHASE_UNITS = {"rad": "rad", "radian": "rad", "radians": "rad", "arbitrary": "scaled", "a.u.": "scaled",
               "deg": "deg", "degree": "deg", "degrees": "deg"}
#: entities, in the order BIDS names them, that identify a run (echo and part are per file)
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mt", "inv", "flip")

_NAME = re.compile(r"^(?P<body>(?:[a-zA-Z0-9]+-[a-zA-Z0-9]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\.nii(?:\.gz)?|\.json)$")


def parse_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """Entities, suffix and extension of a BIDS file name, or ``None`` for a name BIDS does not allow."""
    m = _NAME.match(name)
    if m is None:
        return None
    ents: dict[str, str] = {}
    for part in m.group("body").rstrip("_").split("_") if m.group("body") else []:
        key, value = part.split("-", 1)
        if key in ents:
            return None
        ents[key] = value
    return ents, m.group("suffix"), m.group("ext")


def _label(value: str, prefix: str) -> str:
    value = value.strip()
    return value[len(prefix) + 1:] if value.startswith(prefix + "-") else value


def labels(values: Iterable[str] | None, prefix: str) -> set[str]:
    """Filter labels as given on a command line: with or without ``sub-``/``ses-``, comma/space separated."""
    out: set[str] = set()
    for v in values or ():
        for item in re.split(r"[,\s]+", str(v)):
            if item:
                out.add(_label(item, prefix))
    return out


@dataclass
class BidsRun:
    """One multi-echo GRE acquisition found in a BIDS dataset."""

    entities: dict[str, str]
    suffix: str
    magnitude: list[Path]
    phase: list[Path]
    echo_times: list[float] | None
    field_strength: float | None
    #: ``rad``/``scaled``/``deg`` from the phase ``Units``; ``None`` when no sidecar says (qsmkit then
    #: takes radians and names the likely units if the values are not in [-pi, pi])
    phase_units: str | None
    b0_direction: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``sub-01_ses-02_run-1_MEGRE``: unique within the dataset, used to name the run's folders."""
        return "_".join(f"{k}-{v}" for k, v in self.ordered_entities()) + f"_{self.suffix}"

    @property
    def label(self) -> str:
        """The run's entities only (``sub-01_ses-02``): the stem of its derivative files."""
        return "_".join(f"{k}-{v}" for k, v in self.ordered_entities())

    def ordered_entities(self) -> list[tuple[str, str]]:
        keys = [k for k in RUN_ENTITIES if k in self.entities] + sorted(set(self.entities) - set(RUN_ENTITIES))
        return [(k, self.entities[k]) for k in keys]

    @property
    def subject_dir(self) -> Path:
        """``sub-01/ses-02/anat`` relative to the dataset (and to its derivatives)."""
        p = Path(f"sub-{self.entities['sub']}")
        if "ses" in self.entities:
            p = p / f"ses-{self.entities['ses']}"
        return p / "anat"

    def inputs(self) -> dict[str, Any]:
        """The pipeline ``inputs`` section of this run (paths as strings, acquisition from the sidecars)."""
        one = len(self.phase) == 1
        out: dict[str, Any] = {"magnitude": str(self.magnitude[0]) if one else [str(p) for p in self.magnitude],
                               "phase": str(self.phase[0]) if one else [str(p) for p in self.phase]}
        if self.phase_units is not None:
            out["phase_units"] = self.phase_units
        if self.echo_times is not None:
            out["echo_times"] = list(self.echo_times)
        if self.field_strength is not None:
            out["field_strength"] = self.field_strength
        if self.b0_direction is not None:
            out["b0_direction"] = list(self.b0_direction)
        return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: JSON sidecar is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise InputDataError(f"{path}: a JSON sidecar must be an object with keys such as EchoTime; fix it")
    return data


def inherited_sidecar(image: Path, root: Path) -> dict:
    """The image's metadata under the BIDS inheritance principle (see the module docstring)."""
    parsed = parse_name(image.name)
    if parsed is None:
        return {}
    ents, suffix, _ = parsed
    rel = image.parent.relative_to(root)
    levels = [root] + [root.joinpath(*rel.parts[:i + 1]) for i in range(len(rel.parts))]
    merged: dict = {}
    for depth, folder in enumerate(levels):
        found = []
        for js in folder.glob(f"*{suffix}.json"):
            p = parse_name(js.name)
            if p is None or p[1] != suffix:
                continue
            if all(ents.get(k) == v for k, v in p[0].items()):
                found.append((len(p[0]), js))
        for _, js in sorted(found):
            merged.update(_read_json(js))
    return merged


def _echo_number(ents: dict[str, str], path: Path) -> int:
    try:
        return int(ents["echo"])
    except ValueError:
        raise InputDataError(f"{path}: echo-{ents['echo']} is not an echo number; BIDS echo labels are 1, 2, ...") \
            from None


def _group(root: Path) -> dict[tuple, dict[str, dict[int, Path]]]:
    """(run entities, suffix) -> part -> echo number (0 when the name has none) -> file."""
    groups: dict[tuple, dict[str, dict[int, Path]]] = {}
    for sub in sorted(root.glob("sub-*")):
        if not sub.is_dir():
            continue
        anats = [sub / "anat"] + sorted(s / "anat" for s in sub.glob("ses-*") if s.is_dir())
        for anat in anats:
            if not anat.is_dir():
                continue
            for f in sorted(anat.iterdir()):
                parsed = parse_name(f.name)
                if parsed is None or parsed[2] == ".json" or parsed[1] not in SUFFIXES:
                    continue
                ents, suffix, _ = parsed
                part = ents.pop("part", None)
                if part not in ("mag", "phase"):
                    continue  # real/imag parts, or a magnitude-only T2starw image
                echo = _echo_number(ents, f) if "echo" in ents else 0
                ents.pop("echo", None)
                key = (tuple(sorted(ents.items())), suffix)
                files = groups.setdefault(key, {"mag": {}, "phase": {}})[part]
                if echo in files:
                    raise InputDataError(f"{anat}: two files for echo {echo} of part-{part} ({files[echo].name} and "
                                         f"{f.name}, .nii and .nii.gz?); keep one")
                files[echo] = f
    return groups


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputDataError(f"{where}: {what} must be a number, got {value!r}; fix the sidecar")
    return float(value)


def _b0_world(b0_voxel: Any, phase: Path, where: str) -> list[float]:
    """A voxel-frame ``B0_dir`` in scanner coordinates (what ``inputs.b0_direction`` takes)."""
    from ..physics import voxel_sizes
    from .nifti import read_header

    vec = np.asarray(b0_voxel, dtype=float) if isinstance(b0_voxel, list) else None
    if vec is None or vec.shape != (3,) or not np.all(np.isfinite(vec)) or np.linalg.norm(vec) == 0:
        raise InputDataError(f"{where}: B0_dir must be a non-zero 3-vector, got {b0_voxel!r}; fix the sidecar")
    affine = read_header(phase, "phase")[0].affine
    rot = affine[:3, :3] / voxel_sizes(affine)
    world = rot @ (vec / np.linalg.norm(vec))
    return [float(v) for v in world / np.linalg.norm(world)]


def _make_run(root: Path, ents: dict[str, str], suffix: str, parts: dict[str, dict[int, Path]]) -> BidsRun:
    mag, phs = parts["mag"], parts["phase"]
    where = f"{root.name}/{'_'.join(f'{k}-{v}' for k, v in ents.items())}_{suffix}"
    if not phs:
        raise InputDataError(f"{where}: magnitude images but no part-phase image; QSM needs the phase")
    if not mag:
        raise InputDataError(f"{where}: phase images but no part-mag image; give the magnitude too")
    if sorted(mag) != sorted(phs):
        raise InputDataError(f"{where}: magnitude echoes {sorted(mag)} and phase echoes {sorted(phs)} differ; every "
                             f"echo needs both parts")
    if 0 in phs and len(phs) > 1:
        raise InputDataError(f"{where}: files with and without an echo- entity; name every echo (echo-1, echo-2, ...)")
    echoes = sorted(phs)
    phase, magnitude = [phs[e] for e in echoes], [mag[e] for e in echoes]
    sides = [inherited_sidecar(p, root) for p in phase]
    notes: list[str] = []
    te: list[float] | None = None
    if len(phase) == 1:
        raw = sides[0].get("EchoTime", sides[0].get("EchoTimes"))
        if raw is not None:
            te = [_number(t, str(phase[0]), "EchoTime") for t in np.atleast_1d(np.asarray(raw, dtype=object))]
    elif all("EchoTime" in s for s in sides):
        te = [_number(s["EchoTime"], str(p), "EchoTime") for s, p in zip(sides, phase)]
        if any(b <= a for a, b in zip(te, te[1:])):
            order = sorted(range(len(te)), key=lambda i: te[i])
            phase, magnitude = [phase[i] for i in order], [magnitude[i] for i in order]
            sides = [sides[i] for i in order]
            te = [te[i] for i in order]
            notes.append(f"{where}: echoes ordered by EchoTime, not by their echo- numbers")
    b0s = {_number(s["MagneticFieldStrength"], str(p), "MagneticFieldStrength")
           for s, p in zip(sides, phase) if "MagneticFieldStrength" in s}
    if not b0s:  # the magnitude's sidecar may carry it when the phase's does not
        b0s = {_number(s["MagneticFieldStrength"], str(p), "MagneticFieldStrength")
               for p in magnitude for s in [inherited_sidecar(p, root)] if "MagneticFieldStrength" in s}
    if len(b0s) > 1:
        raise InputDataError(f"{where}: the sidecars give different MagneticFieldStrength {sorted(b0s)}; fix them")
    units_raw = sides[0].get("Units")
    if units_raw is None:
        units = None
    elif not isinstance(units_raw, str) or units_raw.strip().lower() not in PHASE_UNITS:
        raise InputDataError(f"{phase[0]}: phase Units {units_raw!r} is not 'rad' or 'arbitrary'; fix the sidecar")
    else:
        units = PHASE_UNITS[units_raw.strip().lower()]
    b0_dir = sides[0].get("B0_dir")
    b0_world = _b0_world(b0_dir, phase[0], str(phase[0])) if b0_dir is not None else None
    return BidsRun(dict(ents), suffix, magnitude, phase, te, next(iter(b0s)) if b0s else None, units, b0_world, notes)


def find_runs(bids_dir: str | Path, participant_label: Sequence[str] = (), session_label: Sequence[str] = (),
              run: Sequence[str] = (), acq: Sequence[str] = ()) -> list[BidsRun]:
    """Every multi-echo GRE run of a BIDS dataset that passes the filters, in a stable order.

    Parameters
    ----------
    bids_dir : path
        The dataset's root folder (holding ``dataset_description.json`` and ``sub-*``).
    participant_label, session_label : sequence of str
        Keep only these subjects / sessions (labels with or without ``sub-`` / ``ses-``).
    run, acq : sequence of str
        Keep only these ``run-`` / ``acq-`` labels.
    """
    root = Path(bids_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--bids {root}: not a folder; give the BIDS dataset's root folder")
    if not any(root.glob("sub-*")):
        hint = " (it looks like a subject folder: give its parent)" if root.name.startswith("sub-") else ""
        raise ConfigError(f"--bids {root}: no sub-* folders; give the BIDS dataset's root folder{hint}")
    subs, sess = labels(participant_label, "sub"), labels(session_label, "ses")
    runs_f, acqs_f = labels(run, "run"), labels(acq, "acq")
    found: list[BidsRun] = []
    for (ents_t, suffix), parts in sorted(_group(root).items()):
        ents = dict(ents_t)
        if subs and ents.get("sub") not in subs:
            continue
        if sess and ents.get("ses") not in sess:
            continue
        if runs_f and ents.get("run") not in runs_f and ents.get("run", "").lstrip("0") not in \
                {r.lstrip("0") for r in runs_f}:
            continue
        if acqs_f and ents.get("acq") not in acqs_f:
            continue
        found.append(_make_run(root, ents, suffix, parts))
    if not found:
        filters = [f"{n} {', '.join(sorted(v))}" for n, v in (("participant", subs), ("session", sess),
                                                                ("run", runs_f), ("acq", acqs_f)) if v]
        extra = f" matching {'; '.join(filters)}" if filters else ""
        raise ConfigError(f"--bids {root}: no multi-echo GRE runs{extra} (looked for sub-*/[ses-*/]anat/"
                          f"*_part-mag/phase_{{{','.join(SUFFIXES)}}}.nii[.gz])")
    keys = [r.key for r in found]
    for r in found:  # T2starw and MEGRE of the same entities would share derivative names
        if sum(r.label == o.label for o in found) > 1:
            raise InputDataError(f"--bids {root}: {r.label} has GRE images with more than one suffix "
                                 f"({', '.join(k for k in keys if k.startswith(r.label + '_'))}); filter with --acq "
                                 f"or --run, or remove one")
    return found
