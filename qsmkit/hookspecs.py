"""pluggy hook specifications of qsmkit.

A plugin is a module (registered through the ``qsmkit`` entry-point group) that implements
:func:`qsmkit_register_stages`::

    from qsmkit import hookimpl

    @hookimpl
    def qsmkit_register_stages(registry):
        registry.add(MyInverter)
"""

from __future__ import annotations

import pluggy

PROJECT = "qsmkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qsmkit_register_stages(registry) -> None:
    """Register stage implementations: call ``registry.add(StageClass)`` for each.

    Parameters
    ----------
    registry : qsmkit.registry.StageRegistry
        The registry to add :class:`qsmkit.stage.Stage` subclasses to.
    """
