"""``qsmkit qsm-ci export DIR``: one QSM-CI submission folder per built-in qsmkit method.

For each QSM-CI stage the registry has methods for, ``DIR/algorithms/<slug>/`` gets

``algorithm.yml``
    the QSM-CI manifest: ``name``, ``slug`` (``<method>-qsmkit``), ``algorithm``, ``source:
    qsmkit``, ``stage``, ``language: Python``, ``engine``, ``inputs`` (the artifacts the method
    reads), ``optional_inputs`` (read when present, e.g. the magnitude for MEDI), ``description``,
    ``license``, ``image`` or a ``Dockerfile``, ``run: bash run.sh`` and ``parameters`` (every
    declared :class:`~qsmkit.stage.Param` but ``device``: name, default and a description with
    unit and range), plus a ``qsmkit`` block (version and the exact stage methods);
``run.sh``
    ``qsmkit qsm-ci run --stage S --method M "$IN" "$OUT"`` (``$QSMKIT`` names another qsmkit
    executable); overrides arrive in ``$IN/config.json`` and qsmkit applies them;
``Dockerfile`` (without ``--image``)
    the environment QSM-CI builds in its setup phase (network on): a Python base image with
    qsmkit installed by pip (``QSMKIT_SPEC`` build argument, default ``qsmkit==<this version>``;
    CPU torch wheels). With ``--image IMAGE`` the manifest names that prebuilt environment instead.

Which methods: ``field-mapping`` -- each unwrap method with the default echo fit, and each other
echo-combination method after Laplacian unwrapping; ``bfr`` -- each background method;
``dipole`` -- each single-orientation inversion of the local field; ``bfr+dipole`` -- each
inversion of the total field (e.g. TFI). ``end-to-end`` has no single qsmkit method; any chain
runs under it with ``qsmkit qsm-ci run --stage end-to-end --method a+b+c+d``.

A folder already in ``algorithms/`` is replaced only when this command wrote it (its manifest says
``source: qsmkit``) or with ``--overwrite``; each file lands atomically.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Iterable

import yaml

from qsmkit.errors import OutputError

from .contract import DEFAULTS, STAGES, choose_methods, required_inputs, stage_params

__all__ = ["export_algorithms", "exported_methods"]

LICENSE = "BSD-3-Clause"


def exported_methods(registry, stages: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``(QSM-CI stage, --method)`` for every submission :func:`export_algorithms` writes."""
    want = list(stages) if stages else ["field-mapping", "bfr", "dipole", "bfr+dipole"]
    out: list[tuple[str, str]] = []
    for stage in want:
        if stage not in STAGES:
            raise OutputError(f"qsm-ci export: unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        if stage == "field-mapping":
            out += [(stage, m) for m in registry.methods("unwrap")]
            out += [(stage, f"{DEFAULTS['unwrap']}+{m}") for m in registry.methods("echo_combine")
                    if m != DEFAULTS["echo_combine"]]
        elif stage == "bfr":
            out += [(stage, m) for m in registry.methods("background")]
        elif stage in ("dipole", "bfr+dipole"):
            for m in registry.methods("inversion"):
                cls = registry.get("inversion", m)
                if cls.scope == "joint":
                    continue
                total = "total_field" in cls.reads
                if (stage == "dipole") == (not total) and (total or "local_field" in cls.reads):
                    out.append((stage, m))
    return out


#: how the papers spell the method names that are not simply upper-case
NAMES = {"vsharp": "V-SHARP", "resharp": "RESHARP", "laplacian": "Laplacian", "weighted_fit": "weighted echo fit"}


def display_name(method: str) -> str:
    """``tkd`` -> ``TKD``, ``vsharp`` -> ``V-SHARP``, ``nonlinear_fit`` -> ``Nonlinear Fit``."""
    return NAMES.get(method, method.upper() if len(method) <= 5 else method.replace("_", " ").title())


def _main_method(method: str) -> str:
    return method.split("+")[-1].split("/")[-1]


def _describe_param(p) -> str:
    bits = [p.doc or p.name]
    if p.unit:
        bits.append(f"[{p.unit}]")
    if p.range is not None:
        bits.append(f"range {list(p.range)}")
    if p.choices is not None:
        bits.append("one of " + "|".join(map(str, p.choices)))
    return " ".join(bits)


def manifest(stage: str, method: str, registry, image: str | None) -> dict[str, Any]:
    """The ``algorithm.yml`` mapping of one submission."""
    from qsmkit import __version__

    steps = choose_methods(stage, method, registry)
    main = _main_method(method)
    kind = next(k for k, m in steps if m == main)
    cls = registry.get(kind, main)
    required, optional = required_inputs(stage, steps, registry)
    doc: dict[str, Any] = {
        "name": f"{display_name(main)} (qsmkit)",
        "slug": f"{main.replace('_', '-')}-qsmkit",
        "algorithm": main,
        "source": "qsmkit",
        "stage": stage,
        "language": "Python",
        "engine": "qsmkit",
        "inputs": required,
    }
    if optional:
        doc["optional_inputs"] = optional
    chain = ", ".join(f"{k} {m}" for k, m in steps)
    what = cls.description.rstrip(". ") + ". " if cls.description else ""
    doc["description"] = f"{what}Run by qsmkit {__version__} as the {stage} stage ({chain})."
    doc["license"] = LICENSE
    if image:
        doc["image"] = image
    doc["run"] = "bash run.sh"
    params = [{"name": name, "default": p.default, "description": _describe_param(p)}
              for name, _, p in stage_params(steps, registry)]
    if params:
        doc["parameters"] = params
    doc["qsmkit"] = {"version": __version__, "method": method,
                     "stages": [{"stage": k, "method": m} for k, m in steps]}
    return doc


def run_sh(stage: str, method: str, doc: dict) -> str:
    outs = ", ".join(f"{a}.nii.gz" for a in STAGES[stage][1])
    return (f"#!/usr/bin/env bash\n"
            f"# QSM-CI submission: {doc['name']}, {stage} stage. Written by 'qsmkit qsm-ci export' "
            f"(qsmkit {doc['qsmkit']['version']}).\n"
            f"# consumes: {', '.join(doc['inputs'] + doc.get('optional_inputs', []))} (in $IN)\n"
            f"# produces: {outs} (ppm, on the grid of mask.nii.gz, in $OUT)\n"
            f"# parameter overrides (qsm-ci run --set NAME=VALUE) arrive as $IN/config.json; qsmkit applies them\n"
            f"set -euo pipefail\n"
            f'IN="${{1:-/input}}"; OUT="${{2:-/output}}"\n'
            f'exec "${{QSMKIT:-qsmkit}}" qsm-ci run --stage {stage} --method {method} "$IN" "$OUT"\n')


def dockerfile(version: str) -> str:
    return ("# The environment QSM-CI builds for this submission (setup phase, network on); the code runs with\n"
            "# no network. Set QSMKIT_SPEC to what pip should install (a version, a wheel URL, git+https://...).\n"
            "FROM python:3.11-slim\n"
            f'ARG QSMKIT_SPEC="qsmkit=={version}"\n'
            "RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \\\n"
            "        \"$QSMKIT_SPEC\" \\\n"
            "    && qsmkit --version\n")


def _write(path: Path, text: str, executable: bool = False) -> None:
    from qsmkit.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if executable:
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _ours(folder: Path) -> bool:
    try:
        doc = yaml.safe_load((folder / "algorithm.yml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and doc.get("source") == "qsmkit"


def export_algorithms(out: str | Path, registry=None, stages: Iterable[str] | None = None, image: str | None = None,
                      overwrite: bool = False) -> list[Path]:
    """Write ``out/algorithms/<slug>/`` for every exported method (see the module docstring)."""
    from qsmkit import __version__
    from qsmkit.plugins import load_registry

    registry = registry if registry is not None else load_registry()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"qsm-ci export: {out} is a file; give a folder (algorithms/ is made inside it)")
    root = out / "algorithms"
    todo = [(s, m, manifest(s, m, registry, image)) for s, m in exported_methods(registry, stages)]
    slugs = [d["slug"] for _, _, d in todo]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:  # pragma: no cover - one method name per exported kind today
        raise OutputError(f"qsm-ci export: two submissions would be named {dup[0]}")
    for _, _, doc in todo:
        folder = root / doc["slug"]
        if folder.exists() and any(folder.iterdir()) and not overwrite and not _ours(folder):
            raise OutputError(f"qsm-ci export: {folder} holds a submission qsmkit did not write; choose another "
                              f"folder or pass --overwrite")
    written = []
    for stage, method, doc in todo:
        folder = root / doc["slug"]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder / "algorithm.yml", "# QSM-CI submission manifest, written by 'qsmkit qsm-ci export'\n"
                   + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100))
            _write(folder / "run.sh", run_sh(stage, method, doc), executable=True)
            if image:
                (folder / "Dockerfile").unlink(missing_ok=True)
            else:
                _write(folder / "Dockerfile", dockerfile(__version__))
        except OSError as exc:
            raise OutputError(f"qsm-ci export: cannot write {folder} ({exc.strerror or exc}); choose a folder you "
                              f"can write to") from None
        written.append(folder)
    return written
