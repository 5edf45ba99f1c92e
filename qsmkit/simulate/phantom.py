"""The :class:`Phantom` (a simulated acquisition with its ground truth) and the simulator entry points.

:func:`simulate_phantom` runs the named steps of :mod:`.acquisition`, :mod:`.head` and
:mod:`.forward` in order; :func:`simulate_orientations` calls it once per head rotation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ParameterError
from ..volume import Volume
from .acquisition import DEFAULT_ECHO_TIMES, DEFAULT_SHAPE, DEFAULT_VOXEL_SIZE, _Acquisition, _acquisition
from .forward import (_add_noise, _apply_bipolar, _fields, _fine_grid, _output_labels, _Sampler, _signal,
                      _tissue_tables, bipolar_phase)
from .head import _ID, LABELS, PHASE_OFFSETS, TISSUES, _HAEMATOMA_C, _Head, _make_anatomy

__all__ = ["PHANTOM_FILES", "Phantom", "simulate_phantom", "simulate_orientations", "simulate_susceptibility"]


#: the files :meth:`Phantom.write` writes
PHANTOM_FILES = {f"{n}.nii.gz" for n in ("magnitude", "phase", "chi", "local_field", "total_field", "mask",
                                         "labels")} | {"phantom.json"}


@dataclass
class Phantom:
    """A simulated multi-echo GRE acquisition with its ground truth.

    Attributes
    ----------
    magnitude : Volume
        4D (x, y, z, echo) float32, a.u.
    phase : Volume
        4D wrapped phase, rad in [-pi, pi).
    echo_times : numpy.ndarray
        Echo times in s (float64).
    field_strength : float
        B0 in T.
    truth : dict of Volume
        ``chi`` (ppm rel. CSF, 0 outside mask), ``local_field`` (ppm), ``total_field`` (ppm),
        ``mask`` (bool, brain + inner half of the subarachnoid CSF), ``labels`` (uint8, see
        :data:`LABELS`).
    rotation : numpy.ndarray
        3x3 head rotation applied in the world (scanner) frame about ``meta["rotation_center_mm"]``.
    meta : dict
        Options and derived quantities (b0 direction, noise sigma, head semi-axes, timings);
        with ``bipolar != 0`` also ``meta["bipolar"]`` (a JSON-friendly description) and
        ``meta["bipolar_phase"]`` (float32 ``(N0, 1, 1)``, rad: the phase added to the even
        echoes); with ``haemorrhage=True`` ``meta["haemorrhage"]`` (label, centre, radius).
    phase_offset : Volume or None
        The true phase offset phi0 (rad, not wrapped), block-averaged to the output grid: the
        offset of the odd echoes (a bipolar term is in ``meta``, not here).
    """

    magnitude: Volume
    phase: Volume
    echo_times: np.ndarray
    field_strength: float
    truth: dict
    rotation: np.ndarray
    meta: dict = field(default_factory=dict)
    phase_offset: Volume | None = None

    def __repr__(self) -> str:
        return (f"Phantom(shape={self.magnitude.grid_shape}, voxel_size={self.magnitude.voxel_size}, "
                f"echo_times={[float(t) for t in self.echo_times]}, field_strength={self.field_strength}, "
                f"rotation_deg={self.meta.get('rotation_deg')}, snr={self.meta.get('options', {}).get('snr')})")

    @property
    def mask(self) -> Volume:
        return self.truth["mask"]

    def artifacts(self) -> dict:
        """Artifacts for the pipeline engine: magnitude, phase, echo_times, field_strength, truth."""
        return {"magnitude": self.magnitude, "phase": self.phase,
                "echo_times": np.asarray(self.echo_times, dtype=np.float64),
                "field_strength": float(self.field_strength), "truth": dict(self.truth)}

    def json_dict(self) -> dict:
        """What ``phantom.json`` holds (echo times, field strength, B0, rotation, options)."""
        m = self.meta
        return {"echo_times": [float(t) for t in self.echo_times], "echo_times_units": "s",
                "field_strength": float(self.field_strength), "field_strength_units": "T",
                "b0_direction_world": m.get("b0_direction_world"),
                "b0_direction_voxel": [float(v) for v in self.magnitude.b0_direction],
                "rotation": np.asarray(self.rotation).tolist(),
                "rotation_deg": m.get("rotation_deg"),
                "rotation_center_mm": m.get("rotation_center_mm"),
                "affine": np.asarray(self.magnitude.affine).tolist(),
                "shape": list(self.magnitude.grid_shape),
                "voxel_size_mm": list(self.magnitude.voxel_size),
                "labels": {str(k): v for k, v in LABELS.items()},
                "tissues": {k: {"chi_ppm": v[0], "m0": v[1], "t2star_ms_3T": v[2]} for k, v in m.get("tissues", TISSUES).items()},
                "noise_sigma": m.get("noise_sigma"),
                "options": m.get("options", {}),
                "chi_reference": "csf", "units": {"chi": "ppm", "field": "ppm", "phase": "rad"}}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write NIfTI files and ``phantom.json`` (atomically) to ``out_dir``; returns name -> path."""
        from ..io import save_nifti, write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        vols = {"magnitude": self.magnitude, "phase": self.phase, **self.truth}
        for name, vol in vols.items():
            paths[name] = save_nifti(vol, out / f"{name}.nii.gz")
        p = out / "phantom.json"
        write_json(self.json_dict(), p)
        paths["phantom"] = p
        return paths


