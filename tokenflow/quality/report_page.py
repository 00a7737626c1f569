"""The report's HTML: one edit's page (``render_html``) and a multi-prompt edit's index page
(``render_index``), from report records (``report.json``'s content). No scripts, no remote resources;
every user-supplied text is escaped."""
from __future__ import annotations

import html
import json
from typing import Dict, List, Optional, Sequence, Tuple

INDEX_GENERATOR = "tokenflow-report-index"   # the <meta name=generator> of a multi-prompt index page

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } img, video { max-width: 100%; height: auto; } .note { color: #666; font-size: 0.85em; }
.prompt { font-size: 1.1em; font-style: italic; } .warn { background: #fff3cd; padding: 4px 8px; }
.run td:first-child { color: #555; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows, header=None, cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={cls!r}' if cls else ''}>{head}{body}</table>"


def format_seconds(seconds: Optional[float]) -> Optional[str]:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_bytes(count: Optional[int]) -> Optional[str]:
    if count is None:
        return None
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def run_rows(record: Dict) -> List[Tuple[str, object]]:
    """The "Run" table: model, device and dtype, total time, peak memory, frames, steps (those known)."""
    run, m = record.get("run") or {}, record["metrics"]
    rows = [("model", run.get("model") or record.get("inputs", {}).get("model"))]
    if run.get("device"):
        rows.append(("device, dtype", f"{run['device']}, {run.get('dtype') or '?'}"))
    if run.get("seconds") is not None:
        rows.append(("total time (before this report)", format_seconds(run["seconds"])))
    if run.get("peak_memory_bytes"):
        kind = run.get("peak_memory_kind")
        rows.append(("peak memory", format_bytes(run["peak_memory_bytes"]) + (f" ({kind})" if kind else "")))
    rows.append(("frames", f"{m['frames']}, {m['size'][0]}×{m['size'][1]}"))
    if record.get("keyframes"):
        rows.append(("denoising steps", len(record["keyframes"])))
    return [(k, v) for k, v in rows if v is not None]


def keyframes_summary(keyframes: Sequence[Sequence[int]], n_frames: int) -> str:
    """One line: keyframes per step, and how many frames were never drawn."""
    counts = sorted({len(k) for k in keyframes})
    per_step = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    drawn = {f for k in keyframes for f in k}
    never = n_frames - len(drawn)
    plural = "" if counts == [1] else "s"
    return (f"{per_step} keyframe{plural} of {n_frames} frames at each of {len(keyframes)} "
            f"step{'s' if len(keyframes) != 1 else ''}; "
            + ("every frame was a keyframe at least once" if never == 0
               else f"{never} frame{'s were' if never > 1 else ' was'} never a keyframe"))


def render_html(record: Dict) -> str:
    """The page for a report record (``report.json``'s content)."""
    m, files = record["metrics"], record["files"]
    e = html.escape
    title = record.get("title") or "tokenflow edit report"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    if record.get("prompt"):
        parts.append(f"<p class='prompt'>“{e(record['prompt'])}”</p>")
    for note in list(record.get("notes", [])) + [f"warning: {w}" for w in record.get("warnings", [])]:
        parts.append(f"<p class='warn'>{e(note)}</p>")
    parts.append(_table(run_rows(record), cls="run"))
    parts.append(f"<p class='note'>created {e(record['created'])}</p>")
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
    if "keyframes" in files:
        parts.append(f"<h2>Keyframes</h2><p>{e(keyframes_summary(record['keyframes'], m['frames']))}</p>"
                     f"<img src='{files['keyframes']}' alt='keyframes drawn per step, frame by step'>")
    if "timings" in files:
        parts.append(f"<h2>Stage timings</h2><img src='{files['timings']}' alt='stage timings'>"
                     "<p class='note'>the edit's bar is split into its keyframe and propagation passes; "
                     "stages run one after another, so their bars add up</p>")
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


def render_index(reports: Sequence[Tuple[str, Dict]], title: str) -> str:
    """The index page of a multi-prompt edit: per prompt its thumbnail, prompt and key metrics,
    linking its report. reports: (folder relative to the page, report record), in prompt order."""
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<meta name='generator' content='{INDEX_GENERATOR}'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    notes = dict.fromkeys(n for _, r in reports for n in r.get("notes", []))
    parts += [f"<p class='warn'>{e(n)}</p>" for n in notes]
    if reports:
        parts.append(_table([row for row in run_rows(reports[0][1]) if row[0] != "denoising steps"], cls="run"))
    head = ("<tr><th>#</th><th>edited (middle frame)</th><th>prompt</th><th>warp error ratio</th>"
            "<th>flicker</th><th>CLIP text alignment</th></tr>")
    rows = []
    for k, (link, record) in enumerate(reports, 1):
        m, files = record["metrics"], record["files"]
        clip = (m.get("clip") or {}).get("text_alignment")
        thumb = (f"<a href='{e(link)}/index.html'><img src='{e(link)}/{files['thumbnail']}' width='240' "
                 f"alt='edited frame, prompt {k}'></a>" if "thumbnail" in files else "")
        rows.append(f"<tr><td>{k}</td><td>{thumb}</td>"
                    f"<td><a href='{e(link)}/index.html'>“{e(record.get('prompt') or '')}”</a></td>"
                    f"<td class='num'>{e(_fmt(m.get('warp_error_ratio')))}</td>"
                    f"<td class='num'>{e(_fmt(m['edited']['flicker']))}</td><td class='num'>{e(_fmt(clip))}</td></tr>")
    parts.append(f"<h2>Prompts</h2><table>{head}{''.join(rows)}</table>")
    parts.append("<p class='note'>warp error ratio: the edit's warp error over the source's own (1.0: as "
                 "temporally consistent as the source); each prompt's page has the details</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
