"""Rigid (Euler3D) registration of head orientations with SimpleITK.

:func:`rigid_register` returns a :class:`RigidResult` whose matrix maps reference world to
moving world coordinates (mm); the coordinate and B0 conventions are those of :mod:`.geometry`.
The geometry and resampling helpers are re-exported here, so ``from qsmkit_register.rigid import
...`` reaches all of them. SimpleITK is imported inside the functions that need it.

Reproducibility: ITK accumulates the metric and its gradient per thread, so the sums (and the
regular-step optimiser's path, which halves its step on each change of gradient direction)
depend on the number of threads. :func:`rigid_register` therefore runs every SimpleITK object
with an explicit thread count (1 by default), and :func:`register_many` speeds up several
orientations by running them in parallel processes of one thread each (:func:`map_processes`),
so that the result is the same whatever the number of cores or workers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from qsmkit.errors import ParameterError
from qsmkit.operators import block_mean, bounding_box
from qsmkit.physics import voxel_sizes

from .geometry import b0_in_reference_frame, b0_world_from_voxel, euler_matrix, rotation_angle_deg, to_sitk
from .resample import fov_fraction, resample_masked, resample_masked_many, resample_to_reference

__all__ = [
    "RigidResult", "to_sitk", "rigid_register", "register_many", "map_processes", "crop_to_mask", "euler_matrix",
    "rotation_angle_deg",
    "resample_to_reference", "resample_masked", "resample_masked_many", "b0_in_reference_frame",
    "b0_world_from_voxel", "fov_fraction",
]


#: metric samples per evaluation of the exhaustive rotation search
_SEARCH_SAMPLES = 6_000


@dataclass
class RigidResult:
    """Outcome of :func:`rigid_register`.

    Attributes
    ----------
    matrix : ndarray (4, 4)
        Reference world (mm) -> moving world (mm).
    angles_deg : ndarray (3,)
        ITK Euler3D angles about x, y, z in degrees (``R = Rz @ Rx @ Ry``).
    rotation_angle_deg : float
        Total rotation angle (deg), independent of the angle convention.
    translation_mm : ndarray (3,)
        Displacement of :attr:`center_mm` (``M(c) - c``), mm.
    center_mm : ndarray (3,)
        Centre of rotation in reference world coordinates (mm).
    metric_value : float
        Final metric value (negative MI or negative correlation; lower is better).
    converged : bool
        False when the optimizer stopped at the iteration limit of the finest level.
    stop_condition : str
        SimpleITK's description of why the optimizer stopped.
    iterations : int
        Iterations spent at the finest level.
    metric_history : list
        Metric value of the last iteration of each level.
    """

    matrix: np.ndarray
    angles_deg: np.ndarray
    rotation_angle_deg: float
    translation_mm: np.ndarray
    center_mm: np.ndarray
    metric_value: float
    converged: bool
    stop_condition: str
    iterations: int
    metric_history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-friendly dictionary (lists and floats)."""
        return {
            "matrix": np.asarray(self.matrix).tolist(),
            "rotation_deg": [float(a) for a in self.angles_deg],
            "rotation_convention": "ITK Euler3D about x, y, z; R = Rz @ Rx @ Ry; reference world -> moving world",
            "rotation_angle_deg": float(self.rotation_angle_deg),
            "translation_mm": [float(t) for t in self.translation_mm],
            "center_mm": [float(c) for c in self.center_mm],
            "metric_value": float(self.metric_value),
            "converged": bool(self.converged),
            "stop_condition": self.stop_condition,
            "iterations": int(self.iterations),
        }


