"""``tokenflow`` command line: thin; parses flags into an EditConfig, runs a job, maps errors to exit codes."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

from tokenflow import __version__
from tokenflow.config import DEFAULT_NEGATIVE_PROMPT, PRESETS, EditConfig, from_mapping, load_yaml, parse_size
from tokenflow.errors import ConfigError, ResourceError, TokenFlowError

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


def _size(text: str):
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad flag."""

    def error(self, message: str):
        self.exit(2, f"tokenflow: error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser, edit: bool) -> None:
    p.add_argument("video", nargs="?", help="input video (mp4, mov, webm, mkv, gif, ...) or a folder of numbered images")
    p.add_argument("--config", metavar="YAML", help="YAML config; our keys or the original repo's "
                   "(data_path, n_frames, n_timesteps, batch_size, sd_version, ...). Flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset: "
                   "original (the paper's defaults), fast (50 inversion / 10 edit steps), tiny (offline demo)")
    g = p.add_argument_group("frames")
    g.add_argument("--frames", type=int, metavar="N", help="number of frames to edit (default 40; 0 = all)")
    g.add_argument("--start", metavar="I", help="first source frame index (default 0)")
    g.add_argument("--stride", type=int, metavar="S", help="take every S-th source frame (default 1)")
    g.add_argument("--size", type=_size, metavar="WxH", help="frame size, multiples of 8 (default 512x512 for "
                   "square input, 672x384 / 384x672 otherwise)")
    g.add_argument("--crop", action="store_true", default=None,
                   help="centre-crop to the target aspect ratio instead of stretching")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hub id, local diffusers folder, SD version (1.5, 2.0, 2.1) or 'tiny' "
                   "(random weights, offline). Default stabilityai/stable-diffusion-2-1-base")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", help="float32, float16 or bfloat16 (default float16 on GPUs, float32 on CPU)")
    g.add_argument("--allow-pickle", action="store_true", default=None, help="also load pickle weights (.bin/.ckpt); "
                   "default: safetensors only (pickle can run code: only for weights you trust)")
    g = p.add_argument_group("inversion")
    g.add_argument("--inversion-prompt", help="text describing the source video (default empty)")
    g.add_argument("--inversion-steps", type=int, metavar="N", help="DDIM inversion steps (default 500)")
    g.add_argument("--inversion-batch-size", type=int, metavar="B", help="frames per UNet call while inverting "
                   "(default: the memory plan's)")
    g.add_argument("--cache-dir", help="inversion cache folder (default $TOKENFLOW_CACHE or ~/.cache/tokenflow)")
    g.add_argument("--no-cache", action="store_true", default=None, help="neither read nor write the inversion cache")
    if edit:
        g = p.add_argument_group("editing")
        g.add_argument("--prompt", action="append", help="what the video should become (required); repeat it "
                       "for several edits of the same video in one run (shared inversion, one output each)")
        g.add_argument("--negative-prompt", help=f"default: {DEFAULT_NEGATIVE_PROMPT!r}")
        g.add_argument("--method", choices=["pnp", "sdedit"], help="pnp (default, TokenFlow + Plug-and-Play) or "
                       "sdedit (TokenFlow + SDEdit, the original's run_tokenflow_sdedit.py)")
        g.add_argument("--steps", type=int, metavar="N", help="denoising steps (default 50); every edit timestep "
                       "must be an inversion timestep")
    else:
        p.add_argument("--steps", type=int, metavar="N", help="the edit steps the inversion must serve (default 50)")
        p.add_argument("--method", choices=["pnp", "sdedit"], help=argparse.SUPPRESS)
    if edit:
        g.add_argument("--guidance-scale", type=float, metavar="G", help="classifier-free guidance (default 7.5)")
        g.add_argument("--keyframe-spacing", type=int, metavar="B", help="frames per group, one random keyframe "
                       "each (the original's batch_size; default 8)")
        g.add_argument("--pnp-attn-t", type=float, metavar="F", help="fraction of steps with PnP Q/K injection (default 0.5)")
        g.add_argument("--pnp-f-t", type=float, metavar="F", help="fraction of steps with PnP ResNet feature injection (default 0.8)")
        g.add_argument("--sdedit-start", type=float, metavar="F", help="SDEdit: start fraction (the original's "
                       "`start`, default 0.9); `--start 0.9` is accepted with --method sdedit")
        g.add_argument("--no-ddim-noise", action="store_true", default=None,
                       help="SDEdit: noise with one random draw instead of the inversion's noise")
        g.add_argument("--propagation", choices=["original", "paper"], help="original (default: the authors' "
                       "code) or paper (nearest keyframes before/after, linear weights, matched on attention outputs)")
        g.add_argument("--seed", type=int, help="seed of the keyframe draws (default 1)")
        g = p.add_argument_group("memory (see --plan)")
        g.add_argument("--memory-budget", metavar="SIZE", help="device memory the edit may use, e.g. 12GB or "
                       "16GiB (default: what the device has free, minus a margin); sets the chunk sizes")
        g.add_argument("--plan", action="store_true", help="print the memory plan (chunk sizes, predicted peak, "
                       "keyframe store size) and exit without editing")
        g.add_argument("--chunk-frames", type=int, metavar="N", help="frames per UNet call of the propagation "
                       "pass (default: the memory plan's); changes memory and speed, not the result")
        g.add_argument("--keyframe-window", type=int, metavar="W", help="each keyframe attends to the keyframes "
                       "of its window of W (shifted by W/2 every other step), so long videos cost linear time "
                       "and memory (default: all keyframes, the original)")
        g.add_argument("--keyframe-store", choices=["auto", "device", "host"], help="where the keyframe "
                       "features live (default auto: on the device unless the plan needs the room)")
        g.add_argument("--inverted-latents", choices=["auto", "device", "host", "disk"], help="where the "
                       "inverted latents live (default auto); disk reloads them per call, as the original does")
        g.add_argument("--backend", choices=["eager", "compile", "aot", "onnx", "tensorrt"], help="how the UNet runs: "
                       "eager (default), compile (torch.compile; CUDA graphs on GPU), aot (AOTInductor packages: compiled once per "
                       "model/shape/machine, loaded without tracing in later runs), onnx (exported graphs in "
                       "ONNX Runtime; `tokenflow export`), tensorrt (engines built from those graphs; never run "
                       "in our CI, see README)")
        g = p.add_argument_group("kernels (see `tokenflow doctor` for what runs here)")
        g.add_argument("--attention-backend", metavar="NAME", help="keyframe attention: auto (default: triton "
                       "on CUDA, else torch), triton, xformers (unverified) or torch (the reference)")
        g.add_argument("--nearest-backend", metavar="NAME", help="nearest-neighbour search: auto (default: "
                       "triton on CUDA, else torch), triton, faiss or torch (the reference)")
        g = p.add_argument_group("outputs")
        g.add_argument("-o", "--output", help="output .mp4 (H.264, source fps, source audio) or a folder "
                       "(default tokenflow-results/<video>-<method>.mp4)")
        g.add_argument("--save-frames", metavar="DIR", help="also write numbered PNGs into DIR")
        g.add_argument("--save-latents", metavar="PATH", help="also write the final latents [N,4,h,w] as .npy")
        g.add_argument("--fps", type=float, help="output frame rate (default: the source's)")
        g.add_argument("--report", metavar="DIR", help="also write an HTML report into DIR: frames side by side, "
                       "a side-by-side video, warp error / flicker per frame, stage timings, settings "
                       "(needs opencv-python-headless and matplotlib)")
        g.add_argument("--overwrite", action="store_true", default=None,
                       help="replace existing outputs (default: a job whose outputs all exist is skipped, exit 0)")
        g = p.add_argument_group("unattended runs (docs/checkpoints.md, docs/farm.md)")
        g.add_argument("--checkpoint-dir", metavar="DIR", help="save resumable state (latents, step, RNG) into DIR")
        g.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (default 5)")
        g.add_argument("--resume", action="store_true", default=None,
                       help="continue from the checkpoint in --checkpoint-dir (refused if it was made with other settings)")
        g = p.add_argument_group("outputs")
        g.add_argument("--clip-model", metavar="MODEL", help="CLIP model (Hub id or folder) for the report's CLIP "
                       "text alignment and frame consistency (default: skipped)")
    g = p.add_argument_group("logging")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    g.add_argument("--log-json", action="store_true", help="JSON-lines events on stdout instead of progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="tokenflow", description="TokenFlow video editing with Stable Diffusion "
                                     "(Geyer et al., ICLR 2024).", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tokenflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{edit,invert,run,schema,farm,metrics,report,doctor,bench,export}", parser_class=_OneLineParser)
    edit = sub.add_parser("edit", help="invert (or reuse the cache) and edit a video",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(edit, edit=True)
    invert = sub.add_parser("invert", help="only DDIM-invert a video into the cache")
    _add_common(invert, edit=False)
    doctor = sub.add_parser("doctor", help="environment, devices, and which kernel backends run here (and why not)")
    doctor.add_argument("--device", help="only this device (default: cpu and cuda when present)")
    doctor.add_argument("--dtype", help="dtype to check the backends for (default: the device's default)")
    doctor.add_argument("--check", action="store_true", help="also compare every runnable backend with the "
                        "torch reference on random inputs; exit code 1 if any check fails")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    from tokenflow.app import export as export_cli  # noqa: PLC0415
    from tokenflow.app import farm, jobfile  # noqa: PLC0415
    from tokenflow.benchmark import cli as bench_cli  # noqa: PLC0415
    from tokenflow.quality import cli as quality_cli  # noqa: PLC0415

    jobfile.add_parsers(sub)
    farm.add_parser(sub)
    quality_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    export_cli.add_parser(sub)
    return parser


# flag -> config field where the names differ
_RENAMES = {"start": "start_frame", "no_cache": "use_cache", "no_ddim_noise": "use_ddim_noise"}
_NOT_CONFIG = {"command", "config", "preset", "quiet", "log_json", "plan"}


def config_from_args(args: argparse.Namespace) -> EditConfig:
    config = PRESETS[args.preset] if args.preset else EditConfig()
    if args.config:
        config = load_yaml(args.config, config)
    changes = {}
    for name, value in vars(args).items():
        if name in _NOT_CONFIG or value is None:
            continue
        if name == "start":
            name, value = _parse_start(value, args)
        elif name in ("no_cache", "no_ddim_noise"):
            value = not value
        elif name == "prompt":
            value = value[0] if len(value) == 1 else tuple(value)
        changes[_RENAMES.get(name, name)] = value
    if changes.get("frames") == 0:
        changes["frames"] = None
    return from_mapping(changes, config, source="flags")


def _parse_start(value: str, args: argparse.Namespace):
    """--start is the first frame index; a decimal like 0.9 means SDEdit's start under --method sdedit."""
    if value.strip().lstrip("+").isdigit():
        return "start_frame", int(value)
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigError(f"--start {value!r} must be a frame index (integer >= 0)") from None
    if getattr(args, "method", None) == "sdedit":
        return "sdedit_start", fraction
    raise ConfigError(f"--start {value!r}: the first frame index must be an integer >= 0 "
                      "(for SDEdit's start fraction use --method sdedit --sdedit-start F)")


def _one_line_warnings(reporter) -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).splitlines()[0] if str(message) else category.__name__
        reporter.event("warning", message=text)
        if not reporter.quiet and reporter.json_stream is None:
            print(f"tokenflow: warning: {text}", file=sys.stderr)
    warnings.showwarning = show


def main(argv: Optional[List[str]] = None) -> int:
    from tokenflow.io.progress import Reporter

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "bench":
        from tokenflow.benchmark import cli as bench_cli  # noqa: PLC0415

        return bench_cli.main(args)
    if args.command in ("export", "doctor", "metrics", "report", "run", "schema", "farm"):   # own reporting
        try:
            if args.command == "export":
                from tokenflow.app import export as command
            elif args.command in ("metrics", "report"):
                from tokenflow.quality import cli as command
            elif args.command in ("run", "schema"):
                from tokenflow.app import jobfile as command
            elif args.command == "farm":
                from tokenflow.app import farm as command
            else:
                from tokenflow.app import doctor as command
            return command.main(args)
        except TokenFlowError as exc:
            print(f"tokenflow: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("tokenflow: error: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:   # e.g. `tokenflow schema | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
            if os.environ.get("TOKENFLOW_DEBUG"):
                raise
            print(f"tokenflow: error: {_internal_error(exc)}", file=sys.stderr)
            return 1
    reporter = Reporter(quiet=args.quiet, json_stream=sys.stdout if args.log_json else None)
    _one_line_warnings(reporter)
    _start_event(reporter, args.command, argv)
    try:
        config = config_from_args(args)
        from tokenflow.app import jobs

        if args.command == "edit" and args.plan:
            jobs.run_plan(config, reporter)
        elif args.command == "edit":
            results = jobs.run_edit(config, reporter)
            if reporter.json_stream is None:   # stdout carries results only: the written paths
                for result in results or []:
                    print(result.output)
        else:
            jobs.run_invert(config, reporter)
        return 0
    except TokenFlowError as exc:
        return _fail(reporter, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail(reporter, "interrupted; no output was written", 130)
    except MemoryError:
        return _fail(reporter, str(ResourceError("out of host memory: use fewer frames (--frames) or a smaller "
                                                 "--size")), ResourceError.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("TOKENFLOW_DEBUG"):
            raise
        return _fail(reporter, _internal_error(exc), 1)


def _internal_error(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:500] if str(exc) else ""
    return f"internal error: {type(exc).__name__}: {first} (set TOKENFLOW_DEBUG=1 for a traceback and please report it)"


def _start_event(reporter, command: str, argv: Optional[List[str]]) -> None:
    import platform

    from tokenflow.io.progress import EVENT_SCHEMA_VERSION

    reporter.event("start", command=command, version=__version__, schema=EVENT_SCHEMA_VERSION, pid=os.getpid(),
                   host=platform.node(), argv=list(sys.argv[1:] if argv is None else argv))


def _fail(reporter, message: str, code: int) -> int:
    from tokenflow.errors import EXIT_NAMES

    reporter.event("error", code=EXIT_NAMES.get(code, "internal_error"), exit_code=code, message=message)
    print(f"tokenflow: error: {message}", file=sys.stderr)
    return code


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
    import atexit
    import threading

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
