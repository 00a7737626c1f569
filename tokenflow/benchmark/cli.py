"""``tokenflow bench``: flags -> BenchConfig -> run -> tables, JSON, plot.

Wire-up (``tokenflow/app/cli.py``): ``configure(parser)`` adds the flags to the "bench" subcommand's
parser, ``main(args)`` runs it and returns 0 or raises a TokenFlowError; the app turns errors into
one line and an exit code (``tokenflow.app.run``), as for every subcommand.

There is one entry point, ``tokenflow bench`` (a stand-alone ``python -m tokenflow.benchmark`` would
need its own error wrapper, and ``benchmark`` may not import ``app``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Optional

from tokenflow.benchmark import report, run
from tokenflow.benchmark.config import (
    ARCHES,
    KERNEL_VARIANTS,
    PRESETS,
    UNET_BACKENDS,
    VARIANT_NAMES,
    BenchConfig,
    parse_variants,
)
from tokenflow.config import Ranged, Rule, parse_size
from tokenflow.errors import ConfigError, OutputError, TokenFlowError
from tokenflow.kernels import backend_names

EPILOG = f"""examples:
  tokenflow bench --device cuda --compare torch,triton,original --json bench.json --plot bench.png
  tokenflow bench --preset smoke --compare torch,original          # tiny model, seconds on a CPU
  tokenflow bench --arch sd15 --frames 40 --size 672x384 --compare chunk4,chunk8,chunk16
  tokenflow bench --device cuda --compare eager,compile,onnx        # UNet backends (build time in the warm-up)
  tokenflow bench --device cuda --compare plain,controlnet1,controlnet2   # the cost of N ControlNets
  tokenflow bench --device cuda --arch sd2-depth                    # SD 2-depth's 5-channel UNet
  tokenflow bench --device cuda --arch sdxl --size 1024x1024 --dtype float16   # SDXL base 1.0's shapes
