"""The Ray task of one farm job (``run_job_task``): ``tokenflow run JOB --resume`` in a child
process until it succeeds, fails for good or the attempt budget is spent.

The child writes its events into a file, so it outlives a dead worker long enough to save its
checkpoint; a retry of the task (after a lost worker) first waits for the previous attempt's child
or its output locks, reads what it wrote, and resumes from the job's checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import tokenflow
from tokenflow.app.farm.child import CHILD_CODE, PARENT_ENV
from tokenflow.app.farm.status import (
    DEFAULT_GRACE_S,
    FAILED_EXIT_CODE,
    GRACE_ENV,
    LOCKED_EXIT_CODE,
    RETRIED_EXIT_CODES,
    describe_exit,
    grace_seconds,
    has_checkpoint,
    read_json,
    signal_name,
    write_json_atomic,
)
from tokenflow.app.locks import lock_path, lock_ttl, pid_start, read_lock, same_process, stale_reason
from tokenflow.errors import InterruptedWithCheckpoint


def run_job_task(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The Ray task of one job: run ``tokenflow run JOB --resume`` in a child until it succeeds, fails
    for good or the attempt budget is spent; return its record. Safe to rerun after a lost worker."""
    return JobAttempts(spec).run()


class JobAttempts:
    def __init__(self, spec: Dict[str, Any]):
        self.spec = spec
        self.host = socket.gethostname()
        self.node_id = self._node_id()
        state = read_json(spec["status"]) or {}
        if state.get("run_id") != spec["run_id"]:        # an earlier farm's file: start a new history
            state = {"run_id": spec["run_id"], "job": spec["job"], "file": spec["file"], "attempts": [],
                     "result": None}
        self.state = state
        self._last_write = 0.0

    @staticmethod
    def _node_id() -> Optional[str]:
        ray = sys.modules.get("ray")   # a Ray worker has imported it; tests call the task without Ray
        try:
            return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
        except Exception:
            return None

    def save(self, force: bool = True) -> None:
        now = time.time()
        if force or now - self._last_write >= 1.0:
            self.state["updated"] = round(now, 3)
            write_json_atomic(self.spec["status"], self.state)
            self._last_write = now

    def run(self) -> Dict[str, Any]:
        state, spec = self.state, self.spec
        if state.get("result"):                 # finished, but the worker was lost before returning
            return {**state["result"], "attempt_log": state["attempts"]}
        attempts = state["attempts"]
        for previous in attempts:
            if previous.get("outcome") == "running":   # its worker died: this is Ray's retry
                previous["outcome"] = "worker lost"
                previous["retried_at"] = round(time.time(), 3)
        self.save()
        if attempts and attempts[-1].get("outcome") == "worker lost":
            lost = attempts[-1]
            lost["child_end"] = self.wait_for_previous(lost)
            lost["child_gone_at"] = round(time.time(), 3)
            self.read_lost_events(lost)
            if lost.get("child_exit_code") == 0:   # the child finished after all: nothing to redo
                lost["exit_code"] = 0
                return self.finish(lost)
        final: Optional[Dict[str, Any]] = None
        while len(attempts) < spec["max_attempts"]:
            attempt = self.run_child(len(attempts) + 1)
            code = attempt["exit_code"]
            retry = code is not None and (code < 0 or code in RETRIED_EXIT_CODES
                                          or (code == LOCKED_EXIT_CODE and len(attempts) > 1))
            if not retry:
                final = attempt
                break
        return self.finish(final)

    def finish(self, final: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        attempts = self.state["attempts"]
        last = final or (attempts[-1] if attempts else {})
        code = last.get("exit_code")
        if final is not None and code == 0:
            skipped = last.get("job_status") == "skipped"
            status, error = ("skipped" if skipped and len(attempts) == 1 else "ok"), None
        elif final is not None:
            status, error = "failed", last.get("error") or describe_exit(code)
            code = code if code and code > 0 else FAILED_EXIT_CODE
        else:   # every attempt was interrupted or lost: the budget is spent
            status = "failed"
            error = f"gave up after {len(attempts)} attempt(s); last: {last.get('error') or describe_exit(code)}"
            code = InterruptedWithCheckpoint.exit_code if has_checkpoint(self.spec["checkpoint_dir"]) else FAILED_EXIT_CODE
        result = {"status": status, "exit_code": code if status == "failed" else 0, "attempts": len(attempts),
                  "outputs": last.get("outputs") or (self.spec["outputs"] if status != "failed" else []),
                  "error": error, "host": last.get("host"), "node_id": last.get("node_id"),
                  "started": attempts[0]["started"] if attempts else None, "finished": round(time.time(), 3),
                  "compute_seconds": round(sum(a.get("seconds") or 0.0 for a in attempts), 3),
                  "stages": last.get("stages"), "resumed": [a["resumed"] for a in attempts if a.get("resumed")],
                  "attempt_log": attempts}
        self.state["result"] = {k: v for k, v in result.items() if k != "attempt_log"}
        self.save()
        return result

    # -- the previous attempt
    def wait_for_previous(self, previous: Dict[str, Any]) -> str:
        """Let the previous attempt's child finish saving (same machine) or its locks lapse (another
        one); how that child ended, as far as this task can tell (``child_end`` in its record)."""
        pid, start, grace = previous.get("child_pid"), previous.get("child_start"), grace_seconds()
        if not pid or not previous.get("host"):
            return "unknown: the lost attempt recorded no child"
        if previous.get("host") != self.host:
            return self.wait_for_locks(previous)
        if not same_process(pid, start):
            return "gone before this retry looked"
        # Normally sent already by the parent-death signal; a second SIGTERM only repeats the stop
        # request. SIGCONT: a stopped child (job control, a debugger) could not save anything.
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and same_process(pid, start):
            time.sleep(0.2)
        if not same_process(pid, start):
            return "gone after this retry's SIGTERM"
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.5)
        return f"killed (SIGKILL) after the {grace:g} s grace period ({GRACE_ENV})"

    def wait_for_locks(self, previous: Dict[str, Any]) -> str:
        try:
            ttl = lock_ttl()
        except Exception:
            ttl = 120.0
        deadline = time.time() + ttl + 30.0
        while time.time() < deadline:
            held = False
            for output in self.spec["outputs"]:
                holder = read_lock(lock_path(output))
                record = (holder.record or {}) if holder else {}
                if (holder is not None and stale_reason(holder, ttl) is None and record.get("host") == previous["host"]
                        and record.get("pid") == previous["child_pid"]):
                    held = True
            if not held:
                return f"on {previous['host']}: its output locks are released or stale"
            time.sleep(2.0)
        return f"on {previous['host']}: its output locks were still held after {ttl + 30.0:g} s"

    def read_lost_events(self, lost: Dict[str, Any]) -> None:
        """What the child of an attempt whose worker died wrote after the worker's last look.
        ``child_exit_code``: its ``run_done`` event's exit code; None, with ``child_exit_note``
        saying why, when it wrote none (killed, crashed) or its events cannot be read."""
        lost["child_exit_code"], lost["child_exit_note"] = None, None
        offset = lost.get("events_offset")
        if offset is None:
            lost["child_exit_note"] = "no events offset was recorded for this attempt"
            self.save()
            return
        try:
            with open(self.spec["events"], "rb") as events:
                events.seek(offset)
                lines = events.read().split(b"\n")
        except OSError as exc:
            lost["child_exit_note"] = f"cannot read {self.spec['events']}: {exc.strerror or exc}"
            self.save()
            return
        lost["child_exit_note"] = ("its events hold no run_done: it was killed or crashed before the end "
                                   "of its run (see the job's log)")
        for line in lines:
            self.on_event(lost, line.decode("utf-8", "replace"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "run_done":
                lost["child_exit_code"], lost["child_exit_note"] = event.get("exit_code"), None
        self.save()

    # -- one child run
    def command(self) -> List[str]:
        spec = self.spec
        cmd = [sys.executable, "-c", CHILD_CODE, "run", spec["file"], "--checkpoint-root", spec["root"],
               "--resume", "--log-json"]
        for flag, key in (("--output-root", "output_root"), ("--input-root", "input_root")):   # checked again there
            cmd += [flag, spec[key]] if spec.get(key) else []
        return cmd + (["--overwrite"] if spec["overwrite"] else [])

    def child_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        package_parent = str(Path(tokenflow.__file__).resolve().parents[1])   # the folder holding tokenflow/
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        env[PARENT_ENV] = str(os.getpid())
        return env

    def run_child(self, number: int) -> Dict[str, Any]:
        spec = self.spec
        attempt: Dict[str, Any] = {"attempt": number, "host": self.host, "node_id": self.node_id,
                                   "worker_pid": os.getpid(), "child_pid": None, "child_start": None,
                                   "started": round(time.time(), 3), "ended": None, "seconds": None,
                                   "exit_code": None, "outcome": "running", "job_status": None, "error": None,
                                   "outputs": [], "stages": None, "resumed": None, "progress": None,
                                   "checkpoint": None}
        self.state["attempts"].append(attempt)
        self.save()
        cwd = spec["cwd"] if os.path.isdir(spec["cwd"]) else os.path.dirname(spec["file"])
        os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
        # The child writes its events into a file, not a pipe: when this worker dies the child still
        # saves its checkpoint and reports, instead of dying of a broken pipe in mid-step.
        with open(spec["log"], "ab") as log, open(spec["events"], "ab") as events:
            log.write(f"--- attempt {number} on {self.host} (worker pid {os.getpid()}) "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(self.command()[3:])}\n".encode())
            log.flush()
            offset = events.seek(0, os.SEEK_END)
            start = time.perf_counter()
            proc = subprocess.Popen(self.command(), stdout=events, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=self.child_env(), start_new_session=True)
        attempt["child_pid"], attempt["child_start"] = proc.pid, pid_start(proc.pid)
        attempt["events_offset"] = offset
        self.save()
        try:
            with open(spec["events"], "rb") as events:
                events.seek(offset)
                pending = b""
                while True:
                    code = proc.poll()
                    pending += events.read()
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self.on_event(attempt, line.decode("utf-8", "replace"))
                    if code is not None:
                        break
                    time.sleep(0.2)
        except KeyboardInterrupt:   # ray.cancel: let the child checkpoint, then stop
            code = stop_child(proc)
            self.end(attempt, code, start, "cancelled")
            raise
        except BaseException:
            stop_child(proc)
            raise
        self.end(attempt, code, start, None)
        return attempt

    def end(self, attempt: Dict[str, Any], code: Optional[int], start: float, outcome: Optional[str]) -> None:
        attempt["exit_code"] = code
        attempt["ended"] = round(time.time(), 3)
        attempt["seconds"] = round(time.perf_counter() - start, 3)
        if outcome is None:
            if code == 0:
                outcome = attempt.get("job_status") or "done"
            elif code is not None and code < 0:
                outcome = f"killed by {signal_name(-code)}"
            elif code in RETRIED_EXIT_CODES:
                outcome = "interrupted"
            else:
                outcome = "failed"
        attempt["outcome"] = outcome
        if code and not attempt.get("error"):
            attempt["error"] = describe_exit(code)
        self.save()

    def on_event(self, attempt: Dict[str, Any], line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == "progress":
            attempt["progress"] = {k: event.get(k) for k in ("stage", "done", "total", "eta_seconds")}
            self.save(force=False)
        elif kind == "checkpoint":
            attempt["checkpoint"] = {k: event.get(k) for k in ("phase", "step", "total")}
            self.save(force=False)
        elif kind == "info" and str(event.get("message", "")).startswith("resuming"):
            attempt["resumed"] = event["message"]
            self.save()
        elif kind == "done":
            attempt["stages"] = event.get("stages")
            attempt["outputs"] = [os.path.abspath(p) for p in event.get("outputs") or []]
        elif kind == "skipped":
            attempt["outputs"] = [os.path.abspath(p) for p in event.get("outputs") or []]
        elif kind == "job_end":
            attempt["job_status"] = event.get("status")
            if event.get("message"):
                attempt["error"] = event["message"]
            if event.get("outputs") and not attempt["outputs"]:
                attempt["outputs"] = [os.path.abspath(p) for p in event["outputs"]]
        elif kind == "error" and event.get("message") and not attempt.get("error"):
            attempt["error"] = event["message"]


def stop_child(proc: subprocess.Popen, grace: float = DEFAULT_GRACE_S) -> Optional[int]:
    """SIGTERM (the child saves a checkpoint and exits 75), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:
            proc.kill()
    try:
        return proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        return None
