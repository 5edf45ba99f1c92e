"""Core training layer: checkpoints (safe loading), config checking, the resumable loop, ``qsmkit train``."""

import os
import pickle
import types

import click
import numpy as np
import pytest
import torch

from qsmkit import hookimpl
from qsmkit.checkpoints import load_checkpoint, load_weights, save_checkpoint
from qsmkit.commands import load_commands, train_group
from qsmkit.errors import CheckpointError, ConfigError, OutputError
from qsmkit.training import EMA, check_config, fit, load_config, read_history, train_command

# ---------------------------------------------------------------- checkpoints


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path):
    net = _tiny()
    p = save_checkpoint(tmp_path / "m.pt", method="toy", arch={"width": 4}, model=net.state_dict(),
                        normalisation={"scale": np.float32(2.5)}, config={"lr": 1e-3, "shape": (3, 4)})
    ck = load_checkpoint(p, "toy")
    assert ck["arch"] == {"width": 4} and ck["normalisation"]["scale"] == 2.5 and ck["config"]["shape"] == [3, 4]
    other = _tiny()
    for q in other.parameters():
        q.data.zero_()
    load_weights(other, ck["model"], p)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"format": "qsmkit-checkpoint", "payload": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(bad, "toy")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle (not a torch zip) with code in it
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw, "toy")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_foreign_and_mismatched_checkpoints_get_one_line_errors(tmp_path):
    net = _tiny()
    good = save_checkpoint(tmp_path / "m.pt", method="toy", arch={}, model=net.state_dict())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut, "toy")
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a qsmkit checkpoint"):
        load_checkpoint(bare, "toy")
    with pytest.raises(CheckpointError, match="belongs to method 'toy', not 'qsmnet'"):
        load_checkpoint(good, "qsmnet")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no training state"):
        load_checkpoint(good, "toy", need_training=True)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_weights(wider, load_checkpoint(good)["model"], good)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- config


DEFAULTS = {"epochs": 3, "lr": 1e-2, "batch": 8, "name": "toy", "widths": [4], "data": {"n": 64, "noise": 0.0},
            "extra": None}


def test_config_checks_keys_and_types(tmp_path):
    assert check_config({"lr": "1e-3"}, DEFAULTS)["lr"] == 1e-3  # YAML reads 1e-3 as a string
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        check_config({"lr": "fast"}, DEFAULTS)
    cfg = check_config({"lr": 1, "data": {"n": 10}}, DEFAULTS)
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float) and cfg["data"] == {"n": 10, "noise": 0.0}
    with pytest.raises(ConfigError, match="unknown key 'epoch'.*did you mean 'epochs'"):
        check_config({"epoch": 1}, DEFAULTS)
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        check_config({"epochs": 2.5}, DEFAULTS)
    with pytest.raises(ConfigError, match="data: unknown key 'm'"):
        check_config({"data": {"m": 1}}, DEFAULTS)
    f = tmp_path / "train.yaml"
    f.write_text("epochs: 5\n!!python/object/apply:os.system ['true']: 1\n")
    with pytest.raises(ConfigError, match="safe_load"):
        load_config(f, DEFAULTS)
    f.write_text("epochs: 5\n")
    assert load_config(f, DEFAULTS, ["batch=2", "data.noise=0.1"]) | {} == {**DEFAULTS, "epochs": 5, "batch": 2,
                                                                            "data": {"n": 64, "noise": 0.1}}
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="training config must be a YAML mapping"):
        load_config(f, DEFAULTS)


# ---------------------------------------------------------------- the loop


def _train(out, epochs, resume=False, overwrite=False, ema=None):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    w = torch.tensor([[1.0], [-2.0], [0.5]])

    def batches(epoch, rng):
        for _ in range(8):
            x = torch.from_numpy(rng.standard_normal((16, 3)).astype(np.float32))
            yield x, x @ w

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    xv = torch.from_numpy(np.random.default_rng(99).standard_normal((64, 3)).astype(np.float32))

    def validate(model):
        return {"val_mse": float(torch.nn.functional.mse_loss(model(xv), xv @ w))}

    cfg = {"lr": 1e-2, "epochs": epochs}
    hist = fit(method="toy", model=net, arch={"hidden": 16}, config=cfg, out_dir=out, epochs=epochs, seed=7,
               optimizer=opt, scheduler=sched, train_batches=batches, loss_fn=loss_fn, validate=validate,
               ema_decay=ema, resume=resume, overwrite=overwrite, log=lambda m: None)
    return net, hist


