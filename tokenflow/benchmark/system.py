"""What surrounds a measurement: machine load, per-stage peak memory, the git revision (device sync,
names and versions are ``tokenflow.device``'s).

Load guard (CPU timings): before timing, ``wait_until_idle`` samples ``/proc/stat`` for half a
second at a time and waits (at most ``max_wait_s``) until other processes keep fewer than
``max(0.5, 0.1 * cpus)`` CPUs busy; the 1-minute load average (``os.getloadavg``) is recorded
but not waited on, since it lags by a minute and includes the benchmark's own warm-up. During
each timed repeat, ``ContentionMeter`` records how many CPUs other processes kept busy, so a
disturbed repeat shows in the JSON.

Peak memory per stage (``MemoryTracker``, used through ``MeasuringReporter``):
  CUDA: ``torch.cuda.reset_peak_memory_stats`` when a stage starts, ``max_memory_allocated``
        when it ends (bytes held by tensors: weights included; allocator cache excluded).
  CPU:  the process's peak resident set (Linux ``VmHWM``), reset at every stage start by
        writing ``5`` to ``/proc/self/clear_refs``, read at the stage end (weights included).
        Where that reset is unavailable, ``ru_maxrss`` (the peak of the whole process so far).
Stages nest (``keyframes`` / ``propagate`` inside ``edit``): an outer stage's peak includes its
inner stages'.
"""
from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from tokenflow.engine.memory import proc_bytes
from tokenflow.io.progress import Reporter

# ----------------------------------------------------------------------------- machine load


def _cpu_times() -> Optional[List[int]]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields[1:]] if fields and fields[0] == "cpu" else None


def busy_cpus(interval_s: float = 0.5) -> Optional[float]:
    """How many CPUs were busy (all processes) during ``interval_s``, from /proc/stat; None if unknown."""
    first = _cpu_times()
    time.sleep(interval_s)
    second = _cpu_times()
    if first is None or second is None:
        return None
    delta = [b - a for a, b in zip(first, second)]
    total = sum(delta[:8])                  # user nice system idle iowait irq softirq steal
    idle = delta[3] + delta[4]
    return (total - idle) / total * (os.cpu_count() or 1) if total > 0 else 0.0


class ContentionMeter:
    """CPUs that *other* processes kept busy while a block ran: the machine's busy time from
    /proc/stat minus this process's own CPU time (``getrusage``), divided by the wall time."""

    def __enter__(self) -> "ContentionMeter":
        self.others_busy_cpus: Optional[float] = None
        self._stat, self._own, self._wall = _cpu_times(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        stat, own, wall = _cpu_times(), _own_cpu_s(), time.perf_counter() - self._wall
        if self._stat is None or stat is None or wall <= 0:
            return
        delta = [b - a for a, b in zip(self._stat, stat)]
        busy_s = (sum(delta[:8]) - delta[3] - delta[4]) / os.sysconf("SC_CLK_TCK")
        self.others_busy_cpus = round(max(0.0, busy_s - (own - self._own)) / wall, 3)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_snapshot() -> dict:
    """1/5/15-minute load averages and a short busy-CPU sample."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    busy = busy_cpus(0.25)
    return {"loadavg": load, "busy_cpus": None if busy is None else round(busy, 3), "cpus": os.cpu_count(),
            "time": round(time.time(), 3)}


def wait_until_idle(max_wait_s: float = 60.0, threshold: Optional[float] = None) -> dict:
    """Wait until fewer than ``threshold`` CPUs are busy (default max(0.5, 10% of the CPUs)).

    Returns {"waited_s", "idle" (threshold met), "busy_cpus" (last sample), "threshold"}.
    """
    cpus = os.cpu_count() or 1
    threshold = max(0.5, 0.1 * cpus) if threshold is None else threshold
    start = time.perf_counter()
    busy = busy_cpus()
    while busy is not None and busy > threshold and time.perf_counter() - start < max_wait_s:
        busy = busy_cpus()
    return {"waited_s": round(time.perf_counter() - start, 2), "idle": busy is None or busy <= threshold,
            "busy_cpus": None if busy is None else round(busy, 3), "threshold": threshold}


# ----------------------------------------------------------------------------- memory


def status_bytes(field: str) -> Optional[int]:
    """A field of this process's /proc status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    return proc_bytes("/proc/self/status", field)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size; False where Linux's
    /proc/self/clear_refs is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_bytes("VmHWM") is not None
    except OSError:
        return False


class MemoryTracker:
    """Peak memory per (possibly nested) stage; see the module docstring for the method."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peaks: Dict[str, int] = {}
        self._stack: List[list] = []            # [name, peak so far]
        self.cuda = self.device.type == "cuda"
        self.resettable = self.cuda or reset_peak_rss()
        self.method = ("torch.cuda.max_memory_allocated, reset per stage" if self.cuda else
                       "process peak RSS (VmHWM), reset per stage via /proc/self/clear_refs" if self.resettable
                       else "process peak RSS since start (ru_maxrss; cannot be reset here)")

    def _read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            return status_bytes("VmHWM") or 0
        scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            reset_peak_rss()

    def enter(self, name: str) -> None:
        if self._stack:                          # bank the outer stage's peak before resetting
            self._stack[-1][1] = max(self._stack[-1][1], self._read())
        self._reset()
        self._stack.append([name, 0])

    def exit(self) -> None:
        name, peak = self._stack.pop()
        peak = max(peak, self._read())
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        if self._stack:
            self._stack[-1][1] = max(self._stack[-1][1], peak)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()


class MeasuringReporter(Reporter):
    """A quiet Reporter that also records the peak memory of every stage and sub-stage."""

    def __init__(self, tracker: MemoryTracker):
        super().__init__(quiet=True)
        self.tracker = tracker

    @contextlib.contextmanager
    def stage(self, name: str, total: Optional[int] = None, **kwargs):
        with self.tracker.stage(name), super().stage(name, total, **kwargs) as stage:
            yield stage

    @contextlib.contextmanager
    def timed(self, name: str, *args, **kwargs):
        with self.tracker.stage(name), super().timed(name, *args, **kwargs):
            yield


# ----------------------------------------------------------------------------- environment


def git_revision() -> Dict[str, Optional[object]]:
    """HEAD of the checkout tokenflow runs from, and whether it has local changes (None if unknown)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"revision": head, "dirty": None if status is None else bool(status)}
