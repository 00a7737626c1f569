"""The HTML report: its files, its links, replacing an old one safely, `edit --report`, and a real browser."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

from tokenflow.io.write import write_video  # noqa: E402

from .test_quality_metrics import translating_video  # noqa: E402

MAGENTA = (255, 0, 255)   # painted into the frames only: the page itself never uses it
FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4"]


def tokenflow(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tokenflow", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})


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


def test_edit_report_problems_are_found_before_any_work(tmp_path, tiny_model_dir, sample_clip):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4",
                    "--report", tmp_path / "taken", "--log-json")
    assert run.returncode == 5 and not (tmp_path / "o.mp4").exists()
    assert not any(json.loads(line).get("stage") == "invert" for line in run.stdout.splitlines() if line.strip())
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
