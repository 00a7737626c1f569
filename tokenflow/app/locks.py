"""Output locks: one worker per output, and a dead worker's lock never blocks a job for ever.

A job locks each of its outputs with a file next to it, ``<output>.lock``, created with
``O_CREAT | O_EXCL`` and holding one JSON record::

    {"pid": 4242, "host": "node-7", "started": 1700000000.1, "heartbeat": 1700000030.2,
     "token": "<uuid>", "output": "/abs/out.mp4", "boot": "<boot id>", "pidns": "pid:[...]",
     "pid_start": "<clock ticks>"}

The holder rewrites it (in place, one padded ``pwrite`` through the descriptor it created it
with) every ``min(10 s, TTL / 4)``: ``heartbeat`` and the file's mtime stay fresh.

A lock is stale, and is broken, when
- it was written on this machine (same host name and PID namespace) and its process is gone:
  ``os.kill(pid, 0)`` says no such process, the process is a zombie, its start time differs from
  ``pid_start`` (the pid was reused) or the machine has rebooted since (``boot`` differs);
- it was written on another machine and its newest sign of life (``heartbeat`` or the file's
  mtime, whichever is later) is older than the TTL: 120 s, or ``$TOKENFLOW_LOCK_TTL`` seconds;
- it cannot be parsed (a writer died between creating and filling it) and its mtime is older
  than the TTL.
A live process on this machine always keeps its lock, however old its heartbeat.

Breaking is race-free: every removal of a lock file (breaking a stale one, releasing one's own)
happens under a short-lived guard file, ``.<output>.lock.break`` (``O_EXCL``; one older than 30 s
is a dead remover's and is deleted). Under it the breaker reads the lock again and deletes it only
if it is still the very file it judged stale (same inode, mtime and record); then it competes for
the free name with ``O_EXCL`` like everyone else. Nobody can delete a lock that replaced the one
they looked at.
A holder checks that the lock file is still its own (same inode) at every heartbeat and, through
``verify()``, right before it renames its outputs into place; it releases (deletes) the lock
only if it is still its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

from tokenflow.errors import ConfigError, LockedError, OutputError

DEFAULT_TTL_S = 120.0
HEARTBEAT_S = 10.0
TTL_ENV = "TOKENFLOW_LOCK_TTL"
_RECORD_BYTES = 1024   # records are padded to a fixed size, so a rewrite never leaves a stale tail
_GUARD_STALE_S = 30.0  # the removal guard is held for microseconds (30 s: room for clock skew)


def lock_ttl() -> float:
    """The TTL (seconds) for locks written on other machines: ``$TOKENFLOW_LOCK_TTL`` or 120."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0 or ttl == float("inf"):
        raise ConfigError(f"{TTL_ENV}={raw!r} is not a positive number of seconds; "
                          f"unset it for the default ({DEFAULT_TTL_S:.0f} s)")
    return ttl


def lock_path(target) -> str:
    """The lock file of an output file or folder: ``<output>.lock`` next to it."""
    return os.path.abspath(os.fspath(target)) + ".lock"


# ----------------------------------------------------------------------------- this machine


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


_HOST = socket.gethostname()
_BOOT = _read_text("/proc/sys/kernel/random/boot_id")
try:
    _PIDNS: Optional[str] = os.readlink("/proc/self/ns/pid")
except OSError:
    _PIDNS = None


def _proc_stat(pid: int) -> Optional[List[str]]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), or None where there is no /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def pid_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot), or None where there is no /proc."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None   # field 22: starttime


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # PermissionError: it exists, under another user
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))   # a zombie holds nothing


