"""Progress per stage, a quiet mode, and JSON-lines events for machines.

Progress counts the steps the user asked for (inversion steps, edit steps), not internal passes: a
stage has ``total`` steps, of which ``done_before`` were done by an earlier process (a resumed
run shows 24/50, not 0/26), and its ETA comes from the steps done in this process only. On a
terminal, a tqdm bar per stage; elsewhere (a farm log, ``2> file``) plain lines: the start, the
first step, then one line per 5 % of the stage at most every 10 s, and the last step.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Callable, Dict, Iterator, Optional, TextIO

# Every JSON-lines event (``--log-json``): its kind and the fields it always carries, besides
# "event" (the kind) and "time" (Unix seconds). Documented in docs/events.md; EVENT_SCHEMA_VERSION
# changes when a field is removed or changes meaning (new fields or kinds may be added).
EVENT_SCHEMA_VERSION = 1
EVENT_FIELDS: Dict[str, tuple] = {
    "start": ("command", "version", "schema", "pid", "host"),
    "stage_start": ("stage", "total", "done_before"),
    "progress": ("stage", "done", "total", "elapsed", "eta_seconds", "done_before"),
    "stage_end": ("stage", "seconds"),
    "plan": ("chunk_frames",),
    "info": ("message",),
    "warning": ("message",),
    "skipped": ("reason", "outputs"),
    "checkpoint": ("phase", "step", "total", "path"),
    "done": ("outputs", "seconds", "stages", "ran"),
    "error": ("code", "exit_code", "message"),
    # tokenflow run (every event of a run also has "job")
    "checked": ("jobs",),
    "job_start": ("job", "file", "index", "total"),
    "job_end": ("job", "status", "exit_code", "seconds", "outputs"),
    "run_done": ("exit_code", "jobs"),
}

LINE_EVERY_FRACTION = 0.05   # plain progress lines (not a terminal): at least 5 % of the stage apart ...
LINE_EVERY_SECONDS = 10.0    # ... and at least 10 s apart (whichever is rarer)


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):   # no isatty, or a closed stream
        return False


def clock_text(seconds: float) -> str:
    """3725.2 -> '1:02:05'; 65 -> '1:05'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Lines:
    """Progress as plain lines, throttled (no carriage returns): for streams that are not terminals."""

    def __init__(self, stream: TextIO, name: str, total: int, done: int, unit: str, clock: Callable[[], float]):
        self.stream, self.name, self.total, self.unit, self.clock = stream, name, total, unit, clock
        self.first, self.last_done, self.last_time = done, done, clock()
        self.write(f"{done}/{total} {unit}" + (" (resumed)" if done else ""))

    def write(self, text: str) -> None:
        self.stream.write(f"{self.name}: {text}\n")
        self.stream.flush()

    def show(self, done: int, elapsed: float, eta: Optional[float]) -> None:
        now = self.clock()
        due = (done >= self.total or done == self.first + 1
               or (done - self.last_done >= LINE_EVERY_FRACTION * self.total
                   and now - self.last_time >= LINE_EVERY_SECONDS))
        if not due or done == self.last_done:
            return
        self.last_done, self.last_time = done, now
        rest = "" if eta is None or done >= self.total else f", ETA {clock_text(eta)}"
        self.write(f"{done}/{self.total} {self.unit} ({100 * done // max(1, self.total)}%), "
                   f"{clock_text(elapsed)} elapsed{rest}")

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar (terminals): starts at the steps done before; its rate counts this process's."""

    def __init__(self, stream: TextIO, name: str, total: int, done: int, unit: str):
        from tqdm import tqdm  # noqa: PLC0415  start-up time: the CLI imports this module before parsing flags

        self.bar = tqdm(total=total, initial=done, desc=f"{name:>9}", unit=unit.rstrip("s"), file=stream,
                        dynamic_ncols=True, leave=True)
        self.done = done

    def show(self, done: int, elapsed: float, eta: Optional[float]) -> None:
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        self.bar.close()


