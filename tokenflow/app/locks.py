"""Output locks: one worker per output, and a dead worker's lock never blocks a job for ever.

A job locks each of its outputs with a file next to it, ``<output>.lock``, created with
``O_CREAT | O_EXCL`` and holding one JSON record::

    {"pid": 4242, "host": "node-7", "started": 1700000000.1, "heartbeat": 1700000030.2,
     "token": "<uuid>", "output": "/abs/out.mp4", "boot": "<boot id>", "pidns": "pid:[...]",
     "pid_start": "<clock ticks>", "machine": "<machine tag>"}

(``machine``: ``io.owners.MACHINE_TAG``, a hash of host name, PID namespace and machine id.)

The holder rewrites it (in place, one padded ``pwrite`` through the descriptor it created it
with) every ``min(10 s, TTL / 4)``: ``heartbeat`` and the file's mtime stay fresh.

Where a lock was written is decided by ``io.owners.record_placement`` (the machine-identity rule
of ``io.owners``: the machine tag, and the boot; a record of an older tokenflow, without
``machine``, counts as this machine's only during this very boot). A lock is stale, and is
broken, when
- it was written during this boot of this machine and its process is gone: ``os.kill(pid, 0)``
  says no such process, the process is a zombie, or its start time differs from ``pid_start``
  (the pid was reused);
- it was written during an earlier boot of this machine (the same machine id, another ``boot``);
- it was written on another machine (or one that cannot be told from this one) and its newest
  sign of life (``heartbeat`` or the file's mtime, whichever is later) is older than the TTL:
  120 s, or ``$TOKENFLOW_LOCK_TTL`` seconds;
- its holder marked it ``released``: ``OutputLock.release`` deletes the file only under the
  removal guard, and marks it so when it could not have the guard;
- it cannot be parsed (a writer died between creating and filling it) and its mtime is older
  than the TTL.
A live process of this boot of this machine always keeps its lock, however old its heartbeat.

Breaking is race-free: every removal of a lock file (breaking a stale one, releasing one's own)
happens under a short-lived guard file, ``.<output>.lock.break`` (``O_EXCL``; one older than 30 s
is a dead remover's and is deleted). Under it the breaker reads the lock again and deletes it only
if it is still the very file it judged stale (same inode, mtime and record); then it competes for
the free name with ``O_EXCL`` like everyone else. Nobody can delete a lock that replaced the one
they looked at.
The guard holds its holder's owner token (``io.owners``) and a nonce: the guard of a remover
killed in it is taken over at once by a remover on the same machine, by swapping a guard of its
own into place (``renameat2(RENAME_EXCHANGE)``) and judging the file it swapped out, which nobody
else can touch any more. If that one is dead, the taker holds the guard. If it is a live
remover's (one that replaced the dead guard meanwhile), the taker's guard now stands in for it
(it names a live process too): the taker deletes the swapped-out file and waits until the remover
inside, done, unlinks the guard - the taker's file. Nothing is ever swapped back, so no guard is
put back after its remover left, and a live remover's guard is never judged by a stale look.
Without an atomic exchange only the 30-second rule applies: the old guard is renamed aside and
deleted only if it is the very file judged (same inode and contents), else it is put back.
A holder checks that the lock file is still its own (same inode) at every heartbeat and, through
``verify()``, right before it renames its outputs into place; it releases (deletes) the lock
only if it is still its own.

Leftovers: once a lock is held, ``acquire`` also removes what dead workers left of that output
(``swept``): a dead remover's guard, and the output's temps (``io.outputs.sweep_temps``) whose
writer was a process of this machine that is gone, or, for another machine's temps, that nothing
touched for longer than the TTL (a live worker there would hold this lock). A run that needs no
lock (every output exists) calls ``sweep_leftovers``: stale locks broken, dead removers' guards
and dead writers' temps removed (other machines' temps after an hour), except for an output whose
lock a live worker holds: its guard and temps are left to it. docs/checkpoints.md, "Leftovers".
The process identity helpers (``pid_alive``, ``pid_start``, ``same_process``) live in ``io.owners``
and are importable from here too.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from tokenflow.errors import ConfigError, LockedError, OutputError
from tokenflow.io.outputs import remove_path, rename_exchange, sweep_temps, temp_sibling
from tokenflow.io.owners import (
    BOOT,
    ELSEWHERE,
    HOST,
    MACHINE_TAG,
    PIDNS,
    REBOOTED,
    local_gone_reason,
    my_token,
    owners_in,
    record_placement,
)
from tokenflow.io.owners import pid_alive as pid_alive
from tokenflow.io.owners import pid_start as pid_start
from tokenflow.io.owners import same_process as same_process

DEFAULT_TTL_S = 120.0
HEARTBEAT_S = 10.0
TTL_ENV = "TOKENFLOW_LOCK_TTL"
_RECORD_BYTES = 1024   # records are padded to a fixed size, so a rewrite never leaves a stale tail
_GUARD_STALE_S = 30.0  # the removal guard is held for microseconds (30 s: room for clock skew)
_GUARD_WAIT_S = 2.0    # how long a remover waits for the guard
_STAND_IN_S = 2.0      # how long a taker that stands in for a live remover's guard waits for it to finish


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
# The process identity helpers live in ``io.owners`` (temp names use them too); the names below
# stay importable from here.

_HOST, _BOOT, _PIDNS = HOST, BOOT, PIDNS


def _placement(record: dict) -> str:
    """Where the lock ``record`` was written: ``io.owners.record_placement`` (HERE, REBOOTED, ELSEWHERE)."""
    def text(key: str) -> Optional[str]:
        value = record.get(key)
        return None if value is None else str(value)

    return record_placement(text("machine"), text("host"), text("pidns"), text("boot"))


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
    if record.get("released"):
        return (f"pid {pid} on host '{record.get('host')}' released it "
                "(without the removal guard it could not delete the lock file)")
    place = _placement(record)
    if place != ELSEWHERE:
        start = record.get("pid_start")
        return local_gone_reason(pid, str(start) if start not in (None, "") else None, place == REBOOTED)
    if age > ttl:
        return (f"host '{record.get('host')}' (pid {pid}) has not renewed it for {age:.0f} s "
                f"(TTL {ttl:.0f} s, {TTL_ENV})")
    return None


def guard_path(path: str) -> str:
    """The removal guard of the lock file ``path``: ``.<output>.lock.break`` next to it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.break")


