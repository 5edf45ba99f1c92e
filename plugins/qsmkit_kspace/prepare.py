"""``qsmkit kspace prepare``: fastMRI / skm-tea files -> 320 x 320 training data, cropped in image space.

The recipe (as research groups prepare fastMRI brain/knee data for learned and score-based
reconstruction, e.g. the HFS-SDE authors with BART), per slice:

1. inverse centred FFT of the multi-coil k-space to coil images;
2. centre crop of the coil images in IMAGE space to ``crop`` (default 320 x 320). A centre crop
   of k-space would keep only the low frequencies: a low-resolution image with the wrong field
   of view (for fastMRI's 2x oversampled readout, half the object folds in);
3. ESPIRiT coil maps (:func:`.espirit.espirit_maps`, ``calib`` x ``calib`` calibration region,
   default 24 x 24) estimated from the cropped coil images' k-space;
4. multi-coil k-space re-synthesised on the ``crop`` grid: the centred FFT of the cropped coil
   images (``resynthesis="coils"``, exact: its zero-filled RSS is the cropped reference) or of
   the maps times the coil-combined image ``S_c sum_c' conj(S_c') x_c'`` (``"maps"``: the part
   of the data the maps explain);
5. normalisation: everything is divided by the maximum of the coil-combined (RSS) image of the
   slice (never each coil's k-space on its own: relative coil intensities are kept); the
   factor is saved (``scale``);
6. an undersampling mask on the new grid (``random`` / ``equispaced`` columns as fastMRI, or a
   2D ``poisson`` disc; ``none``: all ones), saved next to the fully sampled k-space.

Outputs in ``out`` (each file written atomically):

- per slice ``<stem>_<slice>_kspace.npy``, ``_maps.npy``, ``_mask.npy`` (and ``_target.npy``, the
  normalised RSS image). Axis orders follow the research layouts: fastMRI files give
  ``kspace``/``maps`` as ``(coil, H, W)``, skm-tea files ``(H, W, coil)`` (``axes`` overrides);
  masks ``(H, W)``; complex64 / float32;
- ``<stem>_prepared.h5``: datasets ``kspace`` and ``maps`` (slices first, then the same axes),
  ``mask`` (H, W), ``target`` (slices, H, W), ``scale`` (slices,), ``slice_index``; attributes
  ``layout``, ``axes``, ``crop``, ``calib``, ``source``, ``resynthesis``, ``normalisation``.

fastMRI ``H`` is the readout (the image rows), ``W`` the phase encoding; skm-tea ``(H, W)`` are
``(y, z)`` of one readout position ``x`` (its k-space is stored hybrid, inverse-FFT'd along x).
Widths vary between fastMRI files (368, 372, ...): any size at least ``crop`` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qsmkit.errors import InputDataError, ParameterError

from .transforms import fft2c_np, ifft2c_np

__all__ = ["detect_layout", "prepare_slice", "prepare_file", "AXES"]

#: per-slice axis orders of the outputs
AXES = {"fastmri": "(coil, H, W)", "skmtea": "(H, W, coil)"}


def detect_layout(path: str | Path) -> str:
    """``"fastmri"`` (multi-coil ``kspace`` (slices, coils, H, W)) or ``"skmtea"`` (``kspace`` (x, ky, kz,
    echo, coil)); a one-line error for anything else."""
    import h5py

    from .fastmri import open_h5

    path = Path(path)
    with open_h5(path, "k-space file") as f:
        ds = f.get("kspace")
        nd = ds.ndim if isinstance(ds, h5py.Dataset) else None
        if nd == 4 and ds.dtype.kind in "cf":
            return "fastmri"
        if nd == 5 and ds.dtype.kind == "c":
            return "skmtea"
        have = ", ".join(f"{k} {getattr(f[k], 'shape', '(group)')}" for k in sorted(f.keys())[:5]) or "nothing"
        raise InputDataError(f"{path.name} is neither a fastMRI multi-coil file (kspace (slices, coils, H, W)) nor an "
                             f"skm-tea file (kspace (x, ky, kz, echo, coil)); it holds {have}")


def _check_geometry(name: str, shape: Sequence[int], crop: Sequence[int], calib: Sequence[int],
                    sampled: np.ndarray) -> None:
    from .masks import fully_sampled_center

    H, W = int(shape[0]), int(shape[1])
    ch, cw = int(crop[0]), int(crop[1])
    if ch > H or cw > W:
        raise ParameterError(f"crop {ch}x{cw} is larger than the {H}x{W} image of {name}; "
                             f"choose --crop at most {H} {W}")
    if int(calib[0]) > ch or int(calib[1]) > cw:
        raise ParameterError(f"calibration region {calib[0]}x{calib[1]} is larger than the crop {ch}x{cw}; "
                             f"lower --calib")
    fh, fw = fully_sampled_center(sampled, (H, W), max_size=(int(calib[0]), int(calib[1])))
    if fh < int(calib[0]) or fw < int(calib[1]):
        raise InputDataError(f"{name}: calibration region {calib[0]}x{calib[1]} is larger than the fully sampled "
                             f"k-space centre ({fh}x{fw}); lower --calib or use fully sampled data")


def _make_mask(kind: str, shape: Sequence[int], acceleration: float, center_fraction: float, seed: int) -> np.ndarray:
    from .masks import equispaced_mask, poisson_disc_mask, random_mask

    H, W = int(shape[0]), int(shape[1])
    if kind == "none":
        return np.ones((H, W), dtype=bool)
    if kind in ("random", "equispaced"):
        fn = random_mask if kind == "random" else equispaced_mask
        col, _, _ = fn(W, [center_fraction], [acceleration], seed=seed)
        return np.broadcast_to(col[None, :], (H, W)).copy()
    if kind == "poisson":
        cal = max(4, int(round(min(H, W) * center_fraction)))
        m, _ = poisson_disc_mask((H, W), acceleration, calib=(cal, cal), seed=seed)
        return np.asarray(m, dtype=bool)
    raise ParameterError(f"mask '{kind}': use none, random, equispaced or poisson")


def prepare_slice(kspace: np.ndarray, crop: Sequence[int] = (320, 320), calib: Sequence[int] = (24, 24),
                  resynthesis: str = "coils", device="cpu", espirit: dict | None = None) -> dict[str, Any]:
    """The recipe for one slice (see the module docstring), in the fastMRI axis order.

    Parameters
    ----------
    kspace : ndarray, complex, (coils, H, W)
        Multi-coil k-space of the slice (DC at ``(H // 2, W // 2)``).
    crop : (h, w)
        Image-space centre crop.
    calib : (int, int)
        ESPIRiT calibration region on the cropped grid.
    resynthesis : str
        ``coils`` (FFT of the cropped coil images) or ``maps`` (FFT of maps x combined image).
    device : str
        Torch device of ESPIRiT.
    espirit : dict, optional
        Further :func:`.espirit.espirit_maps` arguments (kernel, threshold, crop, ...).

    Returns
    -------
    dict
        ``kspace`` (coils, h, w) complex64 normalised, ``maps`` (coils, h, w) complex64,
        ``target`` (h, w) float32 (normalised RSS, max 1), ``scale`` (float: the RSS maximum
        divided out).
    """
    from qsmkit.kspace import center_crop

    from .espirit import espirit_maps

    if resynthesis not in ("coils", "maps"):
        raise ParameterError(f"resynthesis '{resynthesis}': use coils or maps")
    coils = center_crop(ifft2c_np(np.asarray(kspace, dtype=np.complex64)), crop)      # (C, h, w) image space
    k_crop = fft2c_np(np.ascontiguousarray(coils)).astype(np.complex64)
    maps, _ = espirit_maps(k_crop[None], None, calib=tuple(int(c) for c in calib), device=device, **(espirit or {}))
    maps = maps[0, 0]                                                                     # (C, h, w)
    if resynthesis == "maps":
        combined = np.sum(np.conj(maps) * coils, axis=0)
        coils = maps * combined[None]
        k_crop = fft2c_np(np.ascontiguousarray(coils)).astype(np.complex64)
    rss = np.sqrt(np.sum(np.abs(coils) ** 2, axis=0))
    scale = float(rss.max())
    if not scale > 0 or not np.isfinite(scale):
        raise InputDataError("the cropped coil images are all zero (or not finite); check the slice selection")
    return {"kspace": (k_crop / scale).astype(np.complex64), "maps": maps.astype(np.complex64),
            "target": (rss / scale).astype(np.float32), "scale": scale}


def _axes(a: np.ndarray, axes: str) -> np.ndarray:
    """(coil, H, W) -> the requested layout's per-slice axis order."""
    return np.ascontiguousarray(np.moveaxis(a, 0, -1) if axes == "skmtea" else a)


def _save_npy(path: Path, a: np.ndarray) -> None:
    from qsmkit.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, a)


def prepare_file(path: str | Path, out: str | Path, crop: Sequence[int] = (320, 320),
                 calib: Sequence[int] = (24, 24), slices: Any = None, layout: str = "auto", axes: str = "auto",
                 target_key: str = "auto", echo: int = 0, mask: str = "auto", acceleration: float = 4.0,
                 center_fraction: float = 0.08, seed: int = 0, resynthesis: str = "coils", write_npy: bool = True,
                 write_h5: bool = True, device="cpu", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the recipe on every selected slice of one file and write the outputs.

    Parameters
    ----------
    path : str or Path
        fastMRI multi-coil or skm-tea recon HDF5 file.
    out : str or Path
        Output folder (created).
    crop, calib, resynthesis, device
        See :func:`prepare_slice`.
    slices : None, int, list or ``"a:b"``
        Slices (fastMRI) or readout positions x (skm-tea); default all.
    layout : str
        ``auto`` (detected), ``fastmri`` or ``skmtea``.
    axes : str
        Per-slice axis order of the outputs: ``auto`` (the input's layout), ``fastmri``
        ``(coil, H, W)`` or ``skmtea`` ``(H, W, coil)``.
    target_key : str
        fastMRI reference dataset (``auto``: ``reconstruction_rss``); when it has the crop's size,
        it is saved (normalised by the same scale) as ``reference`` in the HDF5 output.
    echo : int
        skm-tea echo.
    mask : str
        ``auto`` (fastMRI: ``random`` columns, skm-tea: ``poisson``), ``random``, ``equispaced``,
        ``poisson`` or ``none``; one mask per file on the crop grid.
    acceleration, center_fraction, seed
        Mask parameters.
    write_npy, write_h5 : bool
        Which outputs to write.

    Returns
    -------
    dict
        ``files`` (written paths), ``slices``, ``layout``, ``axes``, ``scale`` (per slice).
    """
    from qsmkit.progress import progress

    from .kdata import parse_slices

    path, out = Path(path), Path(out)
    crop = (int(crop[0]), int(crop[1]))
    calib = (int(calib[0]), int(calib[1]))
    found = detect_layout(path)
    if layout == "auto":
        layout = found
    elif layout != found:
        raise InputDataError(f"{path.name} is a {found} file, not {layout}; use --format auto")
    axes = layout if axes == "auto" else axes
    if axes not in AXES:
        raise ParameterError(f"axes '{axes}': use auto, fastmri or skmtea")
    if mask == "auto":
        mask = "random" if layout == "fastmri" else "poisson"
    reference = None
    if layout == "fastmri":
        from .fastmri import FastMRIFile

        reader = FastMRIFile(path)
        if not reader.multicoil:
            reader.close()
            raise InputDataError(f"{path.name} is single-coil fastMRI data; the recipe needs multi-coil k-space")
        n_total = reader.n_slices
        shape = reader.image_shape
        key = reader.target_key(target_key)
        read = reader.read_kspace
        if key is not None:
            ref_ds = reader._f[key]
            if tuple(ref_ds.shape[-2:]) == crop:
                reference = lambda i: np.abs(np.asarray(ref_ds[int(i)])).astype(np.float32)  # noqa: E731
    else:
        from .skmtea import SkmTeaFile

        reader = SkmTeaFile(path)
        if not 0 <= int(echo) < reader.n_echoes:
            reader.close()
            raise ParameterError(f"echo = {echo} but {path.name} has {reader.n_echoes} echoes")
        n_total = reader.n_slices
        shape = reader.image_shape
        read = lambda idx: reader.read_kspace(idx, int(echo))  # noqa: E731
    try:
        idx = parse_slices(slices, n_total, "--slices")
        first = read([idx[0]])[0]
        _check_geometry(path.name, shape, crop, calib, np.abs(first).sum(0) > 0)
        m = _make_mask(mask, crop, acceleration, center_fraction, seed)
        stem = path.stem
        out.mkdir(parents=True, exist_ok=True)
        ks, mp, tg, sc, refs = [], [], [], [], []
        written: list[Path] = []
        for i in progress(idx, f"prepare {path.name}", total=len(idx), unit="slice"):
            k = first if i == idx[0] else read([i])[0]
            r = prepare_slice(k, crop, calib, resynthesis, device)
            ks.append(_axes(r["kspace"], axes))
            mp.append(_axes(r["maps"], axes))
            tg.append(r["target"])
            sc.append(r["scale"])
            if reference is not None:
                refs.append(reference(i) / r["scale"])
            if write_npy:
                for name, a in (("kspace", ks[-1]), ("maps", mp[-1]), ("mask", m), ("target", tg[-1])):
                    p = out / f"{stem}_{i:03d}_{name}.npy"
                    _save_npy(p, a)
                    written.append(p)
        if write_h5:
            import h5py

            from qsmkit.io.atomic import atomic_path

            h5 = out / f"{stem}_prepared.h5"
            with atomic_path(h5) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.create_dataset("kspace", data=np.stack(ks), chunks=(1,) + ks[0].shape)
                    f.create_dataset("maps", data=np.stack(mp), chunks=(1,) + mp[0].shape)
                    f.create_dataset("mask", data=m)
                    f.create_dataset("target", data=np.stack(tg))
                    f.create_dataset("scale", data=np.asarray(sc, dtype=np.float64))
                    f.create_dataset("slice_index", data=np.asarray(idx, dtype=np.int64))
                    if refs:
                        f.create_dataset("reference", data=np.stack(refs).astype(np.float32))
                    f.attrs.update({"layout": layout, "axes": AXES[axes], "crop": crop, "calib": calib,
                                    "source": str(path), "resynthesis": resynthesis, "mask": mask,
                                    "acceleration": float(acceleration),
                                    "normalisation": "divided by the max of the slice's RSS image"})
            written.append(h5)
    finally:
        reader.close()
    if log:
        log(f"{path.name}: {len(idx)} slice(s) {shape[0]}x{shape[1]} -> {crop[0]}x{crop[1]} ({layout}, axes "
            f"{AXES[axes]}), {len(written)} file(s) in {out}")
    return {"files": written, "slices": idx, "layout": layout, "axes": AXES[axes], "scale": sc}