class Stage:
    """One stage of a job. ``total``: its steps (None: untimed, no progress); ``done_before``: the
    steps an earlier process did (a resumed run)."""

    def __init__(self, reporter: "Reporter", name: str, total: Optional[int], done_before: int = 0,
                 unit: str = "steps"):
        self.reporter, self.name, self.total = reporter, name, total
        self.done = self.done_before = done_before
        self.start = reporter.clock()
        self.view = None
        if reporter.bars and total is not None:  # untimed stages show up in the summary only
            if is_terminal(reporter.stream):
                self.view = _Bar(reporter.stream, name, total, done_before, unit)
            else:
                self.view = _Lines(reporter.stream, name, total, done_before, unit, reporter.clock)

    def update(self, n: int = 1, partial: float = 0.0, **info) -> None:
        """``n`` more steps done; ``partial``: the fraction of the next step done too (a step's
        passes report it, so the ETA moves during long steps; ``done`` stays whole steps)."""
        self.done += n
        elapsed = self.reporter.clock() - self.start
        worked = self.done - self.done_before + partial   # this process's steps: a resumed run's ETA
        eta = (elapsed / worked * max(0.0, self.total - self.done - partial)
               if self.total is not None and worked > 0 else None)
        if self.view is not None:
            self.view.show(self.done, elapsed, eta)
        self.reporter.event("progress", stage=self.name, done=self.done, total=self.total,
                            elapsed=round(elapsed, 3), eta_seconds=None if eta is None else round(eta, 3),
                            done_before=self.done_before, **info)


class Reporter:
    """Stage timings plus human or machine progress output.

    quiet: no progress, no messages (errors are still printed by the CLI).
    json_stream: if set, one JSON object per line per event (stage start/progress/end, info, done).
    stream: where people read progress and messages (stderr by default): a bar per stage on a
    terminal, throttled plain lines elsewhere. clock: seconds (monotonic), for the ETA and throttling.
    synchronize: waits for the device's queued work (``tokenflow.device.synchronizer``; None where
    work is synchronous, e.g. the CPU); ``use_device`` sets it from the device a job runs on.
    """

    def __init__(self, quiet: bool = False, json_stream: Optional[TextIO] = None, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.perf_counter, synchronize: Optional[Callable[[], None]] = None):
        self.quiet, self.json_stream = quiet, json_stream
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.synchronize = synchronize
        self.bars = not quiet and json_stream is None   # human output (bars or lines, messages)
        self.timings: Dict[str, float] = {}

    def use_device(self, device) -> "Reporter":
        """Stage timings on ``device``: on asynchronous devices (CUDA, MPS) each stage waits for the
        queued work at its start and end, so a stage is charged its own work, not the one before's."""
        from tokenflow.device import synchronizer  # noqa: PLC0415  start-up time: the CLI imports this module before torch

        self.synchronize = synchronizer(device)
        return self

    def _sync(self) -> None:
        if self.synchronize is not None:
            self.synchronize()

    def event(self, kind: str, **fields) -> None:
        if self.json_stream is not None:
            self.json_stream.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
            self.json_stream.flush()

    def info(self, message: str) -> None:
        self.event("info", message=message)
        if self.bars:
            print(message, file=self.stream)

    @contextlib.contextmanager
    def timed(self, name: str, synchronize=None) -> Iterator[None]:
        """Add the time of the block to ``timings[name]`` (no events; for sub-stages such as the
        keyframe and propagation passes). ``synchronize`` (e.g. torch.cuda.synchronize) is called
        before and after so asynchronous device work is counted where it happens."""
        if synchronize is not None:
            synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if synchronize is not None:
                synchronize()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def stage(self, name: str, total: Optional[int] = None, done_before: int = 0) -> Iterator[Stage]:
        """A stage of ``total`` steps (None: untimed), ``done_before`` of them done by an earlier process.

        On an asynchronous device (``synchronize`` set) the queued work of what came before is
        waited for first, and the stage's own before its time is taken (not after an error: the
        device may be what failed)."""
        self._sync()
        self.event("stage_start", stage=name, total=total, done_before=done_before)
        stage = Stage(self, name, total, done_before)
        start = time.perf_counter()
        try:
            yield stage
            self._sync()
        finally:
            if stage.view is not None:
                stage.view.close()
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.event("stage_end", stage=name, seconds=round(elapsed, 4))