def _read_guard(guard: str) -> Optional[Tuple[Tuple[int, int], bytes, float]]:
    """(device and inode, contents, mtime) of the guard file, None if there is none."""
    try:
        fd = os.open(guard, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:      # there, but unreadable: its age decides
        try:
            st = os.stat(guard)
        except OSError:
            return None
        return (st.st_dev, st.st_ino), b"", st.st_mtime
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino), os.read(fd, 256), st.st_mtime
    finally:
        os.close(fd)


def guard_stale_reason(guard: str, now: Optional[float] = None) -> Optional[str]:
    """Why the removal guard ``guard`` belongs to a remover that died in it, or None (also when
    there is none). It names its holder (an ``io.owners`` token): a process of this machine that is
    gone; or, whoever held it, it is older than 30 s (it is held for microseconds)."""
    seen = _read_guard(guard)
    return None if seen is None else _guard_gone(seen, now)


def _guard_gone(seen: Tuple[Tuple[int, int], bytes, float], now: Optional[float] = None) -> Optional[str]:
    _, content, mtime = seen
    owners = owners_in(content.decode("ascii", "replace"))
    if owners and owners[0].here:
        gone = owners[0].gone_reason()
        if gone is not None:
            return gone
    age = (time.time() if now is None else now) - mtime
    if age > _GUARD_STALE_S:
        return f"it is {age:.0f} s old (a removal takes microseconds)"
    return None


def _guard_content() -> bytes:
    """What a removal guard holds: its holder's owner token and a nonce (no two guards alike)."""
    return f"{my_token()} {uuid.uuid4().hex}".encode()


Exchange = Callable[[str, str], bool]