def same_process(pid: int, start: Optional[str]) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``start`` (not a reused pid;
    ``start`` None: any process with that pid)."""
    return pid_alive(pid) and (start is None or pid_start(pid) == start)


def _same_machine(record: dict) -> bool:
    if record.get("host") != _HOST:
        return False
    theirs = record.get("pidns")
    return theirs is None or _PIDNS is None or theirs == _PIDNS


# ----------------------------------------------------------------------------- reading a lock


@dataclass
class Holder:
    """What a lock file says about its holder. ``record`` is None when it cannot be parsed."""

    path: str
    record: Optional[dict]
    inode: Tuple[int, int]
    mtime: float
    mtime_ns: int = 0

    def same_file(self, other: "Holder") -> bool:
        """The same lock file in the same state (inode numbers alone are reused after a delete)."""
        return (self.inode, self.mtime_ns, self.record) == (other.inode, other.mtime_ns, other.record)

    def last_seen(self) -> float:
        try:
            heartbeat = float((self.record or {}).get("heartbeat", 0.0))
        except (TypeError, ValueError):
            heartbeat = 0.0
        return max(heartbeat, self.mtime)

    def describe(self) -> str:
        age = max(0.0, time.time() - self.last_seen())
        if self.record is None:
            return f"an unreadable lock (last touched {age:.0f} s ago)"
        r = self.record
        started = r.get("started")
        since = (f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(started)))}, "
                 if isinstance(started, (int, float)) else "")
        return f"pid {r.get('pid')} on host '{r.get('host')}' ({since}last heartbeat {age:.0f} s ago)"


def read_lock(path: str, attempts: int = 5) -> Optional[Holder]:
    """The lock at ``path`` (None if there is none). A record being written is read again."""
    for attempt in range(attempts):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            raw = b""
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                raw += chunk
        finally:
            os.close(fd)
        holder = Holder(path, None, (st.st_dev, st.st_ino), st.st_mtime, st.st_mtime_ns)
        try:
            record = json.loads(raw.decode())
            if isinstance(record, dict) and "pid" in record:
                holder.record = record
                return holder
        except (ValueError, UnicodeDecodeError):
            pass
        if attempt + 1 < attempts:
            time.sleep(0.02 * (attempt + 1))   # just created and not yet filled in: look again
    return holder


def stale_reason(holder: Holder, ttl: float, now: Optional[float] = None) -> Optional[str]:
    """Why the lock may be broken, or None if its holder must be presumed alive."""
    now = time.time() if now is None else now
    age = now - holder.last_seen()
    record = holder.record
    if record is None:
        return f"its lock file is unreadable and untouched for {age:.0f} s (TTL {ttl:.0f} s)" if age > ttl else None
    try:
        pid = int(record["pid"])
    except (TypeError, ValueError):
        pid = -1
    if _same_machine(record):
        if record.get("boot") and _BOOT and record["boot"] != _BOOT:
            return f"pid {pid}'s machine has rebooted since"
        if not pid_alive(pid):
            return f"pid {pid} on this machine has exited"
        if record.get("pid_start") and pid_start(pid) not in (None, record["pid_start"]):
            return f"pid {pid} on this machine has exited (the pid now belongs to another process)"
        return None
    if age > ttl:
        return (f"host '{record.get('host')}' (pid {pid}) has not renewed it for {age:.0f} s "
                f"(TTL {ttl:.0f} s, {TTL_ENV})")
    return None


@contextlib.contextmanager
def _removal_guard(path: str, wait_s: float = 2.0) -> Iterator[bool]:
    """A short-lived mutex for removing ``path``: every removal of a lock file (breaking a stale one,
    releasing one's own) happens under it, so nobody removes a lock that replaced the one they
    inspected. Yields False if it could not be had in ``wait_s``."""
    folder, name = os.path.split(path)
    guard = os.path.join(folder, f".{name}.break")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            break
        except FileExistsError:
            try:   # held for microseconds; one this old belongs to a remover that died in it
                if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_S:
                    os.unlink(guard)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.002)
    try:
        yield True
    finally:
        try:
            os.unlink(guard)
        except FileNotFoundError:
            pass


def _break(holder: Holder) -> bool:
    """Delete the stale lock ``holder`` if it is still the one at its path (True if deleted)."""
    with _removal_guard(holder.path) as guarded:
        if not guarded:
            return False
        now = read_lock(holder.path, attempts=1)
        if now is None or not holder.same_file(now):
            return False        # released, or broken and re-taken by someone else meanwhile
        try:
            os.unlink(holder.path)  # nobody else removes lock files while we hold the guard
        except FileNotFoundError:
            return False
        return True


# ----------------------------------------------------------------------------- holding a lock


class OutputLock:
    """The lock of one output (file or folder). ``acquire()`` raises LockedError if a live worker holds it."""

    def __init__(self, target, ttl: Optional[float] = None):
        self.target = os.path.abspath(os.fspath(target))
        self.path = lock_path(self.target)
        self.ttl = lock_ttl() if ttl is None else float(ttl)
        self.fd: Optional[int] = None
        self.inode: Optional[Tuple[int, int]] = None
        self.record: dict = {}
        self.size = _RECORD_BYTES
        self.lost: Optional[str] = None
        self.broken: List[str] = []     # "why" of each stale lock this one broke
        self._io = threading.Lock()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "OutputLock":
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:
                    continue                               # released meanwhile: try again
                reason = stale_reason(holder, self.ttl)
                if reason is None:
                    raise LockedError(self._locked_message(holder)) from None
                try:
                    if _break(holder):
                        self.broken.append(f"broke the stale lock on '{self.target}': {reason}")
                except OSError as error:
                    raise OutputError(f"cannot remove the stale lock '{self.path}': {error.strerror or error}. "
                                      "Check the folder's permissions.") from None
                continue
            except OSError as error:
                raise OutputError(f"cannot create the lock file '{self.path}' for output '{self.target}': "
                                  f"{error.strerror or error}. Check the folder's permissions.") from None
            st = os.fstat(fd)
            self.fd, self.inode, self.lost = fd, (st.st_dev, st.st_ino), None
            now = time.time()
            self.record = {"pid": os.getpid(), "host": _HOST, "started": round(now, 3), "heartbeat": round(now, 3),
                           "token": uuid.uuid4().hex, "output": self.target, "boot": _BOOT, "pidns": _PIDNS,
                           "pid_start": pid_start(os.getpid())}
            self.size = max(_RECORD_BYTES, len(json.dumps(self.record)) + 256)
            try:
                self._write()
            except OSError as error:
                self.release()
                raise OutputError(f"cannot write the lock file '{self.path}': {error.strerror or error}") from None
            return self
        raise LockedError(f"output '{self.target}' is being locked and unlocked by other workers all the time "
                          f"({self.path}); try again later")

    def _write(self) -> None:
        data = json.dumps(self.record).encode()
        data += b" " * (self.size - 1 - len(data)) + b"\n"   # still one JSON document
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def heartbeat(self) -> None:
        """Renew the record (and mtime); notice if the lock file is no longer ours."""
        with self._io:
            if self.fd is None or self.lost:
                return
            self.record["heartbeat"] = round(time.time(), 3)
            try:
                self._write()          # through our descriptor: never into someone else's lock
            except OSError:
                pass
            self._check_owner()

    def _check_owner(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:   # our open descriptor keeps the inode number ours
                return
        except FileNotFoundError:
            pass
        holder = read_lock(self.path)
        self.lost = (f"'{self.path}' now belongs to {holder.describe()}" if holder is not None
                     else f"its lock file '{self.path}' was removed")

    def verify(self) -> None:
        """LockedError unless the lock file is still this holder's (checked right before committing outputs)."""
        with self._io:
            if self.fd is None:
                raise LockedError(f"output '{self.target}' is not locked by this worker")
            if not self.lost:
                self._check_owner()
            if self.lost:
                raise LockedError(f"lost the lock on output '{self.target}' ({self.lost}); another worker took it "
                                  f"over (this worker looked dead to it: heartbeat older than the TTL, "
                                  f"{TTL_ENV}), so this one does not write it")

    def release(self) -> None:
        """Delete the lock file if it is still ours. Idempotent."""
        with self._io:
            if self.fd is None:
                return
            fd, self.fd = self.fd, None
            try:
                with _removal_guard(self.path):
                    st = os.stat(self.path)
                    if (st.st_dev, st.st_ino) == self.inode:   # our open descriptor keeps the inode ours
                        os.unlink(self.path)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _locked_message(self, holder: Holder) -> str:
        if holder.record is not None and _same_machine(holder.record):
            rule = f"it is broken automatically once pid {holder.record.get('pid')} has exited"
        else:
            rule = f"it is broken automatically once it is {self.ttl:.0f} s old without a heartbeat ({TTL_ENV})"
        return (f"output '{self.target}' is locked by {holder.describe()}: another worker is making it. "
                f"Leave it to that worker or retry later: the lock goes when that worker ends, and {rule}. "
                f"Delete '{self.path}' only if you are sure that worker is gone")


class OutputLocks:
    """Locks on all of a job's outputs, taken all or none, with one heartbeat thread.

    ``with OutputLocks(paths) as locks: ... locks.verify(); <rename outputs into place>``
    """

    def __init__(self, targets: Iterable, ttl: Optional[float] = None, heartbeat_s: Optional[float] = None):
        ttl = lock_ttl() if ttl is None else float(ttl)
        unique = sorted({os.path.abspath(os.fspath(t)) for t in targets})
        self.locks = [OutputLock(t, ttl) for t in unique]
        self.interval = heartbeat_s if heartbeat_s is not None else min(HEARTBEAT_S, ttl / 4)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def broken(self) -> List[str]:
        return [message for lock in self.locks for message in lock.broken]

    def acquire(self) -> "OutputLocks":
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.release()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="tokenflow-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for lock in self.locks:
                lock.heartbeat()

    def verify(self) -> None:
        for lock in self.locks:
            lock.verify()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        for lock in self.locks:
            lock.release()

    def __enter__(self) -> "OutputLocks":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
