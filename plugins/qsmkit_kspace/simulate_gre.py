"""Simulated multi-coil multi-echo 3D GRE k-space of the qsmkit head phantom, with its ground truth.

The object is the noise-free complex multi-echo signal of :func:`qsmkit.simulate.simulate_phantom`
(``snr=None``): ``M0 exp(-TE/T2*) exp(i (phi0 + omega TE))`` with the phantom's susceptibility
truth. Each coil sees it through a receive sensitivity ``S_c(x)``: the field ``B_x - i B_y`` of
a circular loop (Biot-Savart, :func:`.multicoil.loop_coil_sensitivities`), the loops spread
around the head on a cylinder along the world z axis, times a random constant phase per coil
(cable / receiver phase), so magnitude and phase vary across the head and between coils. The
sensitivities are computed on a coarse grid (smooth fields) and interpolated (cubic).

k-space: ``k[e, c] = fftnc(S_c * s_e)`` over the three image axes (core centred orthonormal
FFT), plus complex Gaussian noise white in k-space (so white in image space) of standard
deviation ``sigma`` per real/imaginary channel and coil, with
``sigma = mean_brain(|s_1| ||S(x)||) / snr``: ``snr`` is the first-echo brain SNR of the
optimally combined image. The *coil-free* references (what the QSM pipeline is compared with):
``coil_free``, the noisy coil images combined with the true sensitivities (the same noise
realisation, so only the reconstruction and combination differ), and ``coil_free_uniform``,
the object with independent image-space noise of ``mean_brain(|s_1|) / snr`` (the phantom's
own noise model: the same mean SNR, but uniform instead of following the coil profile).

:func:`simulate_gre_files` writes ``gre_kspace.h5`` (:mod:`.gre_io` layout, with noise samples
for prewhitening), the truth (``chi``, ``local_field``, ``total_field``, ``mask``, ``labels``
NIfTI), the coil-free references ``coilfree[_uniform]_magnitude.nii.gz`` / ``coilfree[_uniform]_phase.nii.gz`` and
``simulate_gre.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit import fft as qfft
from qsmkit.errors import ParameterError

__all__ = ["GreSimulation", "coil_sensitivities_3d", "simulate_gre", "simulate_gre_files", "GRE_SIM_FILES"]

#: files :func:`simulate_gre_files` writes
GRE_SIM_FILES = frozenset({"gre_kspace.h5", "chi.nii.gz", "local_field.nii.gz", "total_field.nii.gz", "mask.nii.gz",
                           "labels.nii.gz", "coilfree_magnitude.nii.gz", "coilfree_phase.nii.gz",
                           "coilfree_uniform_magnitude.nii.gz", "coilfree_uniform_phase.nii.gz",
                           "simulate_gre.json"})


@dataclass
class GreSimulation:
    """A simulated multi-coil acquisition.

    Attributes
    ----------
    kspace : ndarray, complex64, (echo, coil, kx, ky, kz)
    sens : ndarray, complex64, (coil, x, y, z)
        True sensitivities (not normalised; largest magnitude in the head 1).
    signal : ndarray, complex64, (x, y, z, echo)
        Noise-free coil-free complex images (the truth of the combination).
    coil_free : ndarray, complex64, (x, y, z, echo)
        Coil-free images with the acquisition's own noise: the noisy coil images combined with
        the *true* sensitivities, ``S^H m / S^H S`` (the ideal combination; noise ``sigma / ||S||``).
    coil_free_uniform : ndarray, complex64, (x, y, z, echo)
        The object with independent, spatially uniform image noise of the same mean brain SNR
        (the phantom's own noise model).
    noise : ndarray, complex64, (coil, samples)
        Noise-only samples (a noise prescan).
    sigma : float
        k-space noise standard deviation per channel.
    phantom : qsmkit.simulate.Phantom
        The noise-free phantom (truth, affine, echo times, field strength, phase offset).
    """

    kspace: np.ndarray
    sens: np.ndarray
    signal: np.ndarray
    coil_free: np.ndarray
    coil_free_uniform: np.ndarray
    noise: np.ndarray
    sigma: float
    phantom: Any


def coil_sensitivities_3d(shape: Sequence[int], affine: np.ndarray, n_coils: int, radius_mm: float,
                          seed: int = 0, coarse: int = 20) -> np.ndarray:
    """Loop-coil receive sensitivities on a 3D grid, ``(coil, x, y, z)`` complex64.

    Parameters
    ----------
    shape : 3 ints
        Image grid.
    affine : (4, 4)
        Voxel -> world (mm); the coils surround the grid centre, their cylinder along world z.
    n_coils : int
        Loops (one ring up to 8, then ``ceil(n / 8)`` rings, as :func:`.multicoil.loop_coil_sensitivities`).
    radius_mm : float
        Length unit of the coil geometry (the head's largest in-plane semi-axis): the loops lie on
        a cylinder of radius ``1.35 radius_mm`` and have a radius of ``0.55 radius_mm``.
    seed : int
        Seed of the constant phase of each coil (uniform in [-pi, pi)).
    coarse : int
        Points per axis of the coarse grid the Biot-Savart sum is evaluated on.

    Returns
    -------
    ndarray, complex64: largest magnitude over the grid 1; relative coil intensities kept.
    """
    from scipy.ndimage import map_coordinates

    from .multicoil import loop_coil_sensitivities

    shape = tuple(int(s) for s in shape)
    A = np.asarray(affine, np.float64)
    centre = A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + A[:3, 3]
    cs = [min(s, int(coarse)) for s in shape]
    axes = [np.linspace(0, s - 1, c) for s, c in zip(shape, cs)]
    I, J, K = np.meshgrid(*axes, indexing="ij")
    ijk = np.stack([I.ravel(), J.ravel(), K.ravel()])
    world = (A[:3, :3] @ ijk + A[:3, 3:4]).T - centre[None]
    coarse_s = loop_coil_sensitivities(world / float(radius_mm), int(n_coils)).reshape((n_coils,) + tuple(cs))
    phase = np.exp(1j * np.random.default_rng(seed + 101).uniform(-np.pi, np.pi, n_coils)).astype(np.complex64)
    grid = np.meshgrid(*[np.arange(s) * (c - 1) / max(s - 1, 1) for s, c in zip(shape, cs)], indexing="ij")
    out = np.empty((n_coils,) + shape, dtype=np.complex64)
    for c in range(n_coils):
        re = map_coordinates(coarse_s[c].real, grid, order=3, mode="nearest")
        im = map_coordinates(coarse_s[c].imag, grid, order=3, mode="nearest")
        out[c] = (re + 1j * im) * phase[c]
    return (out / np.abs(out).max()).astype(np.complex64)


def simulate_gre(shape: Sequence[int] = (84, 96, 72), voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
                 n_coils: int = 8, snr: float | None = 100.0, seed: int = 0, noise_samples: int = 2048,
                 **phantom_kw: Any) -> GreSimulation:
    """Simulate multi-coil multi-echo GRE k-space of the head phantom (see the module docstring).

    Parameters
    ----------
    shape, voxel_size
        Grid and voxel size (mm) of the phantom (default a 168 x 192 x 144 mm FOV at 2 mm).
    n_coils : int
        Receive coils (1-64).
    snr : float or None
        First-echo brain SNR of the combined image; ``None`` for noise-free k-space.
    seed : int
        Noise and coil-phase seed.
    noise_samples : int
        Noise-only samples per coil written for prewhitening (0: none).
    **phantom_kw
        Any other :func:`qsmkit.simulate.simulate_phantom` option (``echo_times``,
        ``field_strength``, ``phase_offset``, ``oversample``, ...); its ``snr`` is always None.
    """
    from qsmkit.simulate import simulate_phantom

    if not 1 <= int(n_coils) <= 64:
        raise ParameterError(f"simulate_gre: n_coils must be 1-64, got {n_coils}")
    if snr is not None and not (float(snr) > 0 and np.isfinite(float(snr))):
        raise ParameterError(f"simulate_gre: snr must be positive (or None for no noise), got {snr}")
    ph = simulate_phantom(shape=shape, voxel_size=voxel_size, snr=None, seed=seed, **phantom_kw)
    sig = (ph.magnitude.data * np.exp(1j * ph.phase.data)).astype(np.complex64)  # (x, y, z, echo)
    semi = ph.meta["options"]["head_semi_axes_mm"]
    sens = coil_sensitivities_3d(ph.magnitude.grid_shape, ph.magnitude.affine, int(n_coils),
                                 max(semi[0], semi[1]), seed=seed)
    brain = ph.truth["mask"].data.astype(bool)
    a1 = np.abs(sig[..., 0])
    rng = np.random.default_rng(seed + 7)
    E = sig.shape[-1]
    k = np.empty((E, int(n_coils)) + sig.shape[:3], dtype=np.complex64)
    for e in range(E):
        k[e] = qfft.fftnc(sens * sig[None, ..., e], axes=(1, 2, 3)).astype(np.complex64)
    sigma, coil_free, noise = 0.0, sig.copy(), np.zeros((int(n_coils), 0), np.complex64)
    coil_free_uniform = coil_free
    if snr is not None:
        snorm = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
        sigma = float(np.mean((a1 * snorm)[brain]) / float(snr))
        for e in range(E):  # in place, one echo at a time (memory)
            k[e] += (sigma * (rng.standard_normal(k.shape[1:], dtype=np.float32)
                              + 1j * rng.standard_normal(k.shape[1:], dtype=np.float32))).astype(np.complex64)
        sig_ref = float(np.mean(a1[brain]) / float(snr))
        coil_free_uniform = (sig + sig_ref * (rng.standard_normal(sig.shape, dtype=np.float32)
                                              + 1j * rng.standard_normal(sig.shape, dtype=np.float32))
                             ).astype(np.complex64)
        den = np.maximum(np.sum(np.abs(sens) ** 2, axis=0), 1e-12)
        for e in range(E):  # the acquisition's own noise, combined with the true sensitivities
            coil = qfft.ifftnc(k[e], axes=(1, 2, 3))
            coil_free[..., e] = (np.einsum("cxyz,cxyz->xyz", np.conj(sens), coil) / den).astype(np.complex64)
        if noise_samples:
            noise = (sigma * (rng.standard_normal((int(n_coils), int(noise_samples)))
                              + 1j * rng.standard_normal((int(n_coils), int(noise_samples))))).astype(np.complex64)
    return GreSimulation(kspace=k, sens=sens, signal=sig, coil_free=coil_free, coil_free_uniform=coil_free_uniform,
                         noise=noise, sigma=sigma, phantom=ph)


def simulate_gre_files(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Write ``gre_kspace.h5``, the truth and the coil-free reference to ``out_dir`` (atomically, file by file).

    ``kwargs`` are those of :func:`simulate_gre`. Returns ``{name: path}``.
    """
    from qsmkit.io import save_nifti, write_json

    from .gre_io import write_gre

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim = simulate_gre(**kwargs)
    ph = sim.phantom
    paths: dict[str, Path] = {}
    paths["kspace"] = write_gre(out / "gre_kspace.h5", sim.kspace, ph.echo_times, ph.field_strength,
                                ph.magnitude.affine, ph.meta["b0_direction_world"],
                                noise=sim.noise if sim.noise.size else None,
                                attrs={"generated_by": "qsmkit simulate-kspace --gre"})
    for name in ("chi", "local_field", "total_field", "mask", "labels"):
        paths[name] = save_nifti(ph.truth[name], out / f"{name}.nii.gz")
    te = [float(t) for t in ph.echo_times]
    paths["coilfree_magnitude"] = save_nifti(ph.magnitude.like(np.abs(sim.coil_free).astype(np.float32)),
                                             out / "coilfree_magnitude.nii.gz")
    paths["coilfree_phase"] = save_nifti(ph.phase.like(np.angle(sim.coil_free).astype(np.float32)),
                                         out / "coilfree_phase.nii.gz")
    for tag, img in (("coilfree_uniform", sim.coil_free_uniform),):
        paths[f"{tag}_magnitude"] = save_nifti(ph.magnitude.like(np.abs(img).astype(np.float32)),
                                               out / f"{tag}_magnitude.nii.gz")
        paths[f"{tag}_phase"] = save_nifti(ph.phase.like(np.angle(img).astype(np.float32)), out / f"{tag}_phase.nii.gz")
    opts = {k: v for k, v in kwargs.items()}
    write_json({"generated_by": "qsmkit simulate-kspace --gre", "options": opts, "echo_times": te,
                "field_strength": float(ph.field_strength), "n_coils": int(sim.sens.shape[0]),
                "kspace_noise_sigma": sim.sigma, "phantom": ph.json_dict(),
                "files": sorted(p.name for p in paths.values())}, out / "simulate_gre.json")
    paths["json"] = out / "simulate_gre.json"
    return paths
