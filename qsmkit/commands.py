"""Commands that plugins add to the ``qsmkit`` command line (hook ``qsmkit_register_commands``).

The ``qsmkit`` click group is a :class:`PluginGroup`: its built-in commands (``run``,
``validate``, ...) are resolved directly, and the plugins' command hooks run only when the
command line needs them, that is when it lists the commands (``qsmkit --help``, shell
completion) or is given a name that is not built in (``qsmkit simulate-kspace``). So
``qsmkit run`` and ``qsmkit --version`` never call a command hook, and ``qsmkit --help`` imports
the plugin modules but nothing heavy (plugins import torch, h5py, SimpleITK inside their
command bodies).

Each plugin's hook is called with a group of its own; its commands join the ``qsmkit`` group only
if the hook returns without an error and none of their names is taken. Otherwise the plugin is
recorded as a :class:`~qsmkit.registry.PluginFailure` (listed by ``qsmkit plugins`` under
"failed to load", like a plugin whose stages fail to register) and the other plugins' commands
are unaffected. The result is cached for one invocation (in the root click context's ``meta``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import click

from .registry import PluginFailure

__all__ = ["PluginCommands", "PluginGroup", "TrainGroup", "load_commands", "plugin_commands", "train_group"]

_META_KEY = "qsmkit.plugin_commands"
#: built-in command groups whose subcommands come from several plugins (``qsmkit train <method>``)
SHARED_GROUPS = ("train",)


def train_group(cli: click.Group) -> click.Group:
    """The ``train`` group inside a plugin's command hook: add ``qsmkit train <method>`` commands to it.

    Usage in a plugin::

        @hookimpl
        def qsmkit_register_commands(cli):
            from qsmkit.commands import train_group
            from qsmkit.training import train_command
            train_group(cli).add_command(train_command("qsmnet", DEFAULTS, run, "Train QSMnet."))

    Several plugins add to the same group; a method name already taken by another plugin is a
    registration failure of the second plugin, as for top-level commands.
    """
    group = cli.commands.get("train")
    if group is None:
        group = click.Group("train")
        cli.add_command(group)
    return group


@dataclass
class PluginCommands:
    """Commands added by plugins, who added them, and the plugins that failed.

    Attributes
    ----------
    commands : dict[str, click.Command]
        Command name -> command.
    providers : dict[str, tuple[str, str]]
        Command name -> (plugin name, distribution).
    train, train_providers : dict
        The same for the ``qsmkit train <method>`` subcommands (see :func:`train_group`).
    failures : list[PluginFailure]
        Plugins whose ``qsmkit_register_commands`` hook raised or used a name already taken.
    load_failures : list[PluginFailure]
        Plugins that could not be imported at all (also reported by the stage registry).
    """

    commands: dict = field(default_factory=dict)
    providers: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    train_providers: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    load_failures: list = field(default_factory=list)


def load_commands(reserved: Iterable[str] = (), extra_plugins: Iterable[object] = ()) -> PluginCommands:
    """Call every plugin's ``qsmkit_register_commands`` hook, each on its own.

    Parameters
    ----------
    reserved : iterable of str
        Names that plugins may not use (the built-in commands).
    extra_plugins : iterable of modules/objects
        Plugins to register directly, besides the entry points (tests, embedding applications).
    """
    from .plugins import get_plugin_manager

    pm, load_failures, dists = get_plugin_manager(extra_plugins)
    reserved = set(reserved)
    out = PluginCommands(load_failures=list(load_failures))
    for impl in pm.hook.qsmkit_register_commands.get_hookimpls():
        name = impl.plugin_name
        dist = dists.get(name, "?")
        trial = click.Group(name="qsmkit")
        try:
            impl.function(cli=trial)
            shared = {g: trial.commands.pop(g) for g in SHARED_GROUPS if g in trial.commands}
            for sub, cmd in getattr(shared.get("train"), "commands", {}).items():
                if sub in out.train:
                    raise ValueError(f"command 'train {sub}' is already added by plugin '{out.train_providers[sub][0]}'")
            for cname, cmd in trial.commands.items():
                if not isinstance(cmd, click.Command):
                    raise TypeError(f"command '{cname}' is a {type(cmd).__name__}, not a click command")
                if cname in reserved:
                    raise ValueError(f"command '{cname}' is a built-in qsmkit command")
                if cname in out.commands:
                    other = out.providers[cname][0]
                    raise ValueError(f"command '{cname}' is already added by plugin '{other}'")
        except Exception as exc:  # a broken plugin must not break the command line
            out.failures.append(PluginFailure(name, dist, f"registering commands: {type(exc).__name__}: {exc}".strip()))
            continue
        for cname, cmd in trial.commands.items():
            out.commands[cname] = cmd
            out.providers[cname] = (name, dist)
        for sub, cmd in getattr(shared.get("train"), "commands", {}).items():
            out.train[sub] = cmd
            out.train_providers[sub] = (name, dist)
    return out


def plugin_commands(ctx: click.Context | None = None) -> PluginCommands:
    """The plugin commands of this invocation (loaded on the first call, then cached)."""
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    pc = root.meta.get(_META_KEY)
    if pc is None:
        builtins = root.command.commands if isinstance(root.command, click.Group) else {}
        pc = load_commands(reserved=builtins)
        root.meta[_META_KEY] = pc
    return pc


def describe_commands(ctx: click.Context | None = None) -> list[str]:
    """Lines for ``qsmkit plugins``: one per plugin command, with its plugin and distribution."""
    pc = plugin_commands(ctx)
    if not pc.commands and not pc.train:
        return []
    lines = ["commands"]
    entries = [(c, pc.commands[c], pc.providers[c]) for c in pc.commands]
    entries += [(f"train {c}", pc.train[c], pc.train_providers[c]) for c in pc.train]
    for cname, cmd, (plugin, dist) in sorted(entries, key=lambda e: e[0]):
        short = cmd.get_short_help_str(limit=70)
        lines.append(f"  {cname}  [plugin {plugin}, from {dist}]" + (f"  {short}" if short else ""))
    return lines


class PluginGroup(click.Group):
    """A click group whose commands are the built-in ones plus those the plugins add (lazily)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(plugin_commands(ctx).commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        return plugin_commands(ctx).commands.get(cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:  # "No such command": say which plugins are missing
            pc = plugin_commands(ctx)
            failed = sorted({f.name for f in pc.load_failures + pc.failures})
            blocked = os.environ.get("QSMKIT_BLOCK_PLUGINS", "").strip()
            notes = []
            if failed:
                notes.append(f"plugins that failed to load: {', '.join(failed)}; see 'qsmkit plugins'")
            if blocked:
                notes.append(f"blocked by QSMKIT_BLOCK_PLUGINS: {blocked}")
            if notes and exc.message.startswith("No such command"):
                exc.message = f"{exc.message.rstrip('.')} ({'; '.join(notes)})."
            raise


class TrainGroup(click.Group):
    """``qsmkit train``: a built-in group whose subcommands (one per trainable method) come from plugins."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(plugin_commands(ctx).train))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name) or plugin_commands(ctx).train.get(cmd_name)
