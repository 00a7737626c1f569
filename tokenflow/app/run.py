"""How every subcommand ends: an error becomes one line on stderr and its exit code.

``run_command`` is the one place where that happens, for every subcommand (``tokenflow.app.cli``
calls it). A command that streams JSON events (edit, invert, run) registers its Reporter with
``start_reporting``; its errors then also become an ``error`` event with the stable code name
(docs/events.md). ``exit_for`` is the mapping itself, which ``tokenflow run`` also applies to
each job it runs.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Callable, List, Optional, Tuple

from tokenflow import __version__
from tokenflow.errors import EXIT_NAMES, Interrupted, ResourceError, TokenFlowError, first_line, one_line
from tokenflow.io.progress import EVENT_SCHEMA_VERSION, Reporter

INTERNAL_ERROR = TokenFlowError.exit_code
OUT_OF_HOST_MEMORY = "out of host memory: use fewer frames (--frames) or a smaller --size"
_reporter: Optional[Reporter] = None    # the running command's, once it called start_reporting


def run_command(command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """``command()``'s exit code; for an exception, one line on stderr (and the ``error`` event)
    and its exit code (``exit_for``). ``interrupted``: the message for Ctrl-C.

    A closed stdout (``tokenflow schema | head``) ends a command that prints its result quietly
    with 0: the reader has what it wanted. A command streaming events was cut off mid-work:
    that is an error."""
    global _reporter
    _reporter = None
    try:
        return command()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing more can be written there
        if _reporter is None:
            return 0
        return fail("stdout was closed before the command finished (broken pipe)", INTERNAL_ERROR)
    except (Exception, KeyboardInterrupt) as exc:   # every other error: one line and its exit code
        code, message = exit_for(exc, interrupted=interrupted)
        return fail(message, code)
    finally:
        _reporter = None


def exit_for(exc: BaseException, *, interrupted: str = "interrupted") -> Tuple[int, str]:
    """The exit code and the one-line message for an exception that ends a command (or a job).

    A TokenFlowError carries both; Ctrl-C is 130, MemoryError 6; anything else is a bug: exit 1 and
    ``internal error: ...``, or the exception itself when TOKENFLOW_DEBUG is set (for its traceback)."""
    if isinstance(exc, TokenFlowError):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted.exit_code, interrupted
    if isinstance(exc, MemoryError):
        return ResourceError.exit_code, OUT_OF_HOST_MEMORY
    if os.environ.get("TOKENFLOW_DEBUG"):
        raise exc
    return INTERNAL_ERROR, internal_error(exc)


def internal_error(exc: BaseException) -> str:
    return f"internal error: {one_line(exc, limit=500)} (set TOKENFLOW_DEBUG=1 for a traceback and please report it)"


def fail(message: str, code: int) -> int:
    """One line on stderr, and the ``error`` event when the command streams events; ``code``."""
    if _reporter is not None:
        _reporter.event("error", code=EXIT_NAMES.get(code, EXIT_NAMES[INTERNAL_ERROR]), exit_code=code, message=message)
    print(f"tokenflow: error: {message}", file=sys.stderr)
    return code


def start_reporting(reporter: Reporter, command: str, argv: Optional[List[str]]) -> None:
    """``command`` reports through ``reporter`` from here on: the ``start`` event now, warnings as one
    line (and a ``warning`` event), errors as an ``error`` event."""
    global _reporter
    _reporter = reporter

    def show(message, category, filename, lineno, file=None, line=None):
        text = first_line(message)
        reporter.event("warning", message=text)
        if not reporter.quiet and reporter.json_stream is None:
            print(f"tokenflow: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    reporter.event("start", command=command, version=__version__, schema=EVENT_SCHEMA_VERSION, pid=os.getpid(),
                   host=platform.node(), argv=list(sys.argv[1:] if argv is None else argv))
