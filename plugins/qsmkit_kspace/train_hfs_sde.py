"""``qsmkit train hfs_sde``: train the HFS-SDE score network (Cao et al., IEEE TMI 2024).

Loss: denoising score matching on the high frequencies (:func:`.hfs_sde.dsm_loss`, the authors'
``losses.py`` with ``reduce_mean``), ``t ~ U(1e-5, 1)``. Optimiser as score_sde / HFS-SDE: Adam
(lr 2e-4, beta1 0.9, eps 1e-8), linear learning-rate warm-up over ``warmup`` steps, gradient
norm clipping at ``grad_clip``, EMA of the weights (:class:`qsmkit.training.EMA`; ``model.pt``
holds the EMA weights, as score_sde samples with them). The authors' EMA rate 0.9999 and
5000 warm-up steps fit their 190 epochs of fastMRI; the defaults here (0.999, 200) fit short runs.

Training images are coil-combined complex images (the diffusion variable), normalised per slice
by ``normalize_coeff * rms(x_low)`` with ``x_low`` the low-frequency part ``F^H L F x`` (the same
statistic the stage computes from the measured low frequencies). Sources (``data.source``):

- ``anatomies``: random complex anatomies drawn afresh every epoch (:func:`.anatomies.random_anatomy`,
  ``data.image_size`` square) plus complex white noise of a relative level drawn log-uniformly in
  ``data.noise`` (the noise of a fully sampled SENSE combination);
- ``multicoil``: random multi-coil slices (:func:`.anatomies.random_multicoil_slice`), combined with
  their maps, ``sum_c conj(S_c) F^H y_c`` (slower: a Biot-Savart coil array per slice);
- ``files``: prepared data (``qsmkit kspace prepare``): ``*_prepared.h5`` files (datasets
  ``kspace`` and ``maps``) or ``*_kspace.npy`` files with their ``*_maps.npy``, combined with the
  maps; ``data.files`` lists files or folders. An epoch is a seeded random permutation.

Validation: the loss on ``data.validation_slices`` fixed slices (seed ``seed + 1_000_003``, never a
training seed) at fixed times and noise (a deterministic number per epoch).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from qsmkit.errors import ConfigError, InputDataError

__all__ = ["DEFAULTS", "run", "build_model", "prepare_images", "load_image_files"]

#: every key of a ``train.yaml`` for ``qsmkit train hfs_sde`` (``--print-defaults``)
DEFAULTS = {
    "seed": 0,
    "epochs": 20,
    "steps_per_epoch": 50,
    "batch_size": 4,
    "lr": 2e-4,
    "warmup": 200,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "threads": 0,
    "model": {"size": "small", "nf": None, "ch_mult": None, "num_res_blocks": None, "attn_resolutions": None,
              "dropout": None},
    "sde": {"kind": "vp", "beta_min": 0.1, "beta_max": 20.0, "sigma_min": 0.01, "sigma_max": 20.0},
    "low_frequency": {"kind": "low_frequency", "acs": 16},
    "normalize_coeff": 1.5,
    "data": {"source": "anatomies", "image_size": 128, "noise": [0.002, 0.02], "files": [],
             "validation_slices": 8},
}

_SIZES = ("tiny", "small", "published")


def build_model(model_cfg: dict, image_size: int):
    """The score network of a ``model`` config section (preset ``size`` plus explicit overrides)."""
    from . import score_net

    size = model_cfg.get("size", "small")
    if size not in _SIZES:
        raise ConfigError(f"model.size = {size!r}: choose one of {', '.join(_SIZES)}")
    arch = copy.deepcopy({"tiny": score_net.TINY, "small": score_net.SMALL, "published": score_net.PUBLISHED}[size])
    for key in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"):
        if model_cfg.get(key) is not None:
            arch[key] = model_cfg[key]
    arch["image_size"] = int(image_size)
    return score_net.build_score_net(arch), arch


def prepare_images(x: np.ndarray, L: np.ndarray, coeff: float) -> np.ndarray:
    """Complex images ``(N, H, W)`` divided by ``coeff * rms(F^H L F x)`` each (complex64)."""
    from .transforms import fft2c_np, ifft2c_np

    x = np.asarray(x, np.complex64)
    low = ifft2c_np(fft2c_np(x) * L)
    rms = np.sqrt(np.mean(np.abs(low) ** 2, axis=(-2, -1), keepdims=True))
    return (x / (coeff * np.where(rms > 0, rms, 1.0))).astype(np.complex64)


def _combine(kspace: np.ndarray, maps: np.ndarray) -> np.ndarray:
    from .transforms import ifft2c_np

    return np.sum(np.conj(maps) * ifft2c_np(kspace), axis=-3).astype(np.complex64)


def _list_files(entries) -> list[Path]:
    files: list[Path] = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            files += sorted(p.glob("*_prepared.h5")) or sorted(p.glob("*_kspace.npy"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputDataError(f"data.files: {p} does not exist; give prepared files or folders "
                                 "('qsmkit kspace prepare')")
    if not files:
        raise InputDataError("data.source is files but data.files holds no *_prepared.h5 or *_kspace.npy file")
    return files


def load_image_files(entries) -> np.ndarray:
    """Coil-combined complex images ``(N, H, W)`` of prepared files (see the module docstring)."""
    out = []
    for f in _list_files(entries):
        if f.suffix in (".h5", ".hdf5"):
            import h5py

            try:
                with h5py.File(f, "r") as h:
                    k, m = np.asarray(h["kspace"]), np.asarray(h["maps"])
                    coil_last = str(h.attrs.get("axes", "")).endswith("coil)")
            except (OSError, KeyError) as exc:
                raise InputDataError(f"{f}: not a prepared file with 'kspace' and 'maps' ({exc})") from None
            if coil_last:
                k, m = np.moveaxis(k, -1, -3), np.moveaxis(m, -1, -3)
        elif f.name.endswith("_kspace.npy"):
            mf = f.with_name(f.name[: -len("_kspace.npy")] + "_maps.npy")
            if not mf.is_file():
                raise InputDataError(f"{f}: its maps file {mf.name} is missing")
            k, m = np.load(f, allow_pickle=False), np.load(mf, allow_pickle=False)
            if k.ndim == 3 and k.shape[-1] < k.shape[0] and k.shape[-1] < k.shape[1]:  # (H, W, coil)
                k, m = np.moveaxis(k, -1, 0), np.moveaxis(m, -1, 0)
            k, m = k[None], m[None]
        else:
            raise InputDataError(f"{f}: expected a *_prepared.h5 or *_kspace.npy file")
        if k.shape != m.shape or k.ndim != 4:
            raise InputDataError(f"{f}: kspace {k.shape} and maps {m.shape} must both be (slices, coils, H, W)")
        out.append(_combine(k, m))
    shapes = {x.shape[-2:] for x in out}
    if len(shapes) > 1:
        raise InputDataError(f"data.files: slices of different sizes {sorted(shapes)}; prepare them with one --crop")
    return np.concatenate(out)


def _anatomy_batch(rng, n: int, size: int, noise) -> np.ndarray:
    from .anatomies import random_anatomy

    lo, hi = (float(noise[0]), float(noise[-1])) if len(noise) else (0.0, 0.0)
    xs = []
    for _ in range(n):
        img, _ = random_anatomy(rng, (size, size))
        if hi > 0:
            level = float(np.exp(rng.uniform(np.log(max(lo, 1e-12)), np.log(hi))))
            sd = level * float(np.abs(img).max()) / np.sqrt(2)
            img = img + sd * (rng.standard_normal(img.shape) + 1j * rng.standard_normal(img.shape))
        xs.append(img)
    return np.stack(xs).astype(np.complex64)


def _multicoil_batch(rng, n: int, size: int, noise) -> np.ndarray:
    from .anatomies import random_multicoil_slice

    xs = []
    for _ in range(n):
        d = random_multicoil_slice(rng, (size, size), noise=tuple(noise) if len(noise) > 1 else noise[0])
        xs.append(_combine(d["kspace"][None], d["maps"][None])[0])
    return np.stack(xs)


def run(config: dict, out_dir, resume: bool = False, overwrite: bool = False, device: str = "auto", log=None):
    """Train (``qsmkit train hfs_sde``); returns the history (see :func:`qsmkit.training.fit`)."""
    import torch

    from qsmkit.device import resolve_device
    from qsmkit.training import fit

    from .hfs_sde import HFSSDE, dsm_loss, low_frequency_mask

    cfg = config
    dev = resolve_device(device)
    if cfg["threads"] > 0:
        torch.set_num_threads(int(cfg["threads"]))
    data = cfg["data"]
    src = data["source"]
    if src not in ("anatomies", "multicoil", "files"):
        raise ConfigError(f"data.source = {src!r}: choose anatomies, multicoil or files")
    for key in ("epochs", "steps_per_epoch", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} = {cfg[key]}: must be at least 1")
    sde = HFSSDE.from_dict(cfg["sde"])
    files = load_image_files(data["files"]) if src == "files" else None
    size = int(files.shape[-1]) if files is not None else int(data["image_size"])
    shape = tuple(files.shape[-2:]) if files is not None else (size, size)
    L = low_frequency_mask(shape, cfg["low_frequency"]["kind"], cfg["low_frequency"]["acs"])
    coeff = float(cfg["normalize_coeff"])
    torch.manual_seed(int(cfg["seed"]))  # the initial weights
    model, arch = build_model(cfg["model"], min(shape))
    model = model.to(dev)
    if shape[0] % model.factor or shape[1] % model.factor:
        raise ConfigError(f"images {shape} are not divisible by {model.factor} (the network's downsampling); "
                          "change data.image_size or the crop")
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    base_step = opt.step

    def clipped_step(closure=None):
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=cfg["grad_clip"])
        return base_step(closure)

    opt.step = clipped_step
    bs, spe = int(cfg["batch_size"]), int(cfg["steps_per_epoch"])

    def draw(rng, n):
        if src == "anatomies":
            return _anatomy_batch(rng, n, size, data["noise"])
        if src == "multicoil":
            return _multicoil_batch(rng, n, size, data["noise"])
        return files[rng.integers(0, len(files), n)]

    def train_batches(epoch, rng):
        for k in range(spe):
            yield (epoch - 1) * spe + k + 1, torch.from_numpy(prepare_images(draw(rng, bs), L, coeff)).to(dev)

    def eps_model(net):
        def f(x, t):
            out = net(torch.stack([x.real, x.imag], 1), t)
            return torch.complex(out[:, 0], out[:, 1])
        return f

    def loss_fn(net, batch):
        step, x0 = batch
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, step / max(cfg["warmup"], 1))
        return dsm_loss(eps_model(net), x0, L, sde)

    vrng = np.random.default_rng([int(cfg["seed"]) + 1_000_003])
    nval = int(data["validation_slices"])
    if nval > 0:
        xv = torch.from_numpy(prepare_images(draw(vrng, nval), L, coeff)).to(dev)
        gen_state = torch.Generator(device="cpu").manual_seed(int(cfg["seed"]) + 7)
        tv = torch.linspace(0.05, 0.95, nval)
        zv = torch.randn((2, nval) + shape, generator=gen_state)

    def validate(net):
        if nval == 0:
            return {}
        from .hfs_sde import _fft, _ifft

        Lt = torch.as_tensor(L, device=dev)
        t = tv.to(dev)
        Z = torch.complex(zv[0], zv[1]).to(dev)
        m, s = sde.mean_coeff(t)[:, None, None], sde.std(t)[:, None, None]
        K0 = _fft(xv)
        xt = _ifft(K0 + (1 - Lt) * ((m - 1) * K0 + s * Z))
        r = _ifft((1 - Lt) * _fft(eps_model(net)(xt, t))) - _ifft((1 - Lt) * Z)
        return {"val_loss": float((r.real ** 2 + r.imag ** 2).mean() / 2)}

    normalisation = {"normalize_coeff": coeff, "sde": sde.as_dict(),
                     "low_frequency": {"kind": cfg["low_frequency"]["kind"], "acs": int(cfg["low_frequency"]["acs"])},
                     "image_size": list(shape)}
    return fit(method="hfs_sde", model=model, arch=arch, config=cfg, out_dir=out_dir, epochs=int(cfg["epochs"]),
               seed=int(cfg["seed"]), optimizer=opt, train_batches=train_batches, loss_fn=loss_fn,
               validate=validate, normalisation=normalisation, ema_decay=float(cfg["ema_decay"]),
               resume=resume, overwrite=overwrite, steps_per_epoch=spe, log=log)
