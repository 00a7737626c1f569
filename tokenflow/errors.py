"""One error family for everything a user can get wrong, with stable exit codes.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; no traceback.
Every message names the offending input and says how to fix it.
"""
from __future__ import annotations

import reprlib
from typing import Optional

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short_repr(value) -> str:
    """``repr`` bounded in depth and length, for quoting user values in messages (a YAML alias
    bomb or a 1000-deep list must not become a megabyte error line)."""
    return _SHORT.repr(value)


class TokenFlowError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is stable across releases; ``code`` is
    its name in the ``error`` event of ``--log-json``; ``meaning`` is what the exit code says."""

    exit_code = 1
    code = "internal_error"
    meaning = "internal error (a bug: please report it; TOKENFLOW_DEBUG=1 prints the traceback)"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(TokenFlowError):
    """A flag or config value is out of range, of the wrong type or unknown.

    ``field`` and ``reason`` are set when one EditConfig field is at fault (``of_field``): the
    message is then ``"<field>: <reason>"``, and job files report ``reason`` under the key the
    file used for that field."""

    exit_code, code = 2, "config_error"
    meaning = "bad flag, config value or job file"

    def __init__(self, message: str, *, field: Optional[str] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.field, self.reason = field, reason

    @classmethod
    def of_field(cls, field: str, reason: str) -> "ConfigError":
        return cls(f"{field}: {reason}", field=field, reason=reason)


class InputError(TokenFlowError):
    """The input video (or image folder) is missing, unreadable, corrupt, empty or of an unsupported size."""

    exit_code, code = 3, "input_error"
    meaning = "bad input video"


class ModelError(TokenFlowError):
    """The model cannot be found, loaded, or is not a supported Stable Diffusion layout."""

    exit_code, code = 4, "model_error"
    meaning = "model unavailable or unsupported"


class OutputError(TokenFlowError):
    """The output path cannot be written."""

    exit_code, code = 5, "output_error"
    meaning = "output cannot be written"


class ResourceError(TokenFlowError):
    """The device ran out of memory (or another resource)."""

    exit_code, code = 6, "out_of_memory"
    meaning = "out of memory (after one retry with smaller chunks)"


class LockedError(TokenFlowError):
    """Another live worker holds the lock of this job's output; nothing was done."""

    exit_code, code = 7, "locked"
    meaning = "output locked by another live worker"


class InterruptedWithCheckpoint(TokenFlowError):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved; ``--resume`` continues."""

    exit_code, code = 75, "interrupted_checkpointed"
    meaning = "interrupted; a checkpoint was saved (run again with --resume)"


class Interrupted(TokenFlowError):
    """SIGTERM/SIGINT without a checkpoint directory: stopped, nothing written."""

    exit_code, code = 130, "interrupted"
    meaning = "interrupted; nothing was saved"


_FAMILY = [TokenFlowError, *TokenFlowError.__subclasses__()]
# exit code -> meaning (0 included), and exit code -> the "code" of an error event
EXIT_CODES = {0: "success (also: every output already existed and was skipped)",
              **{cls.exit_code: cls.meaning for cls in _FAMILY}}
EXIT_NAMES = {cls.exit_code: cls.code for cls in _FAMILY}


def first_line(error: BaseException) -> str:
    """The first line of the message, or the type name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def one_line(error: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message``, shortened to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