def _metadata(acq: _Acquisition, field_strength, affine, rotation_deg, seed, padding, anatomy_seed, fov_fraction,
              chi_overrides, tissues, sigma, pshape, timing, phase_offset="smooth", bipolar=0.0,
              haemorrhage=False) -> dict:
    """The phantom's ``meta`` dict: the options used (JSON-friendly), noise level and timing."""
    te, b0w = acq.te, acq.b0w
    options = {"shape": list(acq.shape), "voxel_size": [float(v) for v in acq.vs], "echo_times": te.tolist(),
               "field_strength": float(field_strength), "b0_direction": b0w.tolist(),
               "affine_given": affine is not None, "rotation_deg": [float(r) for r in rotation_deg],
               "snr": acq.snr, "seed": int(seed), "oversample": acq.os_, "padding": float(padding),
               "anatomy_seed": int(anatomy_seed), "fov_fraction": float(fov_fraction),
               "head_semi_axes_mm": [float(s) for s in acq.S], "chi_overrides": dict(chi_overrides or {}),
               "phase_offset": phase_offset, "bipolar": float(bipolar), "haemorrhage": bool(haemorrhage)}
    return {"source": "qsmkit.simulate", "echo_times": te.tolist(), "field_strength": float(field_strength),
            "b0_direction_world": b0w.tolist(), "rotation_deg": [float(r) for r in rotation_deg],
            "rotation_center_mm": acq.center.tolist(), "noise_sigma": sigma, "padded_fine_shape": list(pshape),
            "options": options, "tissues": tissues, "timing_s": timing}


def _check_contrast_options(phase_offset, bipolar, haemorrhage) -> tuple[str, float, bool]:
    """Check ``phase_offset``, ``bipolar`` and ``haemorrhage`` of :func:`simulate_phantom`."""
    if phase_offset not in PHASE_OFFSETS:
        raise ParameterError(f"simulate: phase_offset must be one of {', '.join(PHASE_OFFSETS)}, got {phase_offset!r}")
    try:
        b = float(bipolar)
    except (TypeError, ValueError):
        raise ParameterError(f"simulate: bipolar must be a phase in rad (a number), got {bipolar!r}") from None
    if not np.isfinite(b) or abs(b) > 2 * np.pi:
        raise ParameterError(f"simulate: bipolar must be a phase in rad between -2 pi and 2 pi, got {bipolar!r}")
    if not isinstance(haemorrhage, (bool, np.bool_)):
        raise ParameterError(f"simulate: haemorrhage must be true or false, got {haemorrhage!r}")
    return str(phase_offset), b, bool(haemorrhage)


