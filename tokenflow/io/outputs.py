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

plus the checks that a target can be written before any work starts, and the sweep of temps that
killed writers left behind.

Temp names say whose they are: ``.<target name>.tmp-<owner token>-<8 hex><suffix>``, the owner
token (``io.owners``) being ``<pid>-<start time>-<machine>-<boot>``. A writer that stages into a
temp path and hands it to another atomic write makes a temp of a temp
(``..<name>.tmp-<owner>-<hex>.new.mp4.tmp-<owner>-<hex>.mp4``): it belongs to the same target.
A name is a temp of ``<name>`` when it is k dots, ``<name>``, then the temp mark right away, and
holds exactly k temp marks (each followed by an owner token or an older version's 12 hex digits):
``..a.mp4.tmp-<owner>-<hex>`` is a temp of ``.a.mp4``, not of ``a.mp4``.

Leftovers (``sweep_temps``; docs/checkpoints.md "Leftovers"). Every ``atomic_file`` and
``atomic_path`` first sweeps its target's temps, and so does taking an output's lock
(``app.locks``). A temp is removed when
- every owner in its name is a process of this machine that is gone: its pid does not exist or is
  a zombie, the pid now belongs to a process that started at another time, or the machine has
  rebooted since (another boot; only where the machine id tells this machine from others:
  ``io.owners``, "the rule"). A live writer's temp is never removed, however old;
- an owner in its name is on another machine (shared storage, a farm; or a machine that cannot be
  told from this one), or the name carries no owner (a temp of an older tokenflow:
  ``.<name>.tmp-<12 hex><suffix>``), and nothing in it was
  modified for ``foreign_after`` seconds: an hour (``FOREIGN_TEMP_AGE_S``) by default, the lock
  TTL when the sweep runs under the target's lock (a live worker on another machine holds that
  lock and renews it, so a worker whose temp it is has lost the output). Writers keep touching a
  file they write (and a folder they fill); a staged, complete output waits at most for the
  other outputs of its job.
Other names are never touched, even ones that contain "tmp".
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Iterator, List, Optional

from tokenflow.errors import OutputError
from tokenflow.io.owners import TOKEN_PATTERN, elsewhere_words, my_token, owners_in

TEMP_MARK = ".tmp-"   # every temp name: ".<target name>.tmp-<owner token>-<8 hex><suffix>"
FOLDER_STAMP = "tokenflow-job.json"   # the job's settings in a frames or report folder (io.stamps)
# the files a checkpoint folder (--checkpoint-dir) writes, per phase: all it ever writes or removes there
STATE_FILES = {"invert": "inversion.pt", "edit": "edit.pt"}
FOREIGN_TEMP_AGE_S = 3600.0   # another machine's (or an owner-less) temp untouched this long is a dead writer's
_LEGACY = re.compile(r"[0-9a-f]{12}(\.|$)")   # what followed TEMP_MARK before names carried their owner
_TEMP_NAME = re.compile(re.escape(TEMP_MARK) + f"({TOKEN_PATTERN}|{_LEGACY.pattern})")


