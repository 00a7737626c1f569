"""``tokenflow run JOBS...`` (docs/jobs.md): every job is validated before any work starts, and
every problem is reported at once with its file and field path; then the jobs run in order with
one Reporter, whose events each name their job.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional

from tokenflow.app.jobfile.load import Job, load_jobs
from tokenflow.app.paths import check_root
from tokenflow.app.run import exit_for, fail, start_reporting
from tokenflow.errors import ConfigError, Interrupted, InterruptedWithCheckpoint, LockedError
from tokenflow.interrupt import StopFlag, stop_on_signals
from tokenflow.io.progress import Reporter

# how a job that ended with an exit code is recorded (any other non-zero code: "failed")
STATUS_OF = {0: "done", LockedError.exit_code: "locked", Interrupted.exit_code: "interrupted",
             InterruptedWithCheckpoint.exit_code: "interrupted"}


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="validate job files (YAML), then run them in order: one edit each",
                         description="Run job files: every job is validated first (all problems at once, "
                         "nothing runs if any job is bad), then they run in order. See docs/jobs.md.")
    run.add_argument("jobs", nargs="+", metavar="JOB", help="job files, folders of them (*.yaml, *.yml) or quoted globs")
    run.add_argument("--check", action="store_true", help="only validate: exit 0 if every job is valid, 2 if not")
    run.add_argument("--keep-going", action="store_true", help="run the remaining jobs after a failure "
                     "(default: stop at the first failing job); the exit code is still the first failure's")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs in every job")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue every job from the checkpoint in its checkpoint_dir")
    run.add_argument("--strict-resume", action="store_true", default=None, help="with --resume: refuse a checkpoint "
                     "saved with another thread count, torch/diffusers version or device (docs/checkpoints.md)")
    run.add_argument("--checkpoint-root", metavar="DIR", help="checkpoint_dir = DIR/<job name> for jobs without one")
    add_root_flags(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    run.add_argument("--log-json", action="store_true", help="JSON-lines events on stdout, each with its \"job\"")


def add_root_flags(parser) -> None:
    """--output-root and --input-root, shared with `tokenflow farm`."""
    parser.add_argument("--output-root", metavar="DIR", help="every output, checkpoint_dir and cache_dir a job "
                        "file gives must resolve (after '..' and symbolic links) inside DIR, an existing folder; "
                        "a job that escapes it is refused before any job runs (exit 2)")
    parser.add_argument("--input-root", metavar="DIR", help="every input a job file gives (video, depth maps, "
                        "control image folders; local model, CLIP, VAE, depth model, model config, LoRA, embedding "
                        "and ControlNet files or folders) must resolve inside DIR, an existing folder (exit 2 "
                        "otherwise)")


def root_options(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """The roots of the command line as real paths (ConfigError for a root that is not a folder)."""
    return {"output_root": check_root(getattr(args, "output_root", None), "--output-root"),
            "input_root": check_root(getattr(args, "input_root", None), "--input-root")}


class RunReporter(Reporter):
    """The run's one Reporter: every event names its job; notices a skipped job."""

    job: Optional[str] = None
    skipped: Optional[list] = None   # the outputs of a job skipped because they exist

    def event(self, kind: str, **fields) -> None:
        if kind == "skipped":
            self.skipped = list(fields.get("outputs") or [])
        super().event(kind, **({"job": self.job, **fields} if self.job is not None else fields))


