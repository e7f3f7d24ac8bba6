"""Errors Balsam reports to users: each is one line saying what is wrong and where."""

from __future__ import annotations


class BalsamError(Exception):
    """Base of every error meant for the user (the CLI prints it without a traceback)."""

    #: Exit code of the CLI for this error (2 is reserved for usage errors).
    exit_code = 1


class ConfigError(BalsamError):
    """A bad ``balsam.toml``: syntax, unknown key, wrong type, impossible value."""


class PluginError(BalsamError):
    """A plugin that is unknown, ambiguous, broken, or failed to build."""


class SiteNotFound(BalsamError):
    """No site at the given path, in ``BALSAM_SITE`` or above the current directory."""


class ValidationError(BalsamError):
    """Bad user input for an app, a task or a dependency; nothing was written."""

    exit_code = 2


class DependencyCycle(ValidationError):
    """Adding a dependency would close a cycle in the task graph."""


class NotFound(BalsamError):
    """An app, task or batch job that does not exist."""


class DatabaseError(BalsamError):
    """The database is locked, unreachable, or of an incompatible schema version."""
