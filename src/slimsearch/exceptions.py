"""The one exception root of slimsearch and its few subclasses."""

from __future__ import annotations

__all__ = ["SlimSearchError", "ConfigError", "JobStateError"]


class SlimSearchError(Exception):
    """Root of every error slimsearch raises on purpose."""


class ConfigError(SlimSearchError, ValueError):
    """A job file, command-line value or argument is not allowed.

    The message is one line naming where the value was, the field path, what was
    given and what is allowed.
    """


class JobStateError(SlimSearchError):
    """A job folder is not in the state the command needs (missing, already used, ...)."""
