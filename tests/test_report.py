"""The HTML report: its files, its links, replacing an old one safely, `edit --report`, and a real browser."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

from tokenflow.io.write import write_video  # noqa: E402

from .inprocess import run_tokenflow  # noqa: E402
from .test_quality_metrics import translating_video  # noqa: E402

MAGENTA = (255, 0, 255)   # painted into the frames only: the page itself never uses it
FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4"]


def tokenflow(*args):
    """``tokenflow ARGS`` through tokenflow.app.cli.main in this process (tests/inprocess.py)."""
    return run_tokenflow(*args)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-videos")
    video = translating_video(n=10, height=96, width=128)
    video[:, :, 10:40, 10:40] = torch.tensor(MAGENTA, dtype=torch.float32).view(3, 1, 1) / 255
    edited = (video * 0.8 + 0.1).flip(0)
    write_video(video, str(folder / "source.mp4"), 10)
    write_video(edited, str(folder / "edited.mp4"), 10)
    return folder / "source.mp4", folder / "edited.mp4"


def linked_files(page: str):
    return set(re.findall(r"(?:src|href)='([^']+)'", page))


def label_ink_px(png_path) -> int:
    """Height in image pixels of the frames grid's first label line: the dark rows above the first
    row of tiles (rows mostly non-white)."""
    from PIL import Image

    with Image.open(png_path) as image:
        grey = np.asarray(image.convert("L")).astype(int)
    tile_rows = np.flatnonzero((grey < 245).mean(axis=1) > 0.5)
    band = grey[:tile_rows[0]] if tile_rows.size else grey
    ink = np.flatnonzero((band < 128).any(axis=1))
    return int(ink[-1] - ink[0] + 1) if ink.size else 0


def test_report_command_writes_a_self_contained_page(videos, tmp_path):
    out = tmp_path / "report"
    run = tokenflow("report", *videos, "-o", out, "--prompt", "a <b>bold</b> edit")
    assert run.returncode == 0, run.stderr
    page = (out / "index.html").read_text()
    links = linked_files(page)
    assert {"frames.png", "side_by_side.mp4", "warp_error.png"} <= links
    assert all((out / name).is_file() for name in links), links
    assert not re.search(r"(?:src|href)=['\"]?(?:https?:)?//", page), "the page must not load anything remote"
    assert "a &lt;b&gt;bold&lt;/b&gt; edit" in page   # user text is escaped
    record = json.loads((out / "report.json").read_text())
    assert record["kind"] == "tokenflow-report" and record["metrics"]["frames"] == 10
    assert "CLIP metrics skipped" in page
    import av

    with av.open(str(out / "side_by_side.mp4")) as c:
        stream = c.streams.video[0]
        assert (stream.width, stream.height) == (256, 96)
        assert sum(1 for _ in c.decode(video=0)) == 10
    from PIL import Image

    for png in ("frames.png", "warp_error.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 200
    # 8 frames in the grid: drawn no wider than the page's content (1100 CSS px), so shown at its
    # natural size, with labels >= 10 px tall (the browser test measures them as displayed)
    layout = record["layout"]["frames"]
    assert layout["columns"] == 8 and layout["width_px"] <= 1100
    with Image.open(out / "frames.png") as im:
        assert im.width == layout["width_px"]
    assert label_ink_px(out / "frames.png") >= 10


def test_report_replaces_an_old_report_but_never_a_foreign_folder(videos, tmp_path):
    out = tmp_path / "report"
    assert tokenflow("report", *videos, "-o", out).returncode == 0
    first = json.loads((out / "report.json").read_text())["created"]
    (out / "stale.txt").write_text("left by an older version")
    assert tokenflow("report", *videos, "-o", out).returncode == 0
    assert not (out / "stale.txt").exists() and (out / "index.html").exists()
    assert first
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    run = tokenflow("report", *videos, "-o", foreign)
    assert run.returncode == 5 and "already holds other files" in run.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_edit_with_report_for_each_prompt(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "edit.mp4"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--prompt", "marble",
                    "--frames", "5", *FAST, "-o", out, "--report", tmp_path / "rep", "--log-json", "--no-cache")
    assert run.returncode == 0, run.stderr
    for folder in ("1-glass", "2-marble"):
        record = json.loads((tmp_path / "rep" / folder / "report.json").read_text())
        assert record["prompt"] == folder.split("-", 1)[1]
        assert record["metrics"]["frames"] == 5 and record["settings"]["steps"] == 5
        assert {"invert", "edit"} <= set(record["timings"]) and "timings" in record["files"]
        assert any("random weights" in n for n in record["notes"])
        assert (tmp_path / "rep" / folder / "timings.png").is_file()
        # what ran it, and the keyframes drawn at each of the 5 steps (5 frames, spacing 4: 2 a step)
        facts = record["run"]
        assert facts["device"] == "cpu" and facts["dtype"] == "float32" and facts["model"] == str(tiny_model_dir)
        assert facts["seconds"] > 0 and facts["peak_memory_bytes"] > 2**20
        assert len(record["keyframes"]) == 5 and all(len(k) == 2 and 0 <= min(k) and max(k) < 5
                                                     for k in record["keyframes"])
        page = (tmp_path / "rep" / folder / "index.html").read_text()
        for shown in ("device, dtype</td><td>cpu, float32", "total time (before this report)", "peak memory", "keyframes.png",
                      "2 keyframes of 5 frames at each of 5 steps", str(tiny_model_dir), "random weights"):
            assert shown in page, shown
        assert (tmp_path / "rep" / folder / "keyframes.png").is_file()
    # one top-level page links each prompt's report, with its thumbnail and key metrics
    index = (tmp_path / "rep" / "index.html").read_text()
    links = linked_files(index)
    assert {"1-glass/index.html", "2-marble/index.html", "1-glass/thumbnail.png", "2-marble/thumbnail.png"} <= links
    assert all((tmp_path / "rep" / name).is_file() for name in links), links
    assert index.index("“glass”") < index.index("“marble”") and "warp error ratio" in index
    ratio = json.loads((tmp_path / "rep" / "2-marble" / "report.json").read_text())["metrics"]["warp_error_ratio"]
    assert f"{ratio:.4g}" in index
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["1-glass", "2-marble", "index.html"]
    # the edited videos say how they were made; `tokenflow report` on one shows the tiny-model banner
    from tokenflow.quality.provenance import read_edit_tags

    edited = tmp_path / "edit-1-glass.mp4"
    assert read_edit_tags(str(edited)) == {"made_by_tokenflow": True, "prompt": "glass", "model": str(tiny_model_dir),
                                           "tiny": True}
    run = tokenflow("report", sample_clip, edited, "-o", tmp_path / "again")
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "again" / "report.json").read_text())
    assert record["prompt"] == "glass" and any("--model tiny" in n for n in record["notes"])
    page = (tmp_path / "again" / "index.html").read_text()
    assert "class='warn'>the edited video&#x27;s metadata says it was made with --model tiny" in page


def test_report_of_a_video_without_tokenflow_tags_has_no_banner(videos, tmp_path):
    from tokenflow.quality.provenance import read_edit_tags

    assert read_edit_tags(str(videos[1]))["tiny"] is False
    assert tokenflow("report", *videos, "-o", tmp_path / "r").returncode == 0
    record = json.loads((tmp_path / "r" / "report.json").read_text())
    assert record["notes"] == [] and record["warnings"] == []
    assert "--model tiny" not in (tmp_path / "r" / "index.html").read_text()


def test_timings_plot_draws_each_stage_once_with_the_edit_split_into_its_passes():
    from tokenflow.quality.report_figures import timing_bars

    timings = {"read": 1.0, "load": 2.0, "plan": 0.5, "encode": 0.25, "invert": 3.0, "keyframes": 1.5,
               "propagate": 2.5, "edit": 5.0, "decode": 1.0, "write": 0.5}
    bars = dict(timing_bars(timings))
    assert list(bars) == ["read", "load", "plan", "encode", "invert", "edit", "decode", "write"]
    assert bars["edit"] == [("keyframes", 1.5), ("propagate", 2.5), ("other", 1.0)]
    for name, parts in bars.items():   # a bar is as long as its stage: no second counted twice
        assert sum(s for _, s in parts) == pytest.approx(timings[name])
    assert sum(sum(s for _, s in p) for p in bars.values()) == pytest.approx(sum(timings.values()) - 4.0)
    # passes timed without their parent (no such stage) are stages of their own
    assert [n for n, _ in timing_bars({"keyframes": 1.0, "propagate": 2.0})] == ["keyframes", "propagate"]


def test_metrics_warns_once_when_the_videos_cannot_correspond(tmp_path):
    video = translating_video(n=12, height=96, width=128)
    write_video(video, str(tmp_path / "source.mp4"), 30)
    write_video(video[:10, :, :, 16:112], str(tmp_path / "other.mp4"), 10)   # fewer frames, square, 10 fps
    write_video(video[:10], str(tmp_path / "same.mp4"), 30)
    run = tokenflow("metrics", tmp_path / "source.mp4", tmp_path / "other.mp4", "--json", tmp_path / "m.json")
    assert run.returncode == 0, run.stderr
    [warning] = [line for line in run.stderr.splitlines() if line.strip()]
    assert warning.startswith("tokenflow: warning: ") and "may not correspond" in warning
    for said in ("12 frames from --start 0 --stride 1, the edit 10", "128x96, the edit 96x96", "stretched",
                 "30 fps, the edit at 10 fps"):
        assert said in warning, said
    assert len(json.loads((tmp_path / "m.json").read_text())["warnings"]) == 3
    run = tokenflow("metrics", tmp_path / "source.mp4", tmp_path / "same.mp4", "--start", "2")
    assert run.returncode == 0 and run.stderr.strip() == "", run.stderr
    run = tokenflow("metrics", tmp_path / "source.mp4", tmp_path / "same.mp4", "--start", "5")   # 7 < 10 frames
    assert run.returncode == 3 and run.stderr.startswith("tokenflow: error: source") and "--start 5" in run.stderr


def test_edit_report_problems_are_found_before_any_work(tmp_path, tiny_model_dir, sample_clip):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4",
                    "--report", tmp_path / "taken", "--log-json")
    assert run.returncode == 5 and not (tmp_path / "o.mp4").exists()
    assert not any(json.loads(line).get("stage") == "invert" for line in run.stdout.splitlines() if line.strip())
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "index.html").write_text("<p>my own page</p>")
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "a", "--prompt", "b", *FAST,
                    "-o", tmp_path / "o.mp4", "--report", tmp_path / "two")
    assert run.returncode == 5 and "is not a tokenflow report index" in run.stderr, run.stderr
    assert (tmp_path / "two" / "index.html").read_text() == "<p>my own page</p>" and not (tmp_path / "o-1-a.mp4").exists()
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4",
                    "--clip-model", tmp_path / "clip")
    assert run.returncode == 2 and "--report" in run.stderr


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser(videos, tmp_path):
    out = tmp_path / "report"
    assert tokenflow("report", *videos, "-o", out).returncode == 0
    shot = tmp_path / "shot.png"
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1200,1600", f"--screenshot={shot}", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200) and pixels.std() > 20
    magenta = (np.abs(pixels - np.array(MAGENTA)).sum(-1) < 60).sum()
    assert magenta > 500, "the frames grid (the only magenta on the page) was not rendered"
    # the same page with its images gone renders no magenta: the check above can fail
    for name in ("frames.png", "side_by_side.mp4"):
        (out / name).unlink()
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (np.abs(pixels - np.array(MAGENTA)).sum(-1) < 60).sum() < 50
    Path(shot).unlink()
