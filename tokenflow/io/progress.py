"""Progress per stage (tqdm bars with ETA), a quiet mode, and JSON-lines events for machines."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Dict, Iterator, Optional, TextIO

# Every JSON-lines event (``--log-json``): its kind and the fields it always carries, besides
# "event" (the kind) and "time" (Unix seconds). Documented in docs/events.md; EVENT_SCHEMA_VERSION
# changes when a field is removed or changes meaning (new fields or kinds may be added).
EVENT_SCHEMA_VERSION = 1
EVENT_FIELDS: Dict[str, tuple] = {
    "start": ("command", "version", "schema", "pid", "host"),
    "stage_start": ("stage", "total"),
    "progress": ("stage", "done", "total", "elapsed", "eta_seconds"),
    "stage_end": ("stage", "seconds"),
    "plan": ("chunk_frames",),
    "info": ("message",),
    "warning": ("message",),
    "skipped": ("reason", "outputs"),
    "checkpoint": ("phase", "step", "total", "path"),
    "done": ("outputs", "seconds", "stages"),
    "error": ("code", "exit_code", "message"),
    # tokenflow run (every event of a run also has "job")
    "checked": ("jobs",),
    "job_start": ("job", "file", "index", "total"),
    "job_end": ("job", "status", "exit_code", "seconds", "outputs"),
    "run_done": ("exit_code", "jobs"),
}


class Stage:
    def __init__(self, reporter: "Reporter", name: str, total: Optional[int]):
        self.reporter, self.name, self.total, self.done = reporter, name, total, 0
        self.start = time.perf_counter()
        self.bar = None
        if reporter.bars and total is not None:  # untimed stages show up in the summary only
            from tqdm import tqdm  # noqa: PLC0415  start-up time: the CLI imports this module before parsing flags

            self.bar = tqdm(total=total, desc=f"{name:>9}", unit="it", file=reporter.stream,
                            dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elapsed = time.perf_counter() - self.start
        eta = (elapsed / self.done * (self.total - self.done)
               if self.total is not None and self.done > 0 else None)
        self.reporter.event("progress", stage=self.name, done=self.done, total=self.total,
                            elapsed=round(elapsed, 3), eta_seconds=None if eta is None else round(eta, 3), **info)


class Reporter:
    """Stage timings plus human or machine progress output.

    quiet: no bars, no messages (errors are still printed by the CLI).
    json_stream: if set, one JSON object per line per event (stage start/progress/end, info, done).
    """

    def __init__(self, quiet: bool = False, json_stream: Optional[TextIO] = None, stream: TextIO = sys.stderr):
        self.quiet, self.json_stream, self.stream = quiet, json_stream, stream
        self.bars = not quiet and json_stream is None
        self.timings: Dict[str, float] = {}

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
    def stage(self, name: str, total: Optional[int] = None) -> Iterator[Stage]:
        self.event("stage_start", stage=name, total=total)
        stage = Stage(self, name, total)
        start = time.perf_counter()
        try:
            yield stage
        finally:
            if stage.bar is not None:
                stage.bar.close()
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.event("stage_end", stage=name, seconds=round(elapsed, 4))
