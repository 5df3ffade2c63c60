"""Errors raised by deltatune.

Every error is a :class:`DeltatuneError`; its message says what went wrong and what to do.
"""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltatuneError, ValueError):
    """A method or recipe configuration is invalid."""


class TargetError(ConfigError):
    """A target module or layer selection matches nothing, or the wrong kind of module."""


class AdapterError(DeltatuneError, KeyError):
    """An adapter name is unknown, taken, or used in a way its state does not allow."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(DeltatuneError, OSError):
    """An adapter folder or file is missing, truncated, foreign, or does not fit the model."""


class ModelNotFoundError(DeltatuneError, FileNotFoundError):
    """A model alias or directory could not be resolved."""
