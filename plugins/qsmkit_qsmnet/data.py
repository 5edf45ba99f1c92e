"""Training data of QSMnet: chi maps, the published augmentation, patches with ~66 % overlap.

Sources (Yoon et al. 2018 train on COSMOS maps; qsmkit adds simulated heads):

* simulated heads (:func:`qsmkit.simulate.simulate_susceptibility`), each with its own anatomy
  seed, cortical folding scale, head size/shape, head rotation, tissue chi values and lesion mix
  (a haematoma at random and extra random ellipsoidal lesions), so that the network does not
  learn one anatomy;
* the user's chi NIfTI files (e.g. COSMOS maps, ppm) with their masks: the fine-tuning path.
  They are resampled to the training frame (:mod:`.frame`) when their voxels differ.

Every epoch (seeded by ``(seed, epoch)``), each head used is rotated by angles drawn uniformly in
``[-rotation_deg, rotation_deg]`` about the two axes perpendicular to B0 (the published
augmentation, +-30 deg), flipped at random along each axis (the dipole kernel is even), and
dipole-convolved (core :class:`~qsmkit.operators.Dipole`, B0 along axis 3) to make its input
field; patches are drawn from a grid with the published ~66 % overlap between neighbours and kept
when at least ``min_mask_fraction`` of their voxels lie in the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

from qsmkit.errors import ConfigError
from qsmkit.operators import Dipole
from qsmkit.simulate import TISSUES, simulate_susceptibility

from .patches import tile_starts
from .prior import closed_form_prior

__all__ = ["Head", "simulated_heads", "nifti_heads", "augment", "head_patches", "epoch_patches",
           "normalisation_stats"]

#: tissues whose chi is varied per simulated head (air, bone and scalp lie outside the mask)
_VARIED = ("grey_matter", "white_matter", "globus_pallidus", "putamen", "caudate", "red_nucleus",
           "substantia_nigra", "vein", "calcification", "haemorrhage", "thalamus")


@dataclass
class Head:
    """One training chi map (ppm) with its mask, at the training resolution, B0 along axis 3."""

    chi: np.ndarray
    mask: np.ndarray
    name: str


def _ellipsoid_lesions(chi: np.ndarray, mask: np.ndarray, rng: np.random.Generator, n: int,
                       chi_range: Sequence[float], radius_mm: Sequence[float], voxel_size: Sequence[float]) -> None:
    """Add ``n`` random ellipsoids (random chi in ``chi_range``) centred at random mask voxels, in place."""
    idx = np.argwhere(mask)
    if n <= 0 or idx.size == 0:
        return
    vs = np.asarray(voxel_size, np.float64)
    for _ in range(n):
        c = idx[rng.integers(len(idx))]
        r = rng.uniform(radius_mm[0], radius_mm[1], 3) / vs
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, chi.shape)
        g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r)) <= 1.0
        inside &= mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        chi[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = np.float32(rng.uniform(*chi_range))


def simulated_heads(cfg: Mapping, n: int, seed: int, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    log=None) -> list[Head]:
    """``n`` randomised simulated heads (anatomy seeds ``seed, seed + 1, ...``) per the ``data`` config."""
    heads = []
    for i in range(int(n)):
        s = int(seed) + i
        rng = np.random.default_rng([s, 7])
        shape = tuple(int(rng.integers(cfg["size_min"], cfg["size_max"] + 1)) for _ in range(3))
        chi_over = {t: float(TISSUES[t][0] * rng.uniform(1 - cfg["chi_jitter"], 1 + cfg["chi_jitter"]))
                    for t in _VARIED}
        out = simulate_susceptibility(
            shape, voxel_size, rotation_deg=tuple(rng.uniform(-1, 1, 3) * cfg["head_rotation_deg"]),
            oversample=int(cfg["oversample"]), anatomy_seed=s,
            gyral_period=float(rng.uniform(*cfg["gyral_period"])),
            fov_fraction=float(rng.uniform(*cfg["fov_fraction"])), chi_overrides=chi_over,
            haemorrhage=bool(rng.random() < cfg["haemorrhage_probability"]))
        chi, mask = out["chi"].data.astype(np.float32), out["mask"].data.astype(bool)
        nl = int(rng.integers(cfg["lesions"][0], cfg["lesions"][1] + 1))
        _ellipsoid_lesions(chi, mask, rng, nl, cfg["lesion_chi"], cfg["lesion_radius_mm"], voxel_size)
        heads.append(Head(chi, mask, f"simulated anatomy_seed={s} shape={shape} lesions={nl}"))
        if log is not None:
            log(f"qsmnet data: {heads[-1].name}")
    return heads


def nifti_heads(chi_files: Sequence[str], mask_files: Sequence[str], voxel_size: Sequence[float]) -> list[Head]:
    """The user's chi maps (NIfTI, ppm) and masks, in the training frame (resampled when needed)."""
    from qsmkit.io import load_nifti

    from .frame import to_frame, training_frame

    if len(chi_files) != len(mask_files):
        raise ConfigError(f"data.chi_files has {len(chi_files)} files but data.mask_files has {len(mask_files)}; "
                          f"give one mask per chi map")
    heads = []
    for cf, mf in zip(chi_files, mask_files):
        chi, mask = load_nifti(cf, "chi", "ppm"), load_nifti(mf, "mask")
        if chi.grid_shape != mask.grid_shape:
            raise ConfigError(f"{cf} and {mf} have different grids ({chi.grid_shape} vs {mask.grid_shape})")
        fr = training_frame(mask.data, chi.affine, chi.b0_direction, voxel_size)
        c, m = to_frame(chi.data, mask.data, chi.affine, fr)
        heads.append(Head(c.astype(np.float32), m.astype(bool), str(cf)))
    return heads


