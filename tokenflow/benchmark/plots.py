"""PNG plots of ``tokenflow bench`` documents (matplotlib's Agg canvas; no pyplot state is touched).

One document (``figure``, ``write``) gets the panels that ``panels(doc)`` picks from what it records:
    time     median seconds of every timed stage: a group of bars per stage, one bar per variant
    samples  UNet samples per second of the stages that run the UNet, same grouping
    frames   end-to-end frames per second (the ``total`` stage), one bar per variant
    memory   peak memory of the whole edit per variant (GiB or MiB); only when some variant has it
With several variants, a bar's label holds its value and its ratio to the first variant's (seconds:
the first's / this one's, so > 1 is faster, as in the printed tables; the rest: this / the first's).

Several documents (``comparison_figure``, ``write_comparison``): one row per variant of every
document, rows grouped by setup (``setup_key``: device, model, clip, dtype), panels side by side for
total seconds, end-to-end frames/s, UNet samples/s and (when recorded) peak memory. A row's ratio is
to the first row of its setup that ran the same schedule (``schedule_key``: inversion and edit steps,
keyframe spacing), so runs with different step counts are never compared by time.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tokenflow.benchmark.config import STAGE_LABELS, STAGES
from tokenflow.errors import OutputError
from tokenflow.io.outputs import atomic_file

BENCHMARK = "tokenflow bench"
DPI = 120
GIB, MIB = 2 ** 30, 2 ** 20
PANEL_TITLES = {"time": "median seconds per stage", "samples": "UNet samples/s per stage",
                "frames": "end-to-end frames/s", "memory": "peak memory of the edit"}
COMPARISON_TITLES = {"time": "total seconds", "frames": "end-to-end frames/s",
                     "samples": "UNet samples/s (whole edit)", "memory": "peak memory of the edit"}

Ratio = Callable[[float, float], float]


def _speedup(value: float, first: float) -> float:
    return first / value


def _relative(value: float, first: float) -> float:
    return value / first


# ----------------------------------------------------------------------------- reading a document


def document_problem(doc) -> Optional[str]:
    """Why ``doc`` (parsed JSON) is not a plottable ``tokenflow bench`` document; None when it is."""
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    if doc.get("benchmark") != BENCHMARK:
        found = doc.get("benchmark")
        return (f"its \"benchmark\" is {found!r}, not {BENCHMARK!r}" if found is not None
                else f"no \"benchmark\": \"{BENCHMARK}\" field")
    for key in ("device", "model", "clip", "settings"):
        if not isinstance(doc.get(key), dict):
            return f"no \"{key}\" object"
    variants = doc.get("variants")
    if not isinstance(variants, list) or not variants:
        return "no \"variants\" list"
    for i, entry in enumerate(variants):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("stages"), dict):
            return f"variant {i} lacks a \"name\" or \"stages\""
    return None


def _number(value) -> Optional[float]:
    """A positive finite number as float; None for null, 0, NaN, text and the like."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def stage_value(entry: dict, stage: str, key: str) -> Optional[float]:
    """``entry["stages"][stage][key]`` of one variant when it is a positive number, else None."""
    record = (entry.get("stages") or {}).get(stage)
    return _number(record.get(key)) if isinstance(record, dict) else None


def peak_memory(entry: dict) -> Optional[float]:
    """Bytes at the variant's peak: the ``total`` stage's, else the largest stage's; None if unmeasured."""
    values = [stage_value(entry, stage, "peak_memory_bytes") for stage in STAGES]
    return values[-1] or max((v for v in values if v), default=None)


def stages_with(doc: dict, key: str) -> List[str]:
    """The stages (in pipeline order) for which some variant records ``key``."""
    return [s for s in STAGES if any(stage_value(e, s, key) for e in doc["variants"])]


def panels(doc: dict) -> List[str]:
    """The panels of ``doc``'s figure, in order: "time" always, the others when it records their data."""
    chosen = ["time"]
    if stages_with(doc, "samples_per_s"):
        chosen.append("samples")
    if any(stage_value(e, "total", "frames_per_s") for e in doc["variants"]):
        chosen.append("frames")
    if any(peak_memory(e) for e in doc["variants"]):
        chosen.append("memory")
    return chosen


