"""``tokenflow farm JOBS... --ray ADDRESS|local``: many job files on a Ray cluster (docs/farm.md).

The driver validates every job (``jobfile.load_jobs``: all problems at once, exit 2, nothing is
submitted), connects to Ray (``--ray local`` starts a private cluster on this machine), submits one
Ray task per job and writes a JSON report of every job's status, attempts, times and outputs.

Each task runs its job in a child process::

    python -c "from tokenflow.app.farm import child_main; child_main()" \\
        run JOB --checkpoint-root ROOT --resume --log-json [--overwrite]

that is ``tokenflow run`` with one job; the child dies with its Ray worker (Linux: the parent-death
signal is SIGTERM, so it saves a checkpoint at the end of its current step and exits 75). A crash,
an out-of-memory kill or a lost worker therefore never takes the driver down, and every retry
resumes from the job's checkpoint (``ROOT/<job name>``; the job's own ``checkpoint_dir`` if it sets
one). Retries:

- the worker process dies (killed, OOM-killed, node lost): Ray runs the task again (``max_retries``);
  the new attempt first waits for the previous attempt's child (same machine: it was sent SIGTERM
  and is saving its checkpoint; another machine: its output locks must be released or stale);
- the child exits 75 or 130 (interrupted) or is killed by a signal: the task reruns it itself;
- any other exit code (2 config, 3 input, 4 model, 5 output, 6 out of memory, 7 locked by a
  worker of another run, 1 internal error) is final: retrying would not change it.
One budget counts both: at most ``--max-retries`` + 1 child runs per job.

Per job the task keeps ``ROOT/_farm/<job>.json`` (written atomically: the run id, every attempt's
host, Ray worker pid, child pid, exit code and outcome, the last progress event, the result) and
appends the child's stderr to ``ROOT/_farm/<job>.log`` and its JSON events to
``ROOT/_farm/<job>.events.jsonl``. Job files, inputs, outputs and ROOT must be on storage every
node sees at the same paths (a shared filesystem) for a cluster of several machines.

Ray is optional: ``pip install 'tokenflow[farm]'``. Nothing here imports it at module level.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from tokenflow.errors import ConfigError, Interrupted, OutputError
from tokenflow.io.outputs import atomic_file

REPORT_SCHEMA_VERSION = 1
FARM_DIR = "_farm"            # under the checkpoint root; job names cannot start with "_"
RETRIED_EXIT_CODES = (75, 130)  # interrupted (with or without a checkpoint); death by a signal is retried too
LOCKED_EXIT_CODE = 7
DEFAULT_GRACE_S = 120.0       # how long a retry waits for the previous attempt's child to save and exit
INSTALL_HINT = "tokenflow farm needs Ray: pip install 'tokenflow[farm]' (or pip install 'ray>=2.9')"
# environment variables the workers get from the driver (Ray workers on other machines do not inherit it)
ENV_PREFIXES = ("TOKENFLOW_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TRITON_", "PYTORCH_",
                "TORCHINDUCTOR_")
CHILD_CODE = "from tokenflow.app.farm import child_main; child_main()"
_PARENT_ENV = "TOKENFLOW_FARM_PARENT"


# --------------------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    farm = sub.add_parser(
        "farm", help="run job files on a Ray cluster, one task per job (pip install 'tokenflow[farm]')",
        description="Run job files on a Ray cluster: every job is validated first (all problems at once; "
        "nothing is submitted if any job is bad), then each runs as one Ray task (`tokenflow run JOB "
        "--resume` in a child process) with its own GPU (or CPUs). A lost worker or an interrupted job is "
        "retried and resumes from its checkpoint. Writes a JSON report of every job. See docs/farm.md.")
    farm.add_argument("jobs", nargs="+", metavar="JOB", help="job files, folders of them (*.yaml, *.yml) or quoted globs")
    farm.add_argument("--ray", required=True, metavar="ADDRESS",
                      help="Ray cluster address (host:6379, auto, ray://host:10001) or 'local' to start a "
                      "private cluster on this machine for the run")
    farm.add_argument("--report", default="farm-report.json", metavar="PATH",
                      help="JSON report of every job (default farm-report.json; rewritten as jobs finish)")
    farm.add_argument("--checkpoint-root", metavar="DIR", help="each job's checkpoints go to DIR/<job name> "
                      "(unless the job sets checkpoint_dir); default: <report folder>/checkpoints. Must be "
                      "shared storage on a cluster of several machines")
    farm.add_argument("--max-retries", type=int, default=3, metavar="N",
                      help="runs after the first for a job whose worker is lost or which is interrupted (default 3)")
    farm.add_argument("--gpus-per-job", type=float, metavar="G", help="GPUs per job (default: 1 if the "
                      "cluster has GPUs and the job's device is not cpu/mps, else 0)")
    farm.add_argument("--cpus-per-job", type=float, default=1.0, metavar="C",
                      help="CPUs per job (default 1; Ray sets the job's OMP_NUM_THREADS from it)")
    farm.add_argument("--local-cpus", type=int, metavar="N", help="with --ray local: CPUs of the local "
                      "cluster (default: all of this machine's)")
    farm.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: a job "
                      "whose outputs all exist is skipped)")
    farm.add_argument("--log-json", action="store_true",
                      help="JSON-lines events on stdout (farm_start, job_done, farm_done) instead of lines of text")


def main(args: argparse.Namespace) -> int:
    if args.max_retries < 0:
        raise ConfigError(f"--max-retries {args.max_retries} must be >= 0")
    if args.cpus_per_job < 0 or (args.gpus_per_job is not None and args.gpus_per_job < 0):
        raise ConfigError("--cpus-per-job and --gpus-per-job must be >= 0")
    if args.local_cpus is not None and (args.local_cpus < 1 or args.ray != "local"):
        raise ConfigError(f"--local-cpus {args.local_cpus}: must be >= 1, and only sizes a --ray local cluster")
    report_path = os.path.abspath(args.report)
    root = os.path.abspath(args.checkpoint_root or os.path.join(os.path.dirname(report_path), "checkpoints"))
    try:
        jobs = validate_jobs(args.jobs, root, overwrite=args.overwrite)
        ray = import_ray()
        for folder, what in ((os.path.dirname(report_path), "--report"), (os.path.join(root, FARM_DIR),
                                                                          "--checkpoint-root")):
            _check_writable_folder(folder, what)
        return Farm(args, ray, jobs, root, report_path).run()
    except KeyboardInterrupt:
        raise Interrupted("interrupted; run the same command again to resume") from None


def validate_jobs(patterns, root: str, overwrite: bool = False) -> list:
    """Every job of the farm, as ``tokenflow run`` would run it; ConfigError with every problem if any."""
    from tokenflow.app.jobfile import load_jobs

    overrides = {"resume": True, **({"overwrite": True} if overwrite else {})}
    jobs, problems = load_jobs(patterns, overrides=overrides, checkpoint_root=root, check_files=True)
    if problems:
        for p in problems:
            print(f"tokenflow: error: {p}", file=sys.stderr)
        raise ConfigError(f"{len(problems)} problem(s) in the job files; nothing was submitted")
    if not jobs:
        raise ConfigError("no job files given")
    return jobs


def import_ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def job_outputs(config) -> List[str]:
    from tokenflow.app.jobs import prompt_outputs, resolve_output

    return [os.path.abspath(p) for p in prompt_outputs(resolve_output(config), config.prompts)]


def _worker_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


# ------------------------------------------------------------------------------------ driver

class Farm:
    def __init__(self, args, ray, jobs, root: str, report_path: str):
        self.args, self.ray, self.jobs, self.root, self.report_path = args, ray, jobs, root, report_path
        self.run_id = uuid.uuid4().hex[:12]
        self.records: Dict[str, Dict[str, Any]] = {}
        self.cluster: Dict[str, Any] = {}
        self.started = time.time()

    # -- output
    def emit(self, kind: str, **fields) -> None:
        if self.args.log_json:
            sys.stdout.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
            sys.stdout.flush()

    def say(self, text: str) -> None:
        if not self.args.log_json:
            print(text, flush=True)

    # -- the run
    def run(self) -> int:
        try:
            self.connect()
            return self._run()
        finally:
            self.ray.shutdown()

    def connect(self) -> None:
        ray, args = self.ray, self.args
        import logging

        runtime_env = {"env_vars": _worker_env()}
        self.local = args.ray == "local"
        if not self.local:
            _check_reachable(args.ray)   # ray.init retries an address where nothing listens for ever
        try:
            if self.local:
                # address="local": always a new cluster, never one found through RAY_ADDRESS or `ray start`
                ray.init(address="local", num_cpus=args.local_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, object_store_memory=256 * 1024 ** 2,
                         runtime_env=runtime_env)
            else:
                ray.init(address=args.ray, log_to_driver=False, logging_level=logging.WARNING,
                         runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray {args.ray}: cannot connect to a Ray cluster ({_first_line(exc)}); start one "
                              "with `ray start --head` or use --ray local. A cluster with token authentication "
                              "(the default of recent Ray) needs RAY_AUTH_MODE=token and its token in "
                              "RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.cluster = {"address": "local" if self.local else args.ray, "ray_version": ray.__version__,
                        "nodes": len(nodes), "hosts": sorted({n.get("NodeManagerHostname", "?") for n in nodes}),
                        "resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}}

    def gpus_for(self, job) -> float:
        if self.args.gpus_per_job is not None:
            return self.args.gpus_per_job
        device = (job.config.device or "").split(":")[0]
        has_gpus = self.cluster["resources"].get("GPU", 0) > 0
        return 1.0 if has_gpus and device not in ("cpu", "mps") else 0.0

    def _run(self) -> int:
        ray, args = self.ray, self.args
        have = self.cluster["resources"]
        for job in self.jobs:
            need = {"CPU": args.cpus_per_job, "GPU": self.gpus_for(job)}
            short = [f"{n:g} {k}" for k, n in need.items() if n > have.get(k, 0)]
            if short:
                message = (f"job {job.name!r} needs {' and '.join(short)} but the cluster has "
                           f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU")
                if self.local:
                    raise ConfigError(message + ": lower --cpus-per-job/--gpus-per-job or raise --local-cpus")
                print(f"tokenflow: warning: {message}; its task waits until the cluster grows", file=sys.stderr)
        task = ray.remote(run_job_task)
        farm_dir = os.path.join(self.root, FARM_DIR)
        os.makedirs(farm_dir, exist_ok=True)
        cwd = os.getcwd()
        pending: Dict[Any, Any] = {}
        for job in self.jobs:
            spec = {"run_id": self.run_id, "job": job.name, "file": os.path.abspath(job.file), "root": self.root,
                    "overwrite": bool(args.overwrite), "max_attempts": args.max_retries + 1,
                    "outputs": job_outputs(job.config), "checkpoint_dir": job.config.checkpoint_dir,
                    "status": os.path.join(farm_dir, f"{job.name}.json"),
                    "log": os.path.join(farm_dir, f"{job.name}.log"),
                    "events": os.path.join(farm_dir, f"{job.name}.events.jsonl"), "cwd": cwd}
            gpus = self.gpus_for(job)
            ref = task.options(num_cpus=args.cpus_per_job, num_gpus=gpus, max_retries=args.max_retries,
                               retry_exceptions=False, name=f"tokenflow-farm:{job.name}").remote(spec)
            pending[ref] = (job, spec)
            self.records[job.name] = {"job": job.name, "file": spec["file"], "status": "pending", "exit_code": None,
                                      "attempts": 0, "submitted": round(time.time(), 3), "gpus": gpus,
                                      "cpus": args.cpus_per_job, "outputs": spec["outputs"], "error": None,
                                      "checkpoint_dir": spec["checkpoint_dir"], "status_file": spec["status"],
                                      "log": spec["log"], "events": spec["events"]}
        self.emit("farm_start", run_id=self.run_id, jobs=[j.name for j in self.jobs], cluster=self.cluster,
                  report=self.report_path, checkpoint_root=self.root)
        if not args.log_json:
            print(f"farm: {len(self.jobs)} job(s) on {self.cluster['address']} ({self.cluster['nodes']} node(s), "
                  f"{_resource_text(self.cluster['resources'])}); report {self.report_path}", file=sys.stderr)
        self.write_report(final=False)
        interrupted = False
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                for ref in done:
                    job, spec = pending.pop(ref)
                    self.finish(job, spec, ref)
        except KeyboardInterrupt:
            interrupted = True
            print("farm: interrupted: stopping the jobs (each saves a checkpoint; run the same command again "
                  "to resume)", file=sys.stderr)
            for ref in pending:
                ray.cancel(ref)
            deadline = time.time() + DEFAULT_GRACE_S + 15
            while pending and time.time() < deadline:
                try:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                except KeyboardInterrupt:
                    break
                for ref in done:
                    job, spec = pending.pop(ref)
                    self.finish(job, spec, ref, interrupted=True)
            for job, spec in pending.values():
                self.finish(job, spec, None, interrupted=True)
        code = self.exit_code(interrupted)
        self.write_report(final=True, exit_code=code)
        totals = self.totals()
        self.emit("farm_done", exit_code=code, totals=totals, report=self.report_path)
        print(self.summary(totals), file=sys.stderr)
        return code

    def finish(self, job, spec, ref, interrupted: bool = False) -> None:
        record = self.records[job.name]
        status_file = _read_json(spec["status"])
        status_file = status_file if (status_file or {}).get("run_id") == self.run_id else {}
        result, error = None, None
        if ref is not None:
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                error = "cancelled (the farm was interrupted)"
            except self.ray.exceptions.RayTaskError as exc:   # an exception in the task itself: a bug
                error = f"internal error in the farm task: {_first_line(getattr(exc, 'cause', None) or exc)}"
            except self.ray.exceptions.RayError as exc:        # worker or node lost more often than --max-retries
                error = (f"Ray gave up after the worker was lost {self.args.max_retries + 1} time(s) "
                         f"({type(exc).__name__}: {_first_line(exc)})")
        if result is None:
            attempts = status_file.get("attempts", [])
            last_code = attempts[-1].get("exit_code") if attempts else None
            checkpointed = _has_checkpoint(spec["checkpoint_dir"])
            if interrupted and not attempts:
                status, code, error = "not run", None, "the farm was interrupted before this job started"
            elif interrupted:
                status = "interrupted"
                code = 75 if checkpointed else 130
                error = attempts[-1].get("error") or error or "interrupted before it finished"
            else:
                status = "failed"
                code = 75 if checkpointed and last_code in (None, 75) else 1
            if checkpointed and status != "not run":
                error += f"; run the farm again to resume from its checkpoint in {spec['checkpoint_dir']}"
            result = {"status": status, "exit_code": code, "attempts": len(attempts),
                      "attempt_log": attempts, "error": error, "outputs": [],
                      "started": attempts[0].get("started") if attempts else None, "finished": round(time.time(), 3)}
        record.update(result)
        record["outputs"] = result.get("outputs") or ([] if record["status"] not in ("ok", "skipped")
                                                       else spec["outputs"])
        started, finished = record.get("started"), record.get("finished")
        record["seconds"] = round(finished - started, 3) if started and finished else None
        record["queued_seconds"] = round(started - record["submitted"], 3) if started else None
        self.emit("job_done", **record)
        tries = f"{record['attempts']} attempts" if record["attempts"] != 1 else "1 attempt"
        seconds = f"{record['seconds']:.1f} s" if record["seconds"] is not None else "-"
        detail = ", ".join(record["outputs"]) if record["status"] in ("ok", "skipped") else \
            f"exit {record['exit_code']}: {record['error']}" if record["exit_code"] is not None else record["error"]
        self.say(f"farm: {record['status']:<8} {job.name}  {seconds}  {tries}  {detail}")
        self.write_report(final=False)

    def exit_code(self, interrupted: bool) -> int:
        ordered = [self.records[j.name] for j in self.jobs]
        bad = [r for r in ordered if r["status"] not in ("ok", "skipped")]
        if interrupted:
            stopped = [r for r in ordered if r["status"] == "interrupted"]
            return 75 if stopped and all(r["exit_code"] == 75 for r in stopped) else 130
        return (bad[0]["exit_code"] or 1) if bad else 0

    def totals(self) -> Dict[str, Any]:
        records = list(self.records.values())
        counts: Dict[str, int] = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {"jobs": len(records), **counts, "attempts": sum(r["attempts"] for r in records),
                "retried": sum(1 for r in records if r["attempts"] > 1),
                "job_seconds": round(sum(r.get("seconds") or 0.0 for r in records), 3),
                "seconds": round(time.time() - self.started, 3)}

    def write_report(self, final: bool, exit_code: Optional[int] = None) -> None:
        from tokenflow import __version__

        report = {"kind": "tokenflow-farm-report", "schema": REPORT_SCHEMA_VERSION, "tokenflow_version": __version__,
                  "run_id": self.run_id, "state": "finished" if final else "running", "exit_code": exit_code,
                  "argv": sys.argv[1:], "driver_host": socket.gethostname(),
                  "started": round(self.started, 3), "finished": round(time.time(), 3) if final else None,
                  "seconds": round(time.time() - self.started, 3), "cluster": self.cluster,
                  "settings": {"checkpoint_root": self.root, "max_retries": self.args.max_retries,
                               "cpus_per_job": self.args.cpus_per_job, "gpus_per_job": self.args.gpus_per_job,
                               "overwrite": bool(self.args.overwrite)},
                  "totals": self.totals(), "jobs": [self.records[j.name] for j in self.jobs if j.name in self.records]}
        _write_json_atomic(self.report_path, report)

    def summary(self, totals: Dict[str, Any]) -> str:
        keys = [k for k in ("ok", "skipped", "failed", "interrupted", "not run", "pending") if totals.get(k)]
        lines = [f"farm: {totals['jobs']} job(s) in {totals['seconds']:.1f} s: "
                 + ", ".join(f"{totals[k]} {k}" for k in keys)
                 + f"; {totals['attempts']} attempt(s), {totals['retried']} job(s) retried; report {self.report_path}"]
        for j in self.jobs:
            r = self.records[j.name]
            if r["status"] not in ("ok", "skipped"):
                code = f"exit {r['exit_code']}: " if r["exit_code"] is not None else ""
                lines.append(f"  {r['status']} {j.name}: {code}{r['error']} (log {r['log']})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ worker

def run_job_task(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The Ray task of one job: run ``tokenflow run JOB --resume`` in a child until it succeeds, fails
    for good or the attempt budget is spent; return its record. Safe to rerun after a lost worker."""
    return JobAttempts(spec).run()