def test_fit_reduces_the_loss_and_writes_its_files(tmp_path):
    net, hist = _train(tmp_path / "run", 4)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["val_mse"] < hist[0]["val_mse"]
    assert read_history(tmp_path / "run") == hist
    ck = load_checkpoint(tmp_path / "run" / "model.pt", "toy")
    assert "training" not in ck and ck["arch"] == {"hidden": 16}
    with pytest.raises(OutputError, match="already holds a training run"):
        _train(tmp_path / "run", 4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds files"):
        _train(other, 1)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_continues_bit_for_bit(tmp_path, ema):
    straight, h_straight = _train(tmp_path / "a", 4, ema=ema)
    _train(tmp_path / "b", 2, ema=ema)
    resumed, h_resumed = _train(tmp_path / "b", 4, resume=True, ema=ema)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(h_straight) == strip(h_resumed)
    m1 = load_checkpoint(tmp_path / "a" / "model.pt")["model"]
    m2 = load_checkpoint(tmp_path / "b" / "model.pt")["model"]
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_resume_refuses_a_changed_config_and_a_missing_run(tmp_path):
    _train(tmp_path / "a", 1)
    net = _tiny()
    with pytest.raises(ConfigError, match=r"config differs.*\(lr\)"):
        fit(method="toy", model=net, arch={}, config={"lr": 0.5, "epochs": 2}, out_dir=tmp_path / "a", epochs=2,
            seed=7, optimizer=torch.optim.SGD(net.parameters(), lr=0.5), train_batches=lambda e, r: [],
            loss_fn=None, resume=True, log=lambda m: None)
    with pytest.raises(OutputError, match="holds no last.pt"):
        _train(tmp_path / "new", 1, resume=True)


def test_ema_follows_the_weights():
    lin = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(lin, decay=0.5)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)  # warm-up decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], d * start + (1 - d) * (start + 1.0))


# ---------------------------------------------------------------- qsmkit train <method>


def _trainer_plugin(modname, method, record):
    def run(config, out_dir, resume, overwrite, device):
        record.append((method, config, str(out_dir), resume, device))

    def hook(cli):
        train_group(cli).add_command(train_command(method, {"epochs": 2, "lr": 1e-3}, run, f"Train {method}."))

    mod = types.ModuleType(modname)
    mod.qsmkit_register_commands = hookimpl(hook)
    return mod


def test_plugins_share_the_train_group_and_duplicates_fail(tmp_path, monkeypatch):
    record = []
    plugins = [_trainer_plugin("p_a", "alpha", record), _trainer_plugin("p_b", "beta", record),
               _trainer_plugin("p_dup", "alpha", record)]
    pc = load_commands(reserved=("run", "train"), extra_plugins=plugins)
    assert {"alpha", "beta"} <= set(pc.train) and "train" not in pc.commands
    assert pc.train_providers["alpha"][0] == "p_a"
    assert "'train alpha' is already added by plugin 'p_a'" in {f.name: f.reason for f in pc.failures}["p_dup"]

    from qsmkit import cli as cli_mod
    from qsmkit.commands import _META_KEY

    def subcommand(ctx, name):
        ctx.meta[_META_KEY] = pc  # this invocation's plugin commands: the ones loaded above
        group = cli_mod.cli.get_command(ctx, "train")
        assert name in group.list_commands(ctx)
        return group.get_command(ctx, name)

    with click.Context(cli_mod.cli) as ctx:
        subcommand(ctx, "alpha").main(["--out", str(tmp_path / "o"), "--set", "epochs=5"], standalone_mode=False)
    assert record[-1][0] == "alpha" and record[-1][1] == {"epochs": 5, "lr": 1e-3} and record[-1][3] is False
    with click.Context(cli_mod.cli) as ctx:
        beta = subcommand(ctx, "beta")
        with pytest.raises(ConfigError, match="unknown key 'epoch'"):
            beta.main(["--out", str(tmp_path / "o"), "--set", "epoch=5"], standalone_mode=False)
        with pytest.raises(ConfigError, match="give an output folder with --out"):
            beta.main([], standalone_mode=False)
