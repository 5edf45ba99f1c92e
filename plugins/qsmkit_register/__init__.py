"""Built-in plugin: rigid registration of head orientations (``stage: register, method: simpleitk``).

Reads the engine's ``orientations`` artifact (reference first; each entry a dict with a 4D
``magnitude``, the eroded ``mask``, the ``local_field`` in ppm and optionally ``noise_weight``,
each on that orientation's own grid) and writes

* ``orientations``: a new list in which ``magnitude`` (first echo, 4D with one echo),
  ``local_field``, ``mask`` and ``noise_weight`` of every orientation are resampled onto the
  reference grid, and every Volume's ``b0_direction`` is that orientation's B0 expressed in the
  reference voxel frame (registration rotation combined with both acquisitions' affines, so
  oblique acquisitions are handled);
* ``transforms``: one JSON-friendly dict per orientation (4x4 world matrix reference world ->
  orientation world in mm, Euler angles in degrees, translation in mm, final metric value, ...).
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, Volume, hookimpl
from qsmkit.errors import InputDataError, StageError
from qsmkit.params import CPU_DEVICE, ITERATIONS, max_iter

from .rigid import (RigidResult, b0_in_reference_frame, b0_world_from_voxel, fov_fraction, resample_masked,
                    resample_masked_many, resample_to_reference, rigid_register)

__all__ = ["SimpleITKRegister", "rigid_register", "resample_to_reference", "resample_masked", "resample_masked_many",
           "b0_in_reference_frame", "fov_fraction", "RigidResult", "check_orientations", "orientation_label"]


def orientation_label(i: int, entry: dict) -> str:
    """``orientation i`` plus the source file of its magnitude (or field) when known."""
    src = None
    for key in ("magnitude", "local_field", "phase"):
        v = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(v, Volume) and v.meta.get("source"):
            src = v.meta["source"]
            break
    return f"orientation {i}" + (f" ({src})" if src else "")


def check_orientations(orients, where: str, need: tuple[str, ...]) -> list[dict]:
    """Check the ``orientations`` artifact: a list of >= 2 dicts with ``need`` keys and equal
    echo times / field strengths. Raises :class:`InputDataError` naming the orientation."""
    if not isinstance(orients, (list, tuple)) or len(orients) < 2:
        n = len(orients) if isinstance(orients, (list, tuple)) else 0
        raise InputDataError(f"{where}: needs at least 2 orientations (got {n}); give inputs.orientations "
                             f"as a list of {{magnitude, phase}} acquisitions, the reference first")
    for i, o in enumerate(orients):
        if not isinstance(o, dict):
            raise InputDataError(f"{where}: orientation {i} is {type(o).__name__}, not a mapping of artifacts")
        missing = [k for k in need if not isinstance(o.get(k), Volume)]
        if missing:
            raise InputDataError(f"{where}: {orientation_label(i, o)} has no {', '.join(missing)}; run the "
                                 f"per-orientation mask/unwrap/echo_combine/background stages first")
    te0, b00 = orients[0].get("echo_times"), orients[0].get("field_strength")
    for i, o in enumerate(orients[1:], 1):
        te = o.get("echo_times")
        if te0 is not None and te is not None:
            a, b = np.asarray(te0, dtype=float).ravel(), np.asarray(te, dtype=float).ravel()
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-9):
                raise InputDataError(f"{where}: {orientation_label(i, o)} has echo times {b.tolist()} s but the "
                                     f"reference has {a.tolist()} s; COSMOS needs the same echo times for every "
                                     f"orientation")
        b0 = o.get("field_strength")
        if b00 is not None and b0 is not None and not np.isclose(float(b0), float(b00), rtol=1e-6):
            raise InputDataError(f"{where}: {orientation_label(i, o)} was acquired at {float(b0)} T but the "
                                 f"reference at {float(b00)} T; all orientations need the same field strength")
    return list(orients)


def _first_echo(vol: Volume) -> np.ndarray:
    d = np.asarray(vol.data)
    return d[..., 0] if d.ndim == 4 else d


def _identity_transform(i: int, entry: dict) -> dict:
    return {"orientation": i, "source": orientation_label(i, entry), "reference": True,
            "matrix": np.eye(4).tolist(), "rotation_deg": [0.0, 0.0, 0.0], "rotation_angle_deg": 0.0,
            "translation_mm": [0.0, 0.0, 0.0], "center_mm": [0.0, 0.0, 0.0], "metric_value": None,
            "converged": True, "stop_condition": "reference orientation", "iterations": 0}


class SimpleITKRegister(Stage):
    """Rigid Euler3D registration of each orientation's first echo magnitude to the reference's."""

    kind, name = "register", "simpleitk"
    scope = "joint"
    reads = ("orientations",)
    optional_reads = ("noise_weight",)
    writes = ("orientations", "transforms")
    description = ("rigid (Euler3D) registration of every orientation to the reference with SimpleITK; "
                   "resamples local field/mask/noise weight and rotates B0 into the reference voxel frame")
    params = (
        Param("metric", str, "mattes", choices=("mattes", "correlation"),
              doc="similarity: Mattes mutual information or normalised correlation"),
        Param("histogram_bins", int, 32, range=(8, 256), doc="Mattes MI histogram bins"),
        Param("shrink_factors", list, [4, 2, 1], range=(1, 16), item_type=int,
              doc="multi-resolution downsampling per level, coarse to fine"),
        Param("smoothing_sigmas", list, [2.0, 1.0, 0.0], unit="voxel", range=(0.0, 16.0),
              doc="Gaussian smoothing per level (voxels of the full grid)"),
        max_iter(200, range=(1, 10000), aliases=ITERATIONS, doc="maximum optimizer iterations per level"),
        Param("learning_rate", float, 1.0, unit="mm", range=(1e-3, 20.0),
              doc="initial step of the regular-step gradient descent (physical-shift scaled)"),
        Param("min_step", float, 1e-4, unit="mm", range=(1e-7, 1.0), doc="convergence: stop below this step"),
        Param("relaxation", float, 0.8, range=(0.1, 0.99), doc="step reduction when the gradient turns back"),
        Param("sampling_percentage", float, 0.25, range=(0.001, 1.0),
              doc="fraction of masked fixed voxels sampled per iteration (1 = all)"),
        Param("max_samples", int, 100000, range=(1000, None),
              doc="cap on metric samples per level (lowers the fraction on large images, e.g. 1 mm heads)"),
        Param("seed", int, 0, range=(0, 2**31 - 1), doc="random seed of the metric sampling"),
        Param("initializer", str, "moments", choices=("moments", "geometry"),
              doc="centred initializer: masked intensity centres of mass or grid centres"),
        Param("search_range_deg", float, 30.0, unit="deg", range=(0.0, 90.0),
              doc="exhaustive rotation search +-range about each axis at the coarsest level (0 = off)"),
        Param("search_step_deg", float, 10.0, unit="deg", range=(1.0, 45.0), doc="step of that search"),
        Param("use_masks", bool, True, doc="restrict the metric to the (dilated) brain masks"),
        Param("mask_margin_mm", float, 4.0, unit="mm", range=(0.0, 50.0), doc="dilation of the metric masks"),
        Param("interpolation", str, "bspline", choices=("linear", "bspline"),
              doc="resampling of local field / noise weight / magnitude (masks are resampled linearly "
                  "and thresholded at 0.5; fields by normalised interpolation inside the mask)"),
        Param("require_convergence", bool, True,
              doc="error when the optimizer stops at the iteration limit of the finest level"),
        Param("min_fov_fraction", float, 0.9, range=(0.0, 1.0),
              doc="error when less than this fraction of an orientation's mask lands inside the reference grid"),
        Param("min_mask_dice", float, 0.7, range=(0.0, 1.0),
              doc="error when the registered mask overlaps the reference mask less than this (Dice)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        where = ctx.stage_label or "register/simpleitk"
        orients = check_orientations(ctx["orientations"], where, ("magnitude", "mask", "local_field"))
        if len(p.shrink_factors) != len(p.smoothing_sigmas):
            from qsmkit.errors import ParameterError
            raise ParameterError(f"{where}: shrink_factors ({len(p.shrink_factors)} levels) and smoothing_sigmas "
                                 f"({len(p.smoothing_sigmas)} levels) need the same length")
        ref = _Reference(orients[0], where)
        out = [{**{k: v for k, v in orients[0].items() if k not in ("magnitude",)},
                "magnitude": orients[0]["magnitude"].like(ref.mag[..., None]),
                "transform": _identity_transform(0, orients[0])}]
        transforms = [_identity_transform(0, orients[0])]
        for i, o in enumerate(orients[1:], 1):
            entry = _register_orientation(i, o, ref, p, where, ctx.log)
            transforms.append(entry["transform"])
            out.append(entry)
        ctx.report_metrics({"registration": transforms})
        return {"orientations": out, "transforms": transforms}


class _Reference:
    """The reference orientation's grid, mask and first-echo magnitude (checked)."""

    def __init__(self, ref: dict, where: str):
        self.field: Volume = ref["local_field"]
        self.affine, self.shape = self.field.affine, self.field.grid_shape
        self.mask = np.asarray(ref["mask"].data) > 0
        if not self.mask.any():
            raise StageError(f"{where}: the reference orientation's mask is empty; check its mask stage")
        self.mag = _first_echo(ref["magnitude"]).astype(np.float32)
        for key in ("magnitude", "mask"):
            if ref[key].grid_shape != self.shape or not np.allclose(ref[key].affine, self.affine, atol=1e-4):
                raise InputDataError(f"{where}: the reference orientation's {key} is not on its local_field grid")

    def volume(self, data, like: Volume, units: str, b0, i: int) -> Volume:
        """``data`` as a Volume on the reference grid, B0 ``b0`` (reference voxel frame)."""
        return Volume(data, self.affine, units=units, b0_direction=b0, header=self.field.header,
                      meta={**like.meta, "orientation": i, "registered_to": "orientation 0"})


