"""``tokenflow ARGS`` run through ``tokenflow.app.cli.main`` in the test process, answered like
``subprocess.run([sys.executable, "-m", "tokenflow", *ARGS], capture_output=True, text=True)``.

A fresh ``python -m tokenflow`` spends most of its few seconds importing torch and diffusers; tests
that check what a command does (its files, events, messages and exit code) run it here instead.
Tests of real process behaviour (signals, the quick exit, a closed stdout, imports in a clean
interpreter) keep their subprocesses.

Both file descriptors 1 and 2 and ``sys.stdout``/``sys.stderr`` are redirected into files for the
call, so writes from C libraries are captured too, in order, as from a child process. The
environment (``env``: variables to set) and the working folder are restored afterwards.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, Optional


@contextlib.contextmanager
def _environment(env: Optional[Dict[str, str]], cwd) -> Iterator[None]:
    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


@contextlib.contextmanager
def _captured() -> Iterator[Dict[int, "tempfile._TemporaryFileWrapper"]]:
    """fds 1 and 2 and sys.stdout/sys.stderr into two temporary files."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    saved = {fd: os.dup(fd) for fd in files}
    old = sys.stdout, sys.stderr
    try:
        for fd, f in files.items():
            os.dup2(f.fileno(), fd)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        yield files
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = old
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def run_tokenflow(*args, env: Optional[Dict[str, str]] = None, cwd=None) -> subprocess.CompletedProcess:
    """``tokenflow ARGS`` in this process: CompletedProcess(args, exit code, stdout, stderr) as text."""
    from tokenflow.app.cli import main

    argv = [str(a) for a in args]
    with _environment(env, cwd), _captured() as files:
        try:
            code = main(argv)
        except SystemExit as exc:   # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = {}
    for fd, f in files.items():
        f.seek(0)
        out[fd] = f.read().decode("utf-8", "replace")
        f.close()
    return subprocess.CompletedProcess(["tokenflow", *argv], code, out[1], out[2])
