"""``qsmkit train qsmnet``: train QSMnet (Yoon et al. 2018) on simulated heads and/or chi NIfTI files.

The published recipe is the default (width 32, 64^3 patches, batch 5, learning rate 1e-3, 25
epochs, Adam, +-30 deg rotation augmentation about the axes perpendicular to B0, model + L1 +
gradient loss); the shipped CPU model overrides it in ``weights/qsmnet_small.yaml``. Each epoch:
fresh augmented heads and patches drawn from ``epoch_rng(seed, epoch)`` (resumable bit for bit on
the CPU), a validation NRMSE of whole held-out simulated heads inverted tile by tile as the stage
does (``val_nrmse``, percent, and ``val_prior_nrmse`` of the closed-form estimate for reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsmkit.errors import ConfigError

__all__ = ["DEFAULTS", "run", "METHOD"]

METHOD = "qsmnet"

DEFAULTS: dict = {
    "seed": 0,
    "epochs": 25,
    "batch": 5,
    "lr": 1e-3,
    "lr_schedule": "constant",       # or cosine (to lr * 0.05 at the last epoch)
    "optimizer": "adam",             # or adamw
    "weight_decay": 0.0,
    "ema": 0.0,                      # EMA decay of the weights (0: off)
    "threads": 0,                    # torch CPU threads (0: torch's default)
    "channels_last": True,           # channels-last 3D layout on the CPU (faster convolutions)
    "voxel_size": [1.0, 1.0, 1.0],   # training resolution, mm
    "prior_threshold": 0.15,         # TKD truncation of the closed-form prior (residual only)
    "network": {"width": 32, "residual": False},
    "loss": {"w_l1": 1.0, "w_model": 0.5, "w_grad": 0.1},
    "data": {
        "simulated": 16,             # simulated training heads (anatomy seeds seed .. seed+n-1)
        "seed": 1000,
        "size_min": 96,              # grid size per axis of a simulated head, voxels at voxel_size
        "size_max": 136,
        "fov_fraction": [0.72, 0.92],
        "gyral_period": [0.15, 0.28],
        "head_rotation_deg": 15.0,   # head pose in the simulator, per axis
        "chi_jitter": 0.35,          # relative change of each tissue's chi per head
        "haemorrhage_probability": 0.3,
        "lesions": [0, 8],           # extra random ellipsoidal lesions per head
        "lesion_chi": [-0.3, 0.8],
        "lesion_radius_mm": [1.5, 8.0],
        "oversample": 2,
        "chi_files": [],             # user chi maps (ppm NIfTI), e.g. COSMOS
        "mask_files": [],
        "patch": 64,
        "overlap": 0.66,             # between neighbouring training patches (published ~66 %)
        "min_mask_fraction": 0.1,
        "patches_per_epoch": 672,
        "heads_per_epoch": 8,
        "rotation_deg": 30.0,        # augmentation about the axes perpendicular to B0
        "noise": 0.0,                # std (ppm) of Gaussian noise added to the input field
    },
    "validation": {"simulated": 1, "seed": 900, "shape": [100, 116, 100], "patch": 64, "overlap": 0.5},
}


def _batches(items, batch: int, device, channels_last: bool):
    import torch

    buf = []

    def emit():
        xs, ys, ms = (torch.from_numpy(np.stack(z)) for z in zip(*buf))
        if channels_last and device.type == "cpu":
            xs = xs.contiguous(memory_format=torch.channels_last_3d)
        return xs.to(device), ys.to(device), ms.to(device)

    for it in items:
        buf.append(it)
        if len(buf) == batch:
            yield emit()
            buf = []
    if buf:
        yield emit()


def _validation_set(cfg: dict, vs, log):
    from qsmkit.simulate import simulate_susceptibility

    from .data import head_inputs, Head

    val = []
    v = cfg["validation"]
    for i in range(int(v["simulated"])):
        s = int(v["seed"]) + i
        out = simulate_susceptibility(tuple(int(n) for n in v["shape"]), vs, rotation_deg=(6.0, -4.0, 3.0),
                                      anatomy_seed=s, gyral_period=0.2, fov_fraction=0.84, haemorrhage=True)
        h = Head(out["chi"].data.astype(np.float32), out["mask"].data.astype(bool), f"validation seed {s}")
        field, _ = head_inputs(h, vs, False, cfg["prior_threshold"])
        val.append((h, field))
        log(f"qsmnet validation: {h.name}, shape {h.chi.shape}")
    return val


def run(config: dict, out_dir, resume: bool = False, overwrite: bool = False, device: str = "auto") -> list:
    """Build the network, data and loss from ``config`` and train (:func:`qsmkit.training.fit`)."""
    import click
    import torch

    from qsmkit.device import resolve_device
    from qsmkit.metrics import nrmse
    from qsmkit.training import fit

    from .data import epoch_patches, nifti_heads, normalisation_stats, simulated_heads
    from .inference import invert_aligned, network_fn
    from .loss import QSMnetLoss
    from .network import QSMnet
    from .prior import closed_form_prior

    cfg = config
    log = click.echo
    if cfg["threads"] > 0:
        torch.set_num_threads(int(cfg["threads"]))
    dev = resolve_device(device)
    vs = tuple(float(v) for v in cfg["voxel_size"])
    d = cfg["data"]
    for key in ("lr_schedule", "optimizer"):
        allowed = {"lr_schedule": ("constant", "cosine"), "optimizer": ("adam", "adamw")}[key]
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if d["patch"] % 16:
        raise ConfigError(f"data.patch must be a multiple of 16 (4 poolings), got {d['patch']}")
    heads = simulated_heads(d, d["simulated"], d["seed"], vs, log) + nifti_heads(d["chi_files"], d["mask_files"], vs)
    if not heads:
        raise ConfigError("qsmnet: no training data; set data.simulated > 0 or give data.chi_files")
    norm = normalisation_stats(heads, vs)
    norm["prior_threshold"] = float(cfg["prior_threshold"])
    norm["voxel_size"] = list(vs)
    log(f"qsmnet: {len(heads)} training heads; field scale {norm['field_scale']:.4g} ppm, "
        f"chi scale {norm['chi_scale']:.4g} ppm")
    residual = bool(cfg["network"]["residual"])
    val = _validation_set(cfg, vs, log)

    torch.manual_seed(int(cfg["seed"]))
    net = QSMnet(int(cfg["network"]["width"]), residual).to(dev)
    if cfg["channels_last"] and dev.type == "cpu":
        net = net.to(memory_format=torch.channels_last_3d)
    opt_cls = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.Adam
    opt = opt_cls(net.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(cfg["epochs"])),
                                                        eta_min=0.05 * float(cfg["lr"]))
             if cfg["lr_schedule"] == "cosine" else None)
    L = cfg["loss"]
    loss = QSMnetLoss((d["patch"],) * 3, vs, L["w_model"], L["w_l1"], L["w_grad"])

    def train_batches(epoch, rng):
        return _batches(epoch_patches(heads, rng, d, norm, vs, residual, cfg["prior_threshold"]),
                        int(cfg["batch"]), dev, cfg["channels_last"])

    def loss_fn(model, batch):
        x, y, m = batch
        return loss(model(x), y, m)[0]

    v = cfg["validation"]
    fn = network_fn(net, cfg["channels_last"])
    prior_nrmse = [nrmse(h.chi, closed_form_prior(f, h.mask, vs, (0, 0, 1), cfg["prior_threshold"]), h.mask)
                   for h, f in val]

    def validate(model):
        if not val:
            return {}
        scores = []
        for h, f in val:
            chi = invert_aligned(fn, f, h.mask, vs, norm, residual, int(v["patch"]), float(v["overlap"]),
                                 batch=2, device=dev)
            c = chi - chi[h.mask].mean()
            t = h.chi - h.chi[h.mask].mean()
            scores.append(nrmse(np.where(h.mask, t, 0), np.where(h.mask, c, 0), h.mask))
        return {"val_nrmse": float(np.mean(scores)), "val_prior_nrmse": float(np.mean(prior_nrmse))}

    steps = int(np.ceil(int(d["patches_per_epoch"]) / int(cfg["batch"])))
    return fit(method=METHOD, model=net, arch=net.arch(), config=cfg, out_dir=Path(out_dir), epochs=int(cfg["epochs"]),
               seed=int(cfg["seed"]), optimizer=opt, scheduler=sched, train_batches=train_batches, loss_fn=loss_fn,
               validate=validate, normalisation=norm, ema_decay=float(cfg["ema"]) or None, resume=resume,
               overwrite=overwrite, steps_per_epoch=steps, resume_ignore=("epochs", "threads"))