# ============================================================================ main
def simulate_phantom(shape: Sequence[int] = DEFAULT_SHAPE,
                     voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
                     echo_times: Sequence[float] = DEFAULT_ECHO_TIMES,
                     field_strength: float = 3.0,
                     b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
                     affine: np.ndarray | None = None,
                     rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                     snr: float | None = 100.0,
                     seed: int = 0,
                     oversample: int = 2,
                     padding: float = 1.5,
                     *,
                     anatomy_seed: int = 0,
                     fov_fraction: float = 0.84,
                     head_semi_axes_mm: Sequence[float] | None = None,
                     chi_overrides: Mapping[str, float] | None = None,
                     phase_offset: str = "smooth",
                     bipolar: float = 0.0,
                     haemorrhage: bool = False,
                     chunk_voxels: int = 4_000_000,
                     verbose: bool = False,
                     **kw: Any) -> Phantom:
    """Simulate a multi-echo GRE head acquisition with ground truth (see :mod:`qsmkit.simulate`).

    Parameters
    ----------
    shape : 3 ints
        Output grid. Default (112, 128, 96) at 1.5 mm: a 168 x 192 x 144 mm FOV, ~1.4 M voxels.
    voxel_size : 3 floats
        Voxel size in mm (anisotropic allowed); ignored when ``affine`` is given.
    echo_times : floats
        Echo times in s.
    field_strength : float
        B0 in T (T2* values, given at 3 T, are scaled by 3/B0).
    b0_direction : 3 floats
        B0 direction in the world (scanner) frame.
    affine : 4x4 array, optional
        Voxel -> world (mm) affine of the acquisition, e.g. oblique. Default: diagonal of
        ``voxel_size``, centred on the grid.
    rotation_deg : 3 floats
        Head rotation (degrees) about the world x, y, z axes through the FOV centre, applied as
        ``Rz @ Ry @ Rx``. B0 does not move.
    snr : float or None
        Mean first-echo magnitude in the brain divided by the noise standard deviation per
        real/imaginary channel; ``None`` or ``inf`` for noise-free data.
    seed : int
        Noise seed (the anatomy uses ``anatomy_seed``, so rotations share one head).
    oversample : int
        Fine-grid factor per axis for the forward model (complex block averaging).
    padding : float
        Minimum zero-padding factor of the fine grid for the dipole convolution (>= 1.5 advised).
    anatomy_seed : int
        Seed of the cortical folding pattern.
    fov_fraction : float
        Head diameter as a fraction of the FOV along each axis.
    head_semi_axes_mm : 3 floats, optional
        Head semi-axes (mm, head frame x, y, z) instead of ``fov_fraction``.
    chi_overrides : mapping, optional
        ``{tissue name: chi in ppm}`` to change :data:`TISSUES` values.
    phase_offset : {"smooth", "coil", "none"}
        Model of the phase offset phi0 (see :meth:`~qsmkit.simulate.head._Head.phi0`):
        ``"smooth"`` (default) about 2 rad of smooth variation that does not wrap in the brain;
        ``"coil"`` a coil-combined-like offset with about 7.5 rad of variation across the brain,
        so that it wraps (for testing MCPC-3D-S); ``"none"`` zero.
    bipolar : float
        Bipolar-readout phase (rad): the even echoes (2nd, 4th, ...) get the extra phase
        ``bipolar * (1 + xi)``, ``xi = (i - (N0 - 1)/2) / N0`` the position along the readout
        (first voxel) axis as a fraction of the FOV, i.e. a constant ``bipolar`` plus a linear
        ramp of ``bipolar`` rad across the FOV; applied to the output-grid signal before the
        noise. The odd echoes and :attr:`Phantom.phase_offset` are unchanged; the term is in
        ``meta["bipolar_phase"]``. Default 0 (monopolar).
    haemorrhage : bool
        Add a haematoma: a ball of radius 0.13 x the mean head semi-axis (9 mm on the default
        grid) in the deep white matter of the left centrum semiovale, label ``haemorrhage``
        (inside the brain mask). The ``haemorrhage`` tissue then takes
        :data:`~qsmkit.simulate.head.HAEMATOMA_TISSUE`: chi +1.0 ppm rel. CSF, T2* 5 ms at 3 T
        (dark magnitude, unreliable late-echo phase); this applies also to the small lesion that
        every phantom has. Position and radius are in ``meta["haemorrhage"]``.
    chunk_voxels : int
        Fine-grid points processed at once (memory control).
    verbose : bool
        Print the grid sizes and timings.
    **kw
        Anything else raises :class:`~qsmkit.errors.ParameterError` naming the valid options
        (so that a typo in a pipeline's ``inputs: {simulate: {...}}`` is reported clearly).

    Returns
    -------
    Phantom
    """
    t_start = time.perf_counter()
    if kw:
        import inspect

        valid = [n for n in inspect.signature(simulate_phantom).parameters if n != "kw"]
        raise ParameterError(f"simulate: unknown option(s) {', '.join(sorted(kw))}; valid options: {', '.join(valid)}")
    acq = _acquisition(shape, voxel_size, echo_times, field_strength, b0_direction, affine, rotation_deg, snr,
                       oversample, padding, fov_fraction, head_semi_axes_mm)
    phase_offset, bipolar, haemorrhage = _check_contrast_options(phase_offset, bipolar, haemorrhage)
    shape, os_ = acq.shape, acq.os_
    head = _Head(acq.S, _make_anatomy(anatomy_seed), min_vein_radius_mm=0.6 * float(acq.vs.max()),
                 phase_offset=phase_offset, haematoma=haemorrhage)
    tissues, chi_lut, m0_lut, r2_lut, in_brain = _tissue_tables(chi_overrides, field_strength, haemorrhage)
    sample = _Sampler(head, acq)

    labels_f, phi0_f, step = _fine_grid(sample, shape, os_, chunk_voxels)
    t_geom = time.perf_counter()
    chi_truth, local_out, total_f, total_out, phi0_out, pshape = _fields(labels_f, phi0_f, chi_lut, in_brain,
                                                                         acq.vs, os_, acq.b_vox, padding)
    t_field = time.perf_counter()
    sig = _signal(labels_f, total_f, phi0_f, m0_lut, r2_lut, acq.te, field_strength, shape, os_, step)
    del total_f, phi0_f, labels_f
    delta = bipolar_phase(shape, bipolar) if bipolar != 0.0 else None
    if delta is not None:
        _apply_bipolar(sig, delta)
    t_sig = time.perf_counter()
    labels_out, mask = _output_labels(sample, shape, chunk_voxels, in_brain)
    chi_truth *= mask
    mag, phase, sigma = _add_noise(sig, mask, acq.snr, seed)
    del sig

    timing = {"geometry": t_geom - t_start, "fields": t_field - t_geom, "signal": t_sig - t_field,
              "total": time.perf_counter() - t_start}
    meta = _metadata(acq, field_strength, affine, rotation_deg, seed, padding, anatomy_seed, fov_fraction,
                     chi_overrides, tissues, sigma, pshape, timing, phase_offset, bipolar, haemorrhage)
    te = acq.te
    if delta is not None:
        meta["bipolar"] = {"rad": bipolar, "readout_axis": 0,
                           "even_echoes": list(range(2, te.size + 1, 2)),
                           "definition": "even echoes (2nd, 4th, ...) get + bipolar * (1 + (i - (N0 - 1) / 2) / N0), "
                                         "i the index along voxel axis 0"}
        meta["bipolar_phase"] = delta
    if haemorrhage:
        meta["haemorrhage"] = {"label": _ID["haemorrhage"], "centre_u": list(_HAEMATOMA_C),
                               "centre_mm_head_frame": [float(c * s) for c, s in zip(_HAEMATOMA_C, acq.S)],
                               "radius_mm": float(head.haematoma_radius_mm),
                               "chi_ppm": float(tissues["haemorrhage"][0]),
                               "t2star_ms_3T": float(tissues["haemorrhage"][2])}

    def vol(data, units, **m):
        return Volume(data, acq.A, units=units, b0_direction=acq.b_vox, meta={"simulated": True, **m})

    truth = {"chi": vol(chi_truth, "ppm", reference="csf"),
             "local_field": vol(local_out, "ppm"),
             "total_field": vol(total_out, "ppm"),
             "mask": vol(mask, "bool"),
             "labels": vol(labels_out, "label", labels={int(k): v for k, v in LABELS.items()})}
    if verbose:
        print(f"simulate_phantom: {shape} fine {tuple(s * os_ for s in shape)} padded {pshape}: {meta['timing_s']}")
    return Phantom(magnitude=vol(mag, "a.u.", echo_times=te.tolist()),
                   phase=vol(phase, "rad", echo_times=te.tolist()),
                   echo_times=te, field_strength=float(field_strength), truth=truth, rotation=acq.R,
                   meta=meta, phase_offset=vol(phi0_out, "rad"))


