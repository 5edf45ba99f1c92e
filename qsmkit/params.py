"""Shared definitions of the parameters that many stages take: one name and one meaning each.

A stage declares these with the factories below instead of writing its own :class:`Param`, so
that the YAML spelling is the same in every plugin; a stage sets only its own default, range and
one-line doc. Old spellings stay accepted (with one ``deprecated`` line on stderr) through
:attr:`Param.aliases`:

* ``max_iter`` (int): iteration budget of the solver; formerly ``iterations`` in unwrap/laplacian,
  inversion/dip, register/simpleitk, coil_maps/espirit, recon/sense and recon/cs_wavelet.
* ``tol`` (float): stopping tolerance of the solver.
* ``lambda`` (float): regularisation (or data) weight, read in ``run`` as ``p["lambda"]`` or
  ``p.lam``; formerly ``regularization`` in inversion/cosmos.
* ``use_noise_weight`` (bool): weight the data by the ``noise_weight`` artifact; formerly
  ``use_noise_weights`` in inversion/cosmos.
* ``device`` (str): ``auto`` / ``cpu`` / ``cuda``.

``device``: every stage accepts it (DESIGN §5). Torch-based stages declare :data:`DEVICE` and
turn it into a ``torch.device`` with :func:`qsmkit.device.resolve_device` (the one way to
resolve it); numpy-only stages declare :data:`CPU_DEVICE` (or nothing: :meth:`Stage.param_map`
adds it), accept any of the three values and run on the CPU.
"""

from __future__ import annotations

from dataclasses import replace

from .stage import Param

__all__ = ["DEVICE", "CPU_DEVICE", "DEVICE_CHOICES", "ITERATIONS", "max_iter", "tol", "lam", "use_noise_weight"]

#: the old spelling of ``max_iter`` (unwrap, DIP, register, ESPIRiT, SENSE, CS): ``aliases=ITERATIONS``
ITERATIONS = ("iterations",)

#: values of the ``device`` parameter
DEVICE_CHOICES = ("auto", "cpu", "cuda")

#: the ``device`` parameter of torch-based stages
DEVICE = Param("device", str, "auto", choices=DEVICE_CHOICES,
               doc="torch device: auto uses CUDA when torch sees a GPU")

#: the ``device`` parameter of numpy-only stages: accepted so that every stage takes it
CPU_DEVICE = replace(DEVICE, doc="accepted by every stage; this one is numpy-only and runs on the CPU")


def max_iter(default: int, *, range: tuple = (1, 10000), doc: str = "maximum iterations",
             aliases: tuple = ()) -> Param:
    """The ``max_iter`` parameter (iteration budget); stages that used to call it ``iterations``
    pass ``aliases=ITERATIONS``."""
    return Param("max_iter", int, default, range=range, doc=doc, aliases=aliases)


def tol(default: float, *, range: tuple = (0.0, 1.0), doc: str = "stopping tolerance",
        aliases: tuple = ()) -> Param:
    """The ``tol`` parameter (stopping tolerance of an iterative solver)."""
    return Param("tol", float, default, range=range, doc=doc, aliases=aliases)


def lam(default: float, *, range: tuple = (0.0, 1e8), doc: str = "regularisation weight", unit: str = "",
        aliases: tuple = ()) -> Param:
    """The ``lambda`` parameter (read in ``run`` as ``p["lambda"]`` or ``p.lam``)."""
    return Param("lambda", float, default, unit=unit, range=range, doc=doc, aliases=aliases)


def use_noise_weight(default: bool = True, *,
                     doc: str = "weight the data by noise_weight when that artifact exists",
                     aliases: tuple = ()) -> Param:
    """The ``use_noise_weight`` parameter (COSMOS's old spelling was ``use_noise_weights``)."""
    return Param("use_noise_weight", bool, default, doc=doc, aliases=aliases)
