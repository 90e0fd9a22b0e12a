"""The one small exception family. The CLI prints these as a sentence and exits non-zero."""

from __future__ import annotations


class TunesmithError(Exception):
    """A problem the user can fix. The message says what, where, and how to fix it."""

    exit_code = 1


class UsageError(TunesmithError):
    """A bad flag, path or option value (exit code 2)."""

    exit_code = 2


class ModelNotFoundError(UsageError):
    """A model name or path that resolves to nothing available offline."""


class AdapterError(UsageError):
    """An adapter folder whose files cannot be loaded onto this base: a config, metadata or
    weights file that is unreadable, malformed or shaped for another model."""


class ConfigError(UsageError):
    """A config file or option that does not validate."""


class DataError(TunesmithError):
    """A data file that cannot be used as given."""
