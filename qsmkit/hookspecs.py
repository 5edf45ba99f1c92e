"""pluggy hook specifications of qsmkit.

A plugin is a module (registered through the ``qsmkit`` entry-point group) that implements
one or both of the hooks below::

    from qsmkit import hookimpl

    @hookimpl
    def qsmkit_register_stages(registry):
        registry.add(MyInverter)

    @hookimpl
    def qsmkit_register_commands(cli):
        import click

        @cli.command("my-tool")
        @click.argument("out")
        def my_tool(out):
            "One line shown by qsmkit --help."
            from .heavy import work  # heavy imports (torch, h5py) inside the body
            work(out)

Each plugin's hooks are called on their own: a plugin whose hook raises is listed by
``qsmkit plugins`` with the reason, and what it registered before failing is discarded; the
other plugins are not affected.
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


@hookspec
def qsmkit_register_commands(cli) -> None:
    """Add click commands to the ``qsmkit`` command line: ``cli.add_command(cmd)`` or ``@cli.command()``.

    Called lazily, only when the command line needs the list of commands (``qsmkit --help``) or
    is given a command name that is not a built-in one, so it must be cheap: import heavy
    modules (torch, h5py, SimpleITK) inside the command's body, not in the hook or at module
    level. A command name that is already taken (by a built-in command or another plugin) is a
    registration failure of this plugin. User errors inside a command should be raised as
    :class:`qsmkit.errors.QsmkitError` subclasses (one ``error:`` line, exit status 2).

    Parameters
    ----------
    cli : click.Group
        A group collecting this plugin's commands (``@cli.group()`` makes a sub-group, e.g.
        ``qsmkit kspace prepare``); its commands are added to the ``qsmkit`` group when the
        hook returns without an error.
    """