def _rotation(ax_deg: float, ay_deg: float) -> np.ndarray:
    ax, ay = np.radians(ax_deg), np.radians(ay_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


def augment(head: Head, rng: np.random.Generator, rotation_deg: float, flip: bool = True) -> Head:
    """The head rotated about the axes perpendicular to B0 (axes 1, 2) by ``U(-r, r)`` deg each, and flipped."""
    chi, mask = head.chi, head.mask
    if rotation_deg > 0:
        r = _rotation(*rng.uniform(-rotation_deg, rotation_deg, 2))
        c = (np.asarray(chi.shape, np.float64) - 1) / 2
        off = c - r @ c
        chi = ndimage.affine_transform(chi, r, off, order=1, mode="constant", cval=0.0, prefilter=False)
        mask = ndimage.affine_transform(mask.astype(np.float32), r, off, order=1, mode="constant", cval=0.0,
                                        prefilter=False) >= 0.5
        chi = np.where(mask, chi, np.float32(0)).astype(np.float32)
    if flip:
        for ax in range(3):
            if rng.random() < 0.5:
                chi, mask = np.flip(chi, ax), np.flip(mask, ax)
    return Head(np.ascontiguousarray(chi), np.ascontiguousarray(mask), head.name)


def head_inputs(head: Head, voxel_size: Sequence[float], residual: bool, threshold: float,
                noise: float = 0.0, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The input field (ppm) of a chi map (core dipole convolution, B0 along axis 3) and, with
    ``residual``, the closed-form prior."""
    field = Dipole(head.chi.shape, voxel_size, (0.0, 0.0, 1.0), padding=1.5).apply(head.chi)
    if noise > 0 and rng is not None:
        field = field + rng.normal(0.0, noise, field.shape).astype(np.float32)
    field = np.where(head.mask, field, np.float32(0)).astype(np.float32)
    prior = closed_form_prior(field, head.mask, voxel_size, (0.0, 0.0, 1.0), threshold) if residual else None
    return field, prior


def head_patches(mask: np.ndarray, size: int, overlap: float, min_fraction: float) -> list[tuple[slice, ...]]:
    """Patch slices on the grid with ``overlap`` between neighbours, within the mask's bounding box,
    holding at least ``min_fraction`` mask voxels."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return []
    lo, hi = idx.min(0), idx.max(0) + 1
    out = []
    starts = []
    for a in range(3):
        n = int(hi[a] - lo[a])
        if n < size:  # centre one patch on the box, clipped to the volume
            s0 = int(np.clip(lo[a] - (size - n) // 2, 0, max(0, mask.shape[a] - size)))
            starts.append([s0])
        else:
            starts.append([int(lo[a]) + s for s in tile_starts(n, size, overlap)])
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                sl = (slice(a, a + size), slice(b, b + size), slice(c, c + size))
                sub = mask[sl]
                if sub.shape == (size,) * 3 and sub.mean() >= min_fraction:
                    out.append(sl)
    return out


def normalisation_stats(heads: Sequence[Head], voxel_size: Sequence[float]) -> dict:
    """Scales of the network's input and output: RMS of the field and of chi over the masks."""
    fs, cs, n = 0.0, 0.0, 0
    for h in heads:
        f, _ = head_inputs(h, voxel_size, False, 0.15)
        fs += float(np.sum(f[h.mask].astype(np.float64) ** 2))
        cs += float(np.sum(h.chi[h.mask].astype(np.float64) ** 2))
        n += int(h.mask.sum())
    if n == 0:
        raise ConfigError("qsmnet: the training masks are empty")
    return {"field_scale": float(np.sqrt(fs / n)), "chi_scale": float(np.sqrt(cs / n))}


def epoch_patches(heads: Sequence[Head], rng: np.random.Generator, cfg: Mapping, norm: Mapping,
                  voxel_size: Sequence[float], residual: bool, threshold: float) -> Iterator[tuple]:
    """The patches of one epoch: ``(x (C, p, p, p), chi (1, p, p, p), mask (1, p, p, p))`` float32
    (normalised), in a random order."""
    k = min(int(cfg["heads_per_epoch"]), len(heads))
    chosen = rng.choice(len(heads), size=k, replace=False)
    per_head = int(np.ceil(int(cfg["patches_per_epoch"]) / k))
    size = int(cfg["patch"])
    items = []
    fsc, csc = float(norm["field_scale"]), float(norm["chi_scale"])
    for j in chosen:
        h = augment(heads[int(j)], rng, float(cfg["rotation_deg"]))
        field, prior = head_inputs(h, voxel_size, residual, threshold, float(cfg["noise"]), rng)
        sls = head_patches(h.mask, size, float(cfg["overlap"]), float(cfg["min_mask_fraction"]))
        if not sls:
            continue
        pick = rng.choice(len(sls), size=min(per_head, len(sls)), replace=False)
        for p in pick:
            sl = sls[int(p)]
            chans = [field[sl] / fsc] + ([prior[sl] / csc] if residual else [])
            items.append((np.stack(chans).astype(np.float32), (h.chi[sl] / csc)[None].astype(np.float32),
                          h.mask[sl][None].astype(np.float32)))
    order = rng.permutation(len(items))
    for i in order[: int(cfg["patches_per_epoch"])]:
        yield items[int(i)]
