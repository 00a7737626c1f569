"""The report's PNG figures (matplotlib, Agg backend): frames grid, warp error, stage timings,
keyframes drawn. Every figure is sized in pixels for the report page (``PAGE_PX`` wide content),
so it is shown at about its natural size and its text at the size chosen here."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

GRID_COLUMNS = 8
PAGE_PX = 1000          # figures' natural width: the page's content is up to 1100 CSS px wide
DPI = 100
LABEL_PX = (15, 22)     # frame labels: 11 % of a tile's width, within these pixel sizes

# Stages timed inside another (tokenflow.method.denoise: the keyframe and propagation passes of
# each step run inside the "edit" stage): drawn as parts of their parent's bar, never as peers.
STAGE_PARTS: Dict[str, Tuple[str, ...]] = {"edit": ("keyframes", "propagate")}
STAGE_COLOURS = {"keyframes": "#dd8452", "propagate": "#55a868", "other": "#8c8c8c"}


def pyplot():
    import matplotlib  # noqa: PLC0415  optional package (the quality extra)

    matplotlib.use("Agg", force=True)   # before pyplot loads: no display needed
    import matplotlib.pyplot as plt  # noqa: PLC0415  optional package, after the backend is chosen

    return plt


def grid_indices(n_frames: int, columns: int = GRID_COLUMNS) -> list:
    """Up to ``columns`` frame numbers spread evenly from the first frame to the last."""
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(columns, n_frames))})


def label_px(tile_px: float) -> float:
    """The frame labels' font size in pixels for tiles ``tile_px`` wide."""
    return float(np.clip(0.11 * tile_px, *LABEL_PX))


