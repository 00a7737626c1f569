"""A visual report of one edit: a self-contained HTML page plus PNGs and a side-by-side video.

Folder layout (everything relative, no network resources):

    index.html          the page
    frames.png          source (top) and edited (bottom) frames at regular intervals
    side_by_side.mp4    source | edited, at the video's frame rate
    warp_error.png      per-pair warp error of the edit, the source's own, the edit's flicker
    timings.png         stage timings, the edit's passes stacked inside its bar (when known)
    keyframes.png       the keyframes drawn at each denoising step (when known)
    thumbnail.png       the middle edited frame, small (for the multi-prompt index page)
    report.json         metrics, run facts, settings, versions, timings, keyframes, file list

A multi-prompt edit writes one report per prompt in ``DIR/K-slug/`` and ``DIR/index.html``
(``write_report_index``) linking them. The folder is built under a hidden sibling name and renamed
into place; an existing folder is replaced only when it holds an earlier report (its report.json
says so).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.outputs import atomic_file, atomic_path
from tokenflow.io.write import write_video
from tokenflow.quality import report_figures as figures
from tokenflow.quality.report_page import INDEX_GENERATOR, render_html, render_index

KIND = "tokenflow-report"
MATPLOTLIB_HINT = "pip install matplotlib (or: pip install 'tokenflow[quality]')"


def check_report_support() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"a report needs matplotlib, which is not installed: {MATPLOTLIB_HINT}")


def check_report_target(folder: str) -> None:
    """OutputError unless ``folder`` is new, empty or an earlier report, in a writable parent."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"report folder '{folder}' is a file; give a folder path instead.")
    if path.is_dir() and any(path.iterdir()) and not _is_report(path):
        raise OutputError(f"report folder '{folder}' already holds other files; choose an empty or new folder.")
    parent = path.resolve().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the folder for report '{folder}': {error.strerror or error}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write report '{folder}': folder '{parent}' is not writable.")


def _is_report(path: Path) -> bool:
    try:
        return json.loads((path / "report.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def write_report(folder: str, *, source: torch.Tensor, edited: torch.Tensor, fps: float, metrics: Dict,
                 prompt: Optional[str] = None, title: Optional[str] = None, settings: Optional[Dict] = None,
                 timings: Optional[Dict[str, float]] = None, versions: Optional[Dict[str, str]] = None,
                 inputs: Optional[Dict[str, str]] = None, notes: Sequence[str] = (), run: Optional[Dict] = None,
                 keyframes: Optional[List[List[int]]] = None, warnings: Sequence[str] = ()) -> Path:
    """Write the report folder; returns its path.

    source, edited: float [N, 3, H, W] in [0, 1]. metrics: ``temporal_metrics`` output, with an
    optional ``clip`` entry. settings / timings / versions / inputs: shown as tables; notes: shown
    under the title (e.g. that a random-weights model made the edit); warnings: likewise (e.g. that
    the two videos may not correspond). run: what ran it (``model``, ``device``, ``dtype``,
    ``seconds``, ``peak_memory_bytes``, ``peak_memory_kind``). keyframes: per denoising step, the
    keyframe frame numbers drawn.
    """
    check_report_support()
    check_report_target(folder)
    try:
        with atomic_path(folder) as temp:
            os.makedirs(temp)
            files = {"frames": "frames.png", "video": "side_by_side.mp4", "warp_error": "warp_error.png",
                     "thumbnail": "thumbnail.png"}
            layout = figures.frame_grid(source, edited, temp / files["frames"])
            write_video(torch.cat([source, edited], dim=-1), str(temp / files["video"]), fps)
            figures.warp_plot(metrics, temp / files["warp_error"])
            figures.thumbnail(edited, temp / files["thumbnail"])
            if timings:
                files["timings"] = "timings.png"
                figures.timings_plot(timings, temp / files["timings"])
            if keyframes:
                files["keyframes"] = "keyframes.png"
                figures.keyframes_plot(keyframes, int(edited.shape[0]), temp / files["keyframes"])
            record = {"kind": KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "title": title, "prompt": prompt,
                      "inputs": inputs or {}, "notes": list(notes), "warnings": list(warnings), "run": run or {},
                      "metrics": metrics, "settings": settings or {}, "timings": timings or {},
                      "keyframes": keyframes or [], "versions": versions or {}, "files": files,
                      "layout": {"frames": layout}}
            (temp / "report.json").write_text(json.dumps(record, indent=1, default=str))
            (temp / "index.html").write_text(render_html(record), encoding="utf-8")
    except OSError as error:
        raise OutputError(f"could not write report '{folder}': {error.strerror or error}. "
                          "Check free disk space and permissions.") from None
    return Path(folder)


def check_index_target(folder: str) -> None:
    """OutputError when ``folder/index.html`` exists and is not a multi-prompt index tokenflow wrote."""
    path = Path(folder) / "index.html"
    if path.is_dir() or (path.exists() and not _is_index(path)):
        raise OutputError(f"'{path}' exists and is not a tokenflow report index; the multi-prompt report writes "
                          f"its index page there: move that file or choose another --report folder.")


def _is_index(path: Path) -> bool:
    try:
        return f"<meta name='generator' content='{INDEX_GENERATOR}'>" in path.read_text(encoding="utf-8",
                                                                                        errors="replace")
    except OSError:
        return False


def write_report_index(path: str, reports: Sequence[Tuple[str, Path]], title: str = "tokenflow edit reports") -> str:
    """Write the index page of a multi-prompt edit at ``path`` (atomically); returns ``path``.

    reports: (link, folder) per prompt, in order: ``link`` is the report's folder relative to the
    index page (``1-a-robot-wolf``), ``folder`` where its report.json can be read now."""
    rows = []
    for link, folder in reports:
        record = json.loads((Path(folder) / "report.json").read_text())
        rows.append((link, record))
    try:
        with atomic_file(path, "wb") as f:
            f.write(render_index(rows, title).encode("utf-8"))
    except OSError as error:
        raise OutputError(f"could not write the report index '{path}': {error.strerror or error}. "
                          "Check free disk space and permissions.") from None
    return str(path)
