"""A visual report of one edit: a self-contained HTML page plus PNGs and a side-by-side video.

Folder layout (everything relative, no network resources):

    index.html          the page
    frames.png          source (top) and edited (bottom) frames at regular intervals
    side_by_side.mp4    source | edited, at the video's frame rate
    warp_error.png      per-pair warp error of the edit, the source's own, the edit's flicker
    timings.png         stage timings (when known)
    report.json         metrics, settings, versions, timings, file list

The folder is built under a hidden sibling name and renamed into place; an existing folder is
replaced only when it holds an earlier report (its report.json says so).
"""
from __future__ import annotations

import html
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.outputs import atomic_path
from tokenflow.io.write import write_video

KIND = "tokenflow-report"
MATPLOTLIB_HINT = "pip install matplotlib (or: pip install 'tokenflow[quality]')"
GRID_COLUMNS = 8


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
                 inputs: Optional[Dict[str, str]] = None, notes: Sequence[str] = ()) -> Path:
    """Write the report folder; returns its path.

    source, edited: float [N, 3, H, W] in [0, 1]. metrics: ``temporal_metrics`` output, with an
    optional ``clip`` entry. settings / timings / versions / inputs: shown as tables; notes: shown
    under the title (e.g. that a random-weights model made the edit).
    """
    check_report_support()
    check_report_target(folder)
    try:
        with atomic_path(folder) as temp:
            os.makedirs(temp)
            files = {"frames": "frames.png", "video": "side_by_side.mp4", "warp_error": "warp_error.png"}
            frame_grid(source, edited, temp / files["frames"])
            write_video(torch.cat([source, edited], dim=-1), str(temp / files["video"]), fps)
            warp_plot(metrics, temp / files["warp_error"])
            if timings:
                files["timings"] = "timings.png"
                timings_plot(timings, temp / files["timings"])
            record = {"kind": KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "title": title, "prompt": prompt,
                      "inputs": inputs or {}, "notes": list(notes), "metrics": metrics, "settings": settings or {},
                      "timings": timings or {}, "versions": versions or {}, "files": files}
            (temp / "report.json").write_text(json.dumps(record, indent=1, default=str))
            (temp / "index.html").write_text(render_html(record), encoding="utf-8")
    except OSError as error:
        raise OutputError(f"could not write report '{folder}': {error.strerror or error}. "
                          "Check free disk space and permissions.") from None
    return Path(folder)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib  # noqa: PLC0415  optional package (the quality extra)

    matplotlib.use("Agg", force=True)   # before pyplot loads: no display needed
    import matplotlib.pyplot as plt  # noqa: PLC0415  optional package, after the backend is chosen

    return plt


def grid_indices(n_frames: int, columns: int = GRID_COLUMNS) -> list:
    """Up to ``columns`` frame numbers spread evenly from the first frame to the last."""
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(columns, n_frames))})


