"""Built-in plugin: the QSM-CI algorithm contract (``qsmkit qsm-ci run`` / ``qsmkit qsm-ci export``).

QSM-CI (github.com/QSMxT/QSM-CI) is the open QSM leaderboard: a submission implements one stage
(``field-mapping``, ``bfr``, ``dipole``) or span (``bfr+dipole``, ``end-to-end``) and reads and
writes canonical NIfTI files. This plugin runs any qsmkit method chain under that contract
(:mod:`.contract`) and writes submission folders for the built-in methods (:mod:`.export`).

Commands only (hook ``qsmkit_register_commands``); no stages. The hook imports click alone.
"""

from __future__ import annotations

from qsmkit import hookimpl


@hookimpl
def qsmkit_register_commands(cli):
    from .commands import COMMANDS

    for cmd in COMMANDS:
        cli.add_command(cmd)
