"""``recon`` stages: ``zero_filled``, ``sense`` and ``cs_wavelet``, built on the public
:class:`qsmkit.kspace.ReconStage`; each writes ``image`` (magnitude Volume, centre crop) and, when
a ``target`` exists, reports the fastMRI metrics (NMSE, PSNR, SSIM).
"""

from __future__ import annotations

from qsmkit import Param
from qsmkit.device import DEVICE_PARAM
from qsmkit.errors import MissingArtifactError
from qsmkit.kspace import RECON_PARAMS, ReconStage
from qsmkit.params import ITERATIONS, lam, max_iter, tol

__all__ = ["ZeroFilled", "Sense", "CSWavelet"]

_COMMON_RECON = RECON_PARAMS  # crop, complex_output, batch_slices (qsmkit.kspace)


class _Recon(ReconStage):
    """The built-in recon methods: :class:`qsmkit.kspace.ReconStage` that reports the fastMRI metrics."""

    def evaluate(self, image, target, kd):
        from .metrics import evaluate_volume

        return evaluate_volume(target, image, square_crop=kd.layout == "fastmri")


class ZeroFilled(_Recon):
    """Zero-filled inverse FFT, RSS (or maps) coil combination."""

    name = "zero_filled"
    description = "zero-filled inverse FFT with root-sum-of-squares (or sensitivity-weighted) coil combination"
    needs_maps = False
    params = _COMMON_RECON + (
        Param("combine", str, "rss", choices=("rss", "maps"), doc="coil combination"),
        DEVICE_PARAM)

    def run(self, ctx, p):
        self._magnitude_only = p.combine == "rss"
        if p.combine == "maps" and not "maps" in ctx:
            raise MissingArtifactError("stage recon/zero_filled with combine: maps needs 'maps'; add a coil_maps "
                                       "stage before it or use combine: rss")
        return super().run(ctx, p)

    def reconstruct(self, y, maps, mask, p, ctx):
        import torch

        from .transforms import center_crop, zero_filled_coils

        crop = self._crop
        img = zero_filled_coils(y, crop, mask)  # cropped coil images (S, C, h, w)
        if p.combine == "rss":
            return torch.sqrt((img.abs() ** 2).sum(1, keepdim=True)).to(torch.complex64)
        return (center_crop(maps, crop).conj() * img.unsqueeze(1)).sum(2)


class Sense(_Recon):
    """CG-SENSE with sensitivity maps."""

    name = "sense"
    reads = ("kspace", "maps")
    description = "CG-SENSE (Pruessmann 2001) with optional Tikhonov regularisation, torch, batched slices"
    params = _COMMON_RECON + (
        max_iter(30, range=(1, 10000), aliases=ITERATIONS, doc="maximum CG iterations"),
        tol(1e-6, range=(0.0, 1.0), doc="relative residual to stop at (0: run all iterations)"),
        lam(0.0, range=(0.0, 1e6), doc="Tikhonov weight (normalised data: image max ~1)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .sense import cg_sense

        x, _ = cg_sense(y, maps, mask, p.max_iter, p.tol, p.lam, log=ctx.log)
        return x


class CSWavelet(_Recon):
    """L1-wavelet compressed sensing (FISTA / POGM)."""

    name = "cs_wavelet"
    reads = ("kspace", "maps")
    description = "L1-wavelet CS-SENSE with FISTA or POGM (orthogonal wavelets from PyWavelets / ptwt)"
    params = _COMMON_RECON + (
        lam(0.002, range=(0.0, 1e3), doc="L1 weight (normalised data: image max ~1)"),
        max_iter(30, range=(1, 10000), aliases=ITERATIONS, doc="solver iterations"),
        Param("solver", str, "fista", choices=("fista", "pogm"), doc="proximal gradient method"),
        Param("restart", bool, True, doc="gradient restart of the momentum (O'Donoghue & Candes)"),
        Param("wavelet", str, "db4", doc="orthogonal wavelet (PyWavelets name)"),
        Param("levels", int, 4, range=(1, 10), doc="decomposition levels"),
        Param("backend", str, "auto", choices=("auto", "torch", "pywt", "ptwt"), doc="wavelet implementation (auto = torch: periodic DWT with PyWavelets' periodization coefficients, CPU or CUDA; pywt: the same; ptwt: boundary wavelets)"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def reconstruct(self, y, maps, mask, p, ctx):
        from .cs import cs_wavelet

        return cs_wavelet(y, maps, mask, p.lam, p.max_iter, p.solver, p.wavelet, p.levels, p.backend,
                          p.restart, log=ctx.log)
