"""Training infrastructure shared by every learned method (``qsmkit train <method>``).

A plugin that ships a trainable method provides three things and gets the rest from here:

- its **defaults**: a (possibly nested) mapping of every config key with its default value; a
  user's ``train.yaml`` and ``--set key=value`` overrides may only use these keys, with values of
  the same type (checked by :func:`load_config`);
- a **run function** ``run(config, out_dir, resume, device)`` that builds the network, the data and
  the loss and calls :func:`fit`;
- the command itself, made by :func:`train_command` and added under ``qsmkit train`` through the
  command hook (:func:`qsmkit.commands.train_group`).

:func:`fit` is the one training loop: per-epoch data drawn from generators seeded by
``(seed, epoch)`` (so an interrupted run resumes bit-for-bit on the CPU), optional EMA weights (as
score_sde keeps them), per-epoch validation, a progress bar with the running loss, an atomic
``last.pt`` with the full training state after every epoch, ``model.pt`` (the weights users load;
the EMA weights where there is an EMA) and ``history.json`` (the training curve).

Output folder (``--out``)::

    train.json     marker: method, config, seed, qsmkit version (a folder without it is refused)
    last.pt        resumable checkpoint (weights, optimiser, scheduler, EMA, epoch, history)
    model.pt       the trained model (no optimiser state; this is the file to ship)
    history.json   one record per epoch: train loss, validation metrics, seconds

torch is imported inside the functions, so importing this module (``qsmkit --help``) is free.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import click

from .errors import CheckpointError, ConfigError, OutputError

__all__ = ["EMA", "load_config", "check_config", "epoch_rng", "fit", "train_command", "MARKER"]

MARKER = "train.json"
TRAIN_FILES = frozenset({MARKER, "last.pt", "model.pt", "history.json"})


# --------------------------------------------------------------------------------------------
# configuration


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def check_config(config: Mapping, defaults: Mapping, where: str = "config") -> dict:
    """``defaults`` updated by ``config``, refusing unknown keys and values of the wrong type.

    A default of ``None`` accepts any value; an int default accepts ints; a float default accepts
    ints and floats; a list default accepts a list (or a scalar, wrapped); a dict default is
    checked recursively.
    """
    from .pipeline.spec import check_keys

    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: must be a mapping of keys to values")
    check_keys(config, list(defaults), where)
    out = copy.deepcopy(dict(defaults))
    for key, value in config.items():
        default = defaults[key]
        here = f"{where}.{key}" if where != "config" else key
        if isinstance(default, dict):
            out[key] = check_config(value if value is not None else {}, default, here)
            continue
        if default is None:
            out[key] = value
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{here}: expected true or false, got {value!r}")
            out[key] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{here}: expected an integer, got {value!r}")
            out[key] = value
        elif isinstance(default, float):
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{here}: expected a finite number, got {value!r}")
            out[key] = float(value)
        elif isinstance(default, list):
            out[key] = list(value) if isinstance(value, (list, tuple)) else [value]
        elif not isinstance(value, type(default)):
            raise ConfigError(f"{here}: expected {_type_name(default)}, got {value!r}")
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, defaults: Mapping, overrides: Iterable[str] = ()) -> dict:
    """Read a training config (strict YAML, as pipelines are), apply ``--set`` overrides, check it."""
    from .pipeline.spec import apply_overrides, load_yaml

    raw: dict = {}
    if path is not None:
        raw = load_yaml(path, "training config", "a YAML mapping of config keys (see --print-defaults)")
    raw, _ = apply_overrides(raw, list(overrides))
    return check_config(raw, defaults, "config")


def epoch_rng(seed: int, epoch: int):
    """The numpy generator of one epoch (data draws); the same ``(seed, epoch)`` gives the same draws."""
    import numpy as np

    return np.random.default_rng([int(seed), int(epoch)])


# --------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a module's parameters (score_sde's ``ExponentialMovingAverage``).

    ``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step, with the warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))``; buffers (batch-norm statistics) are copied.
    """

    def __init__(self, module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self, module) -> None:
        import torch

        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            for k, v in module.state_dict().items():
                s = self.shadow[k]
                if v.dtype.is_floating_point:
                    s.mul_(d).add_(v.detach(), alpha=1.0 - d)
                else:
                    s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        self.decay = float(state["decay"])
        self.steps = int(state["steps"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# --------------------------------------------------------------------------------------------
# the loop


def _prepare_out(out_dir: Path, method: str, config: dict, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder; returns ``last.pt`` to resume from, or None."""
    from .io.atomic import check_folder_for

    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise OutputError(f"--resume: {out_dir} holds no last.pt; start without --resume")
        return last
    if out_dir.is_dir() and (out_dir / MARKER).exists() and not overwrite:
        raise OutputError(f"{out_dir} already holds a training run; pass --resume to continue it or "
                          f"--overwrite to start again")
    check_folder_for(out_dir, set(TRAIN_FILES), MARKER, overwrite)
    return None


def _config_differences(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    diffs = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            diffs += _config_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            diffs.append(f"{prefix}{k}")
    return diffs


def _restore(last: Path, method: str, config: Mapping, resume_ignore: Iterable[str], model, optimizer, scheduler,
             ema: EMA | None) -> tuple[list[dict], int]:
    """Load ``last.pt`` into the model, optimiser, scheduler and EMA; returns (history, first epoch to run)."""
    from .checkpoints import load_checkpoint, load_weights

    ckpt = load_checkpoint(last, method, need_training=True)
    diffs = [d for d in _config_differences(ckpt["config"], config) if d not in set(resume_ignore)]
    if diffs:
        raise ConfigError(f"--resume: the config differs from the one {last} was trained with "
                          f"({', '.join(diffs[:4])}); resume with the same config or start a new folder")
    tr = ckpt["training"]
    load_weights(model, ckpt["model"], last)
    try:
        optimizer.load_state_dict(tr["optimizer"])
        if scheduler is not None and tr.get("scheduler") is not None:
            scheduler.load_state_dict(tr["scheduler"])
        if ema is not None:
            if tr.get("ema") is None:
                raise KeyError("ema")
            ema.load_state_dict(tr["ema"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"--resume: {last} does not hold this run's optimiser/EMA state ({exc}); "
                              f"start a new folder") from None
    return list(tr.get("history", [])), int(tr["epoch"]) + 1


def fit(*, method: str, model, arch: Mapping, config: Mapping, out_dir: str | Path, epochs: int, seed: int,
        optimizer, train_batches: Callable[[int, Any], Iterable], loss_fn: Callable[[Any, Any], Any],
        scheduler=None, validate: Callable[[Any], Mapping[str, float]] | None = None,
        normalisation: Mapping | None = None, ema_decay: float | None = None, resume: bool = False,
        overwrite: bool = False, steps_per_epoch: int | None = None, log: Callable[[str], None] | None = None,
        resume_ignore: Iterable[str] = ("epochs",)) -> list[dict]:
    """Train ``model`` for ``epochs`` epochs, checkpointing every epoch; returns the history.

    Parameters
    ----------
    method : str
        Method name stored in the checkpoints (checked by the stage that loads them).
    model : torch.nn.Module
        The network, already on its device.
    arch : mapping
        The network's constructor arguments (stored, so the stage can rebuild it).
    config : mapping
        The full training config (stored; on ``resume`` it must equal the checkpoint's except the
        keys in ``resume_ignore``).
    out_dir : path
        Output folder (see the module docstring).
    epochs, seed : int
        Number of epochs; seed of every draw (epoch ``e`` uses :func:`epoch_rng(seed, e) <epoch_rng>`
        for data and ``torch.manual_seed`` of the same pair for dropout / noise).
    optimizer, scheduler
        A torch optimiser and an optional LR scheduler stepped once per epoch.
    train_batches : callable
        ``train_batches(epoch, rng)`` -> iterable of batches for that epoch.
    loss_fn : callable
        ``loss_fn(model, batch)`` -> scalar loss tensor (the model is in training mode).
    validate : callable, optional
        ``validate(model)`` -> mapping of metric name to float, called in eval mode under
        ``torch.no_grad`` with the EMA weights loaded when there is an EMA.
    normalisation : mapping, optional
        Statistics the stage applies around the network (stored in the checkpoints).
    ema_decay : float, optional
        Keep an EMA of the weights with this decay; ``model.pt`` then holds the EMA weights.
    resume, overwrite : bool
        Continue from ``out_dir/last.pt``; or replace an earlier run in ``out_dir``.
    steps_per_epoch : int, optional
        Length of an epoch, for the progress bar.
    log : callable, optional
        Where the one-line-per-epoch summary goes (default ``click.echo``).
    """
    import torch

    from . import __version__
    from .checkpoints import save_checkpoint, to_plain
    from .io.atomic import write_json
    from .progress import progress

    log = log or click.echo
    out_dir = Path(out_dir)
    config = to_plain(dict(config))
    last = _prepare_out(out_dir, method, config, resume, overwrite)
    ema = None if ema_decay is None else EMA(model, ema_decay)
    history: list[dict] = []
    start = 1
    if last is not None:
        history, start = _restore(last, method, config, resume_ignore, model, optimizer, scheduler, ema)
        if start > epochs:
            log(f"{method}: {last} already finished epoch {start - 1} of {epochs}; nothing to do")
            return history
        log(f"{method}: resuming from epoch {start - 1} ({last})")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json({"method": method, "generated_by": f"qsmkit {__version__} train {method}", "seed": int(seed),
                    "epochs": int(epochs), "config": config}, out_dir / MARKER)

    def final_state() -> dict:
        return ema.shadow if ema is not None else model.state_dict()

    def with_final_weights(fn):
        if ema is None:
            return fn()
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.shadow)
        try:
            return fn()
        finally:
            model.load_state_dict(saved)

    for epoch in range(start, epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(int(seed) * 1_000_003 + epoch)
        rng = epoch_rng(seed, epoch)
        model.train()
        total, count = 0.0, 0
        bar = progress(train_batches(epoch, rng), f"{method} epoch {epoch}/{epochs}", total=steps_per_epoch,
                       unit="batch")
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ConfigError(f"{method}: the training loss became {float(loss)} at epoch {epoch}; lower the "
                                  f"learning rate (lr) or check the training data")
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            total += float(loss.detach())
            count += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / count:.4g}")
        if count == 0:
            raise ConfigError(f"{method}: epoch {epoch} drew no training batches; give more training data")
        if scheduler is not None:
            scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total / count, "batches": count}
        if validate is not None:
            model.eval()

            def run_validation():
                with torch.no_grad():
                    return dict(validate(model))

            record.update({k: float(v) for k, v in with_final_weights(run_validation).items()})
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["cpu_seconds"] = round(time.process_time() - c0, 3)
        history.append(record)
        training = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None, "history": history}
        save_checkpoint(out_dir / "last.pt", method=method, arch=arch, model=model.state_dict(),
                        normalisation=normalisation, config=config, training=training)
        write_json(history, out_dir / "history.json")
        extras = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                           if k not in ("epoch", "train_loss", "batches", "seconds", "cpu_seconds"))
        log(f"{method} epoch {epoch}/{epochs}  loss {record['train_loss']:.4g}  {extras}  "
            f"{record['seconds']:.1f} s".replace("    ", "  "))
    save_checkpoint(out_dir / "model.pt", method=method, arch=arch, model=final_state(),
                    normalisation=normalisation, config=config)
    log(f"{method}: model written to {out_dir / 'model.pt'}")
    return history


# --------------------------------------------------------------------------------------------
# the command


def train_command(name: str, defaults: Mapping, run: Callable[..., Any], help: str) -> click.Command:
    """The ``qsmkit train <name>`` command: ``--config``, ``--out``, ``--set``, ``--resume``, ``--overwrite``, ``--device``.

    ``run(config, out_dir, resume, overwrite, device)`` does the training (heavy imports inside).
    ``--print-defaults`` prints the default config as YAML (a starting point for ``train.yaml``).
    """

    @click.command(name, help=help)
    @click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                  help="Training config (YAML); keys not given keep their defaults (--print-defaults).")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
                  help="Output folder for last.pt, model.pt, history.json.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config key, e.g. --set epochs=5 (value parsed as YAML); repeatable.")
    @click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
    @click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out.")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
    @click.option("--print-defaults", is_flag=True, help="Print the default config as YAML and exit.")
    def command(config_path, out_dir, overrides, resume, overwrite, device, print_defaults):
        import yaml

        if print_defaults:
            click.echo(yaml.safe_dump(dict(defaults), sort_keys=False).rstrip())
            return
        if out_dir is None:
            raise ConfigError(f"qsmkit train {name}: give an output folder with --out")
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; give one")
        config = load_config(config_path, defaults, overrides)
        run(config=config, out_dir=out_dir, resume=resume, overwrite=overwrite, device=device)

    return command


def read_history(out_dir: str | Path) -> list[dict]:
    """The per-epoch records of a training run (``history.json``)."""
    return json.loads((Path(out_dir) / "history.json").read_text())
