"""``./run.sh demo``: edit a generated sample clip with settings that finish on the machine it runs on.

    python -m tokenflow.app.demo [--dry-run] [tokenflow edit flags ...]

1. The model: ``TOKENFLOW_MODEL`` if set (loaded as given); else SD 2.1-base, downloaded with
   huggingface_hub's progress bars on stderr when online, taken from the Hugging Face cache when
   offline (``HF_HUB_OFFLINE=1``). If it cannot be had, the tiny random-weight model
   (``--preset tiny``: the output is NOT a real edit) and how to get the real one.
2. The settings, for the device (``--device`` among the flags, else the best available one):
   a CUDA GPU gets the real defaults (512x512, 500 inversion + 50 edit steps); a CPU (or MPS)
   gets ``--preset fast`` (50 + 10 steps) at 256x256 and 16 frames: about 1,300 UNet evaluations of
   one 256x256 frame, about 22 minutes on a 2-core VM (estimated from a measured shorter run of the
   SD 2.1 architecture with random weights, bench/results/cpu_sd21_256_16f_demo_cost.json).
3. ``tokenflow edit`` writes ``tokenflow-results/sample-edit.mp4`` and its report. Flags after
   ``demo`` go to it last (they win). ``--dry-run`` prints the choice and the command, downloads
   and edits nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from tokenflow.config import DEFAULT_MODEL
from tokenflow.errors import ModelError, one_line
from tokenflow.models.hf import download_command

RESULTS = "tokenflow-results"
CLIP = f"{RESULTS}/sample.mp4"
PROMPT, INVERSION_PROMPT = "a colourful stained glass window", "coloured shapes moving"
TINY = ["--preset", "tiny"]
SMALL = ["--preset", "fast", "--size", "256x256", "--frames", "16"]   # CPU / MPS with a real model
SETTINGS_WORDS = {
    "tiny": "the tiny model's preset (128x128, 16 frames, 50 inversion + 10 edit steps)",
    "gpu": "the real defaults on a GPU (512x512, 500 inversion + 50 edit steps)",
    "small": "--preset fast (50 inversion + 10 edit steps) at 256x256 and 16 frames, as a CPU needs; "
             "about 1,300 UNet evaluations, estimated at about 22 minutes on a 2-core CPU (from a measured "
             "shorter run; a CUDA GPU runs the full settings)",
}


def how_to_get(repo: str = DEFAULT_MODEL) -> str:
    return (f"for a real edit, download the model once with `{download_command(repo)}` and run "
            "`TOKENFLOW_MODEL=DIR ./run.sh demo` (or run ./run.sh demo online: it downloads it, about 5 GB)")


def choose_model(dry_run: bool) -> Tuple[str, bool, List[str]]:
    """(model for --model, whether it is a tiny random-weight model, lines to tell the user).
    Downloads the default model when online (progress on stderr) unless ``dry_run``."""
    from tokenflow.models.architectures import weights_on_disk  # noqa: PLC0415  imports huggingface_hub
    from tokenflow.models.load import hub_offline, looks_like_path, resolve_source  # noqa: PLC0415

    given = os.environ.get("TOKENFLOW_MODEL", "").strip()
    if given:
        local = given.startswith("tiny") or looks_like_path(given) or Path(given).expanduser().exists()
        if dry_run and not (local or hub_offline()):   # a Hub id that resolving might download
            return given, False, [f"model: {given} (TOKENFLOW_MODEL; a dry run does not fetch it)"]
        try:
            source = resolve_source(given)
            return given, source.is_tiny, [f"model: {given} (TOKENFLOW_MODEL)"]
        except ModelError as error:
            return "tiny", True, [f"model: TOKENFLOW_MODEL={given} cannot be loaded ({error}); using --model tiny",
                            how_to_get()]
    if weights_on_disk(DEFAULT_MODEL):
        return DEFAULT_MODEL, False, [f"model: {DEFAULT_MODEL} (in the Hugging Face cache)"]
    if hub_offline():
        return "tiny", True, [f"model: {DEFAULT_MODEL} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "using --model tiny", how_to_get()]
    if dry_run:
        return DEFAULT_MODEL, False, [f"model: {DEFAULT_MODEL}, would be downloaded now (about 5 GB)"]
    print(f"demo: downloading {DEFAULT_MODEL} (about 5 GB, once; progress below)", file=sys.stderr, flush=True)
    try:
        download(DEFAULT_MODEL)
    except Exception as error:   # offline, proxy, disk full, interrupted ...: the offline demo still runs
        return "tiny", True, [f"model: could not download {DEFAULT_MODEL} ({one_line(error)}); using --model tiny",
                        how_to_get()]
    return DEFAULT_MODEL, False, [f"model: {DEFAULT_MODEL} (downloaded)"]


def download(repo: str) -> str:
    """huggingface_hub's snapshot_download of the files tokenflow loads, with its progress bars."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.utils import enable_progress_bars  # noqa: PLC0415

    from tokenflow.models.load import HUB_ALLOW_PATTERNS  # noqa: PLC0415

    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        enable_progress_bars()
    return snapshot_download(repo, allow_patterns=HUB_ALLOW_PATTERNS)


def device_kind(flags: List[str]) -> str:
    """The device type the edit will run on: ``--device`` among ``flags``, else the best available."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device")
    given = parser.parse_known_args(flags)[0].device
    if given and given.strip().lower() != "auto":
        return given.strip().lower().split(":")[0]
    from tokenflow.device import default_device  # noqa: PLC0415  imports torch

    return default_device().type


def settings(tiny: bool, device: str) -> Tuple[List[str], str]:
    """(edit flags, their words) for a real or ``tiny`` model on a ``device`` type."""
    if tiny:
        return TINY, SETTINGS_WORDS["tiny"]
    if device == "cuda":
        return [], SETTINGS_WORDS["gpu"]
    return SMALL, SETTINGS_WORDS["small"]


def edit_args(model: str, flags: List[str], extra: List[str]) -> List[str]:
    return ["edit", CLIP, *flags, "--model", model, "--prompt", PROMPT, "--inversion-prompt", INVERSION_PROMPT,
            "-o", f"{RESULTS}/sample-edit.mp4", "--report", f"{RESULTS}/sample-report", "--overwrite", *extra]


def main(argv: Optional[List[str]] = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in extra
    extra = [a for a in extra if a != "--dry-run"]
    model, tiny, lines = choose_model(dry_run)
    device = device_kind(extra)
    flags, words = settings(tiny, device)
    lines.append(f"settings on {device}: {words}")
    if tiny:
        lines.append("the tiny model has random weights: the output is NOT a real edit")
    args = edit_args(model, flags, extra)
    for line in lines:
        print(f"demo: {line}", file=sys.stderr)
    print("demo: tokenflow " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    from tokenflow.app.cli import main as cli_main  # noqa: PLC0415  imports torch
    from tokenflow.io.samples import make_sample_clip  # noqa: PLC0415

    os.makedirs(RESULTS, exist_ok=True)
    make_sample_clip(CLIP, n_frames=24, size=(256, 256), fps=12)
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
