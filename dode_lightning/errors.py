"""The user-mistake error every command line reports in one line (no Lightning import: the light commands use it)."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user mistake in the configuration; the command lines report it in one line with exit code 2."""