def frame_grid(source: torch.Tensor, edited: torch.Tensor, path: Path, width_px: int = PAGE_PX) -> Dict:
    """Two rows (source, edited) of frames at regular intervals, frame numbers above, ``width_px``
    wide. source, edited: float [N, 3, H, W] in [0, 1]. Returns the layout (label size in px)."""
    plt = pyplot()
    indices = grid_indices(len(source))
    h, w = source.shape[-2:]
    cols = len(indices)
    font = label_px(width_px / cols)
    side = 2.2 * font                                   # room for the row names on the left
    tile_w = (width_px - side) / cols
    tile_h = tile_w * h / w
    height_px = 2 * tile_h + 2 * 2.0 * font + 8         # each row has its label line above
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    points = font * 72 / DPI
    for row, (name, frames) in enumerate((("source", source), ("edited", edited))):
        top = height_px - row * (tile_h + 2 * font) - 2 * font
        for col, index in enumerate(indices):
            ax = fig.add_axes([(side + col * tile_w + 1) / width_px, (top - tile_h) / height_px,
                               (tile_w - 2) / width_px, tile_h / height_px])
            ax.imshow(frames[index].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {index}", fontsize=points, pad=font * 0.3 * 72 / DPI)
            if col == 0:
                ax.set_ylabel(name, fontsize=points)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {"label_px": font, "width_px": width_px, "columns": cols}


def warp_plot(metrics: Dict, path: Path) -> None:
    """Per consecutive pair: the edit's warp error, the source's own (the floor), the edit's flicker."""
    plt = pyplot()
    series = metrics["per_pair"]
    pairs = np.arange(len(series["warp_error"]))
    fig, ax = plt.subplots(figsize=(PAGE_PX / DPI, 3.6), dpi=DPI)
    for key, label, style in (("warp_error", "edited, source flow (warp error)", "-"),
                              ("flicker", "edited, own flow (flicker)", ":"),
                              ("source_warp_error", "source, own flow (floor)", "--")):
        values = np.array([np.nan if v is None else v for v in series[key]], dtype=float)
        ax.plot(pairs, values, style, marker=".", markersize=4, label=label)
    ax.set_xlabel("frame pair t → t+1")
    ax.set_ylabel("mean squared RGB error")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    ratio = metrics.get("warp_error_ratio")
    ax.set_title("warp error per frame pair" + (f" (edit / source = {ratio:.2f}×)" if ratio else ""), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def timing_bars(timings: Dict[str, float]) -> List[Tuple[str, List[Tuple[str, float]]]]:
    """The timings plot's data: one bar per top-level stage, in the order the stages ran, as
    (stage, [(part, seconds), ...]). A stage with parts (``STAGE_PARTS``) is split into them plus
    ``other`` (its time outside them); the parts are never bars of their own, so every second is
    drawn once and a bar's length is its stage's time."""
    parts_of = {part: parent for parent, parts in STAGE_PARTS.items() for part in parts}
    bars = []
    for name, seconds in timings.items():
        if name in parts_of and parts_of[name] in timings:
            continue   # drawn inside its parent's bar
        if not seconds:
            continue
        parts = [(p, float(timings[p])) for p in STAGE_PARTS.get(name, ()) if timings.get(p)]
        if parts:
            rest = float(seconds) - sum(s for _, s in parts)
            parts.append(("other", max(0.0, rest)))
        else:
            parts = [(name, float(seconds))]
        bars.append((name, parts))
    return bars


def timings_plot(timings: Dict[str, float], path: Path) -> None:
    """Horizontal bars: seconds per stage in run order; ``edit`` stacked from its passes."""
    plt = pyplot()
    bars = timing_bars(timings)
    fig, ax = plt.subplots(figsize=(PAGE_PX / DPI, max(1.8, 0.9 + 0.34 * len(bars))), dpi=DPI)
    labelled = set()
    for y, (name, parts) in enumerate(bars):
        left = 0.0
        for part, seconds in parts:
            if seconds <= 0:
                continue
            stacked = part != name
            colour = STAGE_COLOURS.get(part, "#4c72b0") if stacked else "#4c72b0"
            visible = seconds > 0.005 * sum(s for _, s in parts)   # a sliver gets no legend entry
            label = f"{name}: {part}" if stacked and visible and part not in labelled else None
            if label:
                labelled.add(part)
            ax.barh(y, seconds, left=left, color=colour, label=label, edgecolor="white" if stacked else None)
            left += seconds
        ax.text(left, y, f" {left:.2f} s", va="center", fontsize=10)
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    total = sum(sum(s for _, s in parts) for _, parts in bars)
    ax.set_title(f"stage timings (stages sum to {total:.2f} s)", fontsize=12)
    if labelled & set(STAGE_COLOURS):
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside: never on a bar
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def keyframes_matrix(keyframes: Sequence[Sequence[int]], n_frames: int) -> np.ndarray:
    """bool [steps, n_frames]: True where the step drew that frame as a keyframe."""
    drawn = np.zeros((len(keyframes), n_frames), dtype=bool)
    for step, frames in enumerate(keyframes):
        drawn[step, [f for f in frames if 0 <= f < n_frames]] = True
    return drawn


def keyframes_plot(keyframes: Sequence[Sequence[int]], n_frames: int, path: Path) -> None:
    """A strip plot, frame (x) by denoising step (y): a filled cell is a keyframe drawn at that step."""
    plt = pyplot()
    drawn = keyframes_matrix(keyframes, n_frames)
    steps = len(keyframes)
    from matplotlib.colors import ListedColormap  # noqa: PLC0415  optional package (the quality extra)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  optional package (the quality extra)

    height = min(4.0, 1.3 + 0.08 * steps)
    fig, ax = plt.subplots(figsize=(PAGE_PX / DPI, height), dpi=DPI)
    ax.imshow(drawn, aspect="auto", cmap=ListedColormap(["#ffffff", "#4c72b0"]), interpolation="nearest", vmin=0, vmax=1,
              extent=(-0.5, n_frames - 0.5, steps - 0.5, -0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("frame")
    ax.set_ylabel("step")
    ax.set_title(f"keyframes drawn per step ({steps} steps × {n_frames} frames; blue = keyframe)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def thumbnail(frames: torch.Tensor, path: Path, width_px: int = 240) -> None:
    """The middle frame of float [N, 3, H, W] frames as a PNG ``width_px`` wide (the index page's)."""
    from PIL import Image  # noqa: PLC0415  (Pillow comes with matplotlib)

    frame = frames[len(frames) // 2].permute(1, 2, 0).clamp(0, 1).mul(255).byte().cpu().numpy()
    image = Image.fromarray(frame)
    height = max(1, round(width_px * image.height / image.width))
    image.resize((width_px, height), Image.BILINEAR).save(path)