def simulate_orientations(rotations_deg: Sequence[Sequence[float]], **kwargs: Any) -> list[Phantom]:
    """The same head in several orientations (for COSMOS), one :class:`Phantom` per rotation.

    The first entry is the reference frame (usually ``(0, 0, 0)``). All share the grid/affine and
    the anatomy (``anatomy_seed``); orientation ``i`` uses noise seed ``seed + i``.
    """
    rots = [tuple(float(a) for a in r) for r in rotations_deg]
    if not rots or any(len(r) != 3 for r in rots):
        raise ParameterError("simulate_orientations: give a non-empty list of (x, y, z) rotations in degrees")
    if "rotation_deg" in kwargs:
        raise ParameterError("simulate_orientations: pass rotations in rotations_deg, not rotation_deg")
    seed = int(kwargs.pop("seed", 0))
    return [simulate_phantom(rotation_deg=r, seed=seed + i, **kwargs) for i, r in enumerate(rots)]


def simulate_susceptibility(shape: Sequence[int] = DEFAULT_SHAPE,
                            voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
                            rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                            oversample: int = 2,
                            *,
                            affine: np.ndarray | None = None,
                            anatomy_seed: int = 0,
                            gyral_period: float = 0.21,
                            fov_fraction: float = 0.84,
                            head_semi_axes_mm: Sequence[float] | None = None,
                            chi_overrides: Mapping[str, float] | None = None,
                            haemorrhage: bool = False,
                            chunk_voxels: int = 4_000_000) -> dict[str, Volume]:
    """The phantom's susceptibility truth only (no fields, no signal): for training learned inverters.

    The same head model as :func:`simulate_phantom` (same options, same labels and tissue
    values; chi is the block mean over ``oversample^3`` fine points of the chi inside the brain
    mask, zero outside the mask), without the dipole fields and the multi-echo signal, so that
    it costs a fraction of a full simulation. ``gyral_period`` (brain-radius units, default
    0.21 as in :func:`simulate_phantom`) changes the cortical folding scale; with the defaults
    the ``chi`` and ``mask`` equal :func:`simulate_phantom`'s truth bit for bit.

    Returns
    -------
    dict
        ``chi`` (ppm relative to CSF, float32), ``mask`` (bool) and ``labels`` (uint8) Volumes,
        B0 along world z.
    """
    acq = _acquisition(shape, voxel_size, DEFAULT_ECHO_TIMES, 3.0, (0.0, 0.0, 1.0), affine, rotation_deg, None,
                       oversample, 1.5, fov_fraction, head_semi_axes_mm)
    if not (0.02 <= float(gyral_period) <= 2.0):
        raise ParameterError(f"simulate: gyral_period must lie in [0.02, 2] (brain radii), got {gyral_period!r}")
    _, _, haemorrhage = _check_contrast_options("smooth", 0.0, haemorrhage)
    head = _Head(acq.S, _make_anatomy(anatomy_seed, gyral_period=float(gyral_period)),
                 min_vein_radius_mm=0.6 * float(acq.vs.max()), phase_offset="none", haematoma=haemorrhage)
    _, chi_lut, _, _, in_brain = _tissue_tables(chi_overrides, 3.0, haemorrhage)
    sample = _Sampler(head, acq)
    fshape = tuple(s * acq.os_ for s in acq.shape)
    fine_idx = [((np.arange(n) + 0.5) / acq.os_ - 0.5) for n in fshape]
    chi_f = np.empty(fshape, np.float32)
    step = max(acq.os_, (max(1, chunk_voxels // (fshape[1] * fshape[2])) // acq.os_) * acq.os_)
    for a in range(0, fshape[0], step):
        b = min(a + step, fshape[0])
        lab, _ = sample(fine_idx[0][a:b], fine_idx[1], fine_idx[2], False)
        chi_f[a:b] = chi_lut[lab] * in_brain[lab]
    from ..operators import block_mean

    chi = block_mean(chi_f, acq.os_)
    del chi_f
    labels, mask = _output_labels(sample, acq.shape, chunk_voxels, in_brain)
    chi *= mask

    def vol(data, units, **m):
        return Volume(data, acq.A, units=units, b0_direction=acq.b_vox, meta={"simulated": True, **m})

    return {"chi": vol(chi, "ppm", reference="csf"), "mask": vol(mask, "bool"),
            "labels": vol(labels, "label", labels={int(k): v for k, v in LABELS.items()})}
