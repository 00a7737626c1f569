"""``tokenflow metrics`` and ``tokenflow report``: judge an edited video against its source.

    tokenflow metrics wolf.mp4 wolf-edit.mp4 --json metrics.json
    tokenflow metrics wolf.mp4 wolf-edit.mp4 --prompt "a marble wolf" --clip-model openai/clip-vit-base-patch32
    tokenflow report wolf.mp4 wolf-edit.mp4 -o report/ --prompt "a marble wolf"

The edited video sets the size and the frame count; the source is read at that size from
``--start`` every ``--stride`` frames (pass the values the edit used) and resized the same way
(stretched; centre-cropped to the edited aspect with ``--crop``). When the two cannot correspond
frame for frame (the source has more frames from ``--start`` than the edit, another aspect ratio,
another frame rate) one ``tokenflow: warning:`` line says so and the metrics are computed anyway
(on the edited video's frames and the first source frames); a source with fewer frames is an error.
A video made by ``tokenflow edit`` carries its prompt, model and whether the random-weights tiny
model made it (``provenance.py``): the report shows them, and uses the prompt when ``--prompt`` is
not given.

``tokenflow.app.cli`` imports this module to define the subcommands' flags, so it imports torch,
OpenCV and the metric modules only when a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from tokenflow.config import Ranged, parse_size
from tokenflow.errors import InputError, OutputError
from tokenflow.io.aliasing import check_not_an_input
from tokenflow.io.outputs import atomic_file

if TYPE_CHECKING:
    import torch

ASPECT_TOLERANCE = 0.04   # edits round sizes to multiples of 8: 512x288 of 1920x1080 is 0.4 % off
FPS_TOLERANCE = 0.01
TINY_VIDEO_NOTE = ("the edited video's metadata says it was made with --model tiny: random weights, NOT a real edit "
                   "(offline demo/test model)")


def add_parsers(sub) -> None:
    metrics = sub.add_parser("metrics", help="temporal-consistency (and CLIP) metrics of an edited video vs its source")
    _add_inputs(metrics)
    metrics.add_argument("--json", metavar="PATH", help="also write the metrics as JSON (written atomically)")
    report = sub.add_parser("report", help="HTML report (frames, side-by-side video, metric plots) of an edit")
    _add_inputs(report)
    report.add_argument("-o", "--out", required=True, metavar="DIR", help="report folder (index.html + PNGs)")
    report.add_argument("--title", help="page title (default: the edited file's name)")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the source video (file or folder of numbered images)")
    p.add_argument("edited", help="the edited video")
    p.add_argument("--prompt", help="the edit prompt (for CLIP text alignment)")
    p.add_argument("--clip-model", metavar="MODEL", help="CLIP model (Hub id or folder) for the CLIP metrics; "
                   "without it they are skipped")
    p.add_argument("--start", type=Ranged("--start", field="start_frame"), default=0, metavar="I",
                   help="first source frame the edit used (default 0)")
    p.add_argument("--stride", type=Ranged("--stride", field="stride"), default=1, metavar="S",
                   help="source frame stride the edit used (default 1)")
    p.add_argument("--crop", action="store_true", help="the edit centre-cropped the source (tokenflow edit --crop)")
    p.add_argument("--size", metavar="WxH", help="compare at this size (default: the edited video's, rounded to 8)")
    p.add_argument("--flow-preset", default="medium", choices=["ultrafast", "fast", "medium"],
                   help="OpenCV DIS optical-flow preset (default medium)")
    p.add_argument("--device", help="device for the CLIP model (default: the best available)")
    Ranged.add_to_help(p)


def main(args: argparse.Namespace) -> int:
    from tokenflow.quality.flow import require_cv2  # noqa: PLC0415 (imports numpy: not while the CLI parses flags)

    require_cv2()
    videos = [("source video", args.source), ("edited video", args.edited)]
    if args.command == "report":
        check_not_an_input("-o", args.out, videos)
        from tokenflow.quality.report import check_report_support, check_report_target  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

        check_report_support()
        check_report_target(args.out)
    elif args.json:
        check_not_an_input("--json", args.json, videos)
        _check_json_target(args.json)
    scorer = load_scorer(args.clip_model, args.device)   # a missing model fails before any work
    from tokenflow.quality.provenance import read_edit_tags  # noqa: PLC0415 (imports av: not while the CLI parses flags)

    source, edited, fps = load_pair(args.source, args.edited, start=args.start, stride=args.stride,
                                    crop=args.crop, size=args.size)   # (errors first: a short source, one frame)
    problems = correspondence_problems(args.source, args.edited, start=args.start, stride=args.stride, crop=args.crop)
    if problems:
        print(f"tokenflow: warning: '{args.source}' and '{args.edited}' may not correspond frame for frame: "
              + "; ".join(problems), file=sys.stderr)
    tags = read_edit_tags(args.edited)
    prompt = args.prompt or tags["prompt"]
    metrics = evaluate(source, edited, prompt=prompt, scorer=scorer, preset=args.flow_preset)
    metrics["warnings"] = problems
    if args.command == "report":
        from tokenflow.device import versions  # noqa: PLC0415 (imports torch: not while the CLI parses flags)
        from tokenflow.quality.report import write_report  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

        notes = [TINY_VIDEO_NOTE] if tags["tiny"] else []
        if prompt and not args.prompt:
            notes.append("the prompt is the one the edited video's metadata records")
        path = write_report(args.out, source=source, edited=edited, fps=fps, metrics=metrics, prompt=prompt,
                            title=args.title or Path(args.edited).name, versions=versions(),
                            inputs={"source": args.source, "edited": args.edited}, notes=notes, warnings=problems,
                            run={"model": tags["model"]} if tags["model"] else None)
        print(path / "index.html")
        return 0
    if args.json:
        write_json_atomic(metrics, args.json)
    print(format_metrics(metrics))
    return 0


def load_pair(source: str, edited: str, *, start: int = 0, stride: int = 1, crop: bool = False,
              size: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(source [N,3,H,W], edited [N,3,H,W], edited fps): both in [0, 1] at the edited video's size."""
    from tokenflow.io.read import probe, read_video  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

    if size:
        width, height = parse_size(size)
    else:
        info = probe(edited)
        width, height = (max(64, (v + 4) // 8 * 8) for v in (info["width"], info["height"]))
    edit_clip = read_video(edited, size=(width, height))
    n = int(edit_clip.frames.shape[0])
    if n < 2:
        raise InputError(f"edited video '{edited}' has {n} frame; temporal metrics need at least 2.")
    source_clip = read_video(source, frames=n, start=start, stride=stride, size=(width, height), crop=crop,
                             warn_short=False)   # the frame counts are compared below, with the fix
    if source_clip.frames.shape[0] != n:
        raise InputError(f"source '{source}' has only {source_clip.frames.shape[0]} frames from --start {start} "
                         f"--stride {stride}, but edited '{edited}' has {n}; pass the --start/--stride the edit used.")
    return source_clip.frames, edit_clip.frames, edit_clip.fps


def correspondence_problems(source: str, edited: str, *, start: int = 0, stride: int = 1,
                            crop: bool = False) -> List[str]:
    """Why ``edited`` may not be an edit of ``source`` read from ``start`` every ``stride`` frames,
    from the headers only: more source frames than edited ones, another aspect ratio (unless
    ``crop``), another frame rate. Empty when they agree; a short source is load_pair's error."""
    from tokenflow.io.read import count_selected, probe  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

    src, edit = probe(source), probe(edited)
    problems = []
    selected = count_selected(source, start=start, stride=stride).frames
    if selected is not None and edit["frames"] and selected > edit["frames"]:
        problems.append(f"the source has {selected} frames from --start {start} --stride {stride}, the edit "
                        f"{edit['frames']}: comparing with the first {edit['frames']} (pass the --start/--stride the "
                        "edit used)")
    src_aspect, edit_aspect = src["width"] / src["height"], edit["width"] / edit["height"]
    if not crop and abs(src_aspect / edit_aspect - 1) > ASPECT_TOLERANCE:
        problems.append(f"the source is {src['width']}x{src['height']}, the edit {edit['width']}x{edit['height']} "
                        f"(another aspect ratio): the source is stretched to the edit's size (pass --crop if the "
                        "edit cropped)")
    if not os.path.isdir(source) and not os.path.isdir(edited) and src["fps"] and edit["fps"] \
            and abs(src["fps"] / edit["fps"] - 1) > FPS_TOLERANCE:
        problems.append(f"the source plays at {src['fps']:.3g} fps, the edit at {edit['fps']:.3g} fps "
                        "(an edit keeps its source's rate unless --fps)")
    return problems


def load_scorer(clip_model: Optional[str], device=None):
    """The CLIP scorer for ``--clip-model`` on ``device`` (float32), or None without one."""
    if not clip_model:
        return None
    from tokenflow.device import resolve_device  # noqa: PLC0415 (imports torch: not while the CLI parses flags)
    from tokenflow.quality.clip_metrics import load_clip_scorer  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

    return load_clip_scorer(clip_model, resolve_device(device))


def evaluate(source: torch.Tensor, edited: torch.Tensor, *, prompt: Optional[str] = None, scorer=None,
             preset: str = "medium") -> Dict:
    """Temporal metrics plus a ``clip`` entry (scores, or why they were skipped: no ``scorer``)."""
    from tokenflow.quality.clip_metrics import CLIP_SKIPPED, clip_metrics  # noqa: PLC0415 (imports torch: not while the CLI parses flags)
    from tokenflow.quality.metrics import temporal_metrics  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

    metrics = temporal_metrics(source, edited, preset=preset)
    metrics["clip"] = clip_metrics(scorer, edited, prompt) if scorer is not None else {"skipped": CLIP_SKIPPED}
    return metrics


def format_metrics(m: Dict) -> str:
    """The printed table: edited vs source, the ratio, CLIP scores or why they are missing."""
    def f(v):
        return "–" if v is None else f"{v:.5f}"

    lines = [f"{m['frames']} frames, {m['size'][0]}x{m['size'][1]}; optical flow: {m['flow']['method']} "
             f"({m['flow']['preset']}) on the source",
             f"{'metric':<28}{'edited':>12}{'source':>12}"]
    for key, label in (("warp_error", "warp error (source flow)"), ("flicker", "flicker (own flow)"),
                       ("temporal_difference", "temporal difference")):
        lines.append(f"{label:<28}{f(m['edited'][key]):>12}{f(m['source'][key]):>12}")
    ratio = m.get("warp_error_ratio")
    lines.append(f"warp error ratio edited/source: {'–' if ratio is None else f'{ratio:.3f}'}; "
                 f"visible pixels: {f(m['visible_fraction'])}")
    clip = m.get("clip") or {}
    if clip.get("skipped"):
        lines.append(clip["skipped"])
    elif clip:
        lines.append(f"CLIP ({clip['model']}): text alignment {f(clip.get('text_alignment'))}, "
                     f"frame consistency {f(clip.get('frame_consistency'))}")
    return "\n".join(lines)


def _check_json_target(path: str) -> None:
    folder = Path(path).expanduser().resolve().parent
    if Path(path).is_dir():
        raise OutputError(f"--json '{path}' is a folder; give a file path.")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write --json '{path}': folder '{folder}' does not exist or is not writable.")


def write_json_atomic(doc: Dict, path: str) -> Path:
    target = Path(path).expanduser()
    try:
        with atomic_file(target) as f:
            json.dump(doc, f, indent=1)
    except OSError as error:
        raise OutputError(f"could not write '{path}': {error.strerror or error}") from None
    return target
