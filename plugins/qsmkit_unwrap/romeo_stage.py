"""The ``unwrap/romeo`` stage: a thin wrapper of :func:`qsmkit_unwrap.romeo.romeo_unwrap`."""

from __future__ import annotations

import numpy as np

from qsmkit import Param, Stage
from qsmkit.errors import GeometryError, InputDataError, ParameterError
from qsmkit.params import CPU_DEVICE

from .romeo import DEFAULT_WEIGHTS, MODES, TEMPORAL_REFERENCES, WEIGHT_NAMES, romeo_unwrap


_SINGLE_ECHO = ("unwrap/romeo: mode temporal needs at least 2 echoes but the phase has 1; set mode: individual "
                "(or spatial) for single-echo phase, or give more echoes")


class RomeoUnwrap(Stage):
    """Quality-guided region-growing unwrapping (ROMEO, Dymerska et al. 2021) and its quality map."""

    kind, name = "unwrap", "romeo"
    reads = ("phase",)
    optional_reads = ("magnitude", "mask", "echo_times")
    writes = ("unwrapped_phase", "quality")
    description = ("ROMEO-like quality-guided region growing (Dymerska et al. 2021): edge weights from "
                   "phase/gradient coherence, linearity and magnitude, bucket-queue growth from the best "
                   "voxel; output = data + 2 pi k, exact on smooth fields; writes a quality map (0-1)")
    params = (
        Param("mode", str, "temporal", choices=MODES,
              doc="multi-echo strategy: temporal (template echo spatially, the others voxel-wise in TE), "
                  "spatial (every echo spatially from shared seeds) or individual (echo by echo)"),
        Param("template_echo", int, 1, range=(1, None),
              doc="echo unwrapped spatially and used for the seeds and the quality map (1 = first)"),
        Param("weights", list, list(DEFAULT_WEIGHTS), choices=WEIGHT_NAMES, item_type=str,
              doc="edge-weight factors to multiply (ROMEO's default four; 'magnitude' adds a magnitude "
                  "weight); factors whose input is missing are left out"),
        Param("temporal_reference", str, "fit", choices=TEMPORAL_REFERENCES,
              doc="temporal mode: fit (echo difference + weighted line fit, insensitive to a phase "
                  "offset) or ratio (ROMEO's TE ratio; needs offset-corrected phase, e.g. MCPC-3D-S)"),
        Param("wrap_addition", float, 0.0, unit="rad", range=(0.0, float(np.pi)),
              doc="ROMEO's linear extrapolation: unwrap a voxel against its neighbour plus the step "
                  "before it (clipped to this), to follow steady steps above pi; 0 = off (ROMEO's "
                  "default); with multi_echo_steps on it adds errors at 7 T (first echo 0 -> 62 voxels) "
                  "and is best left off"),
        Param("multi_echo_steps", bool, True,
              doc="temporal mode, >= 3 echoes: recognise neighbour steps of the template echo (and of "
                  "the echo difference) beyond pi from all echoes together and follow them; needs an "
                  "echo time that is not a multiple of the template's (7 T phantom, 30 ms against "
                  "4 ms: first-echo errors 76 -> 0), changes nothing otherwise"),
        Param("uncertain_ratio", float, 0.25, range=(0.0, 1.0),
              doc="temporal mode: where the adjacent echo's magnitude is below this fraction of the "
                  "template's, re-decide the 2 pi of the echo difference from the neighbours' field "
                  "(ROMEO's temporal uncertain unwrapping); 0 = off"),
        Param("decision_threshold", float, None, range=(0.0, None),
              doc="temporal mode, >= 3 echoes: re-decide each voxel's echo 2 pi counts by the best line "
                  "fit through all echoes (complex-domain misfit in noise-variance units, noise from "
                  "the data) where it improves by more than this; 0 = off; default: 16 with "
                  "temporal_reference ratio, off with fit (it changed nothing there, at 0.5 s per echo)"),
        Param("use_mask", bool, True,
              doc="unwrap only inside the mask (when one is available); output and quality are 0 "
                  "outside it. Without a mask the whole volume is unwrapped (noise last)"),
        Param("use_magnitude", bool, True, doc="use the magnitude (when available) for the weights and echo fit"),
        Param("correct_global", bool, True,
              doc="subtract the 2*pi*k that puts the template echo's mean over the mask nearest 0 "
                  "(the same k for every echo)"),
        CPU_DEVICE,
    )

    @classmethod
    def check_inputs(cls, inputs, p):
        """At validation: one echo time given with mode temporal is refused as :meth:`run` would."""
        if p.mode != "temporal" or "echo_times" not in inputs:
            return
        try:
            n = np.atleast_1d(np.asarray(inputs["echo_times"], dtype=np.float64)).size
        except (TypeError, ValueError):
            return
        if n == 1:
            raise ParameterError(_SINGLE_ECHO)

    def run(self, ctx, p):
        ph = ctx["phase"]
        data = np.asarray(ph.data, dtype=np.float32)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise InputDataError(f"phase must be 3D or 4D (x, y, z, echo), got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise InputDataError("phase contains NaN or infinite values; fix or mask the input phase")
        n_e = data.shape[3]
        if p.mode == "temporal" and n_e < 2:
            raise ParameterError(_SINGLE_ECHO)
        if p.template_echo > n_e:
            raise ParameterError(f"unwrap/romeo: template_echo = {p.template_echo} but the phase has {n_e} "
                                 f"echo(es); choose 1..{n_e}")
        te = None
        if "echo_times" in ctx:
            te = ctx.echo_times(n_e)
        elif n_e > 1 and p.mode != "individual":
            raise InputDataError(f"unwrap/romeo: mode {p.mode} needs the echo times; give echo_times under "
                                 "inputs (seconds) or set mode: individual")
        mag = None
        if p.use_magnitude and "magnitude" in ctx:
            mag = np.asarray(ctx["magnitude"].data, dtype=np.float32)
            if mag.ndim == 3:
                mag = mag[..., None]
            if mag.shape[:3] != data.shape[:3] or mag.shape[3] not in (1, n_e):
                raise GeometryError(f"magnitude shape {mag.shape} does not match the phase {data.shape}; "
                                    "give magnitude and phase on the same grid with the same echoes")
            if not np.all(np.isfinite(mag)):
                raise InputDataError("magnitude contains NaN or infinite values; fix the input magnitude")
        mask = ctx.optional_mask(data.shape[:3]) if p.use_mask else None
        u, q, info = romeo_unwrap(data, mag, mask, te, mode=p.mode, template_echo=p.template_echo,
                                  weights=tuple(p.weights), return_quality=True, correct_global=p.correct_global,
                                  temporal_reference=p.temporal_reference, wrap_addition=p.wrap_addition,
                                  multi_echo_steps=p.multi_echo_steps, uncertain_ratio=p.uncertain_ratio,
                                  decision_threshold=p.decision_threshold,
                                  return_info=True)
        ctx.log(f"ROMEO unwrapping ({p.mode}{', ' + p.temporal_reference if p.mode == 'temporal' and n_e > 1 else ''}) "
                f"of {n_e} echo(es) on {data.shape[:3]}, seed {info['seed']}, {info['regions']} region(s)"
                + (f", {int(mask.sum())} voxels in mask" if mask is not None else ", no mask"))
        return {"unwrapped_phase": ph.like(u, units="rad"),
                "quality": ph.like(q, units="1", description="ROMEO voxel quality in [0, 1], 1 = most reliable")}