def _rigid(ref: _Reference, mag, fld: Volume, mask, p, where: str, label: str) -> RigidResult:
    """:func:`rigid_register` of one orientation with the stage parameters; SimpleITK errors as StageError."""
    try:
        return rigid_register(
            ref.mag, ref.affine, mag, fld.affine,
            ref.mask if p.use_masks else None, mask if p.use_masks else None,
            metric=p.metric, histogram_bins=p.histogram_bins, shrink_factors=p.shrink_factors,
            smoothing_sigmas=p.smoothing_sigmas, iterations=p.max_iter, learning_rate=p.learning_rate,
            min_step=p.min_step, relaxation=p.relaxation, sampling_percentage=p.sampling_percentage,
            max_samples=p.max_samples,
            seed=p.seed, initializer=p.initializer, mask_margin_mm=p.mask_margin_mm,
            search_range_deg=p.search_range_deg, search_step_deg=p.search_step_deg)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError (e.g. too few samples in the masks)
        msg = str(exc).strip().splitlines()
        short = next((m for m in reversed(msg) if m.strip()), "SimpleITK error")[:200]
        raise StageError(f"{where}: registration of {label} failed in SimpleITK ({short}); check that "
                         f"its magnitude and mask overlap the reference's, or set use_masks: false") from None


