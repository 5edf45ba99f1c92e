"""Exception hierarchy for user-facing errors.

Every error that a user can cause (bad input file, bad YAML, unknown plugin or parameter, data
in the wrong units) is a :class:`QsmkitError` subclass whose message is one line that says what
is wrong and how to fix it. The CLI prints such errors without a traceback and exits with
status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations


class QsmkitError(Exception):
    """Base class of every user-facing qsmkit error (one-line message, CLI exit status 2)."""

    exit_code = 2

    def __str__(self) -> str:  # keep messages on one line whatever the caller passed
        return " ".join(str(a) for a in self.args).replace("\n", " ").strip()


class ConfigError(QsmkitError):
    """The pipeline YAML, a ``--set`` override or a CLI option is malformed."""


class ParameterError(ConfigError):
    """A stage parameter is unknown, of the wrong type or out of its allowed range."""


class PluginError(QsmkitError):
    """A stage kind or method is unknown, or a plugin failed to load or register."""


class InputDataError(QsmkitError, ValueError):
    """An input file is missing, unreadable or holds data that cannot be used as it is.

    Also a :class:`ValueError`, so that library users calling the pure array functions of the
    plugins (which raise it, or :class:`GeometryError` / :class:`UnitsError`, on bad arrays) can
    catch it as they would catch numpy's or scipy's errors.
    """


class GeometryError(InputDataError):
    """Inputs disagree on grid, affine or dimensionality."""


class UnitsError(InputDataError):
    """Data are not in the units qsmkit expects (phase in rad, echo times in s, ...)."""


class CheckpointError(InputDataError):
    """A trained model's checkpoint is missing, corrupt, truncated, foreign or of another architecture."""


class MissingArtifactError(QsmkitError):
    """A stage needs an artifact (e.g. ``magnitude``) that neither inputs nor stages provide."""


class UndeclaredArtifactError(MissingArtifactError):
    """A stage read an artifact that its class does not declare in ``reads`` / ``optional_reads`` (a plugin bug)."""


class StageError(QsmkitError):
    """A stage could not produce a valid result from valid-looking input (e.g. empty mask)."""


class OutputError(QsmkitError):
    """Outputs cannot be written where asked (e.g. they would overwrite an input)."""


class QsmkitWarning(UserWarning):
    """Something was assumed that the user may want to make explicit (printed as one ``warning:`` line)."""
