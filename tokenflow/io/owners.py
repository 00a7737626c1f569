"""Who wrote a lock or a temp file, and whether that writer is gone: the one copy of the process
identity helpers and of the machine-identity rule (``app/locks`` records it in lock files,
``io/outputs`` in temp names).

A writer is identified by its process id, the process's start time (``/proc/<pid>/stat`` field 22,
clock ticks since boot: tells a reused pid from the original), its **machine** and the machine's
**boot** (``/proc/sys/kernel/random/boot_id``, random at every boot).

The machine is recorded as a tag: a hash of the host name, the PID namespace
(``/proc/self/ns/pid``) and the **machine id** (``/etc/machine-id``, else
``/var/lib/dbus/machine-id``: 32 hex digits made once per installation). The host name and the
namespace alone do not tell machines apart: the initial PID namespace is ``pid:[4026531836]`` on
every Linux host, so two cloned VMs (or containers) with one host name on shared storage would
look like one machine. The machine id is a **strong** identity only where it exists and this
process runs in the initial PID namespace (a container's machine id is often its image's, shared
by every container made from it, and its namespace number is reused from host to host).

The rule (``placement``): a writer whose machine tag differs from ours ran on **another machine**.
One with our tag ran
- during **this boot of this machine** when its boot is ours (one boot id: one running kernel, and
  the tag adds the host name and PID namespace), or when either boot is unknown and our identity
  is strong;
- during **an earlier boot of this machine** when the boots differ and our identity is strong
  (then the tag hashed this very machine id);
- else (the boots differ, no strong identity) we cannot tell it from another machine with the
  same host name: **another machine**.
A writer of this boot of this machine is gone when its pid does not exist or is a zombie, or the
pid now belongs to a process that started at another time; one of an earlier boot is gone. Nothing
is known about writers on other machines from here: callers judge those by age (a lock's
heartbeat, a temp file's mtime). Machine ids must differ between machines that share storage:
give cloned images a new one (``systemd-machine-id-setup``, ``dbus-uuidgen``).

In a temp name the identity is an **owner token**, ``<pid>-<start>-<machine>-<boot>``:

    4242-1fz3k-3b9c0e71d2aa-8e41f0c2

``start`` in base 36 (``0``: unknown), ``machine`` the first 12 hex digits of
sha256(host name, PID namespace, machine id), ``boot`` the first 8 of sha256(boot id)
(``00000000``: unknown). Standard library only.
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


def _machine_id() -> Optional[str]:
    """This installation's machine id (32 hex digits), None where there is none (or it is not one:
    empty, "uninitialized")."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        text = (read_text(path) or "").lower()
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return text
    return None


HOST = socket.gethostname()
BOOT = read_text("/proc/sys/kernel/random/boot_id")
try:
    PIDNS: Optional[str] = os.readlink("/proc/self/ns/pid")
except OSError:
    PIDNS = None
MACHINE_ID = _machine_id()
INIT_PIDNS = "pid:[4026531836]"    # the kernel's initial PID namespace (PROC_PID_INIT_INO): one number on every host
STRONG_ID = MACHINE_ID is not None and PIDNS == INIT_PIDNS   # the machine id tells this machine from any other


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def machine_tag(host: str, pidns: Optional[str], machine_id: Optional[str]) -> str:
    """The machine tag of a writer on ``host`` in PID namespace ``pidns`` with ``machine_id``."""
    return _digest(f"{host}\0{pidns or ''}\0{machine_id or ''}", 12)


def boot_tag(boot_id: Optional[str]) -> str:
    """The boot tag of a boot id (``UNKNOWN_BOOT`` for none)."""
    return _digest(boot_id, 8) if boot_id else UNKNOWN_BOOT


UNKNOWN_BOOT = "0" * 8
MACHINE_TAG = machine_tag(HOST, PIDNS, MACHINE_ID)   # this machine
BOOT_TAG = boot_tag(BOOT)                           # this boot of it
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


HERE = "this boot of this machine"
REBOOTED = "an earlier boot of this machine"
ELSEWHERE = "another machine"


def placement(machine: Optional[str], boot: Optional[str], *, strong: Optional[bool] = None) -> str:
    """Where a writer that recorded the machine tag ``machine`` and the boot tag ``boot`` ran, as
    far as this process can tell: ``HERE``, ``REBOOTED`` or ``ELSEWHERE`` (the rule in the module
    docstring). ``strong``: whether our machine identity is strong (default ``STRONG_ID``)."""
    strong = STRONG_ID if strong is None else strong
    if machine != MACHINE_TAG:
        return ELSEWHERE
    boots_known = UNKNOWN_BOOT not in (boot or UNKNOWN_BOOT, BOOT_TAG)
    if boots_known and boot == BOOT_TAG:
        return HERE
    if not strong:
        return ELSEWHERE        # another boot, or unknown, of a machine we cannot tell from this one
    return REBOOTED if boots_known else HERE


def record_placement(machine: Optional[str], host: Optional[str], pidns: Optional[str], boot_id: Optional[str]) -> str:
    """``placement`` for a lock record: its machine tag (``machine``) and its boot id. A record of an
    older tokenflow has no machine tag, only a host name and a PID namespace, which do not tell
    machines apart: it counts as written here only during this very boot (the same boot id: the
    same running kernel) in our PID namespace under our host name; else as another machine's."""
    if machine is not None:
        return placement(str(machine), boot_tag(boot_id))
    if host == HOST and pidns == PIDNS and BOOT is not None and boot_id == BOOT:
        return HERE
    return ELSEWHERE


def elsewhere_words(machine: Optional[str]) -> str:
    """How to say where a writer judged ``ELSEWHERE`` ran (``machine``: its tag)."""
    if machine == MACHINE_TAG:
        return ("written during another boot of a machine that cannot be told from this one "
                "(same host name and PID namespace, no machine id to tell them apart)")
    return "written on another machine"


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
    def place(self) -> str:
        """``HERE``, ``REBOOTED`` or ``ELSEWHERE`` (``placement``)."""
        return placement(self.machine, self.boot)

    @property
    def here(self) -> bool:
        """Written on this machine, as far as can be told (during this boot or an earlier one)."""
        return self.place != ELSEWHERE

    def gone_reason(self) -> Optional[str]:
        """Why this writer is gone; None while it may run (always None for another machine's)."""
        place = self.place
        if place == ELSEWHERE:
            return None
        return local_gone_reason(self.pid, self.start, rebooted=place == REBOOTED)


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
