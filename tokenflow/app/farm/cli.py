"""``tokenflow farm JOBS... --ray ADDRESS|local``: its flags, and the checks before anything is
submitted (every job valid, Ray installed, the report and checkpoint folders writable)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional

from tokenflow.app.farm.driver import Farm
from tokenflow.app.farm.status import FARM_DIR, grace_seconds
from tokenflow.app.jobfile.load import load_jobs
from tokenflow.app.jobfile.run import add_root_flags, root_options
from tokenflow.app.paths import WHOLE_FOLDERS, job_inputs, job_output_paths
from tokenflow.config import Ranged, Rule
from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.aliasing import check_not_an_input, inside

INSTALL_HINT = "tokenflow farm needs Ray: pip install 'tokenflow[farm]' (or pip install 'ray>=2.9')"
MAX_RETRIES = 100        # runs after the first of one job
MAX_GPUS = 64            # GPUs per job: a Ray task runs on one machine
MAX_CPUS = 4096          # CPUs per job, and of a local cluster


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
    add_root_flags(farm)
    farm.add_argument("--max-retries", type=Ranged("--max-retries", int, Rule(minimum=0, maximum=MAX_RETRIES)),
                      default=3, metavar="N",
                      help="runs after the first for a job whose worker is lost or which is interrupted (default 3)")
    farm.add_argument("--gpus-per-job", type=Ranged("--gpus-per-job", float, Rule(minimum=0, maximum=MAX_GPUS)),
                      metavar="G", help="GPUs per job (default: 1 if the "
                      "cluster has GPUs and the job's device is not cpu/mps, else 0)")
    farm.add_argument("--cpus-per-job", type=Ranged("--cpus-per-job", float, Rule(minimum=0, maximum=MAX_CPUS)),
                      default=1.0, metavar="C",
                      help="CPUs per job (default 1; Ray sets the job's OMP_NUM_THREADS from it)")
    farm.add_argument("--local-cpus", type=Ranged("--local-cpus", int, Rule(minimum=1, maximum=MAX_CPUS)), metavar="N",
                      help="with --ray local: CPUs of the local cluster (default: all of this machine's)")
    farm.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: a job "
                      "whose outputs all exist is skipped)")
    farm.add_argument("--log-json", action="store_true",
                      help="JSON-lines events on stdout (farm_start, job_done, farm_done) instead of lines of text")
    Ranged.add_to_help(farm)


def main(args: argparse.Namespace) -> int:
    if args.local_cpus is not None and args.ray != "local":   # its range: the flag's type (config.Ranged)
        raise ConfigError(f"--local-cpus {args.local_cpus}: only sizes a --ray local cluster")
    grace_seconds()   # the workers get this environment: a bad value is refused before anything is submitted
    report_path = os.path.abspath(args.report)
    root = os.path.abspath(args.checkpoint_root or os.path.join(os.path.dirname(report_path), "checkpoints"))
    roots = root_options(args)   # --output-root / --input-root: existing folders, as real paths
    jobs = validate_jobs(args.jobs, root, overwrite=args.overwrite, **roots)
    check_report_path(report_path, args.report, jobs)
    ray = import_ray()
    for folder, what in ((os.path.dirname(report_path), "--report"), (os.path.join(root, FARM_DIR), "--checkpoint-root")):
        _check_writable_folder(folder, what)
    return Farm(args, ray, jobs, root, report_path, roots).run()


def validate_jobs(patterns, root: str, overwrite: bool = False, output_root: Optional[str] = None,
                  input_root: Optional[str] = None) -> list:
    """Every job of the farm, as ``tokenflow run`` would run it; ConfigError with every problem if any
    (a job that writes outside ``output_root`` or reads outside ``input_root`` among them)."""
    overrides = {"resume": True, **({"overwrite": True} if overwrite else {})}
    jobs, problems = load_jobs(patterns, overrides=overrides, checkpoint_root=root, check_files=True,
                               output_root=output_root, input_root=input_root)
    if problems:   # one line each, as `tokenflow run` prints them; the last one also says nothing ran
        for p in problems[:-1]:
            print(f"tokenflow: error: {p}", file=sys.stderr)
        raise ConfigError(f"{problems[-1]} ({len(problems)} problem(s) in the job files; nothing was submitted)")
    if not jobs:
        raise ConfigError("no job files given")
    return jobs


def check_report_path(report_path: str, shown: str, jobs: list) -> None:
    """OutputError (exit 5) when the farm's report would write over, or inside, a job's input (its
    job file, video, model, ...) or would be one of a job's outputs."""
    real = os.path.realpath(report_path)
    for job in jobs:
        check_not_an_input("--report", shown, job_inputs(job.config, [("job file", job.file)]))
        for label, path in job_output_paths(job.config):
            if os.path.realpath(path) == real or (label in WHOLE_FOLDERS and inside(real, os.path.realpath(path))):
                raise OutputError(f"--report '{shown}' is also an output of job {job.name!r} (its {label}, {job.file}): "
                                  "give the farm's report its own path")


def import_ray():
    try:
        import ray  # noqa: PLC0415 (optional package, tokenflow[farm]; also not while the CLI parses flags)
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def _check_writable_folder(folder: str, what: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tokenflow-farm-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what}: cannot write into '{folder}' ({exc.strerror or exc})") from None
