"""Simulated multi-coil k-space with ground truth, and small files in the fastMRI / skm-tea layouts.

The object and its coils (a 3D Shepp-Logan-like phantom, loop-coil sensitivities by the
Biot-Savart law, complex Gaussian noise white in k-space) are simulated by :mod:`.multicoil`,
whose names are re-exported here.

:func:`simulate_kspace_files` writes:

- ``fastmri_multicoil.h5``: fastMRI training/validation layout (``kspace`` (slices, coils, H, W)
  with a 2x oversampled readout and zero padding columns, ``reconstruction_rss``,
  ``ismrmrd_header``, attributes ``max``, ``norm``, ``acquisition``, ``patient_id``);
- ``fastmri_multicoil_test.h5``: test/challenge layout (undersampled ``kspace``, ``mask``,
  attributes ``acceleration`` and ``num_low_frequencies``, no reference);
- ``fastmri_singlecoil.h5``: single-coil layout (``kspace`` (slices, H, W), ``reconstruction_esc``);
- ``skmtea.h5``: skm-tea recon layout (hybrid ``kspace`` (x, ky, kz, echo, coil), ``maps``,
  ``target``, ``masks/poisson_{acc}x`` stored at the smaller acquired matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .multicoil import loop_coil_sensitivities, shepp_logan_3d, simulate_multicoil
from .transforms import fft2c_np, ifft2c_np

__all__ = ["shepp_logan_3d", "loop_coil_sensitivities", "simulate_multicoil", "simulate_kspace_files",
           "ismrmrd_header_xml"]


def ismrmrd_header_xml(enc_size: Sequence[int], recon_size: Sequence[int], enc_fov: Sequence[float],
                       recon_fov: Sequence[float], center: int, maximum: int) -> str:
    """A minimal ISMRMRD XML header with the fields fastMRI reads."""
    def xyz(tag: str, vals) -> str:
        return f"<{tag}><x>{vals[0]}</x><y>{vals[1]}</y><z>{vals[2]}</z></{tag}>"

    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        "<experimentalConditions><H1resonanceFrequency_Hz>127730000</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding>"
        f"<encodedSpace>{xyz('matrixSize', enc_size)}{xyz('fieldOfView_mm', enc_fov)}</encodedSpace>"
        f"<reconSpace>{xyz('matrixSize', recon_size)}{xyz('fieldOfView_mm', recon_fov)}</reconSpace>"
        "<trajectory>cartesian</trajectory>"
        "<encodingLimits>"
        f"<kspace_encoding_step_0><minimum>0</minimum><maximum>{enc_size[0] - 1}</maximum><center>{enc_size[0] // 2}</center></kspace_encoding_step_0>"
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{maximum}</maximum><center>{center}</center></kspace_encoding_step_1>"
        "</encodingLimits></encoding></ismrmrdHeader>"
    )


def _write_h5(path: Path, write) -> Path:
    import h5py

    from qsmkit.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f)
    return path


@dataclass
class _FastMRIVolume:
    """The simulated multi-coil volume the three fastMRI-layout files are written from."""

    kspace: np.ndarray          # (slices, coils, H, W) complex64, padding columns zero
    sens: np.ndarray            # (slices, coils, H, W) normalised coil sensitivities
    header: str                 # ISMRMRD XML header
    crop: tuple[slice, slice]   # the recon matrix (reference image) inside (H, W)
    pad: tuple[int, int]        # fastMRI padding columns (not acquired) on the left and the right


def _zero_padding(a: np.ndarray, pad: tuple[int, int]) -> None:
    """Zero (in place) the ``pad = (left, right)`` padding columns of the last axis."""
    pad_l, pad_r = pad
    a[..., :pad_l] = 0
    a[..., a.shape[-1] - pad_r:] = 0


def _fastmri_volume(matrix, n_slices: int, n_coils: int, pixel_mm: float, slice_mm: float, noise: float,
                    seed: int) -> _FastMRIVolume:
    """fastMRI k-space ``(slices, coils, 2 mx, W)`` of the phantom with its padding and ISMRMRD header."""
    mx, my = (int(v) for v in matrix)
    H = 2 * mx
    W = my + my // 8
    W += W % 2
    pad = (2, 1)
    sim = simulate_multicoil((n_slices, H, W), n_coils, extent=(2.0, W / my, 0.6), noise=noise, seed=seed)
    k = sim["kspace"]
    _zero_padding(k, pad)
    h0, w0 = (H - mx) // 2, (W - my) // 2
    center = W // 2 - pad[0]
    maximum = W - pad[1] - pad[0] - 1
    header = ismrmrd_header_xml((H, W, 1), (mx, my, 1), (H * pixel_mm, W * pixel_mm, slice_mm),
                                (mx * pixel_mm, my * pixel_mm, slice_mm), center, maximum)
    return _FastMRIVolume(k, sim["sens"], header, (slice(h0, h0 + mx), slice(w0, w0 + my)), pad)


def _fastmri_common(f, vol: _FastMRIVolume, name: str) -> None:
    """What every fastMRI-layout file holds: the ISMRMRD header, ``acquisition`` and ``patient_id``."""
    f.create_dataset("ismrmrd_header", data=np.bytes_(vol.header.encode()))
    f.attrs["acquisition"] = "CORPD_FBK"
    f.attrs["patient_id"] = f"sim-{name}"


def _write_fastmri_train(path: Path, vol: _FastMRIVolume) -> Path:
    """Training/validation layout: full ``kspace``, ``reconstruction_rss``, ``max`` and ``norm``."""
    k = vol.kspace
    rss_full = np.sqrt(np.sum(np.abs(ifft2c_np(k)) ** 2, axis=1)).astype(np.float32)
    recon_rss = rss_full[:, vol.crop[0], vol.crop[1]]

    def write(f):
        f.create_dataset("kspace", data=k, chunks=(1,) + k.shape[1:])
        f.create_dataset("reconstruction_rss", data=recon_rss)
        _fastmri_common(f, vol, "train")
        f.attrs["max"] = float(recon_rss.max())
        f.attrs["norm"] = float(np.linalg.norm(recon_rss))

    return _write_h5(path, write)


def _write_fastmri_test(path: Path, vol: _FastMRIVolume, acc: float) -> Path:
    """Test/challenge layout: equispaced-undersampled ``kspace``, ``mask``, ``acceleration``, no reference."""
    from .masks import equispaced_mask, fastmri_seed

    k = vol.kspace
    col, nlow, _ = equispaced_mask(k.shape[-1], [0.08], [acc], seed=fastmri_seed(path.name))
    _zero_padding(col, vol.pad)

    def write(f):
        f.create_dataset("kspace", data=(k * col[None, None, None, :]).astype(np.complex64), chunks=(1,) + k.shape[1:])
        f.create_dataset("mask", data=col)
        _fastmri_common(f, vol, "test")
        f.attrs["acceleration"] = int(round(acc))
        f.attrs["num_low_frequencies"] = int(nlow)

    return _write_h5(path, write)


def _write_fastmri_singlecoil(path: Path, vol: _FastMRIVolume) -> Path:
    """Single-coil layout: the emulated single-coil combination (sensitivity-weighted coil sum)."""
    sc_img = np.sum(np.conj(vol.sens) * ifft2c_np(vol.kspace), axis=1)
    sc_k = fft2c_np(sc_img).astype(np.complex64)
    _zero_padding(sc_k, vol.pad)
    esc = np.abs(ifft2c_np(sc_k))[:, vol.crop[0], vol.crop[1]].astype(np.float32)

    def write(f):
        f.create_dataset("kspace", data=sc_k)
        f.create_dataset("reconstruction_esc", data=esc)
        _fastmri_common(f, vol, "singlecoil")
        f.attrs["max"] = float(esc.max())
        f.attrs["norm"] = float(np.linalg.norm(esc))

    return _write_h5(path, write)


def _skmtea_data(skmtea_shape, n_coils: int, noise: float, seed: int):
    """skm-tea arrays of a 3D object with 2 echoes: ``(kspace (x, ky, kz, echo, coil), maps (x, y, z,
    coil, 1), target (x, y, z, echo, 1), acquired (ky, kz) matrix)``; k-space outside the acquired box is zero."""
    X, Y, Z = (int(v) for v in skmtea_shape)
    acq = (Y - Y // 8, Z - Z // 4)
    echoes = [simulate_multicoil((X, Y, Z), n_coils, extent=(1.15, 1.15, 1.3), noise=noise, seed=seed + e,
                                 contrast=0.6 * e) for e in range(2)]
    ay0, az0 = (Y - acq[0]) // 2, (Z - acq[1]) // 2
    box = np.zeros((Y, Z), dtype=bool)
    box[ay0:ay0 + acq[0], az0:az0 + acq[1]] = True
    ks = np.stack([e["kspace"] * box for e in echoes], axis=-1)  # (x, C, ky, kz, echo)
    ks = np.transpose(ks, (0, 2, 3, 4, 1)).astype(np.complex64)  # (x, ky, kz, echo, coil)
    maps = np.transpose(echoes[0]["sens"], (0, 2, 3, 1))[..., None].astype(np.complex64)  # (x, y, z, coil, 1)
    tgt = []
    for e in range(2):
        coil_img = ifft2c_np(np.transpose(ks[..., e, :], (0, 3, 1, 2)))  # (x, C, y, z)
        tgt.append(np.sum(np.conj(echoes[0]["sens"]) * coil_img, axis=1))
    target = np.stack(tgt, axis=-1)[..., None].astype(np.complex64)  # (x, y, z, echo, 1)
    return ks, maps, target, acq


def _write_skmtea(path: Path, skmtea_shape, n_coils: int, accelerations, noise: float, seed: int) -> Path:
    """skm-tea recon layout: hybrid ``kspace``, ``maps``, ``target`` and ``masks/poisson_{acc}x`` at the
    acquired matrix."""
    from .masks import poisson_disc_mask

    ks, maps, target, acq = _skmtea_data(skmtea_shape, n_coils, noise, seed)

    def write(f):
        f.create_dataset("kspace", data=ks, chunks=(1,) + ks.shape[1:])
        f.create_dataset("maps", data=maps, chunks=(1,) + maps.shape[1:])
        f.create_dataset("target", data=target)
        g = f.create_group("masks")
        f_cal = np.sqrt(0.5 / max(max(accelerations), 1.0))  # calibration box <= half the samples
        cal = tuple(int(min(24, max(4, round(a * f_cal)))) for a in acq)
        for a in accelerations:
            m, _ = poisson_disc_mask(acq, float(a), calib=cal, seed=seed)
            g.create_dataset(f"poisson_{float(a)}x", data=m)

    return _write_h5(path, write)


def simulate_kspace_files(out_dir: str | Path, matrix: Sequence[int] = (64, 96), n_slices: int = 4,
                          n_coils: int = 12, pixel_mm: float = 0.5, slice_mm: float = 3.0,
                          skmtea_shape: Sequence[int] = (12, 64, 40), accelerations: Sequence[float] = (4.0, 8.0),
                          noise: float = 0.002, seed: int = 0) -> dict[str, Path]:
    """Write small multi-coil files in the fastMRI and skm-tea layouts from the phantom.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created).
    matrix : (mx, my)
        fastMRI recon matrix (the reference image size); k-space is ``(2 mx, W)`` with a 2x
        oversampled readout and ``W = my + my // 8`` phase columns (the outermost 2 left and 1
        right are not acquired: fastMRI padding).
    n_slices, n_coils : int
        Slices and coils of the fastMRI files (and coils of the skm-tea file).
    pixel_mm, slice_mm : float
        In-plane pixel and slice thickness in mm written to the ISMRMRD header.
    skmtea_shape : (x, y, z)
        skm-tea grid (readout positions, ky, kz).
    accelerations : floats
        Poisson-disc masks written to the skm-tea file (``masks/poisson_{acc}x``) and the
        acceleration of the fastMRI test file (the first one).
    noise : float
        Relative complex k-space noise (see :func:`simulate_multicoil`).
    seed : int
        Seed of phase, noise and masks.

    Returns
    -------
    dict[str, Path]
        ``fastmri``, ``fastmri_test``, ``fastmri_singlecoil``, ``skmtea``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vol = _fastmri_volume(matrix, n_slices, n_coils, pixel_mm, slice_mm, noise, seed)
    acc = float(accelerations[0]) if accelerations else 4.0
    return {"fastmri": _write_fastmri_train(out / "fastmri_multicoil.h5", vol),
            "fastmri_test": _write_fastmri_test(out / "fastmri_multicoil_test.h5", vol, acc),
            "fastmri_singlecoil": _write_fastmri_singlecoil(out / "fastmri_singlecoil.h5", vol),
            "skmtea": _write_skmtea(out / "skmtea.h5", skmtea_shape, n_coils, accelerations, noise, seed)}