def main(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    reporter = RunReporter(quiet=args.quiet, json_stream=sys.stdout if args.log_json else None)
    start_reporting(reporter, "run", argv)
    return run_jobs(args, reporter)


def run_jobs(args: argparse.Namespace, reporter: RunReporter) -> int:
    """Validate every job, then run them in order. Exit code: an interrupt's, else the first failed
    job's, else 7 if a job was locked by another worker, else 0."""
    overrides = {k: True for k in ("overwrite", "resume", "strict_resume") if getattr(args, k)}
    jobs, problems = load_jobs(args.jobs, overrides=overrides, checkpoint_root=args.checkpoint_root, check_files=True,
                               **root_options(args))
    if problems:
        for p in problems:
            print(f"tokenflow: error: {p}", file=sys.stderr)
        reporter.event("error", code=ConfigError.code, exit_code=ConfigError.exit_code,
                       message=f"{len(problems)} problem(s) in the job files; nothing was run",
                       problems=[{"file": p.file, "path": p.path, "message": p.message} for p in problems])
        return ConfigError.exit_code
    if args.check:
        reporter.event("checked", jobs=[{"job": j.name, "file": j.file} for j in jobs])
        if not args.quiet:
            print(f"{len(jobs)} job(s) valid: {', '.join(j.name for j in jobs)}", file=sys.stderr)
        return 0
    from tokenflow.app import jobs as runner  # noqa: PLC0415 (imports torch and diffusers: not while parsing flags)

    # One stop request for the whole run: no job starts after it. The handlers stay until run_done is
    # written: a second SIGTERM (a farm retry repeats its worker's parent-death signal) must not
    # kill the run between its last job and the event that reports how it ended.
    with stop_on_signals() as stop:
        records = _run_in_order(jobs, runner, reporter, stop, keep_going=args.keep_going)
        reporter.job = None
        left = jobs[len(records):]
        records += [{"job": j.name, "file": j.file, "status": "not run", "exit_code": None, "seconds": 0.0,
                     "outputs": [], "message": ""} for j in left]
        first = {status: next((r for r in records if r["status"] == status), None)
                 for status in ("interrupted", "failed", "locked")}
        code = next((r["exit_code"] for r in first.values() if r is not None), 0)
        if stop.requested and code == 0 and left:
            code = Interrupted.exit_code   # stopped between jobs: the rest did not run; rerunning skips the done ones
            fail(f"stopped by {stop.reason}: {len(left)} job(s) not run; run the same command again to do them "
                 "(finished outputs are skipped)", code)
        reporter.event("run_done", exit_code=code, jobs=records)
    if not args.quiet:
        print(format_run_summary(records), file=sys.stderr)
    return code


def _run_in_order(jobs: List[Job], runner, reporter: RunReporter, stop: StopFlag, keep_going: bool) -> List[Dict[str, Any]]:
    """Run jobs in order until one is interrupted, one fails (unless ``keep_going``) or a stop was
    requested; the records of those that ran."""
    records: List[Dict[str, Any]] = []
    for index, job in enumerate(jobs, 1):
        if stop.requested:
            break
        reporter.job, reporter.skipped, reporter.timings = job.name, None, {}
        reporter.event("job_start", file=job.file, index=index, total=len(jobs))
        if reporter.bars:
            print(f"tokenflow run: [{index}/{len(jobs)}] {job.name} ({job.file})", file=sys.stderr)
        record = _run_one(job, runner, reporter, stop)
        records.append(record)
        reporter.event("job_end", **{k: v for k, v in record.items() if k != "job"})
        if record["status"] in ("failed", "interrupted", "locked"):
            fail(f"{job.file}: {record['message']}", record["exit_code"])
            if record["status"] == "interrupted" or (record["status"] == "failed" and not keep_going):
                break
        elif reporter.json_stream is None and record["status"] == "done":   # stdout: the written paths
            for output in record["outputs"]:
                print(output)
    return records


def _run_one(job: Job, runner, reporter: RunReporter, stop: StopFlag) -> Dict[str, Any]:
    """Run one valid job; its status, exit code, outputs and seconds. A job's failure does not end
    the run: it becomes the record's exit code and message (``exit_for``, as for a whole command)."""
    start, outputs, message, code = time.perf_counter(), [], "", 0
    try:
        results = runner.run_edit(job.config, reporter, stop, inputs=[("job file", job.file)])
        outputs = [str(r.output) for r in results or []]
    except (Exception, KeyboardInterrupt) as exc:   # the job's end, whatever it was
        code, message = exit_for(exc, interrupted="interrupted; no output was written")
    status = STATUS_OF.get(code, "failed")
    if status == "done" and reporter.skipped is not None:
        status, outputs = "skipped", reporter.skipped
    return {"job": job.name, "file": job.file, "status": status, "exit_code": code,
            "seconds": round(time.perf_counter() - start, 3), "outputs": outputs, "message": message}


def format_run_summary(records: List[Dict[str, Any]]) -> str:
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    width = max(len(r["job"]) for r in records)
    lines = [f"run: {len(records)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for r in records:
        detail = ", ".join(r["outputs"]) if r["status"] in ("done", "skipped") else \
            f"exit {r['exit_code']}: {r['message']}" if r["exit_code"] else ""
        seconds = f"{r['seconds']:7.1f} s" if r["status"] != "not run" else " " * 9
        lines.append(f"  {r['status']:<11} {r['job']:<{width}}  {seconds}  {detail}".rstrip())
    return "\n".join(lines)
