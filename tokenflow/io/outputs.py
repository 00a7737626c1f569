"""Every output lands whole or not at all: written under a temp name in the target's folder
(``temp_sibling``), then renamed over the target. The one implementation of that for the package:

- ``atomic_file``: a file object (text or binary) whose contents replace ``path`` on success;
- ``atomic_path``: a temp *path* for writers that want one (``torch.save`` to a path, ONNX,
  TensorRT, AOTInductor, the video encoder) or a folder the caller fills; whatever is there on
  success replaces ``path`` (a file by ``os.replace``, a folder by ``swap_folder_into_place``);
- ``swap_folder_into_place``: a complete folder replaces another, atomically where the platform
  can exchange two paths (Linux ``renameat2``), safe against concurrent writers of one target;
- ``durable=True``: fsync the new file (or every file of the new folder) before the rename and
  the parent folder after it, for state a crash must not lose (checkpoints, the inversion cache);

plus the checks that a target can be written before any work starts.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator, List

from tokenflow.errors import OutputError

TEMP_MARK = ".tmp-"   # every temp name: ".<target name>.tmp-<12 hex><suffix>"


def temp_sibling(path, suffix: str = "") -> str:
    """A fresh hidden name next to ``path`` (same folder, so a rename is atomic); unique per call."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}{suffix}")


def temp_siblings(path) -> List[Path]:
    """The temp names ``temp_sibling`` made for ``path`` that still exist (a killed writer's)."""
    target = Path(os.fspath(path)).absolute()
    return sorted(target.parent.glob(f".{glob.escape(target.name)}{TEMP_MARK}*"))


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", *, durable: bool = False, make_parents: bool = False) -> Iterator[IO]:
    """Yield a file object opened with ``mode`` ("w", "wb", ...); on a clean exit it replaces
    ``path``, on any error the temp file is removed and ``path`` is untouched. The temp file is
    created with mode 0666 and O_EXCL, so the kernel applies the process umask exactly as a plain
    open would (never mkstemp's 0600, and the umask itself is never touched: other threads may be
    creating files). ``durable``: see the module docstring."""
    target = Path(path).expanduser()
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        remove_path(tmp)
        raise
    if durable:
        fsync_folder(target.parent)


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = "", durable: bool = False, make_parents: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path`` where nothing exists yet (``suffix``: for writers that
    insist on an extension, e.g. ".pt2"). The caller writes a file there, or makes a folder and
    fills it. On a clean exit that replaces ``path`` (a folder through ``swap_folder_into_place``;
    where concurrent writers kept the place, theirs stays and ours is dropped); on any error it
    is removed and ``path`` is untouched. Writing nothing there is an error (FileNotFoundError)."""
    target = Path(path).expanduser()
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_sibling(target, suffix))
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            swap_folder_into_place(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        remove_path(tmp)          # an error, or a folder that others' folders kept out
    if durable:
        fsync_folder(target.parent)


def swap_folder_into_place(new_folder, folder) -> bool:
    """Rename the complete folder ``new_folder`` to ``folder``, replacing a folder already there.

    Readers never see a gap where the platform can exchange two paths in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``); elsewhere the old folder is renamed aside first, and put back
    if the new one cannot follow. Concurrent writers of one ``folder``: the last rename wins and
    every folder that wins is complete. Returns False when, after several tries, other writers'
    folders kept the place (``new_folder`` is then still there for the caller to remove)."""
    new_folder, folder = os.fspath(new_folder), os.fspath(folder)
    asides: List[str] = []
    try:
        for _ in range(8):
            try:
                os.rename(new_folder, folder)          # nothing there (or an empty folder): atomic
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if _rename_exchange(new_folder, folder):   # both exist: swapped; new_folder holds the old one
                asides.append(new_folder)
                return True
            aside = temp_sibling(folder, ".old")
            try:
                os.rename(folder, aside)               # no exchange here: old folder aside, then rename again
                asides.append(aside)
            except FileNotFoundError:
                pass
        return False
    except BaseException:
        if asides and not os.path.lexists(folder):     # the new folder did not follow: put the old one back
            with contextlib.suppress(OSError):
                os.rename(asides.pop(), folder)
        raise
    finally:
        for aside in asides:                           # after the new folder is in place: no gap for readers
            shutil.rmtree(aside, ignore_errors=True)


_renameat2 = None


def _rename_exchange(a, b) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                pass
    if not _renameat2:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def fsync_folder(folder) -> None:
    """Make renames in ``folder`` durable (POSIX); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file below a folder and the folders themselves."""
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(root)


def remove_path(path) -> None:
    """Remove a file, link or folder if it exists."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


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


def check_frames_target(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"frames output '{folder}' is a file; give a folder path instead.")
    if os.path.isdir(folder) and not _holds_only_our_frames(folder):
        raise OutputError(f"frames output folder '{folder}' already holds other files; "
                          "choose an empty or new folder.")
    _check_folder_writable(os.path.dirname(os.path.abspath(folder)), folder)


def _holds_only_our_frames(folder: str) -> bool:
    return all(re.fullmatch(r"\d{5,}\.png", name) for name in os.listdir(folder))