variants for --compare (join parts with '+', e.g. triton+chunk4 or onnx+chunk8):
{textwrap.fill(VARIANT_NAMES, width=100, initial_indent='  ', subsequent_indent='  ')}
  (original: the original implementation's compute pattern)"""

MAX_REPEATS = 1000      # timed (or untimed warm-up) edits per variant
MAX_THREADS = 4096      # torch CPU threads
MAX_IDLE_WAIT_S = 86400

# flag dest -> BenchConfig field where they differ
_FIELDS = {"compare": "variants", "idle_wait": "idle_wait_s"}
_NOT_CONFIG = {"command", "preset", "json", "plot"}


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench flags (and the examples under --help) to ``p``."""
    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset (default 'default': "
                   "sd21, 16 frames 512x512, 20 inversion / 10 edit steps); flags override it")
    g = p.add_argument_group("model and clip")
    g.add_argument("--arch", choices=list(ARCHES), help="architecture with random weights, built "
                   "in memory (default sd21); sd2-depth: SD 2-depth's 5-channel UNet (random depth maps); "
                   "sdxl: SDXL base 1.0 (70 transformer blocks, two text encoders, float32 VAE); "
                   "tiny = the tiny offline model, tiny-depth its 5-channel variant")
    g.add_argument("--model", help="time a real model instead (Hub id, local diffusers folder, 1.5/2.1)")
    g.add_argument("--video", help="time this video instead of a synthetic clip")
    g.add_argument("--frames", type=Ranged("--frames", field="frames"), metavar="N", help="frames (default 16)")
    g.add_argument("--size", metavar="WxH", help="frame size, multiples of 8 (default 512x512)")
    g = p.add_argument_group("edit")
    g.add_argument("--inversion-steps", type=Ranged("--inversion-steps", field="inversion_steps"), metavar="N",
                   help="DDIM inversion steps (default 20)")
    g.add_argument("--steps", type=Ranged("--steps", field="steps"), metavar="N", help="edit steps (default 10)")
    g.add_argument("--keyframe-spacing", type=Ranged("--keyframe-spacing", field="keyframe_spacing"), metavar="B",
                   help="frames per keyframe group (default 8)")
    g.add_argument("--chunk-frames", type=Ranged("--chunk-frames", field="chunk_frames"), metavar="N",
                   help="frames per propagation call (default: the memory plan's)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", help="float32, float16 or bfloat16 (default float16 on GPUs, float32 on CPU)")
    g.add_argument("--attention-backend", metavar="NAME", help="keyframe attention backend: auto (default), "
                   f"{', '.join(backend_names('keyframe_attention'))} (see `tokenflow edit --help`)")
    g.add_argument("--nearest-backend", metavar="NAME", help="nearest-neighbour backend: auto (default), "
                   f"{', '.join(backend_names('cosine_nearest'))} (see `tokenflow edit --help`)")
    g = p.add_argument_group("measurement")
    g.add_argument("--compare", metavar="A,B,...", help="variants to run, the first is the baseline of "
                   f"the ratios (default: one run of the settings as given): kernel backends ({', '.join(KERNEL_VARIANTS)}), "
                   f"UNet backends ({', '.join(UNET_BACKENDS)}), original, chunkN, ... (all below)")
    g.add_argument("--repeats", type=Ranged("--repeats", int, Rule(minimum=1, maximum=MAX_REPEATS)), metavar="R",
                   help="timed edits per variant, median reported (default 3)")
    g.add_argument("--warmup", type=Ranged("--warmup", int, Rule(minimum=0, maximum=MAX_REPEATS)), metavar="W",
                   help="untimed edits first (default 1)")
    g.add_argument("--threads", type=Ranged("--threads", int, Rule(minimum=1, maximum=MAX_THREADS)), metavar="T",
                   help="torch CPU threads (default: torch's)")
    g.add_argument("--idle-wait", type=Ranged("--idle-wait", float, Rule(minimum=0, maximum=MAX_IDLE_WAIT_S, unit="seconds")),
                   metavar="S", help="CPU: wait at most S seconds for an idle machine before timing (default 60)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write every number, the settings and the environment")
    g.add_argument("--plot", metavar="PNG", help="PNG per variant: stage times, UNet samples/s, frames/s, "
                   "peak memory (needs matplotlib)")
    Ranged.add_to_help(p)
    return p


def add_parser(subparsers, **kwargs) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    return configure(subparsers.add_parser("bench", **kwargs))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from the preset and the flags given (None = not given)."""
    config = PRESETS[getattr(args, "preset", None) or "default"]
    fields = set(BenchConfig.__dataclass_fields__)
    changes = {}
    for name, value in vars(args).items():
        if name in _NOT_CONFIG or value is None or _FIELDS.get(name, name) not in fields:
            continue   # also whatever a surrounding parser put in the namespace
        if name == "size":
            value = parse_size(value)
        elif name == "compare":
            value = parse_variants(value)
        changes[_FIELDS.get(name, name)] = value
    if "model" in changes and "arch" in changes:
        raise ConfigError("--arch and --model exclude each other: --arch builds random weights, "
                          "--model loads real ones")
    return config.replace(**changes).validate()


def _check_output(path: Optional[str], flag: str) -> None:
    if path is None:
        return
    folder = Path(path).expanduser().resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{flag} {path}: cannot write into '{folder}'")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe: 0, or a TokenFlowError (bad flags, a variant that
    did not finish).

    ``--json`` is written (atomically) after every variant, so an interrupted or crashed run keeps
    the variants before it (``complete`` says whether all ran). A variant that raises is recorded
    (``error``, ``error_type``; its name in ``failed``) and the others still run; then the exit
    status is the failures' common exit code (6 when all ran out of memory), else 1."""
    config = config_from_args(args)
    if getattr(args, "plot", None):
        report.check_plot_support()
    _check_output(getattr(args, "json", None), "--json")
    _check_output(getattr(args, "plot", None), "--plot")
    command = shlex.join(sys.argv)

    def written(doc: dict) -> None:
        doc["command"] = command
        if getattr(args, "json", None):
            path = report.write_json(doc, args.json)
            if doc["complete"]:
                run.log(f"wrote {path}")

    doc = run.run(config, on_variant=written)
    report.print_tables(doc)
    if getattr(args, "plot", None):
        run.log(f"wrote {report.write_plot(doc, args.plot)}")
    failed = [e for e in doc["variants"] if e.get("error")]
    if failed:
        codes = {e["exit_code"] for e in failed}
        error = TokenFlowError(f"variant(s) {', '.join(e['name'] for e in failed)} did not finish: "
                               + "; ".join(f"{e['name']}: {e['error']}" for e in failed)
                               + (f" (the others are in {args.json})" if getattr(args, "json", None) else ""))
        error.exit_code = codes.pop() if len(codes) == 1 else TokenFlowError.exit_code
        raise error
    return 0
