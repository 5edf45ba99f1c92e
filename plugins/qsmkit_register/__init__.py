"""Built-in plugin: rigid registration of head orientations (``stage: register, method: simpleitk``).

Reads the engine's ``orientations`` artifact (reference first; each entry a dict with a 4D
``magnitude``, the eroded ``mask``, the ``local_field`` in ppm and optionally ``noise_weight``,
each on that orientation's own grid) and writes

* ``orientations``: a new list in which ``magnitude`` (first echo, 4D with one echo; resampled linearly),
  ``local_field``, ``mask`` and ``noise_weight`` of every orientation are resampled onto the
  reference grid, and every Volume's ``b0_direction`` is that orientation's B0 expressed in the
  reference voxel frame (registration rotation combined with both acquisitions' affines, so
  oblique acquisitions are handled);
* ``transforms``: one JSON-friendly dict per orientation (4x4 world matrix reference world ->
  orientation world in mm, Euler angles in degrees, translation in mm, final metric value, ...).

Two methods write these outputs: ``simpleitk`` estimates the transforms by rigid registration of
the first-echo magnitudes (the orientations in parallel processes, one ITK thread each, so the
result does not depend on the number of cores); ``known`` takes them from the acquisitions'
affines or from user-given matrices and runs no optimisation. Both resample, rotate B0 and check
the field of view and mask overlap the same way. Each orientation is registered (``simpleitk``)
and resampled in one worker process (``workers``), which returns only the arrays on the
reference grid; the parent does the checks. Results are bit-identical for any ``workers``.
"""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage, Volume, hookimpl
from qsmkit.errors import InputDataError, ParameterError, StageError
from qsmkit.params import CPU_DEVICE, ITERATIONS, max_iter

from .rigid import (RigidResult, b0_in_reference_frame, b0_world_from_voxel, fov_fraction, map_processes,
                    register_many, resample_masked, resample_masked_many, resample_to_reference, rigid_register)

__all__ = ["SimpleITKRegister", "KnownRegister", "rigid_register", "register_many", "resample_to_reference",
           "resample_masked", "resample_masked_many", "b0_in_reference_frame", "fov_fraction", "RigidResult",
           "check_orientations", "orientation_label"]


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


#: parameters shared by ``register/simpleitk`` and ``register/known``: resampling and the result checks
_INTERPOLATION = Param("interpolation", str, "bspline", choices=("linear", "bspline"),
                       doc="resampling of local field / noise weight (normalised interpolation inside the mask; "
                           "masks are resampled linearly and thresholded at 0.5, the magnitude linearly)")
