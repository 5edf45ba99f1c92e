"""Linear operators and the solvers every method shares (in the spirit of sigpy's ``Linop``).

A :class:`Linop` maps arrays of shape :attr:`~Linop.ishape` to arrays of shape
:attr:`~Linop.oshape`. It has :meth:`~Linop.apply` (``A x``), :meth:`~Linop.adjoint`
(``A^H y``) and :meth:`~Linop.normal` (``A^H A x``; a subclass may override it with a fast path),
``A.H`` (the adjoint as an operator) and ``A.N`` (the normal operator). Operators compose with
``A @ B`` (or ``A * B``), add with ``A + B`` / ``A - B`` and scale with ``c * A``. Every operator
here works on numpy arrays and on torch tensors (CPU or GPU; differentiable where the method
needs autograd); the backend follows the input. Heavy imports (torch) happen only when a torch
tensor arrives.

Operators defined here:

* :class:`FourierMultiplier`: ``crop . iFFT . K . FFT . pad`` with a real kernel ``K`` on a
  zero-padded grid (full or real-FFT half spectrum);
* :class:`Dipole`: THE dipole convolution (``K`` = :func:`qsmkit.physics.dipole_kernel`; field in
  ppm from chi in ppm), arbitrary B0 direction and voxel size;
* :class:`SMV`: the spherical mean value filter (``K`` = :func:`qsmkit.physics.smv_kernel`);
* :class:`Gradient`: forward or backward finite differences (1/mm, or unscaled); its adjoint is
  minus the divergence; :func:`laplacian_kernel` is the spectrum of ``G^H G`` on a periodic grid
  (the k-space divisions of TV-ADMM, RTS and TFI's ADMM solver); :func:`gradient_mask` is the
  binary magnitude edge weight of MEDI and TFI (from :func:`combine_magnitude`, echoes combined);
* :class:`Diagonal`: pointwise weights and masks;
* :class:`Identity`, and the algebra (:class:`Compose`, :class:`Sum`, :class:`Scaled`,
  :class:`Adjoint`, :class:`Normal`).

Solvers: :func:`cg` (preconditioned conjugate gradients, batched, ONE stopping rule:
``||r|| / ||b|| <= tol`` or ``max_iter``), :func:`minres` (symmetric indefinite systems, one
application of ``A`` per iteration) and :func:`power_iteration` (largest eigenvalue of
``A^H A``, e.g. a Lipschitz constant), :func:`proximal_gradient` (FISTA / POGM with restart) and
:func:`condat_vu` (primal-dual) for ``1/2 ||A x - y||^2 + g(.)``. Grid helper: :func:`bounding_box`.

Modules: :mod:`~qsmkit.operators.base` (``Linop``, algebra, ``Diagonal``),
:mod:`~qsmkit.operators.fourier` (``FourierMultiplier``, ``Dipole``, ``SMV``),
:mod:`~qsmkit.operators.gradient`, :mod:`~qsmkit.operators.solvers` (``cg``, ``minres``, ``power_iteration``),
:mod:`~qsmkit.operators.grid` (``bounding_box``). Import everything from ``qsmkit.operators``.

Every subclass of :class:`Linop` may provide a small example instance (classmethod
``example``); ``tests/test_operators.py`` runs the adjoint and linearity checks on every
subclass defined by the core and the built-in plugins, found through :func:`all_operator_classes`.
"""

from .base import (Adjoint, Compose, Diagonal, Identity, Linop, Normal, Scaled, Sum, all_operator_classes,
                   is_torch)
from .fourier import SMV, Dipole, FourierMultiplier
from .gradient import Gradient, combine_magnitude, gradient_mask, laplacian_kernel
from .grid import PaddedBox, block_mean, bounding_box, dilate_mm, erode_mm, padded_box
from .solvers import (CGInfo, ProxInfo, backtrack, cg, condat_vu, line_warm_start, minres, power_iteration,
                      proximal_gradient)

__all__ = ["Linop", "Identity", "Diagonal", "Compose", "Sum", "Scaled", "Adjoint", "Normal",
           "FourierMultiplier", "Dipole", "SMV", "Gradient", "laplacian_kernel", "gradient_mask", "combine_magnitude",
           "cg", "CGInfo", "minres", "power_iteration", "line_warm_start", "backtrack", "proximal_gradient",
           "condat_vu", "ProxInfo", "bounding_box", "block_mean", "erode_mm", "dilate_mm", "padded_box", "PaddedBox",
           "all_operator_classes", "is_torch"]
