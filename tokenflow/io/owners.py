"""Who wrote a lock or a temp file, and whether that writer is gone: the one copy of the process
identity helpers (``app/locks`` records it in lock files, ``io/outputs`` in temp names).

A writer is identified by its process id, the process's start time (``/proc/<pid>/stat`` field 22,
clock ticks since boot: tells a reused pid from the original), its **machine** (host name + PID
namespace: two containers with one host name but separate PID namespaces are different machines)
and the machine's **boot** (``/proc/sys/kernel/random/boot_id``).

A writer on this machine is gone when its machine has rebooted since (another boot), its pid does
not exist or is a zombie, or the pid now belongs to a process that started at another time.
Nothing is known about writers on other machines from here: callers judge those by age (a lock's
heartbeat, a temp file's mtime).

In a temp name the identity is an **owner token**, ``<pid>-<start>-<machine>-<boot>``:

    4242-1fz3k-3b9c0e71d2aa-8e41f0c2

``start`` in base 36 (``0``: unknown), ``machine`` the first 12 hex digits of
sha256(host name, PID namespace), ``boot`` the first 8 of sha256(boot id) (``00000000``: unknown).
Standard library only.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple


def read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


HOST = socket.gethostname()
BOOT = read_text("/proc/sys/kernel/random/boot_id")
try:
    PIDNS: Optional[str] = os.readlink("/proc/self/ns/pid")
except OSError:
    PIDNS = None


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


UNKNOWN_BOOT = "0" * 8
MACHINE_TAG = _digest(f"{HOST}\0{PIDNS or ''}", 12)    # this machine: host name + PID namespace
BOOT_TAG = _digest(BOOT, 8) if BOOT else UNKNOWN_BOOT   # this boot of it
TOKEN_PATTERN = r"(\d+)-([0-9a-z]+)-([0-9a-f]{12})-([0-9a-f]{8})"
_TOKEN = re.compile(TOKEN_PATTERN)


# ----------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> Optional[List[str]]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), or None where there is no /proc."""
    text = read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def pid_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot), or None where there is no /proc."""
    fields = proc_stat(pid)
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
    except (OverflowError, ValueError):   # no pid is that large
        return False
    fields = proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))   # a zombie holds nothing


def same_process(pid: int, start: Optional[str]) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``start`` (not a reused pid;
    ``start`` None: any process with that pid)."""
    return pid_alive(pid) and (start is None or pid_start(pid) == start)


def same_machine(host: Optional[str], pidns: Optional[str]) -> bool:
    """Whether a record written on (``host``, ``pidns``) was written on this machine (an unknown
    namespace on either side: the host name decides)."""
    if host != HOST:
        return False
    return pidns is None or PIDNS is None or pidns == PIDNS


def local_gone_reason(pid: int, start: Optional[str], rebooted: bool = False) -> Optional[str]:
    """Why the process ``pid`` of this machine (started at ``start``, clock ticks; None: unknown)
    is gone, or None while it runs. ``rebooted``: the record comes from an earlier boot."""
    if rebooted:
        return f"pid {pid}'s machine has rebooted since"
    if not pid_alive(pid):
        return f"pid {pid} on this machine has exited"
    if start and pid_start(pid) not in (None, start):
        return f"pid {pid} on this machine has exited (the pid now belongs to another process)"
    return None


# ----------------------------------------------------------------------------- owner tokens


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if not number:
            return text


@dataclass(frozen=True)
class Owner:
    """A writer as its token records it."""

    pid: int
    start: Optional[str]     # clock ticks since boot, decimal (as ``pid_start``); None: unknown
    machine: str
    boot: str

    @property
    def token(self) -> str:
        start = _base36(int(self.start)) if self.start and self.start.isdigit() else "0"
        return f"{self.pid}-{start}-{self.machine}-{self.boot}"

    @classmethod
    def parse(cls, match: "re.Match[str]") -> "Owner":
        pid, start, machine, boot = match.groups()
        ticks = int(start, 36)
        return cls(int(pid), str(ticks) if ticks else None, machine, boot)

    @property
    def here(self) -> bool:
        """Written on this machine (same host name and PID namespace)."""
        return self.machine == MACHINE_TAG

    def gone_reason(self) -> Optional[str]:
        """Why this writer is gone; None while it may run (always None for another machine's)."""
        if not self.here:
            return None
        rebooted = UNKNOWN_BOOT not in (self.boot, BOOT_TAG) and self.boot != BOOT_TAG
        return local_gone_reason(self.pid, self.start, rebooted)


_me: Tuple[int, str] = (-1, "")


def my_token() -> str:
    """This process's owner token (recomputed after a fork: the child is another writer)."""
    global _me
    pid = os.getpid()
    if _me[0] != pid:
        _me = (pid, Owner(pid, pid_start(pid), MACHINE_TAG, BOOT_TAG).token)
    return _me[1]


def owners_in(text: str, after: str = "") -> List[Owner]:
    """Every owner token in ``text`` that directly follows ``after`` (e.g. the temp mark)."""
    pattern = _TOKEN if not after else re.compile(re.escape(after) + TOKEN_PATTERN)
    return [Owner.parse(match) for match in pattern.finditer(text)]
