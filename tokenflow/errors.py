"""One error family for everything a user can get wrong, with stable exit codes.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; no traceback.
Every message names the offending input and says how to fix it.
"""
from __future__ import annotations


import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short_repr(value) -> str:
    """``repr`` bounded in depth and length, for quoting user values in messages (a YAML alias
    bomb or a 1000-deep list must not become a megabyte error line)."""
    return _SHORT.repr(value)


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


class LockedError(TokenFlowError):
    """Another live worker holds the lock of this job's output; nothing was done."""

    exit_code = 7


class InterruptedWithCheckpoint(TokenFlowError):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved; ``--resume`` continues."""

    exit_code = 75


class Interrupted(TokenFlowError):
    """SIGTERM/SIGINT without a checkpoint directory: stopped, nothing written."""

    exit_code = 130


EXIT_CODES = {
    0: "success (also: every output already existed and was skipped)",
    1: "internal error (a bug: please report it; TOKENFLOW_DEBUG=1 prints the traceback)",
    ConfigError.exit_code: "bad flag, config value or job file",
    InputError.exit_code: "bad input video",
    ModelError.exit_code: "model unavailable or unsupported",
    OutputError.exit_code: "output cannot be written",
    ResourceError.exit_code: "out of memory (after one retry with smaller chunks)",
    LockedError.exit_code: "output locked by another live worker",
    InterruptedWithCheckpoint.exit_code: "interrupted; a checkpoint was saved (run again with --resume)",
    Interrupted.exit_code: "interrupted; nothing was saved",
}


# the "code" of an error event (--log-json): a stable name per exit code
EXIT_NAMES = {
    1: "internal_error",
    ConfigError.exit_code: "config_error",
    InputError.exit_code: "input_error",
    ModelError.exit_code: "model_error",
    OutputError.exit_code: "output_error",
    ResourceError.exit_code: "out_of_memory",
    LockedError.exit_code: "locked",
    InterruptedWithCheckpoint.exit_code: "interrupted_checkpointed",
    Interrupted.exit_code: "interrupted",
}
