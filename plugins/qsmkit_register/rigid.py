"""Rigid (Euler3D) registration of head orientations with SimpleITK.

:func:`rigid_register` returns a :class:`RigidResult` whose matrix maps reference world to
moving world coordinates (mm); the coordinate and B0 conventions are those of :mod:`.geometry`.
The geometry and resampling helpers are re-exported here, so ``from qsmkit_register.rigid import
...`` reaches all of them. SimpleITK is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from qsmkit.errors import ParameterError
from qsmkit.physics import voxel_sizes

from .geometry import b0_in_reference_frame, b0_world_from_voxel, euler_matrix, rotation_angle_deg, to_sitk
from .resample import fov_fraction, resample_masked, resample_masked_many, resample_to_reference

__all__ = [
    "RigidResult", "to_sitk", "rigid_register", "euler_matrix", "rotation_angle_deg",
    "resample_to_reference", "resample_masked", "resample_masked_many", "b0_in_reference_frame",
    "b0_world_from_voxel", "fov_fraction",
]


#: metric samples per evaluation of the exhaustive rotation search
_SEARCH_SAMPLES = 20_000


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
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if margin_mm <= 0:
        return m
    r = np.maximum(np.round(margin_mm / np.asarray(voxel_size, dtype=float)).astype(int), 0)
    if not r.any() or not m.any():
        return m
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij")
    ball = sum((g / max(k, 1)) ** 2 for g, k in zip(grids, r)) <= 1.0
    # dilate only within the mask's bounding box grown by the ball radius, not the air around the head
    idx = np.argwhere(m)
    box = tuple(slice(max(int(lo) - k, 0), min(int(hi) + k + 1, n))
                for lo, hi, k, n in zip(idx.min(0), idx.max(0), r, m.shape))
    out = np.zeros_like(m)
    out[box] = ndimage.binary_dilation(m[box], structure=ball)
    return out


def rigid_register(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                   fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None, *,
                   metric: str = "mattes", histogram_bins: int = 32,
                   shrink_factors: Sequence[int] = (4, 2, 1), smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0),
                   iterations: int = 200, learning_rate: float = 1.0, min_step: float = 1e-4,
                   relaxation: float = 0.8,
                   sampling_percentage: float = 0.25, max_samples: int | None = 100_000, seed: int = 0,
                   initializer: str = "moments",
                   mask_margin_mm: float = 4.0, search_range_deg: float = 30.0,
                   search_step_deg: float = 10.0) -> RigidResult:
    """Rigid registration of ``moving`` onto ``fixed`` (both 3D magnitude images).

    Euler3D transform, centred initializer (image moments or geometry), multi-resolution
    regular-step gradient descent with physical-shift parameter scales, and Mattes mutual
    information or normalised correlation, sampled randomly inside the (dilated) masks.

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
        Random seed of the metric sampler (results are reproducible for a given seed).
    initializer : {"moments", "geometry"}
        Centre the transform on the intensity centres of mass or on the grid centres.
    mask_margin_mm : float
        Dilation (mm) of the masks before they restrict the metric (keeps the brain edge).
    search_range_deg, search_step_deg : float
        Before the gradient descent, an exhaustive search over the three rotation angles in
        ``[-range, +range]`` by ``step`` (deg) at the coarsest level picks the start (gradient
        descent alone stalls in local optima for rotations above ~10 deg). ``range = 0`` skips it.

    Returns
    -------
    RigidResult
    """
    if len(shrink_factors) != len(smoothing_sigmas):
        raise ParameterError("rigid_register: shrink_factors and smoothing_sigmas need the same number of levels; "
                             "give one smoothing sigma per shrink factor")
    f_img = to_sitk(fixed, fixed_affine)
    m_img = to_sitk(moving, moving_affine)
    tx = _initial_transform(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, initializer,
                            f_img, m_img)
    f_mask_arr, f_mask, m_mask = _metric_masks(fixed_mask, fixed_affine, moving_mask, moving_affine, mask_margin_mm)
    n_region = float(np.count_nonzero(f_mask_arr)) if f_mask_arr is not None else float(np.prod(np.shape(fixed)))

    def method():
        return _registration_method(metric, histogram_bins, f_mask, m_mask)

    _rotation_search(method, tx, f_img, m_img, n_region, shrink_factors, smoothing_sigmas, search_range_deg,
                     search_step_deg, seed)
    reg = method()
    pcts = _sampling_percentages(n_region, shrink_factors, sampling_percentage, max_samples)
    if min(pcts) < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentagePerLevel(pcts, int(seed))
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


def _metric_masks(fixed_mask, fixed_affine, moving_mask, moving_affine, margin_mm: float):
    """``(fixed mask array, fixed mask image, moving mask image)``: the dilated metric masks (or None)."""
    f_mask = m_mask = f_mask_arr = None
    if fixed_mask is not None:
        f_mask_arr = _dilate(fixed_mask, voxel_sizes(fixed_affine), margin_mm)
        f_mask = to_sitk(f_mask_arr, fixed_affine, "uint8")
    if moving_mask is not None:
        m_mask = to_sitk(_dilate(moving_mask, voxel_sizes(moving_affine), margin_mm), moving_affine, "uint8")
    return f_mask_arr, f_mask, m_mask


def _registration_method(metric: str, histogram_bins: int, f_mask, m_mask):
    """A ``SimpleITK.ImageRegistrationMethod`` with the metric, its masks and linear interpolation."""
    import SimpleITK as sitk

    r = sitk.ImageRegistrationMethod()
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
        srch.SetMetricSamplingPercentage(_SEARCH_SAMPLES / n_coarse, int(seed))
    srch.SetOptimizerAsExhaustive([n_search] * 3 + [0, 0, 0], float(np.radians(search_step_deg)))
    srch.SetOptimizerScales([1.0] * 6)
    srch.SetShrinkFactorsPerLevel([int(max(shrink_factors))])
    srch.SetSmoothingSigmasPerLevel([float(smoothing_sigmas[int(np.argmax(shrink_factors))])])
    srch.SetInitialTransform(tx, inPlace=True)
    srch.Execute(f_img, m_img)


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