def frame_grid(source: torch.Tensor, edited: torch.Tensor, path: Path) -> None:
    """Two rows (source, edited) of frames at regular intervals, frame numbers above."""
    plt = _pyplot()
    indices = grid_indices(len(source))
    h, w = source.shape[-2:]
    cols = len(indices)
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols * w / max(h, w) + 0.6, 4.2 * h / max(h, w) + 0.3),
                             squeeze=False)
    for row, (label, frames) in enumerate((("source", source), ("edited", edited))):
        for col, index in enumerate(indices):
            ax = axes[row][col]
            ax.imshow(frames[index].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {index}", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def warp_plot(metrics: Dict, path: Path) -> None:
    """Per consecutive pair: the edit's warp error, the source's own (the floor), the edit's flicker."""
    plt = _pyplot()
    series = metrics["per_pair"]
    pairs = np.arange(len(series["warp_error"]))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key, label, style in (("warp_error", "edited, source flow (warp error)", "-"),
                              ("flicker", "edited, own flow (flicker)", ":"),
                              ("source_warp_error", "source, own flow (floor)", "--")):
        values = np.array([np.nan if v is None else v for v in series[key]], dtype=float)
        ax.plot(pairs, values, style, marker=".", markersize=3, label=label)
    ax.set_xlabel("frame pair t → t+1")
    ax.set_ylabel("mean squared RGB error")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ratio = metrics.get("warp_error_ratio")
    ax.set_title("warp error per frame pair" + (f" (edit / source = {ratio:.2f}×)" if ratio else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timings_plot(timings: Dict[str, float], path: Path) -> None:
    """Horizontal bars: seconds per stage, in the order the stages ran."""
    plt = _pyplot()
    names = [k for k, v in timings.items() if v]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.32 * len(names)))
    bars = ax.barh(names, [timings[k] for k in names], color="#4c72b0")
    for bar, name in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {timings[name]:.2f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("stage timings", fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- page


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } img, video { max-width: 100%; } .note { color: #666; font-size: 0.85em; }
.prompt { font-size: 1.1em; font-style: italic; } .warn { background: #fff3cd; padding: 4px 8px; }
"""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows, header=None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def render_html(record: Dict) -> str:
    """The page for a report record (``report.json``'s content)."""
    m, files = record["metrics"], record["files"]
    e = html.escape
    title = record.get("title") or "tokenflow edit report"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if record.get("prompt"):
        parts.append(f"<p class='prompt'>“{e(record['prompt'])}”</p>")
    for note in record.get("notes", []):
        parts.append(f"<p class='warn'>{e(note)}</p>")
    parts.append(f"<p class='note'>{m['frames']} frames, {m['size'][0]}×{m['size'][1]}; created {e(record['created'])}</p>")
    parts.append("<h2>Temporal consistency</h2>")
    parts.append(_table([
        ["warp error (source flow)", m["edited"]["warp_error"], m["source"]["warp_error"]],
        ["flicker (own flow)", m["edited"]["flicker"], m["source"]["flicker"]],
        ["temporal difference", m["edited"]["temporal_difference"], m["source"]["temporal_difference"]],
    ], header=["metric", "edited", "source"]))
    parts.append(f"<p>warp error ratio edited / source: <b>{e(_fmt(m.get('warp_error_ratio')))}</b>; "
                 f"pixels visible between frames (source flow): {e(_fmt(m.get('visible_fraction')))}</p>")
    parts.append(_clip_section(m.get("clip")))
    parts.append(f"<h2>Frames</h2><img src='{files['frames']}' alt='source and edited frames at regular intervals'>")
    width = max(768, 2 * m["size"][0])   # small edits are scaled up to be seen
    parts.append(f"<h2>Side by side</h2><video src='{files['video']}' width='{width}' controls loop muted autoplay playsinline>"
                 f"</video><p class='note'>source | edited — <a href='{files['video']}'>{files['video']}</a></p>")
    parts.append(f"<h2>Warp error per frame pair</h2><img src='{files['warp_error']}' alt='per-pair warp error'>")
    if "timings" in files:
        parts.append(f"<h2>Stage timings</h2><img src='{files['timings']}' alt='stage timings'>")
    if record.get("inputs"):
        parts.append("<h2>Inputs</h2>" + _table(sorted(record["inputs"].items())))
    if record.get("settings"):
        parts.append("<h2>Settings</h2>" + _table(sorted((k, json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                          for k, v in record["settings"].items())))
    if record.get("versions"):
        parts.append("<h2>Versions</h2>" + _table(sorted(record["versions"].items())))
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>"
                                                      for k, v in m.get("definitions", {}).items()) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _clip_section(clip: Optional[Dict]) -> str:
    if not clip:
        return ""
    if clip.get("skipped"):
        return f"<h2>CLIP</h2><p class='note'>{html.escape(clip['skipped'])}</p>"
    return "<h2>CLIP</h2>" + _table([["text alignment (frame–prompt cosine)", clip.get("text_alignment")],
                                     ["frame consistency (consecutive-frame cosine)", clip.get("frame_consistency")],
                                     ["model", clip.get("model")]])