def memory_unit(values: Sequence[Optional[float]]) -> Tuple[str, int]:
    """("GiB", 2**30) when the largest of ``values`` (bytes) reaches 1 GiB, else ("MiB", 2**20)."""
    return ("GiB", GIB) if max((v for v in values if v), default=0) >= GIB else ("MiB", MIB)


def _memory_method(doc: dict) -> str:
    """The short name of how memory was measured: "process peak RSS", "torch.cuda.max_memory_allocated"."""
    method = next((e["memory_method"] for e in doc["variants"] if e.get("memory_method")), "")
    return method.split(",")[0].split(" (")[0]


def describe(doc: dict) -> str:
    """Model, device, clip, schedule and dtype of a run, in two lines."""
    clip, settings = doc["clip"], doc["settings"]
    size = clip.get("size") or ["?", "?"]
    return (f"{doc['model'].get('name', '?')} on {str(doc['device'].get('name', '?'))[:48]}\n"
            f"{clip.get('frames', '?')} frames {size[0]}x{size[1]}, {settings.get('inversion_steps', '?')} "
            f"inversion / {settings.get('steps', '?')} edit steps, {settings.get('dtype', '?')}")


def setup_key(doc: dict) -> tuple:
    """What makes runs comparable at all: device, model, clip (source, frames, size) and dtype."""
    clip = doc["clip"]
    return (doc["device"].get("name"), doc["model"].get("identity") or doc["model"].get("name"),
            clip.get("source"), clip.get("frames"), tuple(clip.get("size") or ()), doc["settings"].get("dtype"))


def schedule_key(doc: dict) -> tuple:
    """``setup_key`` plus what fixes the amount of work: inversion and edit steps, keyframe spacing."""
    settings = doc["settings"]
    return setup_key(doc) + (settings.get("inversion_steps"), settings.get("steps"),
                             settings.get("keyframe_spacing"))


# ----------------------------------------------------------------------------- drawing


def _new_figure(width: float, height: float):
    # matplotlib is optional (the bench extra): imported when a figure is drawn, so this module's
    # document checks (document_problem, panels, ...) work without it
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415  optional package
    from matplotlib.figure import Figure  # noqa: PLC0415  optional package

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> List[str]:
    from matplotlib import rcParams  # noqa: PLC0415  optional package (see _new_figure)

    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _label(value: Optional[float], first: Optional[float], ratio: Optional[Ratio], scale: float = 1.0) -> str:
    if value is None:
        return " n/a"
    text = f" {value / scale:.3g}"
    return text + f" ({ratio(value, first):.2f}\u00d7)" if ratio and first else text


def _grouped_bars(ax, groups: Sequence[str], series: Sequence[Tuple[str, Sequence[Optional[float]]]],
                  colors: Sequence[str], ratio: Optional[Ratio], scale: float = 1.0) -> None:
    """Horizontal bars: a group of rows per ``groups`` label, one bar per series (variant) in each.

    ``series`` is [(name, [value per group or None])]; values are divided by ``scale`` for display.
    """
    height = 0.8 / len(series)
    ratio = ratio if len(series) > 1 else None
    for k, (name, values) in enumerate(series):
        ys = [g + k * height for g in range(len(groups))]
        ax.barh(ys, [(v or 0.0) / scale for v in values], height=height, color=colors[k], label=name)
        for g, (y, value) in enumerate(zip(ys, values)):
            ax.text((value or 0.0) / scale, y, _label(value, series[0][1][g], ratio if k else None, scale),
                    va="center", fontsize=7)
    ax.set_yticks([g + height * (len(series) - 1) / 2 for g in range(len(groups))], labels=list(groups))
    ax.set_ylim(len(groups) - 0.5 * height - 0.1, -0.5 * height - 0.1)
    _leave_room_for_labels(ax, [v for _, values in series for v in values], scale)