_CHECKS = (
    Param("min_fov_fraction", float, 0.9, range=(0.0, 1.0),
          doc="error when less than this fraction of an orientation's mask lands inside the reference grid"),
    Param("min_mask_dice", float, 0.7, range=(0.0, 1.0),
          doc="error when the transformed mask overlaps the reference mask less than this (Dice)"),
)


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
        Param("finest_level_mm", float, 2.0, unit="mm", range=(0.0, 20.0),
              doc="skip pyramid levels finer than this (at 1 mm: stop at 2 mm, same accuracy at half the "
                  "cost; 0 = every level)"),
        max_iter(200, range=(1, 10000), aliases=ITERATIONS, doc="maximum optimizer iterations per level"),
        Param("learning_rate", float, 1.0, unit="mm", range=(1e-3, 20.0),
              doc="initial step of the regular-step gradient descent (physical-shift scaled)"),
        Param("min_step", float, 1e-3, unit="mm", range=(1e-7, 1.0), doc="convergence: stop below this step"),
        Param("relaxation", float, 0.9, range=(0.1, 0.99),
              doc="step reduction when the gradient turns back (0.9: 0.8 stalled 0.19-0.34 deg off on one of "
                  "the benchmark's rotations)"),
        Param("sampling_percentage", float, 0.25, range=(0.001, 1.0),
              doc="fraction of masked fixed voxels sampled per iteration (1 = all)"),
        Param("max_samples", int, 40000, range=(1000, None),
              doc="cap on metric samples per level (lowers the fraction on large images, e.g. 1 mm heads)"),
        Param("seed", int, 0, range=(0, 2**31 - 1), doc="random seed of the metric sampling"),
        Param("initializer", str, "moments", choices=("moments", "geometry"),
              doc="centred initializer: masked intensity centres of mass or grid centres"),
        Param("search_range_deg", float, 30.0, unit="deg", range=(0.0, 90.0),
              doc="exhaustive rotation search +-range about each axis at the coarsest level (0 = off)"),
        Param("search_step_deg", float, 10.0, unit="deg", range=(1.0, 45.0), doc="step of that search"),
        Param("use_masks", bool, True, doc="restrict the metric to the (dilated) brain masks"),
        Param("mask_margin_mm", float, 4.0, unit="mm", range=(0.0, 50.0), doc="dilation of the metric masks"),
        _INTERPOLATION,
        Param("require_convergence", bool, True,
              doc="error when the optimizer stops at the iteration limit of the finest level"),
        *_CHECKS,
        Param("workers", int, 0, range=(0, 64),
              doc="orientations registered and resampled at once, in separate processes (registration on "
                  "one ITK thread, resampling on the stage's threads shared among them; 0 = the threads "
                  "qsmkit gives this stage; the result does not depend on it)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        where = ctx.stage_label or "register/simpleitk"
        orients = check_orientations(ctx["orientations"], where, ("magnitude", "mask", "local_field"))
        if len(p.shrink_factors) != len(p.smoothing_sigmas):
            raise ParameterError(f"{where}: shrink_factors ({len(p.shrink_factors)} levels) and smoothing_sigmas "
                                 f"({len(p.smoothing_sigmas)} levels) need the same length")
        ref = _Reference(orients[0], where)
        moving = [_Moving(i, o, where) for i, o in enumerate(orients[1:], 1)]
        # each worker registers one orientation and resamples it onto the reference grid: only the
        # resampled arrays come back, and the parent does no serial resampling
        workers = _workers(p.workers, len(moving))
        jobs = [(_job(ref, m, p), _resample_job(ref, m, p), _resample_threads(workers)) for m in moving]
        ctx.log(f"registering {len(jobs)} orientations to the reference ({p.metric}, levels {p.shrink_factors}, "
                f"{workers} worker{'s' if workers > 1 else ''})")
        results = map_processes(_register_and_resample, jobs, workers, log=ctx.log)
        out, transforms = [_reference_entry(orients[0], ref)], [_identity_transform(0, orients[0])]
        for m, outcome in zip(moving, results):
            res, arrays = outcome if isinstance(outcome, tuple) else (outcome, None)
            res = _checked(res, m, p, where)
            entry = _apply_transform(m, ref, res.matrix, p, where,
                                     {**res.as_dict(), "method": "simpleitk"}, arrays)
            ctx.log(f"{m.label}: rotation {res.rotation_angle_deg:.2f} deg (Euler x,y,z "
                    f"{', '.join(f'{a:.2f}' for a in res.angles_deg)}), translation "
                    f"{np.linalg.norm(res.translation_mm):.2f} mm, metric {res.metric_value:.4f}, "
                    f"{res.iterations} iterations, mask Dice {entry['transform']['mask_dice']:.3f}"
                    + (f"; CPU {arrays['cpu_s'][0]:.1f} s registration + {arrays['cpu_s'][1]:.1f} s resampling"
                       if arrays and "cpu_s" in arrays else ""))
            transforms.append(entry["transform"])
            out.append(entry)
        ctx.report_metrics({"registration": transforms})
        return {"orientations": out, "transforms": transforms}


def _stage_threads() -> int:
    """The threads qsmkit gives this stage (the innermost thread limit, else its decision)."""
    from qsmkit.threads import current_threads, decide_threads

    return max(1, int(current_threads() or decide_threads()))


def _workers(requested: int, n_jobs: int) -> int:
    """Processes for ``n_jobs`` registrations: ``requested``, or (0) the threads of this stage."""
    if requested > 0:
        return max(1, min(int(requested), n_jobs))
    return max(1, min(_stage_threads(), n_jobs))


def _resample_threads(workers: int) -> int:
    """ITK threads of each worker's resampling: the stage's threads shared among the workers (ITK's
    resampling gives the same values for any thread count, unlike the registration metric)."""
    return max(1, _stage_threads() // max(1, int(workers)))


def _reference_entry(ref_o: dict, ref: "_Reference") -> dict:
    """The reference orientation's output entry (first echo magnitude, identity transform)."""
    return {**{k: v for k, v in ref_o.items() if k not in ("magnitude",)},
            "magnitude": ref_o["magnitude"].like(ref.mag[..., None]), "transform": _identity_transform(0, ref_o)}


class KnownRegister(Stage):
    """Orientations put on the reference grid with known transforms: no registration is run.

    Use it when the head positions are known without registration. ``source: affines`` takes
    them from the NIfTI affines: every acquisition is in scanner coordinates (B0 along that
    scanner's z, as for ``simpleitk``), and its voxel grid followed the head (the scanner's
    auto-align / recorded head position is in the affine, as with slab tracking), so the same
    voxel index is the same anatomy in every orientation and the reference world -> orientation
    world transform is ``A_i @ inv(A_0)``. ``source: matrices`` takes user-given 4x4 matrices
    (reference world -> orientation world, mm, the ``matrix`` of ``simpleitk``'s ``transforms``),
    e.g. from a registration done elsewhere or a head tracker; identity matrices state that the
    images' world coordinates are already one head frame (then each Volume's ``b0_direction``
    must carry its own B0).

    A separate method, not a parameter of ``simpleitk``: none of the registration parameters
    (metric, levels, sampling, search) applies, and the pipeline then names what it does.
    Resampling, the B0 rotation into the reference voxel frame and the field-of-view / mask-Dice
    checks are those of ``simpleitk`` (the Dice check catches a wrong matrix).
    """

    kind, name = "register", "known"
    scope = "joint"
    reads = ("orientations",)
    optional_reads = ("noise_weight",)
    writes = ("orientations", "transforms")
    description = ("known head positions (from the affines or given 4x4 matrices), no registration; "
                   "resamples local field/mask/noise weight and rotates B0 into the reference voxel frame")
    params = (
        Param("source", str, "affines", choices=("affines", "matrices"),
              doc="affines: A_i @ inv(A_0) (voxel grids that followed the head); matrices: the given list"),
        Param("matrices", list, None, item_type=list,
              doc="4x4 reference world -> orientation world matrices (mm), one per orientation after the "
                  "reference (or one per orientation, the first the identity)"),
        _INTERPOLATION,
        *_CHECKS,
        Param("workers", int, 0, range=(0, 64),
              doc="orientations resampled at once, in separate processes sharing the stage's threads "
                  "(0 = the threads qsmkit gives this stage, 1 = here; the result does not depend on it)"),
        CPU_DEVICE,
    )

    def run(self, ctx, p):
        where = ctx.stage_label or "register/known"
        orients = check_orientations(ctx["orientations"], where, ("magnitude", "mask", "local_field"))
        ref = _Reference(orients[0], where)
        moving = [_Moving(i, o, where) for i, o in enumerate(orients[1:], 1)]
        mats = _known_matrices(p, ref, moving, where)
        workers = _workers(p.workers, len(moving))
        items = [(mat, _resample_job(ref, m, p), _resample_threads(workers)) for m, mat in zip(moving, mats)]
        arrays = map_processes(_resample_item, items, workers, log=ctx.log) if workers > 1 else [None] * len(moving)
        out, transforms = [_reference_entry(orients[0], ref)], [_identity_transform(0, orients[0])]
        for m, mat, arr in zip(moving, mats, arrays):
            if isinstance(arr, BaseException):
                raise StageError(f"{where}: resampling {m.label} failed in SimpleITK ({str(arr).strip()[:200]}); "
                                 f"check its arrays and affine") from None
            entry = _apply_transform(m, ref, mat, p, where, {**_known_dict(mat), "method": f"known ({p.source})"},
                                     arr)
            ctx.log(f"{m.label}: known rotation {entry['transform']['rotation_angle_deg']:.2f} deg, "
                    f"mask Dice {entry['transform']['mask_dice']:.3f}")
            transforms.append(entry["transform"])
            out.append(entry)
        ctx.report_metrics({"registration": transforms})
        return {"orientations": out, "transforms": transforms}


def _known_matrices(p, ref: "_Reference", moving: list, where: str) -> list[np.ndarray]:
    """The reference world -> orientation world matrices of ``register/known`` (checked rigid)."""
    if p.source == "affines":
        if p.matrices is not None:
            raise ParameterError(f"{where}: matrices are given but source is affines; set source: matrices "
                                 f"to use them, or drop matrices")
        mats = [np.asarray(m.field.affine, np.float64) @ np.linalg.inv(ref.affine) for m in moving]
    else:
        if p.matrices is None:
            raise ParameterError(f"{where}: source: matrices needs matrices (one 4x4 reference world -> "
                                 f"orientation world matrix per orientation after the reference)")
        given = []
        for k, m in enumerate(p.matrices):
            a = np.asarray(m, dtype=np.float64) if _numeric(m) else None
            if a is None or a.shape not in ((4, 4), (16,), (3, 4), (12,)):
                raise ParameterError(f"{where}: matrices[{k}] is not a 4x4 matrix (a list of 4 rows of 4 numbers)")
            a = a.reshape(-1, 4)
            given.append(np.vstack([a, [0.0, 0.0, 0.0, 1.0]]) if a.shape[0] == 3 else a)
        if len(given) == len(moving) + 1:
            if not np.allclose(given[0], np.eye(4), atol=1e-6):
                raise ParameterError(f"{where}: matrices has one entry per orientation but the first (the "
                                     f"reference) is not the identity; give one matrix per orientation after it")
            given = given[1:]
        if len(given) != len(moving):
            raise ParameterError(f"{where}: matrices has {len(p.matrices)} entries for {len(moving)} orientations "
                                 f"after the reference; give one 4x4 matrix for each")
        mats = given
    for m, mat in zip(moving, mats):
        rot = mat[:3, :3]
        if not (np.allclose(mat[3], [0, 0, 0, 1], atol=1e-6) and np.allclose(rot.T @ rot, np.eye(3), atol=1e-4)
                and np.linalg.det(rot) > 0):
            if p.source == "affines":
                raise ParameterError(f"{where}: the affines of {m.label} and the reference differ by more than a "
                                     f"rotation plus translation (other voxel sizes or a flip); register it with "
                                     f"method: simpleitk, or give source: matrices")
            raise ParameterError(f"{where}: the matrix of {m.label} is not a rotation plus translation (orthonormal "
                                 f"3x3 block with determinant +1, last row 0 0 0 1); give a rigid 4x4 matrix")
    return mats


def _numeric(m) -> bool:
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.all(np.isfinite(a)))


def _known_dict(mat: np.ndarray) -> dict:
    """``transforms`` entry fields of a known matrix (same keys as :meth:`RigidResult.as_dict`)."""
    from .geometry import rotation_angle_deg

    rot = mat[:3, :3]
    # ITK Euler3D angles of R = Rz @ Rx @ Ry: R[2, 1] = sin(ax), R[2, 0] = -cos(ax) sin(ay), R[0, 1] = -sin(az) cos(ax)
    ax = float(np.arcsin(np.clip(rot[2, 1], -1.0, 1.0)))
    ay = float(np.arctan2(-rot[2, 0], rot[2, 2]))
    az = float(np.arctan2(-rot[0, 1], rot[1, 1]))
    return {"matrix": np.asarray(mat).tolist(), "rotation_deg": [float(np.degrees(a)) for a in (ax, ay, az)],
            "rotation_convention": "ITK Euler3D about x, y, z; R = Rz @ Rx @ Ry; reference world -> moving world",
            "rotation_angle_deg": rotation_angle_deg(rot), "translation_mm": [float(t) for t in mat[:3, 3]],
            "center_mm": [0.0, 0.0, 0.0], "metric_value": None, "converged": True,
            "stop_condition": "known transform (no registration)", "iterations": 0}


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


class _Moving:
    """One orientation after the reference: its arrays on its own grid (checked)."""

    def __init__(self, i: int, o: dict, where: str):
        self.i, self.o, self.label = i, o, orientation_label(i, o)
        self.field: Volume = o["local_field"]
        self.mask = np.asarray(o["mask"].data) > 0
        if not self.mask.any():
            raise StageError(f"{where}: {self.label} has an empty mask; check its mask/background stages")
        self.mag = _first_echo(o["magnitude"]).astype(np.float32)
        self.nw = o.get("noise_weight") if isinstance(o.get("noise_weight"), Volume) else None
        if any(v.grid_shape != self.field.grid_shape for v in (o["magnitude"], o["mask"], self.nw) if v is not None):
            raise InputDataError(f"{where}: {self.label}: magnitude, mask, local_field and noise_weight are on "
                                 f"different grids; give them all on that acquisition's grid")


def _job(ref: _Reference, m: _Moving, p) -> tuple:
    """``(args, kwargs, require_convergence)``: the :func:`rigid_register` call of orientation ``m`` (stage
    parameters) and whether a non-converged result is an error (then it is not resampled)."""
    args = (ref.mag, ref.affine, m.mag, m.field.affine, ref.mask if p.use_masks else None,
            m.mask if p.use_masks else None)
    kwargs = dict(metric=p.metric, histogram_bins=p.histogram_bins, shrink_factors=p.shrink_factors,
                  smoothing_sigmas=p.smoothing_sigmas, iterations=p.max_iter, learning_rate=p.learning_rate,
                  min_step=p.min_step, relaxation=p.relaxation, sampling_percentage=p.sampling_percentage,
                  max_samples=p.max_samples, seed=p.seed, initializer=p.initializer,
                  mask_margin_mm=p.mask_margin_mm, search_range_deg=p.search_range_deg,
                  search_step_deg=p.search_step_deg, finest_level_mm=p.finest_level_mm, threads=1)
    return args, kwargs, bool(p.require_convergence)


def _checked(res, m: _Moving, p, where: str) -> RigidResult:
    """The registration outcome of ``m``: SimpleITK errors and non-convergence as StageError."""
    if isinstance(res, ParameterError):
        raise res
    if isinstance(res, BaseException):  # SimpleITK raises RuntimeError (e.g. too few samples in the masks)
        msg = str(res).strip().splitlines()
        short = next((x for x in reversed(msg) if x.strip()), "SimpleITK error")[:200]
        raise StageError(f"{where}: registration of {m.label} failed in SimpleITK ({short}); check that "
                         f"its magnitude and mask overlap the reference's, or set use_masks: false") from None
    if p.require_convergence and not res.converged:
        raise StageError(f"{where}: registration of {m.label} did not converge in {p.max_iter} iterations "
                         f"at the finest level ({res.stop_condition.split(':')[-1].strip()[:80]}); raise "
                         f"max_iter or learning_rate, or check the images")
    return res


def _resample_job(ref: _Reference, m: _Moving, p) -> tuple:
    """The arguments after the matrix of :func:`_resample_orientation` for orientation ``m``."""
    return (np.asarray(m.field.data), None if m.nw is None else np.asarray(m.nw.data), m.mask, m.mag,
            np.asarray(m.field.affine, np.float64), ref.shape, np.asarray(ref.affine, np.float64), p.interpolation,
            p.min_fov_fraction)


def _resample_orientation(matrix: np.ndarray, field: np.ndarray, noise_weight, mask: np.ndarray, mag: np.ndarray,
                          affine: np.ndarray, ref_shape, ref_affine: np.ndarray, interpolation: str,
                          min_fov_fraction: float) -> dict:
    """One orientation's arrays on the reference grid through ``matrix`` (reference world -> its world, mm).

    Returns ``{"fov_fraction"}`` alone when less than ``min_fov_fraction`` of the mask lands in the
    reference grid (the caller raises), else also ``field``, ``noise_weight`` (or None), ``mask``
    (bool) and ``magnitude`` on the reference grid (float32). Field and noise weight share the mask,
    which is resampled once for both (normalised interpolation, :func:`resample_masked_many`).
    """
    frac = fov_fraction(mask, affine, ref_shape, ref_affine, matrix)
    if frac < min_fov_fraction:
        return {"fov_fraction": frac}
    fields = [field] + ([noise_weight] if noise_weight is not None else [])
    resampled, mask_r = resample_masked_many(fields, mask, affine, ref_shape, ref_affine, matrix, interpolation)
    # the magnitude is for display and QC (no inversion reads it): linear, 10x cheaper than B-spline on the whole grid
    mag_r = resample_to_reference(mag, affine, ref_shape, ref_affine, matrix, "linear")
    return {"fov_fraction": frac, "field": resampled[0], "mask": mask_r, "magnitude": mag_r,
            "noise_weight": resampled[1] if noise_weight is not None else None}


def _resample_item(item: tuple) -> dict:
    """Worker unit of ``register/known``: :func:`_resample_orientation` of ``(matrix, arguments, ITK threads)``."""
    from .rigid import _itk_threads

    matrix, resample_args, threads = item
    with _itk_threads(threads):
        return _resample_orientation(matrix, *resample_args)


def _register_and_resample(job: tuple):
    """Worker unit of ``register/simpleitk``: :func:`rigid_register` of one orientation, then (when it
    converged, or convergence is not required) :func:`_resample_orientation` through its matrix, with
    the job's ITK thread count (the stage's threads shared among the workers).
    Returns ``(RigidResult, arrays or None)``; SimpleITK's errors propagate to :func:`map_processes`."""
    import time

    from .rigid import _itk_threads

    (args, kwargs, require_convergence), resample_args, threads = job
    c0 = time.process_time()
    res = rigid_register(*args, **kwargs)
    c1 = time.process_time()
    if require_convergence and not res.converged:
        return res, None
    with _itk_threads(threads):  # the registration ran on its own pinned count; resampling may use more
        arrays = _resample_orientation(res.matrix, *resample_args)
    arrays["cpu_s"] = (c1 - c0, time.process_time() - c1)  # registration, resampling (this process)
    return res, arrays


def _apply_transform(m: _Moving, ref: _Reference, matrix: np.ndarray, p, where: str, info: dict,
                     arrays: dict | None = None) -> dict:
    """Orientation ``m`` on the reference grid through ``matrix`` (reference world -> its world):
    field-of-view and Dice checks, resampling (``arrays``: already resampled by a worker, the
    output of :func:`_resample_orientation`), B0 in the reference voxel frame. Its output entry
    (with ``transform``: ``info`` plus the checks)."""
    fld, nw = m.field, m.nw
    if arrays is None:
        arrays = _resample_orientation(matrix, *_resample_job(ref, m, p))
    frac = arrays["fov_fraction"]
    if frac < p.min_fov_fraction:
        raise StageError(f"{where}: registration of {m.label} puts only {100 * frac:.1f}% of its brain mask "
                         f"inside the reference field of view (< {100 * p.min_fov_fraction:.0f}%); the "
                         f"registration failed or the acquisitions do not cover the same brain")
    field_r, mask_r = arrays["field"], arrays["mask"]
    inter = int(np.count_nonzero(mask_r & ref.mask))
    dice = 2.0 * inter / max(1, int(mask_r.sum()) + int(ref.mask.sum()))
    if dice < p.min_mask_dice:
        raise StageError(f"{where}: after registration the mask of {m.label} overlaps the reference mask "
                         f"with Dice {dice:.2f} (< {p.min_mask_dice}); the registration failed (try "
                         f"metric: correlation, a larger search_range_deg, or check the masks)")
    o = m.o
    b_world = b0_world_from_voxel(fld.affine, fld.b0_direction)
    b_ref = b0_in_reference_frame(ref.affine, matrix, b_world)
    entry = {k: v for k, v in o.items() if not isinstance(v, Volume)}
    entry["local_field"] = ref.volume(field_r, fld, fld.units or "ppm", b_ref, m.i)
    entry["mask"] = ref.volume(mask_r, o["mask"], "bool", b_ref, m.i)
    mag_r = arrays["magnitude"]
    entry["magnitude"] = ref.volume(mag_r[..., None], o["magnitude"], o["magnitude"].units, b_ref, m.i)
    if nw is not None:
        nw_r = np.where(mask_r, np.maximum(arrays["noise_weight"], 0), 0).astype(np.float32)
        entry["noise_weight"] = ref.volume(nw_r, nw, nw.units, b_ref, m.i)
    entry["transform"] = {"orientation": m.i, "source": m.label, "reference": False, **info,
                          "fov_fraction": frac, "mask_dice": dice, "b0_direction_reference_voxel": b_ref.tolist()}
    return entry


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(SimpleITKRegister)
    registry.add(KnownRegister)
