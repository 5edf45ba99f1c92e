"""Plugin manager factory: built-in and third-party plugins, all through the ``qsmkit`` entry points.

Built-in plugins (``plugins/qsmkit_*``) are registered through the same entry-point group as
third-party packages. A plugin whose import or registration fails is recorded as a
:class:`~qsmkit.registry.PluginFailure` (shown by ``qsmkit plugins``) and does not stop the others.
:func:`load_registry` calls the stage hooks; :func:`qsmkit.commands.load_commands` the command hooks.

Environment variables
---------------------
QSMKIT_DISABLE_PLUGIN_AUTOLOAD
    When set to a non-empty value other than ``0``, only the plugins shipped in the ``qsmkit``
    distribution itself are loaded (third-party entry points are ignored).
QSMKIT_BLOCK_PLUGINS
    Comma-separated entry-point names that are never loaded (e.g. ``medi,dip``).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Iterable

import pluggy

from . import hookspecs
from .registry import PluginFailure, StageRegistry

ENTRY_POINT_GROUP = "qsmkit"
CORE_DISTRIBUTION = "qsmkit"


def _autoload_disabled() -> bool:
    return os.environ.get("QSMKIT_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")


def _blocked() -> set[str]:
    return {b.strip() for b in os.environ.get("QSMKIT_BLOCK_PLUGINS", "").split(",") if b.strip()}


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def get_plugin_manager(extra_plugins: Iterable[object] = ()) -> tuple[pluggy.PluginManager, list[PluginFailure], dict]:
    """Create a plugin manager with every loadable ``qsmkit`` entry point registered.

    Parameters
    ----------
    extra_plugins : iterable of modules/objects
        Plugins to register directly (tests, embedding applications).

    Returns
    -------
    (pm, failures, distributions)
        The manager, the plugins that failed to import, and ``{plugin name: distribution}``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    dists: dict[str, str] = {}
    blocked = _blocked()
    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = _dist_name(ep)
        if ep.name in blocked or ep.name in seen:
            continue
        if _autoload_disabled() and dist != CORE_DISTRIBUTION:
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}".strip()))
            continue
        dists[ep.name] = dist
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or repr(plugin)
        pm.register(plugin, name=name)
        dists[name] = "(direct)"
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        failures.append(PluginFailure(getattr(exc, "plugin_name", "?"), "?", str(exc)))
    return pm, failures, dists


def load_registry(extra_plugins: Iterable[object] = ()) -> StageRegistry:
    """A :class:`StageRegistry` filled by every plugin's ``qsmkit_register_stages`` hook.

    Each plugin's hook is called on its own, so one that raises is recorded as a failure and the
    stages it registered before failing are kept out.
    """
    pm, failures, dists = get_plugin_manager(extra_plugins)
    registry = StageRegistry()
    registry.failures.extend(failures)
    for impl in pm.hook.qsmkit_register_stages.get_hookimpls():
        name = impl.plugin_name
        dist = dists.get(name, "?")
        trial = StageRegistry()
        trial._stages = dict(registry._stages)
        trial._providers = dict(registry._providers)
        trial._current = (name, dist)
        try:
            impl.function(registry=trial)
        except Exception as exc:
            registry.failures.append(PluginFailure(name, dist, f"{type(exc).__name__}: {exc}".strip()))
            continue
        registry._stages, registry._providers = trial._stages, trial._providers
    return registry
