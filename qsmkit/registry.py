"""``StageRegistry``: maps (stage kind, method name) to a :class:`~qsmkit.stage.Stage` class."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PluginError
from .stage import STAGE_KINDS, Stage


@dataclass
class PluginFailure:
    """A plugin that could not be imported or could not register its stages."""

    name: str
    distribution: str
    reason: str


@dataclass
class StageRegistry:
    """Registered stage implementations, and the plugins that failed to load.

    Plugins call :meth:`add` from their ``qsmkit_register_stages`` hook.
    """

    _stages: dict = field(default_factory=dict)  # (kind, name) -> Stage subclass
    _providers: dict = field(default_factory=dict)  # (kind, name) -> (plugin, distribution)
    failures: list = field(default_factory=list)
    _current: tuple = ("", "")

    def add(self, stage: type[Stage]) -> None:
        """Register a :class:`Stage` subclass under ``(stage.kind, stage.name)``."""
        if not (isinstance(stage, type) and issubclass(stage, Stage)):
            raise PluginError(f"registry.add() takes a Stage subclass, got {stage!r}")
        if not stage.kind or not stage.name:
            raise PluginError(f"stage class {stage.__name__} must set 'kind' and 'name'")
        key = (stage.kind, stage.name)
        if key in self._stages and self._stages[key] is not stage:
            other = self._providers[key][0]
            raise PluginError(f"{stage.kind} method '{stage.name}' is registered twice "
                              f"(by plugin '{other}' and '{self._current[0]}')")
        self._stages[key] = stage
        self._providers[key] = self._current

    def kinds(self) -> list[str]:
        """Known stage kinds: the core's, then any added by plugins."""
        extra = sorted({k for k, _ in self._stages} - set(STAGE_KINDS))
        return list(STAGE_KINDS) + extra

    def methods(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._stages if k == kind)

    def get(self, kind: str, name: str) -> type[Stage]:
        """The implementation of ``kind``/``name``, or a :class:`PluginError` listing valid ones."""
        if kind not in self.kinds():
            raise PluginError(f"unknown stage kind '{kind}'; known kinds: {', '.join(self.kinds())}")
        try:
            return self._stages[(kind, name)]
        except KeyError:
            valid = ", ".join(self.methods(kind)) or "(none installed)"
            failed = [f.name for f in self.failures]
            extra = f" (plugins that failed to load: {', '.join(failed)}; see 'qsmkit plugins')" if failed else ""
            raise PluginError(f"unknown {kind} method '{name}'; valid methods: {valid}{extra}") from None

    def provider(self, kind: str, name: str) -> tuple[str, str]:
        """(plugin name, distribution) that registered ``kind``/``name``."""
        return self._providers.get((kind, name), ("", ""))

    def items(self):
        return sorted(self._stages.items())
