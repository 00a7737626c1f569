"""Every output lands whole or not at all: written under a temp name in the target's folder, then
renamed over it (``atomic_file`` for files; ``temp_sibling`` + ``swap_folder_into_place`` for
folders); plus the checks that a target can be written before any work starts."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator

from tokenflow.errors import OutputError


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", *, durable: bool = False, make_parents: bool = False) -> Iterator[IO]:
    """Yield a file object; on a clean exit it replaces ``path``, on any error the temp file is
    removed and ``path`` is untouched. ``durable``: fsync before the rename (state a crash must not
    lose). The temp file is created with mode 0666 and O_EXCL, so the kernel applies the process
    umask exactly as a plain open would (never mkstemp's 0600, and the umask itself is never
    touched: other threads may be creating files)."""
    target = Path(path).expanduser()
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path) -> None:
    """Raise OutputError unless a file can be created at ``path``; creates missing parent folders.
    Meant to run before expensive work."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"output '{path}' is a folder; give a file name such as "
                          f"'{os.path.join(path, 'edited.mp4')}'.")
    _check_folder_writable(os.path.dirname(os.path.abspath(path)), path)


def _check_folder_writable(folder: str, target: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create folder '{folder}' for output '{target}': "
                          f"{error.strerror or error}. Choose another output path.") from error
    try:
        handle, probe_path = tempfile.mkstemp(prefix=".tokenflow-write-test-", dir=folder)
        os.close(handle)
        os.remove(probe_path)
    except OSError as error:
        raise OutputError(f"cannot write output '{target}' into '{folder}': "
                          f"{error.strerror or error}. Check permissions or choose another path.") from error


def temp_sibling(path: str, suffix: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_frames_target(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"frames output '{folder}' is a file; give a folder path instead.")
    if os.path.isdir(folder) and not _holds_only_our_frames(folder):
        raise OutputError(f"frames output folder '{folder}' already holds other files; "
                          "choose an empty or new folder.")
    _check_folder_writable(os.path.dirname(os.path.abspath(folder)), folder)


def _holds_only_our_frames(folder: str) -> bool:
    return all(re.fullmatch(r"\d{5,}\.png", name) for name in os.listdir(folder))


def swap_folder_into_place(new_folder: str, folder: str) -> None:
    if not os.path.isdir(folder):
        os.rename(new_folder, folder)
        return
    old_folder = temp_sibling(folder, ".old")
    os.rename(folder, old_folder)
    try:
        os.rename(new_folder, folder)
    except OSError:
        os.rename(old_folder, folder)
        raise
    shutil.rmtree(old_folder, ignore_errors=True)
