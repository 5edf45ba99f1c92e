"""Numerical head phantom with ground truth for multi-echo GRE QSM.

The head is defined by implicit shape functions (ellipsoids, a folded cortex from a smooth random
field, tubes for veins) in a *head frame* whose size is a fixed fraction of the field of view, so
any grid works: 64^3 at 1 mm gives a small head, ~180 x 216 x 180 at 1 mm a life-size one.

Forward model
-------------
* Susceptibility ``chi`` (ppm, SI) relative to CSF; air is +9.4 ppm relative to tissue. The
  field is computed for ``chi - chi_air`` (the head is an object in air, and zero padding is air).
* The labels are evaluated on a grid ``oversample`` times finer than the output, the field is
  computed there by FFT with the unit dipole kernel of :mod:`qsmkit.physics` (B0 in the voxel
  frame, zero padding ``padding``), and the *complex* multi-echo signal
  ``M0 * exp(-TE/T2*) * exp(i*(phi0 + 2*pi*GAMMA_BAR*B0*1e-6*field*TE))`` is block-averaged to the
  output grid. Reconstructions therefore do not share the simulator's discrete kernel, and
  intravoxel dephasing near air/tissue interfaces is modelled.
* Truth: ``total_field`` is the block mean of the fine total field ``D * (chi - CHI_AIR)`` over
  the head; ``local_field`` is the block mean of the field of the chi *inside the brain mask
  only* (the true local field), so that ``background = total_field - local_field`` is the field
  of everything outside the mask plus the uniform ``-CHI_AIR`` of the mask region (harmonic
  inside the mask); ``chi`` is the block mean of the fine chi inside
  the brain, zero outside the (output) mask; ``labels`` and ``mask`` are the analytic labels at
  the output voxel centres. ``mask`` is the brain with its ventricles, sulci and the inner half of
  the subarachnoid CSF; its border lies in CSF about 1 mm inside the skull.
* Complex Gaussian noise of standard deviation ``sigma`` per real/imaginary channel with
  ``sigma = mean(|S(TE1)| in mask) / snr``.
* Options for the front end (issue 11): ``phase_offset`` ("smooth" default, "coil": a
  coil-combined-like phi0 that wraps across the head, "none"), ``bipolar`` (rad: the even echoes
  get ``bipolar * (1 + xi)``, ``xi`` the readout position along voxel axis 0 as a fraction of
  the FOV; in ``meta["bipolar_phase"]``) and ``haemorrhage`` (a ~9 mm haematoma in deep white
  matter, label ``haemorrhage``, chi +1 ppm, T2* 5 ms at 3 T). The defaults reproduce the plain
  phantom bit for bit.

Default grid: (112, 128, 96) at 1.5 mm (168 x 192 x 144 mm FOV, 5 echoes 4-20 ms, 3 T, SNR 100),
about 4-5 s of CPU. A life-size 180 x 216 x 180 grid at 1 mm with ``oversample=2`` peaks at
about 3.4 GB RSS (echoes are processed slab by slab, float32/complex64).

Head rotation (for COSMOS) rotates the head (chi, M0, T2*, labels, phi0) in the scanner frame
about the world centre of the field of view, with B0 fixed: the head-frame coordinate of a world
point ``p`` is ``R.T @ (p - c)``; shapes are evaluated analytically at those coordinates.

The package, read in the order the data flows:

* :mod:`.head`: the anatomical model (labels, tissue values, implicit shapes of the head);
* :mod:`.acquisition`: the options checked and turned into the acquisition geometry;
* :mod:`.forward`: the forward model (fine grid, fields, signal, noise);
* :mod:`.phantom`: :class:`Phantom` and :func:`simulate_phantom` / :func:`simulate_orientations`,
  which run those steps in order, and :func:`simulate_susceptibility` (the chi truth only, for
  training learned inverters).
"""

from __future__ import annotations

from .acquisition import DEFAULT_ECHO_TIMES, DEFAULT_SHAPE, DEFAULT_VOXEL_SIZE, rotation_matrix
from .head import BRAIN_LABELS, CHI_AIR, HAEMATOMA_TISSUE, LABELS, PHASE_OFFSETS, TISSUES
from .phantom import PHANTOM_FILES, Phantom, simulate_orientations, simulate_phantom, simulate_susceptibility

__all__ = ["LABELS", "TISSUES", "BRAIN_LABELS", "CHI_AIR", "Phantom", "simulate_phantom",
           "simulate_orientations", "rotation_matrix", "DEFAULT_SHAPE", "DEFAULT_VOXEL_SIZE",
           "DEFAULT_ECHO_TIMES", "PHANTOM_FILES", "HAEMATOMA_TISSUE", "PHASE_OFFSETS",
           "simulate_susceptibility"]
