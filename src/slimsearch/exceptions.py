"""The one exception root of slimsearch and its few subclasses."""

from __future__ import annotations

__all__ = ["SlimSearchError", "ConfigError", "JobStateError", "UnsupportedArchitecture", "UnsupportedOnDevice"]


class SlimSearchError(Exception):
    """Root of every error slimsearch raises on purpose."""


class ConfigError(SlimSearchError, ValueError):
    """A job file, command-line value or argument is not allowed.

    The message is one line naming where the value was, the field path, what was
    given and what is allowed.
    """


class UnsupportedArchitecture(ConfigError):
    """A runtime cannot build a model of this architecture (onnxruntime-genai's builder and GPT-2)."""


class JobStateError(SlimSearchError):
    """A job folder is not in the state the command needs (missing, already used, ...)."""


class UnsupportedOnDevice(SlimSearchError):
    """A model has a layer wider than every kernel of a device (e.g. fp32 on an int8-only NPU).

    Such a model does not run there as it is; its figures for that device are absent,
    not guessed.
    """
