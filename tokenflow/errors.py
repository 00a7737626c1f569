"""One error family for everything a user can get wrong, with stable exit codes.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; no traceback.
Every message names the offending input and says how to fix it.
"""
from __future__ import annotations


class TokenFlowError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is stable across releases."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(TokenFlowError):
    """A flag or config value is out of range, of the wrong type or unknown."""

    exit_code = 2


class InputError(TokenFlowError):
    """The input video (or image folder) is missing, unreadable, corrupt, empty or of an unsupported size."""

    exit_code = 3


class ModelError(TokenFlowError):
    """The model cannot be found, loaded, or is not a supported Stable Diffusion layout."""

    exit_code = 4


class OutputError(TokenFlowError):
    """The output path cannot be written."""

    exit_code = 5


class ResourceError(TokenFlowError):
    """The device ran out of memory (or another resource)."""

    exit_code = 6
