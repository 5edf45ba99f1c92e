"""``qsmkit train unet``: the fastMRI U-Net baseline trained on files or on simulated anatomies.

The recipe of ``fastmri_examples/unet`` (Zbontar et al. 2018): the network sees the
root-sum-of-squares of the zero-filled coil images of an undersampled slice, centre-cropped to
the reference's matrix, normalised per image (``(x - mean) / std`` clamped to +-6, the same
mean and std applied to the target) and predicts the normalised fully sampled RSS; the loss is
L1 (optionally plus ``1 - SSIM``, :func:`qsmkit.metrics.ssim_torch`, on the de-normalised
images with the target's maximum as range); RMSprop with lr 1e-3, step decay (step 40, gamma
0.1), 50 epochs, batch 1, and masks drawn afresh for every sample (fastMRI's random masks, 4x,
centre fraction 0.08, by default). Those are the :data:`DEFAULTS`.

Data (``data.source``):

- ``files``: every slice of the fastMRI multi-coil (``kspace`` + ``reconstruction_rss``) or
  skm-tea (``kspace``, ``maps``, ``target``) HDF5 files in ``data.train_dir`` (read slice by slice
  through the plugin's readers, never whole); validation from ``data.val_dir`` (default:
  simulated anatomies);
- ``simulated``: a pool of ``data.simulated.train_slices`` random anatomies
  (:mod:`.anatomies`), of which the fraction ``data.simulated.refresh`` is replaced by new ones
  every epoch (deterministically, so a resumed run draws the same data), validated on
  ``val_slices`` anatomies drawn from ``val_seed`` (never seen in training).

Masks per sample (``masks``): ``types`` (``random``, ``equispaced`` (fastMRI's
``EquispacedMaskFractionFunc``), ``poisson`` (2D variable density, a bank of
``poisson_bank`` masks per shape and acceleration, calibration box ``centre fraction x size``)),
``center_fractions`` and ``accelerations`` (pairs, one drawn per sample as fastMRI does) and
``per_sample`` masked copies of every slice per epoch. Validation masks are fixed (seed = slice
index, types in turn). Per epoch the history records the training loss and the validation
SSIM, PSNR, NMSE (fastMRI definitions, :mod:`.metrics`) of the U-Net and, for reference, of
the zero-filled input.

The checkpoint stores the architecture (``chans``, ``num_pool_layers``, ``drop_prob``) and the
normalisation (``input`` kind, ``clamp``, ``eps``) that ``recon/unet`` applies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qsmkit.errors import ConfigError, InputDataError

__all__ = ["DEFAULTS", "METHOD", "run", "build_model", "MaskSampler"]

METHOD = "unet"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "epochs": 50,
    "batch_size": 1,
    "threads": 0,  # torch CPU threads (0: torch's default)
    "model": {"chans": 32, "num_pool_layers": 4, "drop_prob": 0.0},
    "optim": {"lr": 1e-3, "lr_step_size": 40, "lr_gamma": 0.1, "weight_decay": 0.0},
    "loss": {"l1": 1.0, "ssim": 0.0},
    "masks": {"types": ["random"], "center_fractions": [0.08], "accelerations": [4.0], "per_sample": 1,
              "poisson_bank": 8},
    "normalisation": {"input": "zero_filled", "sense_iterations": 10, "clamp": 6.0, "eps": 1e-11},
    "data": {
        "source": "simulated",  # simulated | files
        "train_dir": "",
        "val_dir": "",
        "format": "auto",  # auto | fastmri | skmtea
        "echo": 0,  # skm-tea echo
        "max_train_slices": 0,  # 0: all
        "max_val_slices": 16,
        "simulated": {"shape": [320, 320], "coils": [4, 16], "noise": [0.002, 0.03], "train_slices": 256,
                      "refresh": 0.25, "val_slices": 16, "val_seed": 1000003},
    },
}

MASK_TYPES = ("random", "equispaced", "poisson")


# ------------------------------------------------------------------------------------ config checks
def _check(config: dict) -> None:
    """Values :func:`qsmkit.training.check_config` cannot judge by type alone."""
    m = config["masks"]
    bad = [t for t in m["types"] if t not in MASK_TYPES]
    if not m["types"] or bad:
        raise ConfigError(f"masks.types {m['types']!r}: choose from {', '.join(MASK_TYPES)}")
    cfs, accs = m["center_fractions"], m["accelerations"]
    if len(cfs) != len(accs) or not cfs:
        raise ConfigError(f"masks: {len(cfs)} center_fractions but {len(accs)} accelerations; "
                          f"give one per acceleration")
    for v in cfs:
        if not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
            raise ConfigError(f"masks.center_fractions value {v!r} must lie in (0, 1)")
    for v in accs:
        if not isinstance(v, (int, float)) or float(v) < 1.0:
            raise ConfigError(f"masks.accelerations value {v!r} must be a number >= 1")
    if m["per_sample"] < 1 or m["poisson_bank"] < 1:
        raise ConfigError("masks.per_sample and masks.poisson_bank must be >= 1")
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[key]}")
    md = config["model"]
    if md["chans"] < 1 or md["num_pool_layers"] < 1 or not 0.0 <= md["drop_prob"] < 1.0:
        raise ConfigError("model: chans and num_pool_layers must be >= 1 and drop_prob in [0, 1)")
    o = config["optim"]
    if o["lr"] <= 0 or o["lr_step_size"] < 1 or not 0 < o["lr_gamma"] <= 1:
        raise ConfigError("optim: lr must be > 0, lr_step_size >= 1 and lr_gamma in (0, 1]")
    lo = config["loss"]
    if lo["l1"] < 0 or lo["ssim"] < 0 or lo["l1"] + lo["ssim"] <= 0:
        raise ConfigError("loss: give non-negative weights l1 and ssim, not both 0")
    nm = config["normalisation"]
    if nm["input"] not in ("zero_filled", "sense"):
        raise ConfigError(f"normalisation.input {nm['input']!r}: choose zero_filled or sense")
    d = config["data"]
    if d["source"] not in ("simulated", "files"):
        raise ConfigError(f"data.source {d['source']!r}: choose simulated or files")
    if d["format"] not in ("auto", "fastmri", "skmtea"):
        raise ConfigError(f"data.format {d['format']!r}: choose auto, fastmri or skmtea")
    if d["source"] == "files" and not d["train_dir"]:
        raise ConfigError("data.source is files: give data.train_dir (a folder of fastMRI or skm-tea .h5 files)")
    s = d["simulated"]
    if len(s["shape"]) != 2 or any(not isinstance(v, int) or v < 16 for v in s["shape"]):
        raise ConfigError(f"data.simulated.shape {s['shape']!r}: give [H, W], each >= 16")
    if 2 ** md["num_pool_layers"] > min(s["shape"]):
        raise ConfigError(f"model.num_pool_layers {md['num_pool_layers']} pools a {s['shape']} image below one pixel")
    if len(s["coils"]) != 2 or len(s["noise"]) != 2:
        raise ConfigError("data.simulated.coils and noise are [low, high] pairs")
    if s["train_slices"] < 1 or s["val_slices"] < 1 or not 0.0 <= s["refresh"] <= 1.0:
        raise ConfigError("data.simulated: train_slices and val_slices >= 1, refresh in [0, 1]")


def build_model(config: dict):
    """The :class:`.unet.Unet` of a (checked) config."""
    from .unet import Unet

    md = config["model"]
    return Unet(1, 1, md["chans"], md["num_pool_layers"], md["drop_prob"])


# ------------------------------------------------------------------------------------ masks
class MaskSampler:
    """Draws one sampling mask per sample: type, (centre fraction, acceleration) pair and seed.

    Column masks (random / equispaced) are fastMRI's for the drawn seed (:mod:`.masks`), zeroed
    outside fastMRI's padding columns; Poisson-disc masks come from a bank of ``bank`` masks per
    (shape, acceleration, centre fraction), built once (seeds 0..bank-1), because one takes
    seconds to make.
    """

    def __init__(self, types, center_fractions, accelerations, bank: int = 8):
        self.types = list(types)
        self.cfs = [float(v) for v in center_fractions]
        self.accs = [float(v) for v in accelerations]
        self.bank = int(bank)
        self._poisson: dict[tuple, np.ndarray] = {}

    def _poisson_mask(self, shape, cf: float, acc: float, index: int) -> np.ndarray:
        from .masks import poisson_disc_mask

        key = (tuple(shape), cf, acc, index)
        if key not in self._poisson:
            calib = tuple(max(4, int(round(cf * s))) for s in shape)
            self._poisson[key], _ = poisson_disc_mask(tuple(shape), acc, calib=calib, seed=index)
        return self._poisson[key]

    def draw(self, shape, rng: np.random.Generator, padding=None, kind: str | None = None,
             seed: int | None = None) -> np.ndarray:
        """A mask for k-space of ``shape = (H, W)``: ``(1, W)`` columns or ``(H, W)`` Poisson, float32."""
        from .masks import apply_padding, equispaced_mask, random_mask

        kind = kind or self.types[int(rng.integers(len(self.types)))]
        seed = int(rng.integers(2 ** 31)) if seed is None else int(seed)
        H, W = int(shape[0]), int(shape[1])
        if kind == "poisson":
            pick = np.random.RandomState(seed).randint(len(self.cfs))
            m = self._poisson_mask((H, W), self.cfs[pick], self.accs[pick], seed % self.bank)
        else:
            fn = random_mask if kind == "random" else equispaced_mask
            col, _, _ = fn(W, self.cfs, self.accs, seed=seed)
            m = apply_padding(col, padding)[None, :]
        return np.asarray(m, dtype=np.float32)


# ------------------------------------------------------------------------------------ data
class _Slice:
    """One fully sampled training slice: k-space (C, H, W), target (h, w), optional maps, padding."""

    __slots__ = ("kspace", "target", "maps", "padding")

    def __init__(self, kspace, target, maps=None, padding=None):
        self.kspace, self.target, self.maps, self.padding = kspace, target, maps, padding


class SimulatedPool:
    """``n`` random anatomies of which a fraction ``refresh`` is replaced every epoch.

    Slot ``j`` at epoch ``e`` holds the anatomy drawn from ``(seed, j, g)`` with generation
    ``g = (e - 1 + j mod P) // P``, ``P = round(1 / refresh)``: every epoch 1/P of the slots
    change, and any epoch's pool can be rebuilt from the seed alone (resume).
    """

    def __init__(self, n: int, shape, coils, noise, seed: int, refresh: float, with_maps: bool):
        self.n, self.shape, self.coils, self.noise = int(n), tuple(shape), tuple(coils), tuple(noise)
        self.seed, self.with_maps = int(seed), bool(with_maps)
        self.period = 0 if refresh <= 0 else max(1, int(round(1.0 / refresh)))
        self._slots: dict[int, tuple[int, _Slice]] = {}

    def generation(self, j: int, epoch: int) -> int:
        return 0 if self.period == 0 else (epoch - 1 + j % self.period) // self.period

    def _make(self, j: int, g: int) -> _Slice:
        from .anatomies import random_multicoil_slice

        d = random_multicoil_slice(np.random.default_rng([self.seed, j, g]), self.shape, self.coils, self.noise)
        return _Slice(d["kspace"], d["target"], d["maps"][None] if self.with_maps else None)

    def get(self, j: int, epoch: int) -> _Slice:
        g = self.generation(j, epoch)
        have = self._slots.get(j)
        if have is None or have[0] != g:
            self._slots[j] = (g, self._make(j, g))
        return self._slots[j][1]

    def __len__(self) -> int:
        return self.n


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f.get("kspace")
            return "skmtea" if ds is not None and ds.ndim == 5 and "maps" in f else "fastmri"
    except OSError as exc:
        raise InputDataError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0][:80]})") from None


class FileSlices:
    """Every slice of the fastMRI multi-coil / skm-tea files in a folder, read one at a time."""

    def __init__(self, folder: str | Path, fmt: str = "auto", echo: int = 0, max_slices: int = 0,
                 with_maps: bool = False, what: str = "data.train_dir"):
        from .fastmri import FastMRIFile
        from .skmtea import SkmTeaFile

        folder = Path(folder)
        if not folder.is_dir():
            raise InputDataError(f"{what} {folder} is not a folder; give a folder of fastMRI or skm-tea .h5 files")
        files = sorted(p for p in folder.iterdir() if p.suffix == ".h5")
        if not files:
            raise InputDataError(f"{what} {folder} holds no .h5 files")
        self.index: list[tuple[Path, str, int]] = []
        self.shape_key: dict[Path, tuple] = {}  # (image shape, target shape) per file: batches share it
        self.echo, self.with_maps = int(echo), bool(with_maps)
        for p in files:
            kind = _detect_format(p, fmt)
            opener = SkmTeaFile if kind == "skmtea" else FastMRIFile
            with opener(p) as f:
                if kind == "fastmri":
                    if not f.multicoil:
                        raise InputDataError(f"{p.name} is a single-coil fastMRI file; the U-Net trains on "
                                             f"multi-coil data")
                    if f.target_key() is None:
                        raise InputDataError(f"{p.name} has no reconstruction_rss (a test file?); train on files "
                                             f"with a reference")
                    if with_maps:
                        raise InputDataError(f"{p.name}: normalisation.input sense needs coil maps, which "
                                             f"fastMRI files lack; use zero_filled input, skm-tea files or "
                                             f"simulated data")
                    self.shape_key[p] = (f.image_shape, tuple(f._f[f.target_key()].shape[1:]))
                elif not 0 <= self.echo < f.n_echoes:
                    raise InputDataError(f"data.echo = {self.echo} but {p.name} has {f.n_echoes} echoes")
                else:
                    self.shape_key[p] = (f.image_shape, f.image_shape)
                self.index += [(p, kind, i) for i in range(f.n_slices)]
        if max_slices and len(self.index) > max_slices:
            pick = np.linspace(0, len(self.index) - 1, int(max_slices)).round().astype(int)
            self.index = [self.index[i] for i in pick]

    def __len__(self) -> int:
        return len(self.index)

    def get(self, j: int, epoch: int = 0) -> _Slice:
        from .fastmri import FastMRIFile
        from .skmtea import SkmTeaFile

        path, kind, i = self.index[j]
        if kind == "fastmri":
            with FastMRIFile(path) as f:
                return _Slice(f.read_kspace([i])[0], f.read_target([i])[0], None, f.padding)
        with SkmTeaFile(path) as f:
            maps = f.read_maps([i])[0] if self.with_maps else None
            target = f.read_target([i], self.echo)
            if target is None:
                raise InputDataError(f"{path.name} has no target; train on files with a reference")
            return _Slice(f.read_kspace([i], self.echo)[0], target[0], maps, None)


def _batch(slices: list[_Slice], masks: list[np.ndarray], device, norm: dict):
    """Network inputs ``(N, 1, h, w)`` and targets of slices with one target shape (any coil counts)."""
    import torch

    from .unet import network_input

    xs = []
    with torch.no_grad():
        for s, mk in zip(slices, masks):
            k = torch.from_numpy(s.kspace[None]).to(device)
            m = torch.from_numpy(mk[None, None]).to(device)  # (1, 1, H|1, W)
            maps = torch.from_numpy(s.maps[None]).to(device) if norm["input"] == "sense" else None
            xs.append(network_input(k * m, m, s.target.shape[-2:], maps, norm["input"], norm["sense_iterations"]))
    target = torch.from_numpy(np.stack([s.target for s in slices])[:, None]).to(device)
    return torch.cat(xs), target


def _batches_of(items: list, keyfn, size: int) -> list[list]:
    """Consecutive batches of ``size`` items of one shape (items of other shapes wait in their own bucket)."""
    buckets: dict[Any, list] = {}
    out = []
    for it in items:
        b = buckets.setdefault(keyfn(it), [])
        b.append(it)
        if len(b) == size:
            out.append(list(b))
            b.clear()
    out += [b for b in buckets.values() if b]
    return out


# ------------------------------------------------------------------------------------ loss and metrics
def _loss(model, batch, weights: dict, norm: dict):
    import torch
    from torch.nn import functional as F

    from qsmkit.metrics import ssim_torch

    from .unet import denormalize, normalize_instance

    x, target = batch
    xn, mean, std = normalize_instance(x, norm["eps"], norm["clamp"])
    tn = ((target - mean) / (std + norm["eps"])).clamp(-norm["clamp"], norm["clamp"])
    out = model(xn)
    loss = torch.zeros((), device=x.device)
    if weights["l1"]:
        loss = loss + weights["l1"] * F.l1_loss(out, tn)
    if weights["ssim"]:
        # SSIM with the target's maximum L as range, computed on images / L (the same number; no
        # round-off trouble for faint slices)
        scale = target.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
        pred = denormalize(out, mean, std, norm["eps"]) / scale
        loss = loss + weights["ssim"] * (1.0 - ssim_torch(target / scale, pred, 1.0)).mean()
    return loss


def _metrics(targets: list[np.ndarray], preds: list[np.ndarray]) -> dict[str, float]:
    """Mean over slices of the fastMRI NMSE, PSNR and SSIM (each slice a volume of its own)."""
    from .metrics import evaluate_volume

    rows = [evaluate_volume(t[None], p[None], square_crop=False) for t, p in zip(targets, preds)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("nmse", "psnr", "ssim")}


# ------------------------------------------------------------------------------------ run
def run(config: dict, out_dir, resume: bool = False, overwrite: bool = False, device: str = "auto",
        log=None) -> list[dict]:
    """Train the U-Net of ``config`` (see :data:`DEFAULTS`) into ``out_dir``; returns the history."""
    import click
    import torch

    from qsmkit.device import resolve_device
    from qsmkit.training import fit

    from .unet import reconstruct

    log = log or click.echo
    _check(config)
    if config["threads"] > 0:
        torch.set_num_threads(int(config["threads"]))
    dev = resolve_device(device)
    seed = int(config["seed"])
    norm = dict(config["normalisation"])
    with_maps = norm["input"] == "sense"
    d, sim, mk = config["data"], config["data"]["simulated"], config["masks"]
    sampler = MaskSampler(mk["types"], mk["center_fractions"], mk["accelerations"], mk["poisson_bank"])

    if d["source"] == "files":
        train = FileSlices(d["train_dir"], d["format"], d["echo"], d["max_train_slices"], with_maps)
    else:
        train = SimulatedPool(sim["train_slices"], sim["shape"], sim["coils"], sim["noise"], seed, sim["refresh"],
                              with_maps)
    if d["val_dir"]:
        val = FileSlices(d["val_dir"], d["format"], d["echo"], d["max_val_slices"], with_maps, "data.val_dir")
    else:
        val = SimulatedPool(sim["val_slices"], sim["shape"], sim["coils"], sim["noise"], sim["val_seed"], 0.0,
                            with_maps)
    n_val = len(val)
    val_slices = [val.get(j, 1) for j in range(n_val)]
    val_rng = np.random.default_rng(0)
    val_masks = [sampler.draw(s.kspace.shape[-2:], val_rng, s.padding, kind=mk["types"][j % len(mk["types"])],
                              seed=j) for j, s in enumerate(val_slices)]
    val_inputs = [_batch([s], [m], dev, norm) for s, m in zip(val_slices, val_masks)]
    zf = _metrics([t[0, 0].cpu().numpy() for _, t in val_inputs], [x[0, 0].cpu().numpy() for x, _ in val_inputs])
    log(f"unet: {len(train)} training slices ({d['source']}), {n_val} validation slices; zero-filled validation "
        f"SSIM {zf['ssim']:.4f}  PSNR {zf['psnr']:.2f} dB  NMSE {zf['nmse']:.4g}")

    torch.manual_seed(seed)  # the initial weights depend on the seed only
    model = build_model(config).to(dev)
    o = config["optim"]
    optimizer = torch.optim.RMSprop(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, o["lr_step_size"], o["lr_gamma"])
    per = int(mk["per_sample"])
    bs = int(config["batch_size"])

    def shape_of(j: int):
        return None if d["source"] == "simulated" else train.shape_key[train.index[j][0]]

    def train_batches(epoch: int, rng: np.random.Generator):
        order = [int(j) for j in rng.permutation(np.repeat(np.arange(len(train)), per))]
        groups = _batches_of(order, shape_of, bs)
        for group in groups:
            slices = [train.get(j, epoch) for j in group]
            masks = [sampler.draw(s.kspace.shape[-2:], rng, s.padding) for s in slices]
            if len({s.target.shape for s in slices}) > 1:  # files with different matrices: one slice at a time
                for s, m in zip(slices, masks):
                    yield _batch([s], [m], dev, norm)
                continue
            yield _batch(slices, masks, dev, norm)

    def validate(net) -> dict[str, float]:
        preds, targets = [], []
        for x, t in val_inputs:
            preds.append(reconstruct(net, x, norm["clamp"], norm["eps"])[0, 0].cpu().numpy())
            targets.append(t[0, 0].cpu().numpy())
        m = _metrics(targets, preds)
        return {"val_ssim": m["ssim"], "val_psnr": m["psnr"], "val_nmse": m["nmse"],
                "val_ssim_zero_filled": zf["ssim"], "lr": optimizer.param_groups[0]["lr"]}

    steps = math.ceil(len(train) * per / bs)
    return fit(method=METHOD, model=model, arch=model.arch(), config=config, out_dir=out_dir,
               epochs=int(config["epochs"]), seed=seed, optimizer=optimizer, scheduler=scheduler,
               train_batches=train_batches, loss_fn=lambda net, b: _loss(net, b, config["loss"], norm),
               validate=validate, normalisation=norm, resume=resume, overwrite=overwrite,
               steps_per_epoch=steps, log=log)