def _dilate(mask: np.ndarray, voxel_size: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` grown by a ball of radius ``margin_mm`` (mm): every voxel whose centre lies within
    ``margin_mm`` of a mask voxel (exact Euclidean distance on the voxel grid, anisotropic voxels
    allowed), computed only in the mask's bounding box grown by the radius."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if margin_mm <= 0 or not m.any():
        return m
    vs = np.asarray(voxel_size, dtype=float)
    box = bounding_box(m, int(np.ceil(margin_mm / vs.min())))
    out = np.zeros_like(m)
    # distance (mm) of every box voxel to the nearest mask voxel: O(N), unlike a ball-shaped dilation
    out[box] = ndimage.distance_transform_edt(~m[box], sampling=vs) <= margin_mm + 1e-6
    return out


def crop_to_mask(data: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                 margin_vox: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``data`` (and ``mask``) cut to the bounding box of ``mask`` grown by ``margin_vox`` voxels.

    Returns ``(data, affine, mask)`` of the box; the box's affine keeps every voxel at its world
    position (mm), so transforms between world frames are unchanged. ``mask=None`` or an empty
    mask returns the inputs as they are.
    """
    if mask is None:
        return data, affine, None
    m = np.asarray(mask) > 0
    if not m.any():
        return data, affine, mask
    box = bounding_box(m, int(margin_vox))
    a = np.array(affine, dtype=np.float64)
    a[:3, 3] = a[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + a[:3, 3]
    return np.asarray(data)[box], a, m[box]


@contextlib.contextmanager
def _itk_threads(n: int) -> Iterator[None]:
    """SimpleITK's global default thread count set to ``n`` inside the block (restored after)."""
    import SimpleITK as sitk

    prev = int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(prev)


def rigid_register(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                   fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None, *,
                   metric: str = "mattes", histogram_bins: int = 32,
                   shrink_factors: Sequence[int] = (4, 2, 1), smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0),
                   iterations: int = 200, learning_rate: float = 1.0, min_step: float = 1e-3,
                   relaxation: float = 0.9,
                   sampling_percentage: float = 0.25, max_samples: int | None = 40_000, seed: int = 0,
                   initializer: str = "moments",
                   mask_margin_mm: float = 4.0, search_range_deg: float = 30.0,
                   search_step_deg: float = 10.0, threads: int = 1, crop: bool = True,
                   finest_level_mm: float = 0.0) -> RigidResult:
    """Rigid registration of ``moving`` onto ``fixed`` (both 3D magnitude images).

    Euler3D transform, centred initializer (image moments or geometry), multi-resolution
    regular-step gradient descent with physical-shift parameter scales, and Mattes mutual
    information or normalised correlation, sampled randomly inside the (dilated) masks
    (Mattes et al., IEEE TMI 22:120, 2003; the ITK v4 registration framework, Avants et al.,
    Front. Neuroinform. 8:44, 2014).

    Parameters
    ----------
    fixed, moving : ndarray (x, y, z)
        Reference and moving magnitude (a.u.), e.g. first echoes.
    fixed_affine, moving_affine : (4, 4)
        Voxel -> world (mm) affines of the two grids.
    fixed_mask, moving_mask : ndarray or None
        Brain masks; each is dilated by ``mask_margin_mm`` (mm) and restricts metric sampling.
    metric : {"mattes", "correlation"}
        Mattes mutual information (``histogram_bins`` bins) or normalised cross-correlation.
    shrink_factors, smoothing_sigmas : sequences of equal length
        Per-level downsampling factors and Gaussian sigmas (voxels), coarse to fine.
    iterations : int
        Maximum optimizer iterations per level.
    learning_rate, min_step : float
        Initial and minimum step of the regular-step gradient descent (about mm of voxel shift).
    relaxation : float
        Step reduction factor when the gradient changes direction (0-1); values near 1 take more,
        smaller-reduction steps and reach a more precise optimum on noisy metrics.
    sampling_percentage : float
        Fraction (0-1] of the masked fixed voxels sampled per iteration; 1 uses all of them.
    max_samples : int or None
        Upper bound on the samples per level (the fraction is lowered on large images so that a
        1 mm whole head costs about what a 2 mm one does); ``None``: no bound.
    seed : int
        Random seed of the metric sampler (>= 0; the result is reproducible for a given seed: ITK
        gets ``seed + 1``, as SimpleITK would take 0 to mean a seed from the wall clock).
    initializer : {"moments", "geometry"}
        Centre the transform on the intensity centres of mass or on the grid centres.
    mask_margin_mm : float
        Dilation (mm) of the masks before they restrict the metric (keeps the brain edge).
    search_range_deg, search_step_deg : float
        Before the gradient descent, an exhaustive search over the three rotation angles in
        ``[-range, +range]`` by ``step`` (deg) at the coarsest level picks the start (gradient
        descent alone stalls in local optima for rotations above ~10 deg). ``range = 0`` skips it.
    threads : int
        ITK threads of every SimpleITK object used here. The metric sums depend on it in the last
        digits, and the optimiser's path can amplify that; a fixed count (1, the default) makes
        the result reproducible. Parallelise over orientations with :func:`register_many`.
    finest_level_mm : float
        Skip the levels whose voxels (shrink factor x the fixed image's largest voxel size) are
        finer than this (mm); at least the coarsest level is kept. 0 runs every level. When the
        finest level left is ``k > 1`` times the grid, both images (and masks) are first averaged
        over ``k^3`` blocks and registered with the shrink factors and sigmas divided by ``k``: the
        pyramid and the exhaustive search then never touch the full grid. Measured at 1 mm
        (levels 4 and 2 mm, ``relaxation`` 0.9): on the simulator's head
        (``benchmarks/bench_cosmos.py``, 4 orientations, oversampled) 29-33 s for the stage on 2
        cores (55.6 s with ITK's pyramid on the full grid), about 4 CPU s per registration (13-15
        s), rotation errors 0.018-0.028 deg, translations at the brain centre 0.002-0.008 mm
        (0.016-0.026 deg and <= 0.004 mm before); on the tests' smaller 128 mm field-of-view head
        0.067-0.083 deg and <= 0.011 mm (0.06-0.20 deg before; 0.007-0.022 deg with the 1 mm level).
        With ``relaxation`` 0.8 one rotation of each head stalled 0.19-0.39 deg off.
    crop : bool
        Cut both images to the bounding box of their dilated masks (plus a margin of three
        coarsest-level voxels) before registration: the metric only samples inside the masks, so
        the result is the same, but the pyramid and gradient images cover the head, not the air.

    Returns
    -------
    RigidResult
    """
    if len(shrink_factors) != len(smoothing_sigmas):
        raise ParameterError("rigid_register: shrink_factors and smoothing_sigmas need the same number of levels; "
                             "give one smoothing sigma per shrink factor")
    if int(threads) < 1:
        raise ParameterError(f"rigid_register: threads must be at least 1, got {threads!r}")
    shrink_factors, smoothing_sigmas = _levels(shrink_factors, smoothing_sigmas, fixed_affine, finest_level_mm)
    k = min(shrink_factors)
    if k > 1:   # no level uses the full grid: register block means at the finest level's voxels
        fixed, fixed_affine, fixed_mask = _block_mean(fixed, fixed_affine, fixed_mask, k)
        moving, moving_affine, moving_mask = _block_mean(moving, moving_affine, moving_mask, k)
        shrink_factors = [f // k for f in shrink_factors]
        smoothing_sigmas = [g / k for g in smoothing_sigmas]
    with _itk_threads(int(threads)):
        return _rigid_register(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, metric,
                               histogram_bins, shrink_factors, smoothing_sigmas, iterations, learning_rate, min_step,
                               relaxation, sampling_percentage, max_samples, seed, initializer, mask_margin_mm,
                               search_range_deg, search_step_deg, int(threads), crop)


def _rigid_register(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, metric, histogram_bins,
                    shrink_factors, smoothing_sigmas, iterations, learning_rate, min_step, relaxation,
                    sampling_percentage, max_samples, seed, initializer, mask_margin_mm, search_range_deg,
                    search_step_deg, threads: int, crop: bool) -> RigidResult:
    """:func:`rigid_register` inside its ITK thread setting."""
    f_mask_arr, m_mask_arr = _metric_mask_arrays(fixed_mask, fixed_affine, moving_mask, moving_affine, mask_margin_mm)
    if crop:
        pad = 3 * int(max(shrink_factors)) + int(np.ceil(3 * max(smoothing_sigmas)))
        fixed, fixed_affine, fixed_mask, f_mask_arr = _crop_all(fixed, fixed_affine, fixed_mask, f_mask_arr, pad)
        moving, moving_affine, moving_mask, m_mask_arr = _crop_all(moving, moving_affine, moving_mask, m_mask_arr, pad)
    f_img = to_sitk(fixed, fixed_affine)
    m_img = to_sitk(moving, moving_affine)
    tx = _initial_transform(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, initializer,
                            f_img, m_img)
    f_mask = to_sitk(f_mask_arr, fixed_affine, "uint8") if f_mask_arr is not None else None
    m_mask = to_sitk(m_mask_arr, moving_affine, "uint8") if m_mask_arr is not None else None
    n_region = float(np.count_nonzero(f_mask_arr)) if f_mask_arr is not None else float(np.prod(np.shape(fixed)))

    def method():
        return _registration_method(metric, histogram_bins, f_mask, m_mask, threads)

    _rotation_search(method, tx, f_img, m_img, n_region, shrink_factors, smoothing_sigmas, search_range_deg,
                     search_step_deg, seed)
    reg = method()
    pcts = _sampling_percentages(n_region, shrink_factors, sampling_percentage, max_samples)
    if min(pcts) < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentagePerLevel(pcts, _itk_seed(seed))
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=float(learning_rate), minStep=float(min_step),
                                                 numberOfIterations=int(iterations), relaxationFactor=float(relaxation),
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_sigmas])
    reg.SetInitialTransform(tx, inPlace=True)
    history = _execute_with_history(reg, f_img, m_img)
    return _result(tx, reg, iterations, history)


def _levels(shrink_factors, smoothing_sigmas, fixed_affine, finest_level_mm: float) -> tuple[list, list]:
    """The pyramid levels whose voxels are at least ``finest_level_mm`` (mm), the coarsest always kept."""
    shrink, sigmas = [int(f) for f in shrink_factors], [float(g) for g in smoothing_sigmas]
    if finest_level_mm <= 0:
        return shrink, sigmas
    vox = float(np.max(voxel_sizes(fixed_affine)))
    keep = [k for k, f in enumerate(shrink) if f * vox >= finest_level_mm - 1e-6 or f == max(shrink)]
    return [shrink[k] for k in keep], [sigmas[k] for k in keep]


def _block_mean(data, affine, mask, k: int):
    """``data`` averaged over ``k^3`` blocks (:func:`~qsmkit.operators.block_mean`), its affine (block
    centres) and ``mask`` (blocks at least half inside), for registering at ``k`` times the voxel size."""
    a = np.array(affine, dtype=np.float64)
    a[:3, 3] = a[:3, :3] @ np.full(3, (k - 1) / 2) + a[:3, 3]
    a[:3, :3] *= k
    return block_mean(data, k), a, None if mask is None else block_mean(np.asarray(mask) > 0, k) >= 0.5


def _crop_all(data, affine, mask, metric_mask, pad: int):
    """:func:`crop_to_mask` of an image, its brain mask and its dilated metric mask, on the metric mask's box."""
    if metric_mask is None:
        return data, affine, mask, None
    box_data, box_aff, box_metric = crop_to_mask(data, affine, metric_mask, pad)
    box_mask = crop_to_mask(mask, affine, metric_mask, pad)[0] if mask is not None else None
    return box_data, box_aff, box_mask, box_metric


def _register_job(job: tuple) -> RigidResult:
    """One :func:`rigid_register` call ``(args, kwargs)``; the unit of work of :func:`register_many`."""
    args, kwargs = job
    return rigid_register(*args, **kwargs)


def _worker_init() -> None:
    """Worker processes of :func:`register_many`: one ITK thread (each job sets its own count too)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def register_many(jobs: Sequence[tuple], workers: int = 1, log=None) -> list:
    """Run several :func:`rigid_register` calls, ``workers`` at a time in separate processes.

    Parameters
    ----------
    jobs : sequence of ``(args, kwargs)``
        Positional and keyword arguments of each :func:`rigid_register` call (give ``threads``
        in ``kwargs``; 1 keeps every call reproducible and the processes off each other's cores).
    workers : int
        Processes (``spawn`` start method, so no state of this process is copied). 1, or a
        single job, runs in this process. Where processes cannot be started (e.g. inside a
        daemonic worker of another pool) the jobs run here, one after the other.
    log : callable or None
        Receives one line when the jobs fall back to this process.

    Returns
    -------
    list
        One :class:`RigidResult` or exception instance per job, in order: a job's exception (e.g.
        SimpleITK's ``RuntimeError``) is returned, not raised, so the caller can name the
        orientation that failed.
    """
    return map_processes(_register_job, jobs, workers, log)


def map_processes(func, items: Sequence, workers: int = 1, log=None) -> list:
    """``[func(item) for item in items]``, ``workers`` at a time in spawned processes of one ITK thread.

    The engine of :func:`register_many`, also used by the register stages to run each
    orientation's registration *and* resampling in one worker (so only the resampled arrays
    travel back). ``func`` must be a module-level function (it is pickled by name). Every ITK
    filter used here gives the same numbers for any thread count except the registration
    metric, which :func:`rigid_register` pins to its ``threads`` argument, so the results do not
    depend on ``workers``.

    Parameters
    ----------
    func : callable
        Applied to each item; its ``RuntimeError`` / :class:`ParameterError` is returned as the
        item's value, other exceptions propagate.
    items : sequence
        Picklable arguments, one call each.
    workers : int
        Processes; 1 or a single item runs here. Where processes cannot be started (e.g. inside
        a daemonic worker of another pool) the items run here, one after the other.
    log : callable or None
        Receives one line when the items fall back to this process.

    Returns
    -------
    list
        ``func(item)`` or the exception instance, in the order of ``items``.
    """
    n = max(1, min(int(workers), len(items)))
    if n > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init) as pool:
                futures = [pool.submit(func, item) for item in items]
                return [_outcome(f) for f in futures]
        except (BrokenProcessPool, OSError, AssertionError) as exc:  # AssertionError: daemonic process
            if log is not None:
                log(f"worker processes unavailable ({type(exc).__name__}: {str(exc)[:80]}); "
                    f"running one orientation after the other")
    out = []
    for item in items:
        try:
            out.append(func(item))
        except (RuntimeError, ParameterError) as exc:
            out.append(exc)
    return out


def _outcome(future):
    """A future's result, or its RuntimeError / ParameterError as a value (other errors propagate).

    A broken pool (a worker that died, e.g. a spawned child that could not import ``__main__``)
    is re-raised, so that :func:`map_processes` falls back to running the items here; as a
    ``RuntimeError`` subclass it would otherwise be taken for the item's own error."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise
    except (RuntimeError, ParameterError) as exc:
        return exc


def _initial_transform(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, initializer: str,
                       f_img, m_img):
    """Centred Euler3D start: on the masked intensity centres of mass (``moments``) or grid centres."""
    import SimpleITK as sitk

    init_mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if initializer == "moments"
                 else sitk.CenteredTransformInitializerFilter.GEOMETRY)
    if initializer == "moments":
        # moments of the masked images: the neck / background do not pull the centres apart
        f_init = to_sitk(np.where(fixed_mask > 0, fixed, 0) if fixed_mask is not None else fixed, fixed_affine)
        m_init = to_sitk(np.where(moving_mask > 0, moving, 0) if moving_mask is not None else moving, moving_affine)
    else:
        f_init, m_init = f_img, m_img
    return sitk.Euler3DTransform(sitk.CenteredTransformInitializer(f_init, m_init, sitk.Euler3DTransform(), init_mode))


def _metric_mask_arrays(fixed_mask, fixed_affine, moving_mask, moving_affine, margin_mm: float):
    """``(fixed, moving)`` dilated metric masks (bool arrays, or None where no mask was given)."""
    f = _dilate(fixed_mask, voxel_sizes(fixed_affine), margin_mm) if fixed_mask is not None else None
    m = _dilate(moving_mask, voxel_sizes(moving_affine), margin_mm) if moving_mask is not None else None
    return f, m


def _registration_method(metric: str, histogram_bins: int, f_mask, m_mask, threads: int = 1):
    """A ``SimpleITK.ImageRegistrationMethod`` with the metric, its masks, linear interpolation and
    ``threads`` ITK threads."""
    import SimpleITK as sitk

    r = sitk.ImageRegistrationMethod()
    r.SetNumberOfThreads(int(threads))
    if metric == "mattes":
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(histogram_bins))
    elif metric == "correlation":
        r.SetMetricAsCorrelation()
    else:
        raise ParameterError(f"rigid_register: unknown metric {metric!r}; use mattes or correlation")
    if f_mask is not None:
        r.SetMetricFixedMask(f_mask)
    if m_mask is not None:
        r.SetMetricMovingMask(m_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return r


def _rotation_search(method, tx, f_img, m_img, n_region: float, shrink_factors, smoothing_sigmas,
                     search_range_deg: float, search_step_deg: float, seed: int) -> None:
    """Exhaustive search over the three rotation angles at the coarsest level; updates ``tx`` in place."""
    n_search = int(np.floor(search_range_deg / search_step_deg + 1e-9)) if search_step_deg > 0 else 0
    if not (search_range_deg > 0 and n_search > 0):
        return
    # exhaustive rotation search at the coarsest level (all voxels of the shrunk image)
    srch = method()
    s_max = float(max(shrink_factors))
    n_coarse = max(n_region, 1.0) / s_max ** 3
    if n_coarse > _SEARCH_SAMPLES:  # a fixed random subset keeps the 7^3-point search cheap
        srch.SetMetricSamplingStrategy(srch.RANDOM)
        srch.SetMetricSamplingPercentage(_SEARCH_SAMPLES / n_coarse, _itk_seed(seed))
    srch.SetOptimizerAsExhaustive([n_search] * 3 + [0, 0, 0], float(np.radians(search_step_deg)))
    srch.SetOptimizerScales([1.0] * 6)
    srch.SetShrinkFactorsPerLevel([int(max(shrink_factors))])
    srch.SetSmoothingSigmasPerLevel([float(smoothing_sigmas[int(np.argmax(shrink_factors))])])
    srch.SetInitialTransform(tx, inPlace=True)
    srch.Execute(f_img, m_img)


def _itk_seed(seed: int) -> int:
    """ITK's sampler seed for ``seed``: ``seed + 1``, as SimpleITK reads 0 as "seed from the wall clock"
    (``sitkWallClock``), which made every run sample different points."""
    return int(seed) + 1


def _sampling_percentages(n_region: float, shrink_factors, sampling_percentage: float, max_samples) -> list:
    """Per-level sampling fraction: ``sampling_percentage``, capped at ``max_samples`` points per level."""
    pcts = []
    for s in shrink_factors:
        n_level = max(n_region / float(s) ** 3, 1.0)
        cap = 1.0 if max_samples is None else float(max_samples) / n_level
        pcts.append(float(min(1.0, sampling_percentage, max(cap, 1e-4))))
    return pcts


def _execute_with_history(reg, f_img, m_img) -> list:
    """Run the registration; returns the last metric value of each level."""
    import SimpleITK as sitk

    history: list = []  # last metric value of each level
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: history.append(float("nan")))
    reg.AddCommand(sitk.sitkIterationEvent,
                   lambda: history.__setitem__(-1, reg.GetMetricValue()) if history else None)
    reg.Execute(f_img, m_img)
    return history


def _result(tx, reg, iterations: int, history: list) -> RigidResult:
    """:class:`RigidResult` of the optimised transform ``tx`` (reference world -> moving world)."""
    stop = reg.GetOptimizerStopConditionDescription()
    n_it = int(reg.GetOptimizerIteration())
    converged = not ("maximum number of iterations" in stop.lower() or n_it >= int(iterations))

    params = np.asarray(tx.GetParameters(), dtype=np.float64)
    center = np.asarray(tx.GetCenter(), dtype=np.float64)
    rot = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    trans = params[3:6]
    mat = np.eye(4)
    mat[:3, :3] = rot
    mat[:3, 3] = center + trans - rot @ center
    return RigidResult(matrix=mat, angles_deg=np.degrees(params[:3]), rotation_angle_deg=rotation_angle_deg(rot),
                       translation_mm=trans, center_mm=center, metric_value=float(reg.GetMetricValue()),
                       converged=converged, stop_condition=stop, iterations=n_it, metric_history=history)
