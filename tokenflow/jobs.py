"""Whole jobs as the CLI runs them: load, invert/edit, write every output atomically, summarise."""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from .config import EditConfig
from .device import resolve_device, resolve_dtype
from .editor import Editor, EditResult, read_clip
from .errors import InputError
from .kernels import check_backends
from .progress import Reporter
from .video import check_frames_target, check_writable, write_frames, write_video

TINY_NOTE = "made with --model tiny: random weights, the output is NOT a real edit (offline demo/test model)"


def default_output(config: EditConfig) -> str:
    stem = Path(str(config.video).rstrip("/\\")).stem or "video"
    return str(Path("tokenflow-results") / f"{stem}-{config.method}.mp4")


def resolve_output(config: EditConfig) -> str:
    """-o as given; a folder (existing, or without a video suffix) gets the default file name inside."""
    out = config.output or default_output(config)
    p = Path(out)
    if p.is_dir() or p.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        p = p / Path(default_output(config)).name
    return str(p)


def run_edit(config: EditConfig, reporter: Reporter) -> EditResult:
    config.validate()
    if not config.video:
        raise InputError("no input video: pass a video file or a folder of numbered frames (tokenflow edit VIDEO ...)")
    output = resolve_output(config)
    # every output target and the input are checked before any expensive work
    check_writable(output)
    if config.save_latents:
        check_writable(config.save_latents)
    if config.save_frames:
        check_frames_target(config.save_frames)
    device = resolve_device(config.device)
    check_backends(device, resolve_dtype(config.dtype, device), config.attention_backend, config.nearest_backend)
    start = time.perf_counter()
    clip = read_clip(str(config.video), config, reporter)
    editor = Editor.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                    cache_dir=config.cache_dir, use_cache=config.use_cache, reporter=reporter)
    if editor.model.is_tiny:
        reporter.info(f"NOTE: {TINY_NOTE}")
    result = editor.edit(clip, config=config)
    with reporter.stage("write"):
        metadata = {"comment": f"tokenflow edit: {config.prompt}" + (f" [{TINY_NOTE}]" if result.model_is_tiny else "")}
        result.output = write_video(result.frames, output, config.fps or result.clip.fps,
                                    audio_from=result.clip, metadata=metadata)
        if config.save_frames:
            write_frames(result.frames, config.save_frames)
        if config.save_latents:
            save_npy(result.latents.numpy(), config.save_latents)
    result.timings = dict(reporter.timings)
    summary = _summary(result, config, time.perf_counter() - start, editor)
    reporter.event("done", **summary)
    if not reporter.quiet and reporter.json_stream is None:
        print(format_summary(summary), file=sys.stderr)
    return result


def run_invert(config: EditConfig, reporter: Reporter) -> Dict:
    config.validate(need_prompt=False)
    if not config.video:
        raise InputError("no input video: pass a video file or a folder of numbered frames (tokenflow invert VIDEO ...)")
    start = time.perf_counter()
    clip = read_clip(str(config.video), config, reporter)
    editor = Editor.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                    cache_dir=config.cache_dir, use_cache=config.use_cache, reporter=reporter)
    if editor.model.is_tiny:
        reporter.info(f"NOTE: {TINY_NOTE}")
    inversion = editor.invert(clip, config=config)
    summary = {"frames": int(inversion.z0.shape[0]), "timesteps": sorted(inversion.latents),
               "tiny_model": editor.model.is_tiny,
               "from_cache": inversion.from_cache, "cache": str(editor.cache.root),
               "seconds": round(time.perf_counter() - start, 3),
               "stages": {k: round(v, 3) for k, v in reporter.timings.items()}}
    reporter.event("done", **summary)
    if not reporter.quiet and reporter.json_stream is None:
        state = "reused from" if inversion.from_cache else "stored in"
        print(f"inverted {summary['frames']} frames ({config.inversion_steps} steps); latents {state} "
              f"{summary['cache']}; {summary['seconds']:.1f} s", file=sys.stderr)
    return summary


def save_npy(array: np.ndarray, path: str) -> str:
    """np.save through a temp file + rename (no partial file on failure)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npy", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def _summary(result: EditResult, config: EditConfig, seconds: float, editor: Editor) -> Dict:
    n = int(result.frames.shape[0])
    summary = {
        "output": result.output, "frames": n, "size": list(result.frames.shape[-1:-3:-1]),
        "steps": len(result.timesteps), "method": config.method, "model": config.model,
        "device": str(editor.model.device), "dtype": str(editor.model.dtype).replace("torch.", ""),
        "seconds": round(seconds, 3), "frames_per_second": round(n / seconds, 4) if seconds else None,
        "stages": {k: round(v, 3) for k, v in result.timings.items()},
        "peak_memory_bytes": _peak_memory(editor.model.device), "tiny_model": result.model_is_tiny,
    }
    return summary


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_summary(s: Dict) -> str:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in s["stages"].items())
    lines = [f"done: {s['frames']} frames {s['size'][0]}x{s['size'][1]}, {s['steps']} steps ({s['method']}) "
             f"in {s['seconds']:.1f} s ({s['frames_per_second']:.2f} frames/s) on {s['device']} {s['dtype']}",
             f"  stages: {stages}",
             f"  peak memory: {s['peak_memory_bytes'] / 2**30:.2f} GiB",
             f"  output: {s['output']}"]
    if s["tiny_model"]:
        lines.append(f"  NOTE: {TINY_NOTE}")
    return "\n".join(lines)