class JobAttempts:
    def __init__(self, spec: Dict[str, Any]):
        self.spec = spec
        self.host = socket.gethostname()
        self.node_id = self._node_id()
        state = _read_json(spec["status"]) or {}
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
            _write_json_atomic(self.spec["status"], self.state)
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
            self.wait_for_previous(lost)
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
            status, error = "failed", last.get("error") or _describe_exit(code)
            code = code if code and code > 0 else 1
        else:   # every attempt was interrupted or lost: the budget is spent
            status = "failed"
            error = f"gave up after {len(attempts)} attempt(s); last: {last.get('error') or _describe_exit(code)}"
            code = 75 if _has_checkpoint(self.spec["checkpoint_dir"]) else 1
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
    def wait_for_previous(self, previous: Dict[str, Any]) -> None:
        """Let the previous attempt's child finish saving (same machine) or its locks lapse (another one)."""
        pid, grace = previous.get("child_pid"), float(os.environ.get("TOKENFLOW_FARM_GRACE", DEFAULT_GRACE_S))
        if previous.get("host") == self.host and pid:
            if _same_process(pid, previous.get("child_start")):
                try:
                    os.kill(pid, signal.SIGTERM)       # normally sent already by the parent-death signal
                except OSError:
                    pass
                deadline = time.time() + grace
                while time.time() < deadline and _same_process(pid, previous.get("child_start")):
                    time.sleep(0.2)
                if _same_process(pid, previous.get("child_start")):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                    time.sleep(0.5)
        elif previous.get("host") and previous.get("child_pid"):
            self.wait_for_locks(previous)

    def wait_for_locks(self, previous: Dict[str, Any]) -> None:
        from tokenflow.app.locks import lock_path, lock_ttl, read_lock, stale_reason

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
                return
            time.sleep(2.0)

    def read_lost_events(self, lost: Dict[str, Any]) -> None:
        """What the child of an attempt whose worker died wrote after the worker's last look."""
        offset = lost.get("events_offset")
        if offset is None:
            return
        try:
            with open(self.spec["events"], "rb") as events:
                events.seek(offset)
                lines = events.read().split(b"\n")
        except OSError:
            return
        for line in lines:
            self.on_event(lost, line.decode("utf-8", "replace"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "run_done":
                lost["child_exit_code"] = event.get("exit_code")
        self.save()

    # -- one child run
    def command(self) -> List[str]:
        spec = self.spec
        cmd = [sys.executable, "-c", CHILD_CODE, "run", spec["file"], "--checkpoint-root", spec["root"],
               "--resume", "--log-json"]
        return cmd + (["--overwrite"] if spec["overwrite"] else [])

    def child_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        env[_PARENT_ENV] = str(os.getpid())
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
        attempt["child_pid"], attempt["child_start"] = proc.pid, _pid_start(proc.pid)
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
            code = _stop_child(proc)
            self.end(attempt, code, start, "cancelled")
            raise
        except BaseException:
            _stop_child(proc)
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
                outcome = f"killed by {_signal_name(-code)}"
            elif code in RETRIED_EXIT_CODES:
                outcome = "interrupted"
            else:
                outcome = "failed"
        attempt["outcome"] = outcome
        if code and not attempt.get("error"):
            attempt["error"] = _describe_exit(code)
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


def child_main() -> None:
    """Entry point of a job's child process: die with the Ray worker, then ``tokenflow <argv>``."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.environ.pop(_PARENT_ENV, None)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        sys.exit(130)   # the worker died while this process started: nothing was done
    from tokenflow.app.cli import main

    sys.exit(main(sys.argv[1:]))


def _stop_child(proc: subprocess.Popen, grace: float = DEFAULT_GRACE_S) -> Optional[int]:
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


# ----------------------------------------------------------------------------------- helpers

def _pid_start(pid: int) -> Optional[str]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _same_process(pid: int, start: Optional[str]) -> bool:
    """Whether ``pid`` still runs and is the process that had start time ``start`` (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    now = _pid_start(pid)
    if now is None:
        return start is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        state = ""
    return state not in ("Z", "X") and (start is None or now == start)


def _check_writable_folder(folder: str, what: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tokenflow-farm-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what}: cannot write into '{folder}' ({exc.strerror or exc})") from None


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """ConfigError unless a ``host:port`` address accepts a TCP connection (other forms are left to Ray)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                          "with `ray start --head`, check the address, or use --ray local") from None


def _has_checkpoint(folder: Optional[str]) -> bool:
    return bool(folder) and any(Path(folder, name).is_file() for name in ("inversion.pt", "edit.pt"))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe_exit(code: Optional[int]) -> str:
    from tokenflow.errors import EXIT_CODES

    if code is None:
        return "the child's exit status is unknown"
    if code < 0:
        return f"the job's process was killed by {_signal_name(-code)}"
    return f"exit {code}: {EXIT_CODES.get(code, 'unknown exit code')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resource_text(resources: Dict[str, float]) -> str:
    return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if k in resources) or "no resources"


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: str, data: Any) -> None:
    with atomic_file(path, durable=True, make_parents=True) as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")

