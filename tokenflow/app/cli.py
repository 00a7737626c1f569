"""``tokenflow`` command line: the subcommands' parsers, and each parsed command run through
``tokenflow.app.run.run_command`` (errors -> one line + exit code), then a quick exit.

Parsing flags imports no torch: the commands that need it (edit, invert, doctor, bench, ...)
import it when they run.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import Callable, Dict, List, Optional

from tokenflow import __version__
from tokenflow.app import cache_cli, export
from tokenflow.app.farm import cli as farm_cli
from tokenflow.app.flags import add_config_flags, config_from_args
from tokenflow.app.jobfile import run as jobfile_run
from tokenflow.app.jobfile import schema as jobfile_schema
from tokenflow.app.run import fail, run_command, start_reporting
from tokenflow.errors import ConfigError
from tokenflow.io.progress import Reporter
from tokenflow.quality import cli as quality_cli

EPILOG = """examples:
  tokenflow edit clip.mp4 --prompt "a shiny silver robotic wolf" --inversion-prompt "a wolf" -o wolf.mp4
  tokenflow invert clip.mp4 --inversion-prompt "a wolf"
  tokenflow edit --config config_pnp.yaml
  tokenflow edit clip.mp4 --method sdedit --sdedit-start 0.9 --prompt "..."
  tokenflow edit clip.mp4 --model tiny --preset tiny --prompt "anything"   # offline demo, random weights
  tokenflow edit clip.mp4 --prompt "..." -o out.mp4 --report out-report/   # + HTML report with metrics
  tokenflow metrics clip.mp4 out.mp4 --json metrics.json                  # warp error, flicker (+ CLIP)
exit codes: 0 ok (or skipped: outputs exist), 1 internal error, 2 bad flag/config/job file, 3 bad input video,
  4 model, 5 output, 6 out of memory, 7 output locked by another worker, 75 interrupted with a checkpoint
  (rerun with --resume), 130 interrupted (nothing saved)"""
COMMANDS = "{edit,invert,run,schema,farm,metrics,report,doctor,bench,export,cache}"
# what Ctrl-C outside a command's own signal handling means for it (default: "interrupted")
INTERRUPTED = {"edit": "interrupted; no output was written", "invert": "interrupted; no output was written",
               "run": "interrupted; the run stopped"}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad flag.

    ``configure``: adds the parser's flags when it is first used, so that listing a subcommand
    whose flags live in a heavy package (bench) imports nothing."""

    def __init__(self, *args, configure: Optional[Callable[[argparse.ArgumentParser], object]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure = configure

    def parse_known_args(self, args=None, namespace=None):
        if self._configure is not None:
            configure, self._configure = self._configure, None
            configure(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(2, f"tokenflow: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="tokenflow", description="TokenFlow video editing with Stable Diffusion "
                                     "(Geyer et al., ICLR 2024).", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tokenflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar=COMMANDS, parser_class=_OneLineParser)
    edit = sub.add_parser("edit", help="invert (or reuse the cache) and edit a video",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(edit, edit=True)
    invert = sub.add_parser("invert", help="only DDIM-invert a video into the cache")
    add_config_flags(invert, edit=False)
    doctor = sub.add_parser("doctor", help="environment, devices, and which kernel backends run here (and why not)")
    doctor.add_argument("--device", help="only this device (default: cpu and cuda when present)")
    doctor.add_argument("--dtype", help="dtype to check the backends for (default: the device's default)")
    doctor.add_argument("--check", action="store_true", help="also compare every runnable backend with the "
                        "torch reference on random inputs; exit code 1 if any check fails")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.add_argument("--cache-dir", metavar="DIR", help="the tokenflow cache root to report on (default as edit's)")
    jobfile_run.add_parser(sub)
    jobfile_schema.add_parser(sub)
    farm_cli.add_parser(sub)
    quality_cli.add_parsers(sub)
    sub.add_parser("bench", help="throughput of whole edits per stage (random-weight SD architectures by default)",
                   configure=lambda p: _bench_cli().configure(p))
    export.add_parser(sub)
    cache_cli.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as exc:   # a numeric flag outside its range (config.Ranged): one line, exit 2
        return fail(str(exc), exc.exit_code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    commands: Dict[str, Callable[[], int]] = {
        "edit": lambda: _edit_or_invert(args, argv), "invert": lambda: _edit_or_invert(args, argv),
        "run": lambda: jobfile_run.main(args, argv), "schema": lambda: jobfile_schema.main(args),
        "farm": lambda: farm_cli.main(args), "metrics": lambda: quality_cli.main(args),
        "report": lambda: quality_cli.main(args), "doctor": lambda: _doctor(args),
        "bench": lambda: _bench_cli().main(args), "export": lambda: export.main(args),
        "cache": lambda: cache_cli.main(args),
    }
    return run_command(commands[args.command], interrupted=INTERRUPTED.get(args.command, "interrupted"))


def _edit_or_invert(args: argparse.Namespace, argv: Optional[List[str]]) -> int:
    reporter = Reporter(quiet=args.quiet, json_stream=sys.stdout if args.log_json else None)
    start_reporting(reporter, args.command, argv)
    config = config_from_args(args, note=reporter.info)
    from tokenflow.app import jobs  # noqa: PLC0415 (imports torch and diffusers: not while parsing flags)

    if args.command == "edit" and args.plan:
        jobs.run_plan(config, reporter)
    elif args.command == "edit":
        results = jobs.run_edit(config, reporter, inputs=[("--config file", args.config)] if args.config else [])
        if reporter.json_stream is None:   # stdout carries results only: the written paths
            for result in results or []:
                print(result.output)
    else:
        jobs.run_invert(config, reporter)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from tokenflow.app import doctor  # noqa: PLC0415 (imports torch and the kernels: not while parsing flags)

    return doctor.main(args)


def _bench_cli():
    from tokenflow.benchmark import cli  # noqa: PLC0415 (imports torch, the kernels and the benchmark models: only for `bench`)

    return cli


def run() -> None:
    """The console entry point (``tokenflow`` and ``python -m tokenflow``): ``main()``, then a quick exit."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown.

    With torch, diffusers and transformers imported, CPython's finalisation (tearing down thousands
    of modules and freeing every object) takes about 1.2 s after the work is done; every output is
    already written and renamed into place by then. Streams are flushed and the atexit handlers
    (other libraries' cleanups) still run; only the module teardown is skipped. If a non-daemon
    thread is still alive, or TOKENFLOW_NORMAL_EXIT is set, the process exits the ordinary way.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if others or run_exit_handlers is None or os.environ.get("TOKENFLOW_NORMAL_EXIT"):
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):   # reader gone, or the stream closed
            pass
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":  # pragma: no cover
    run()