def _register_orientation(i: int, o: dict, ref: _Reference, p, where: str, log) -> dict:
    """Register orientation ``i`` to the reference, check the result and resample its artifacts:
    its entry of the output ``orientations`` (with ``transform``)."""
    label = orientation_label(i, o)
    fld: Volume = o["local_field"]
    mask = np.asarray(o["mask"].data) > 0
    if not mask.any():
        raise StageError(f"{where}: {label} has an empty mask; check its mask/background stages")
    mag = _first_echo(o["magnitude"]).astype(np.float32)
    nw = o.get("noise_weight") if isinstance(o.get("noise_weight"), Volume) else None
    if any(v.grid_shape != fld.grid_shape for v in (o["magnitude"], o["mask"], nw) if v is not None):
        raise InputDataError(f"{where}: {label}: magnitude, mask, local_field and noise_weight are on "
                             f"different grids; give them all on that acquisition's grid")
    log(f"registering {label} to the reference ({p.metric}, levels {p.shrink_factors})")
    res = _rigid(ref, mag, fld, mask, p, where, label)
    frac = fov_fraction(mask, fld.affine, ref.shape, ref.affine, res.matrix)
    if frac < p.min_fov_fraction:
        raise StageError(f"{where}: registration of {label} puts only {100 * frac:.1f}% of its brain mask "
                         f"inside the reference field of view (< {100 * p.min_fov_fraction:.0f}%); the "
                         f"registration failed or the acquisitions do not cover the same brain")
    if p.require_convergence and not res.converged:
        raise StageError(f"{where}: registration of {label} did not converge in {p.max_iter} iterations "
                         f"at the finest level ({res.stop_condition.split(':')[-1].strip()[:80]}); raise "
                         f"max_iter or learning_rate, or check the images")
    # field and noise weight share the mask: it is resampled once for both
    resampled, mask_r = resample_masked_many([fld.data] + ([nw.data] if nw is not None else []), mask,
                                             fld.affine, ref.shape, ref.affine, res.matrix, p.interpolation)
    field_r = resampled[0]
    inter = int(np.count_nonzero(mask_r & ref.mask))
    dice = 2.0 * inter / max(1, int(mask_r.sum()) + int(ref.mask.sum()))
    if dice < p.min_mask_dice:
        raise StageError(f"{where}: after registration the mask of {label} overlaps the reference mask "
                         f"with Dice {dice:.2f} (< {p.min_mask_dice}); the registration failed (try "
                         f"metric: correlation, a larger search_range_deg, or check the masks)")
    b_world = b0_world_from_voxel(fld.affine, fld.b0_direction)
    b_ref = b0_in_reference_frame(ref.affine, res.matrix, b_world)
    entry = {k: v for k, v in o.items() if not isinstance(v, Volume)}
    entry["local_field"] = ref.volume(field_r, fld, fld.units or "ppm", b_ref, i)
    entry["mask"] = ref.volume(mask_r, o["mask"], "bool", b_ref, i)
    mag_r = resample_to_reference(mag, fld.affine, ref.shape, ref.affine, res.matrix, p.interpolation)
    entry["magnitude"] = ref.volume(mag_r[..., None], o["magnitude"], o["magnitude"].units, b_ref, i)
    if nw is not None:
        entry["noise_weight"] = ref.volume(np.where(mask_r, np.maximum(resampled[1], 0), 0).astype(np.float32), nw,
                                           nw.units, b_ref, i)
    entry["transform"] = {"orientation": i, "source": label, "reference": False, **res.as_dict(),
                          "fov_fraction": frac, "mask_dice": dice, "b0_direction_reference_voxel": b_ref.tolist()}
    log(f"{label}: rotation {res.rotation_angle_deg:.2f} deg (Euler x,y,z "
        f"{', '.join(f'{a:.2f}' for a in res.angles_deg)}), translation "
        f"{np.linalg.norm(res.translation_mm):.2f} mm, metric {res.metric_value:.4f}, "
        f"{res.iterations} iterations, mask Dice {dice:.3f}")
    return entry


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(SimpleITKRegister)