def _leave_room_for_labels(ax, values: Sequence[Optional[float]], scale: float) -> None:
    top = max((v for v in values if v), default=scale) / scale
    ax.set_xlim(0, top * 1.32)
    ax.tick_params(axis="both", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _ratio_note(doc: dict, what: str) -> str:
    names = [e["name"] for e in doc["variants"]]
    return f"{what} (\u00d7: {'speed-up' if what == 'seconds' else 'ratio'} vs {names[0]})" if len(names) > 1 else what


def _draw_panel(ax, doc: dict, panel: str, colors: Sequence[str]) -> None:
    variants = doc["variants"]
    if panel in ("time", "samples"):
        key = "seconds" if panel == "time" else "samples_per_s"
        stages = stages_with(doc, key)
        series = [(e["name"], [stage_value(e, s, key) for s in stages]) for e in variants]
        _grouped_bars(ax, [STAGE_LABELS[s] for s in stages] or ["(no stage timed)"],
                      series if stages else [(n, [None]) for n, _ in series], colors,
                      _speedup if panel == "time" else _relative)
        ax.set_xlabel(_ratio_note(doc, "seconds" if panel == "time" else "samples/s"), fontsize=8)
        title = PANEL_TITLES[panel]
    elif panel == "frames":
        _grouped_bars(ax, ["whole edit"], [(e["name"], [stage_value(e, "total", "frames_per_s")]) for e in variants],
                      colors, _relative)
        ax.set_xlabel(_ratio_note(doc, "frames/s"), fontsize=8)
        title = PANEL_TITLES[panel]
    else:
        values = [peak_memory(e) for e in variants]
        unit, scale = memory_unit(values)
        _grouped_bars(ax, ["whole edit"], [(e["name"], [v]) for e, v in zip(variants, values)],
                      colors, _relative, scale)
        ax.set_xlabel(_ratio_note(doc, unit), fontsize=8)
        method = _memory_method(doc)
        title = f"{PANEL_TITLES[panel]} ({unit}{', ' + method if method else ''})"
    ax.set_title(title, fontsize=9)


def figure(doc: dict):
    """The figure of one document: the ``panels(doc)``, each an axes titled after its panel."""
    chosen = panels(doc)
    n = len(doc["variants"])
    big = [p for p in chosen if p in ("time", "samples")]
    small = [p for p in chosen if p in ("frames", "memory")]
    bars = {"time": len(stages_with(doc, "seconds")) or 1, "samples": len(stages_with(doc, "samples_per_s"))}
    heights = [0.9 + 0.17 * n * bars[p] for p in big] + ([0.9 + 0.2 * n] if small else [])
    fig = _new_figure(10, 0.9 + sum(heights))
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    colors = _colors(n)
    for row, panel in enumerate(big):
        _draw_panel(fig.add_subplot(grid[row, :]), doc, panel, colors)
    for col, panel in enumerate(small):
        _draw_panel(fig.add_subplot(grid[-1, col] if len(small) > 1 else grid[-1, :]), doc, panel, colors)
    fig.suptitle(f"tokenflow bench: {describe(doc)}", fontsize=10)
    fig.legend([_patch(c) for c in colors], [e["name"] for e in doc["variants"]], loc="outside lower center", ncols=min(n, 6),
               fontsize=8, frameon=False)
    return fig


def axes_titles(fig) -> List[str]:
    """The titles of ``fig``'s panels, top to bottom, left to right."""
    return [ax.get_title() for ax in fig.axes]


def save(fig, path) -> Path:
    """Write ``fig`` as a PNG atomically: a temp file in the target's folder, then ``os.replace``."""
    target = Path(path).expanduser()
    try:
        with atomic_file(target, "wb", make_parents=True) as f:
            fig.savefig(f, format="png", dpi=DPI)
    except OSError as exc:
        raise OutputError(f"cannot write the plot to '{path}' ({exc.strerror or exc})") from None
    return target


def write(doc: dict, path) -> Path:
    """The figure of one ``tokenflow bench`` document, saved as a PNG at ``path``."""
    return save(figure(doc), path)


# ----------------------------------------------------------------------------- several documents


def comparison_rows(docs: Sequence[Tuple[str, dict]]) -> List[dict]:
    """Rows of the comparison: per setup a header row {"header": text}, then per variant of every
    document of that setup {"label", "file", "values": {panel: number or None}, "baseline": row}."""
    by_setup: Dict[tuple, List[Tuple[str, dict]]] = {}
    for name, doc in docs:
        by_setup.setdefault(setup_key(doc), []).append((name, doc))
    rows: List[dict] = []
    for members in by_setup.values():
        first = members[0][1]
        header = f"{first['model'].get('name', '?')}, {first['clip'].get('frames', '?')} frames " \
                 f"{'x'.join(map(str, first['clip'].get('size') or []))}, {first['settings'].get('dtype', '?')} " \
                 f"on {first['device'].get('name', '?')}"
        rows.append({"header": "\n".join(textwrap.wrap(header, 42))})
        baselines: Dict[tuple, dict] = {}
        for name, doc in members:
            for entry in doc["variants"]:
                row = {"label": f"{name} \u00b7 {entry['name']}", "file": name, "values": {
                    "time": stage_value(entry, "total", "seconds"),
                    "frames": stage_value(entry, "total", "frames_per_s"),
                    "samples": stage_value(entry, "total", "samples_per_s"),
                    "memory": peak_memory(entry)}}
                row["baseline"] = baselines.setdefault(schedule_key(doc), row)
                rows.append(row)
    return rows


def _comparison_panel(ax, rows: List[dict], panel: str, colors: Dict[str, str]) -> None:
    values = [r["values"][panel] if "values" in r else None for r in rows]
    unit, scale = memory_unit(values) if panel == "memory" else ("", 1)
    ratio = _speedup if panel == "time" else _relative
    for y, (row, value) in enumerate(zip(rows, values)):
        if "header" in row:
            ax.axhspan(y - 0.5, y + 0.5, color="0.92", zorder=0)
            continue
        ax.barh(y, (value or 0.0) / scale, height=0.7, color=colors[row["file"]])
        first = None if row["baseline"] is row else row["baseline"]["values"][panel]
        ax.text((value or 0.0) / scale, y, _label(value, first, ratio, scale), va="center", fontsize=7)
    _leave_room_for_labels(ax, values, scale)
    ax.set_title(COMPARISON_TITLES[panel] + (f" ({unit})" if unit else ""), fontsize=9)


def comparison_figure(docs: Sequence[Tuple[str, dict]]):
    """Every variant of every (name, document) pair on one figure, grouped by setup (module docstring)."""
    rows = comparison_rows(docs)
    chosen = [p for p in ("time", "frames", "samples", "memory")
              if any(r.get("values", {}).get(p) for r in rows)] or ["time"]
    fig = _new_figure(3.4 + 3.1 * len(chosen), 1.8 + 0.3 * len(rows))
    axes = fig.subplots(1, len(chosen), sharey=True, squeeze=False)[0]
    files = list(dict.fromkeys(name for name, _ in docs))
    colors = dict(zip(files, _colors(len(files))))
    for ax, panel in zip(axes, chosen):
        _comparison_panel(ax, rows, panel, colors)
    axes[0].set_yticks(range(len(rows)), labels=[r.get("header") or r["label"] for r in rows])
    for tick, row in zip(axes[0].get_yticklabels(), rows):
        if "header" in row:
            tick.set_fontweight("bold")
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    fig.suptitle("tokenflow bench: runs compared (\u00d7: vs the first row of the same setup and schedule; "
                 "seconds: speed-up)", fontsize=10)
    steps = {name: f"{doc['settings'].get('inversion_steps', '?')} inversion / {doc['settings'].get('steps', '?')} "
                   f"edit steps" for name, doc in docs}
    handles = [_patch(colors[f]) for f in files]
    fig.legend(handles, [f"{f}: {steps[f]}" for f in files], loc="outside lower center",
               ncols=min(len(files), 3), fontsize=8, frameon=False)
    return fig


def _patch(color: str):
    from matplotlib.patches import Patch  # noqa: PLC0415  optional package (see _new_figure)

    return Patch(color=color)


def write_comparison(docs: Sequence[Tuple[str, dict]], path) -> Path:
    """The comparison figure of (name, document) pairs, saved as a PNG at ``path``."""
    return save(comparison_figure(docs), path)
