"""``provenance.json`` and ``metrics.json``: what ran, on which inputs, and how close it came to a truth."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from pathlib import Path
from typing import Any, Mapping

from ..volume import Volume

#: artifacts compared with the simulator's ground truth for metrics.json
TRUTH_COMPARED = ("chi", "local_field")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("numpy", "scipy", "nibabel", "torch", "SimpleITK", "h5py", "pluggy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def input_record(inputs: Mapping[str, Any]) -> dict:
    """Inputs as recorded: values as given, files with their SHA-256."""
    rec: dict[str, Any] = {}

    def one(value: Any) -> Any:
        if isinstance(value, Path):
            return {"path": str(value), "sha256": sha256(value) if value.is_file() else None}
        if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            return [one(v) for v in value]
        return value

    for key, value in inputs.items():
        rec[key] = [input_record(o) for o in value] if key == "orientations" else one(value)
    return rec


def provenance(plan, identity: dict, records: list[dict], started: _dt.datetime) -> dict:
    """The provenance record of a run (``outputs`` and ``duration_s`` are filled in when writing)."""
    from .. import __version__

    src = plan.source
    return {
        "qsmkit_version": __version__,
        "pipeline": {**identity, "sha256": sha256(src) if src is not None and src.exists() else None,
                     "overrides": plan.overrides},
        "started": started.isoformat(timespec="seconds"),
        "duration_s": None,
        "platform": {"python": platform.python_version(), "machine": platform.machine(),
                     "packages": _package_versions()},
        "inputs": input_record(plan.inputs),
        "notes": list(plan.notes),
        "stages": records,
        "outputs": [],
    }


def truth_metrics(art: Mapping[str, Any], truth: Mapping[str, Volume], produced: set[str]) -> dict:
    """Metrics of the produced artifacts against a simulator's ground truth (empty without one)."""
    if not truth:
        return {}
    from .. import metrics as qm

    metrics: dict[str, Any] = {}
    mask = art.get("mask")
    region = truth["mask"].data.astype(bool) if "mask" in truth else None
    if isinstance(mask, Volume) and mask.grid_shape == (region.shape if region is not None else mask.grid_shape):
        region = mask.data.astype(bool) if region is None else (region & mask.data.astype(bool))
    labels = truth.get("labels")
    for name in TRUTH_COMPARED:
        if name in produced and name in truth and isinstance(art.get(name), Volume):
            est = art[name].data
            if est.shape != truth[name].data.shape or region is None or not region.any():
                continue
            metrics[name] = qm.evaluate(truth[name].data, est, region,  # (truth, estimate)
                                        labels=labels.data if labels is not None and name == "chi" else None)
    return metrics