def _take_over_guard(guard: str, exchange: Exchange = rename_exchange,
                     stand_in_s: float = _STAND_IN_S) -> Tuple[Optional[bool], str]:
    """Replace a dead remover's guard by our own, and only that one: (True, why it was dead) when
    this process now holds the guard; (False, "") when the guard there is alive; (None, "") when it
    changed meanwhile (look again).

    Where two paths can be exchanged atomically (Linux), a guard of ours is swapped in and the file
    swapped out, which nobody else can reach any more, is judged. Dead: ours is the guard now. Alive
    (a remover's guard replaced the dead one after we looked): ours stands in for it, naming a live
    process as well, while that remover finishes; we delete the swapped-out file and wait (at most
    ``stand_in_s``) until the remover, done, unlinks the guard, which is now our file. Nothing is
    swapped back: a file put back later could be the guard of a remover that has left meanwhile,
    over a guard that came since. Elsewhere (``exchange`` False) only the age rule holds: a guard
    older than 30 s is renamed aside and deleted if it is the very file judged dead (same inode and
    contents), else put back (a tiny race between two removers of it remains there).

    ``exchange``: the atomic swap (``io.outputs.rename_exchange``; a seam for tests: it returns False
    where exchanging is unsupported and raises FileNotFoundError where a path is missing)."""
    seen = _read_guard(guard)
    if seen is None:
        return None, ""
    if _guard_gone(seen) is None:
        return False, ""
    mine = temp_sibling(guard)
    try:
        fd = os.open(mine, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return _take_over_by_age(guard, seen)
    try:
        with contextlib.suppress(OSError):
            os.write(fd, _guard_content())   # a full disk: an empty guard, judged by its age
        try:
            swapped = exchange(mine, guard)
        except FileNotFoundError:
            return None, ""                  # the guard went meanwhile: look again
        if not swapped:
            remove_path(mine)
            return _take_over_by_age(guard, seen)
        out = _read_guard(mine)              # what was the guard until now: ours alone to judge
        why = _guard_gone(out) if out is not None else None
        remove_path(mine)
        if why is not None:
            return True, why
        _wait_unlinked(fd, stand_in_s)       # standing in for a live remover's guard until it is done
        return None, ""
    finally:
        os.close(fd)
        remove_path(mine)


def _wait_unlinked(fd: int, wait_s: float) -> bool:
    """Wait until the file open at ``fd`` has no name left (unlinked, or deleted by whoever swapped it
    out); False if it still has one after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.fstat(fd).st_nlink == 0:
                return True
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def _take_over_by_age(guard: str, seen: Tuple[Tuple[int, int], bytes, float]) -> Tuple[Optional[bool], str]:
    """``_take_over_guard`` without an atomic exchange: delete the guard judged by ``seen`` if it is
    older than 30 s and still the very same file (renamed aside to a name of ours, then checked: a
    guard that replaced it meanwhile is put back). (None, "") once done: look again."""
    age = time.time() - seen[2]
    if age <= _GUARD_STALE_S:
        return False, ""
    aside = temp_sibling(guard, ".dead")
    try:
        os.rename(guard, aside)
    except FileNotFoundError:
        return None, ""
    moved = _read_guard(aside)
    if moved is None or moved[:2] != seen[:2]:   # not the one judged: a remover's that came since
        try:
            os.link(aside, guard)                # back under its name, unless a guard was made there meanwhile
        except FileExistsError:
            pass
        except OSError:                          # no hard links here
            if not os.path.lexists(guard):
                with contextlib.suppress(OSError):
                    os.rename(aside, guard)
    remove_path(aside)
    return None, ""


@contextlib.contextmanager
def _removal_guard(path: str, wait_s: float = _GUARD_WAIT_S) -> Iterator[bool]:
    """A short-lived mutex for removing ``path``: every removal of a lock file (breaking a stale one,
    releasing one's own) happens under it, so nobody removes a lock that replaced the one they
    inspected. It holds its holder's owner token, so the guard of a remover killed in it is taken
    over at once on this machine (after 30 s from elsewhere; ``_take_over_guard``). Yields False if
    it could not be had in ``wait_s``."""
    guard = guard_path(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, _guard_content())
            except OSError:
                pass       # a full disk: an empty guard, judged by its age
            finally:
                os.close(fd)
            break
        except FileExistsError:
            taken, _ = _take_over_guard(guard)
            if taken:
                break
            if time.monotonic() > deadline:
                yield False
                return
            if taken is False:
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


def _sweep_guard(path: str) -> List[str]:
    """Remove the removal guard of the lock ``path`` if a remover died in it (taken over, then let
    go), and the temps of such takeovers."""
    guard = guard_path(path)
    messages = sweep_temps(guard)
    for _ in range(4):
        try:
            taken, why = _take_over_guard(guard)
        except OSError:
            break
        if taken:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)
            return messages + [f"removed '{guard}', left by a worker that is gone: {why}"]
        if taken is False:
            break
    return messages


def _sweep_leftovers(target: str, foreign_after: float) -> List[str]:
    """A dead remover's guard and dead writers' temps of ``target`` (``io.outputs.sweep_temps``)."""
    return _sweep_guard(lock_path(target)) + sweep_temps(target, foreign_after=foreign_after)


def sweep_leftovers(targets: Iterable, ttl: Optional[float] = None) -> List[str]:
    """Clean up after dead workers without taking the locks, for a run that does not need them (it
    skips: every output exists). For each output: a stale lock is broken (the rules of
    ``stale_reason``, race-free as in ``acquire``), a dead remover's guard removed, and the temps of
    writers that are gone removed (``io.outputs.sweep_temps``; other machines' ones once untouched
    for an hour, since no lock is held). An output whose lock a live worker holds (or whose lock
    cannot be read) is left alone entirely: that worker may be on another machine, encoding other
    outputs while its staged one waits untouched; it sweeps when it takes the lock, and so does the
    next run once the lock is stale. Returns one line per thing removed; never raises."""
    ttl = lock_ttl() if ttl is None else float(ttl)
    messages: List[str] = []
    for target in sorted({os.path.abspath(os.fspath(t)) for t in targets}):
        path = lock_path(target)
        try:
            holder = read_lock(path)
            if holder is not None:
                reason = stale_reason(holder, ttl)
                if reason is None:
                    continue                     # a live worker holds it: its leftovers are its own
                with contextlib.suppress(OSError):
                    if _break(holder):
                        messages.append(f"broke the stale lock on '{target}': {reason}")
                holder = read_lock(path)         # whoever holds it now: taken meanwhile?
                if holder is not None and stale_reason(holder, ttl) is None:
                    continue
        except OSError:
            continue                             # cannot tell who holds it: leave its leftovers
        messages += _sweep_guard(path) + sweep_temps(target)
    return messages


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
        self.swept: List[str] = []      # leftovers of dead writers removed once the lock was held
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
                           "pid_start": pid_start(os.getpid()), "machine": MACHINE_TAG}
            self.size = max(_RECORD_BYTES, len(json.dumps(self.record)) + 256)
            try:
                self._write()
            except OSError as error:
                self.release()
                raise OutputError(f"cannot write the lock file '{self.path}': {error.strerror or error}") from None
            self.swept = _sweep_leftovers(self.target, self.ttl)
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
        """Delete the lock file if it is still ours, under the removal guard. Idempotent.

        Never without the guard (unlinking then could delete a lock that replaced ours): when the
        guard cannot be had, the file stays, marked ``released`` through our own descriptor (into
        our file, wherever it is now), and the next worker breaks it at once (a worker of an older
        version, once this process has exited: the pid rule)."""
        with self._io:
            if self.fd is None:
                return
            guarded = False
            try:
                with _removal_guard(self.path) as guarded:
                    if guarded:
                        st = os.stat(self.path)
                        if (st.st_dev, st.st_ino) == self.inode:   # our open descriptor keeps the inode ours
                            os.unlink(self.path)
            except OSError:
                pass
            finally:
                if not guarded:
                    self.record["released"] = round(time.time(), 3)
                    with contextlib.suppress(OSError):
                        self._write()
                fd, self.fd = self.fd, None
                os.close(fd)

    def _locked_message(self, holder: Holder) -> str:
        if holder.record is not None and _placement(holder.record) != ELSEWHERE:
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
        """What taking the locks cleaned up, one line each: stale locks broken, leftovers removed."""
        return [message for lock in self.locks for message in lock.broken + lock.swept]

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
