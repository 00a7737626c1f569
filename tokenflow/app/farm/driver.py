"""The farm's driver: connects to Ray, submits one task per job (``task.run_job_task``), follows
them, and keeps the JSON report of every job's status, attempts, times and outputs."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

from tokenflow import __version__
from tokenflow.app.farm.status import (
    DEFAULT_GRACE_S,
    FAILED_EXIT_CODE,
    FARM_DIR,
    REPORT_SCHEMA_VERSION,
    has_checkpoint,
    read_json,
    write_json_atomic,
)
from tokenflow.app.farm.task import run_job_task
from tokenflow.app.outputs import prompt_outputs, resolve_output
from tokenflow.errors import ConfigError, Interrupted, InterruptedWithCheckpoint, first_line, one_line

# environment variables the workers get from the driver (Ray workers on other machines do not inherit it)
ENV_PREFIXES = ("TOKENFLOW_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TRITON_", "PYTORCH_",
                "TORCHINDUCTOR_")


def job_outputs(config) -> List[str]:
    return [os.path.abspath(p) for p in prompt_outputs(resolve_output(config), config.prompts)]


def _worker_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


class Farm:
    def __init__(self, args, ray, jobs, root: str, report_path: str, roots: Optional[Dict[str, Optional[str]]] = None):
        self.args, self.ray, self.jobs, self.root, self.report_path = args, ray, jobs, root, report_path
        self.roots = dict(roots or {})   # output_root / input_root (real paths) every job is confined to
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
            raise ConfigError(f"--ray {args.ray}: cannot connect to a Ray cluster ({first_line(exc)}); start one "
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
                    "output_root": self.roots.get("output_root"), "input_root": self.roots.get("input_root"),
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
        status_file = read_json(spec["status"])
        status_file = status_file if (status_file or {}).get("run_id") == self.run_id else {}
        result, error = None, None
        if ref is not None:
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                error = "cancelled (the farm was interrupted)"
            except self.ray.exceptions.RayTaskError as exc:   # an exception in the task itself: a bug
                error = f"internal error in the farm task: {first_line(getattr(exc, 'cause', None) or exc)}"
            except self.ray.exceptions.RayError as exc:        # worker or node lost more often than --max-retries
                error = (f"Ray gave up after the worker was lost {self.args.max_retries + 1} time(s) "
                         f"({one_line(exc)})")
        if result is None:
            attempts = status_file.get("attempts", [])
            last_code = attempts[-1].get("exit_code") if attempts else None
            checkpointed = has_checkpoint(spec["checkpoint_dir"])
            if interrupted and not attempts:
                status, code, error = "not run", None, "the farm was interrupted before this job started"
            elif interrupted:
                status = "interrupted"
                code = (InterruptedWithCheckpoint if checkpointed else Interrupted).exit_code
                error = attempts[-1].get("error") or error or "interrupted before it finished"
            else:
                status = "failed"
                resumable = checkpointed and last_code in (None, InterruptedWithCheckpoint.exit_code)
                code = InterruptedWithCheckpoint.exit_code if resumable else FAILED_EXIT_CODE
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
            resumable = stopped and all(r["exit_code"] == InterruptedWithCheckpoint.exit_code for r in stopped)
            return (InterruptedWithCheckpoint if resumable else Interrupted).exit_code
        return (bad[0]["exit_code"] or FAILED_EXIT_CODE) if bad else 0

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
        report = {"kind": "tokenflow-farm-report", "schema": REPORT_SCHEMA_VERSION, "tokenflow_version": __version__,
                  "run_id": self.run_id, "state": "finished" if final else "running", "exit_code": exit_code,
                  "argv": sys.argv[1:], "driver_host": socket.gethostname(),
                  "started": round(self.started, 3), "finished": round(time.time(), 3) if final else None,
                  "seconds": round(time.time() - self.started, 3), "cluster": self.cluster,
                  "settings": {"checkpoint_root": self.root, "output_root": self.roots.get("output_root"),
                               "input_root": self.roots.get("input_root"), "max_retries": self.args.max_retries,
                               "cpus_per_job": self.args.cpus_per_job, "gpus_per_job": self.args.gpus_per_job,
                               "overwrite": bool(self.args.overwrite)},
                  "totals": self.totals(), "jobs": [self.records[j.name] for j in self.jobs if j.name in self.records]}
        write_json_atomic(self.report_path, report)

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


def _resource_text(resources: Dict[str, float]) -> str:
    return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if k in resources) or "no resources"