def temp_sibling(path, suffix: str = "") -> str:
    """A fresh hidden name next to ``path`` (same folder, so a rename is atomic), carrying this
    process's owner token; unique per call."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}{TEMP_MARK}{my_token()}-{uuid.uuid4().hex[:8]}{suffix}")


def temp_siblings(path) -> List[Path]:
    """The temp names ``temp_sibling`` made for ``path`` that still exist (a killed writer's)."""
    target = Path(os.fspath(path)).absolute()
    return sorted(target.parent.glob(f".{glob.escape(target.name)}{TEMP_MARK}*"))


def sweep_temps(path, *, foreign_after: float = FOREIGN_TEMP_AGE_S) -> List[str]:
    """Remove the temps (files or folders) of ``path`` that their writers left behind: the rule in
    the module docstring. Returns one line per removed temp ("removed ...: why"). Never raises:
    a sweep that cannot look or remove leaves things as they are."""
    target = os.path.abspath(os.fspath(Path(path).expanduser()))
    folder, name = os.path.split(target)
    return _sweep(folder, lambda entry: is_temp_of(entry, name), foreign_after)


def is_temp_of(entry: str, name: str) -> bool:
    """Whether the file name ``entry`` is a temp of the target named ``name`` (``temp_sibling``), or a
    temp of such a temp: k leading dots, ``name``, the temp mark right after it, and exactly k temp
    marks, each followed by an owner token (or an older version's 12 hex digits). The dots count the
    nesting, so ``..a.mp4.tmp-<owner>-<hex>`` (one mark) is the temp of ``.a.mp4``, not of ``a.mp4``,
    while ``..a.mp4.tmp-<owner>-<hex>.new.mp4.tmp-<owner>-<hex>.mp4`` (two) is ``a.mp4``'s."""
    match = re.match(r"(\.+)" + re.escape(name) + re.escape(TEMP_MARK), entry)
    if match is None:
        return False
    first = match.end() - len(TEMP_MARK)
    if _TEMP_NAME.match(entry, first) is None:
        return False
    return sum(1 for _ in _TEMP_NAME.finditer(entry, first)) == len(match.group(1))


def sweep_folder_temps(folder, *, foreign_after: float = FOREIGN_TEMP_AGE_S, loose=()) -> List[str]:
    """``sweep_temps`` for every temp in ``folder``, whatever its target: hidden names with the temp
    mark followed by an owner token (or the 12 hex digits of older versions). ``loose``: also any
    hidden name containing one of these marks, owner or not (for folders only tokenflow writes in,
    such as the inversion cache's)."""
    def is_temp(entry: str) -> bool:
        return entry.startswith(".") and (_TEMP_NAME.search(entry) is not None or any(m in entry for m in loose))

    return _sweep(os.fspath(folder), is_temp, foreign_after)


def _sweep(folder: str, is_temp, foreign_after: float) -> List[str]:
    removed: List[str] = []
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries if is_temp(entry.name)]
    except OSError:
        return removed
    for entry in names:
        temp = os.path.join(folder, entry)
        try:
            why = leftover_reason(temp, foreign_after=foreign_after)
            if why is not None:
                remove_path(temp)
                if not os.path.lexists(temp):
                    removed.append(f"removed '{temp}', left by a writer that is gone: {why}")
        except (OSError, ValueError):   # gone meanwhile (another sweeper), or unreadable: left as it is
            pass
    return removed


def leftover_reason(temp, *, foreign_after: float = FOREIGN_TEMP_AGE_S, now: Optional[float] = None) -> Optional[str]:
    """Why the temp at ``temp`` belongs to a writer that is gone, or None to keep it (the rule in
    the module docstring; the caller has decided that ``temp`` is a temp name)."""
    owners = owners_in(os.path.basename(os.fspath(temp)), TEMP_MARK)
    reasons = [owner.gone_reason() for owner in owners if owner.here]
    if any(reason is None for reason in reasons):
        return None                                # a live writer of this machine
    if owners and len(reasons) == len(owners):
        return reasons[0]                          # every writer was of this machine and is gone
    untouched = (time.time() if now is None else now) - last_touched(temp)
    if untouched <= foreign_after:
        return None
    elsewhere = [owner for owner in owners if not owner.here]   # (those of this machine are gone)
    whose = elsewhere_words(elsewhere[0].machine) if elsewhere else "its name does not say whose it is"
    return f"{whose}, and nothing in it changed for {untouched:.0f} s (more than {foreign_after:.0f} s)"


def last_touched(path) -> float:
    """The newest mtime of ``path`` and, for a folder, of everything below it (links not followed)."""
    path = os.fspath(path)
    st = os.lstat(path)
    newest = st.st_mtime
    if stat.S_ISDIR(st.st_mode):
        for root, folders, files in os.walk(path):
            for name in folders + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


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
    sweep_temps(target)
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
    sweep_temps(target)
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
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def rename_exchange(a, b) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): True when
    swapped, False where the platform or file system cannot exchange paths. Any other failure
    raises OSError: ``FileNotFoundError`` when either path is missing (callers look again)."""
    code = _exchange_errno(a, b)
    if code is None or code in _EXCHANGE_UNSUPPORTED:
        return False
    if code:
        raise OSError(code, os.strerror(code), os.fspath(b))
    return True


def _rename_exchange(a, b) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported or when
    the swap failed for any reason (either path missing: ``swap_folder_into_place`` tries again)."""
    return _exchange_errno(a, b) == 0


def _exchange_errno(a, b) -> Optional[int]:
    """renameat2(a, b, RENAME_EXCHANGE): 0 when swapped, else its errno; None where there is no renameat2."""
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
        return None
    at_fdcwd, exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


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
    return all(re.fullmatch(r"\d{5,}\.(png|exr)", name) or name == FOLDER_STAMP for name in os.listdir(folder))
