"""Whether an output path would write over, into or around an input: the same path, a symbolic
or hard link to it, a folder that contains it or lies inside it. Plain path and ``stat`` arithmetic
(no torch): ``app.paths`` checks a job's every output against its every input with it, and the
commands that write one file next to their inputs (``tokenflow metrics --json``) use it directly.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

from tokenflow.errors import OutputError

NEVER_OVER_INPUTS = ("tokenflow never writes over or into an input, with or without --overwrite: "
                     "choose an output path outside the job's inputs")


def inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both already real, absolute paths)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:   # different drives (Windows)
        return False


def _stat(path: str):
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def alias_reason(output: str, input_label: str, input_path: str, *, may_contain: bool = False) -> Optional[str]:
    """How the output path ``output`` aliases the input, as the rest of a sentence starting with the
    output (``"is the input video 'a.mp4'"``), or None when it does not. ``may_contain``: a folder
    output that only ever adds and removes its own files (the checkpoint folder) may hold inputs."""
    real_out, real_in = os.path.realpath(output), os.path.realpath(input_path)
    named = f"the {input_label} '{input_path}'"
    if real_out == real_in:
        if os.path.abspath(output) == os.path.abspath(input_path):
            return f"is {named}"
        return f"is {named} through a symbolic link (both resolve to '{real_in}')"
    out_stat, in_stat = _stat(real_out), _stat(real_in)
    if out_stat is not None and in_stat is not None and (out_stat.st_dev, out_stat.st_ino) == (in_stat.st_dev,
                                                                                               in_stat.st_ino):
        return f"is a hard link to {named} (the same file on disk)"
    if inside(real_in, real_out) and not may_contain:
        return f"contains {named}"
    if inside(real_out, real_in):
        return f"lies inside {named}"
    return None


def check_not_an_input(label: str, output: str, inputs: Iterable[Tuple[str, str]]) -> None:
    """OutputError (exit 5) naming both paths when the file output ``output`` (flag ``label``) is,
    or lies inside, one of ``inputs`` ((label, path) of files or folders that exist)."""
    for in_label, in_path in inputs:
        if not os.path.lexists(in_path):
            continue
        reason = alias_reason(output, in_label, in_path)
        if reason is not None:
            raise OutputError(f"{label} '{output}' {reason}; tokenflow never writes over or into what it reads: "
                              "choose another path")
