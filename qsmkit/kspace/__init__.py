"""Public extension points for k-space methods: the ``kspace`` artifact and the ``recon`` base class.

A third-party k-space method is a :class:`~qsmkit.stage.Stage` like any other (DESIGN.md §2);
this module holds what such a plugin needs and what the built-in k-space plugin
(``qsmkit_kspace``) is built on, so a plugin never has to import another plugin.

Artifacts of the k-space stages
-------------------------------
``kspace``
    Before ``kspace_read``: the file path given as ``inputs.kspace``. After it: a
    :class:`KSpaceData`, complex64 ``(slices, coils, H, W)``, each slice an independent 2D
    Cartesian problem over ``(H, W)``, DC at ``(H // 2, W // 2)`` (centred orthonormal FFT,
    DESIGN.md §3), unsampled samples exactly 0, in the scanner's arbitrary units.
``sampling_mask``
    bool ndarray broadcastable to ``(H, W)`` or ``(slices, H, W)``: fastMRI column masks are
    ``(1, W)``, 2D (Poisson-disc) masks ``(H, W)``. Check one with :func:`check_sampling_mask`.
``maps``
    complex64 ndarray ``(slices, n_maps, coils, H, W)``: image-space coil sensitivities on the
    full (uncropped) grid, unitless (ESPIRiT maps have ``sum_c |S_c|^2 = 1`` inside the object).
``target``
    reference magnitude :class:`~qsmkit.volume.Volume` (float32, ``"a.u."``) on the output grid
    (already cropped, e.g. fastMRI's 320 x 320), when the file has one.
``image`` (and ``image_real``, ``image_imag``, ``image_complex``)
    float32 magnitude Volume (RSS over the sets of maps), ``"a.u."`` on the scale of the input
    k-space (the normalisation is undone), centre-cropped in image space to
    :attr:`KSpaceData.crop_size`; see :func:`to_volume` for the axis order.

Writing a reconstruction method
-------------------------------
Subclass :class:`ReconStage` and implement :meth:`ReconStage.reconstruct` on one batch of
slices (torch tensors); the base class checks the artifacts, normalises, batches, crops, writes
the outputs and turns an out-of-memory error into a one-line message::

    from qsmkit import Param, hookimpl
    from qsmkit.device import DEVICE_PARAM
    from qsmkit.kspace import RECON_PARAMS, ReconStage

    class Landweber(ReconStage):
        name = "landweber"
        reads = ("kspace", "maps")
        description = "gradient descent on the SENSE data term"
        params = RECON_PARAMS + (Param("iterations", int, 20, range=(1, 1000)), DEVICE_PARAM)

        def reconstruct(self, y, maps, mask, p, ctx):
            from qsmkit.fft import fftnc_torch, ifftnc_torch

            x = (maps.conj() * ifftnc_torch(y).unsqueeze(1)).sum(2)  # (S, M, H, W)
            for _ in range(p.iterations):
                r = mask * fftnc_torch((maps * x.unsqueeze(2)).sum(1)) - y
                x = x - (maps.conj() * ifftnc_torch(mask * r).unsqueeze(1)).sum(2)
            return x

    @hookimpl
    def qsmkit_register_stages(registry):
        registry.add(Landweber)

Readers, undersampling and coil-map methods are plain :class:`~qsmkit.stage.Stage` subclasses
that read and write the artifacts above; :func:`require_kspace`, :func:`check_sampling_mask`
and :func:`kspace_memory_errors` give them the same checks and messages as the built-ins.

The module is a small package: :mod:`.data` (the artifact and the checks), :mod:`.arrays`
(array helpers) and :mod:`.recon` (the base class); everything is imported from
``qsmkit.kspace``. Importing it does not import torch or h5py.
"""

from __future__ import annotations

from ..device import DEVICE_PARAM
from .arrays import center_crop, mask_to_2d, mask_tensor, normalization_scale, rss
from .data import (KSpaceData, check_sampling_mask, from_volume, is_out_of_memory, kspace_memory_errors,
                   require_kspace, to_volume)
from .recon import RECON_PARAMS, ReconStage

__all__ = [
    "KSpaceData", "to_volume", "from_volume", "require_kspace", "check_sampling_mask", "kspace_memory_errors",
    "is_out_of_memory", "ReconStage", "RECON_PARAMS", "rss", "center_crop", "mask_to_2d", "mask_tensor",
    "normalization_scale", "DEVICE_PARAM",
]
