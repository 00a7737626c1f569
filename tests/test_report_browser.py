"""The report of a real (tiny-model) edit, opened in headless Chromium over the DevTools protocol.

Checks what a person opening ``index.html`` would see: the page renders (a screenshot that is not
blank), every plot image decodes, the side-by-side video loads and shows the video's first frame,
the frame labels of the frames grid are at least ``MIN_LABEL_PX`` tall as displayed at the page's
width, and the console stays clean (no console.error, uncaught exception or failed resource load).
A second test breaks a copy of the report on purpose to show each of those checks can fail; a third
opens a multi-prompt index page.

Chromium: Debian's ``chromium`` (``apt-get install chromium``). Without it the tests skip, except
under CI (``CI=true``), where ``.ci/run`` installs it and a missing browser is a failure.
"""
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

from .test_report import FAST, label_ink_px, tokenflow  # noqa: E402

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
WIDTH, HEIGHT = 1200, 900          # the browser window; screenshots cover the whole page at this width
SETTLE_TIMEOUT = 60                # guard only: the waits end as soon as the page is in the state asked for
MIN_COLOURS = 1000                 # a rendered report has far more; a blank page has one
MIN_LABEL_PX = 10                  # the frames grid's labels ("frame 12"), ink height as displayed

# An image's natural and displayed (CSS pixel) width
IMAGE_SCALE = """((src) => { const i = Array.from(document.images).find(i => i.getAttribute('src') === src);
  return {natural: i.naturalWidth, shown: i.getBoundingClientRect().width}; })"""

# Every <img> and <video> on the page and whether the page has settled: images decoded or failed,
# videos with their current frame available (readyState >= 2, HAVE_CURRENT_DATA) or failed.
PAGE_STATE = """(() => {
  const images = Array.from(document.images, i => ({src: i.getAttribute('src'), complete: i.complete,
                                                      width: i.naturalWidth, height: i.naturalHeight}));
  const videos = Array.from(document.querySelectorAll('video'), v => ({src: v.getAttribute('src'),
      ready: v.readyState, width: v.videoWidth, height: v.videoHeight, error: v.error && v.error.code}));
  const settled = document.readyState === 'complete' && images.every(i => i.complete)
                  && videos.every(v => v.ready >= 2 || v.error !== null);
  return settled && {images, videos};
})()"""

# Stop the (autoplaying, looping) video on its first frame, controls hidden, and return where it
# is on the page (CSS pixels, page coordinates) once that frame has been painted.
SHOW_FIRST_FRAME = """(async () => {
  const v = document.querySelector('video');
  v.pause();
  v.controls = false;
  const seeked = new Promise(resolve => v.addEventListener('seeked', resolve, {once: true}));
  v.currentTime = 0;
  await seeked;
  await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  const r = v.getBoundingClientRect();
  return {time: v.currentTime, paused: v.paused, rect: [r.left + scrollX, r.top + scrollY, r.width, r.height]};
})()"""


def unavailable(reason: str):
    """Skip on a developer's machine; fail under CI, which must run this test."""
    if IN_CI:
        pytest.fail(f"{reason}. CI (CI={os.environ.get('CI')}) must run the browser test; "
                    ".ci/run installs chromium before the tests.", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if importlib.util.find_spec("websocket") is None:
        unavailable("the browser test needs websocket-client: pip install -e '.[test]'")
    from .browser import INSTALL_HINT, Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        unavailable(f"no chromium on PATH; {INSTALL_HINT}")
    with Browser(executable, width=WIDTH, height=HEIGHT) as running:
        yield running


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, sample_clip):
    """A report folder from a 5-frame, 64x64 tiny-model edit (`tokenflow edit --report`)."""
    folder = tmp_path_factory.mktemp("browser-report")
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--frames", "5", *FAST,
                    "-o", folder / "edit.mp4", "--report", folder / "report", "--no-cache")
    assert run.returncode == 0, run.stderr
    return folder / "report"


def settle(page, folder):
    page.navigate((folder / "index.html").as_uri())
    return page.wait_until(PAGE_STATE, timeout=SETTLE_TIMEOUT)


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=MIN_COLOURS)
    return MIN_COLOURS + 1 if colours is None else len(colours)


def decoded_frames(path):
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def displayed_label_px(page, folder, src) -> float:
    scale = page.evaluate(f"{IMAGE_SCALE}({json.dumps(src)})")
    return label_ink_px(folder / src) * scale["shown"] / scale["natural"]


def test_report_page_in_headless_chromium(browser, report):
    record = json.loads((report / "report.json").read_text())
    files, (width, height) = record["files"], record["metrics"]["size"]
    page = browser.open_page()
    state = settle(page, report)

    # the plots: every image the report lists is on the page and decoded
    plots = {files[k] for k in ("frames", "warp_error", "timings", "keyframes")}
    assert {i["src"] for i in state["images"]} == plots, state["images"]
    assert all(i["width"] > 0 and i["height"] > 0 for i in state["images"]), state["images"]

    # the video: H.264 (libx264, yuv420p) in MP4, which Chromium decodes; its first frame is there
    [video] = state["videos"]
    assert video["src"] == files["video"] and video["error"] is None, video
    assert video["ready"] >= 2 and (video["width"], video["height"]) == (2 * width, height), video
    # the frame labels are readable at the page's width
    assert displayed_label_px(page, report, files["frames"]) >= MIN_LABEL_PX
    shown = page.evaluate(SHOW_FIRST_FRAME)
    assert shown["time"] == 0 and shown["paused"], shown

    png = page.screenshot()
    assert page.problems() == []   # no console error, uncaught exception or failed load, start to end

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width == WIDTH and image.height > HEIGHT   # the whole page
        pixels = np.asarray(image.convert("RGB")).astype(float)
    assert distinct_colours(png) > MIN_COLOURS
    # the video's box in the screenshot shows the first frame, not a later one and not a blank box
    x, y, w, h = (int(round(v)) for v in shown["rect"])
    assert w >= 2 * width and h >= height, shown["rect"]
    shot = pixels[y:y + h, x:x + w]
    errors = [np.abs(shot - np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR), dtype=float)).mean()
              for f in decoded_frames(report / files["video"])]
    assert int(np.argmin(errors)) == 0 and errors[0] < 8, errors


def test_the_browser_checks_catch_a_broken_page(browser, report, tmp_path):
    """Each check above, on a copy of the report with a plot and the video gone and a faulty script."""
    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / "warp_error.png").unlink()
    from PIL import Image

    with Image.open(report / "frames.png") as grid:   # a grid drawn small: its labels are too
        grid.resize((grid.width * 4 // 10, grid.height * 4 // 10), Image.LANCZOS).save(broken / "frames.png")
    (broken / "side_by_side.mp4").unlink()
    page_html = (broken / "index.html").read_text()
    (broken / "index.html").write_text(page_html.replace(
        "</body>", "<script>console.error('report check'); notDefinedAnywhere();</script></body>"))
    page = browser.open_page()
    state = settle(page, broken)
    assert [i["width"] for i in state["images"] if i["src"] == "warp_error.png"] == [0]
    assert displayed_label_px(page, broken, "frames.png") < MIN_LABEL_PX
    [video] = state["videos"]
    assert video["error"] is not None and video["ready"] < 2 and video["width"] == 0
    problems = "\n".join(page.problems())
    assert "console.error: report check" in problems
    assert "ReferenceError: notDefinedAnywhere" in problems
    for name in ("warp_error.png", "side_by_side.mp4"):
        assert f"ERR_FILE_NOT_FOUND {(broken / name).as_uri()}" in problems, problems
    # and a blank page is told apart from a rendered one
    page.navigate("about:blank")
    assert distinct_colours(page.screenshot(full_page=False)) < 10


def test_multi_prompt_index_page(browser, report, tmp_path):
    """DIR/index.html of a multi-prompt edit (built here from two copies of one report): every
    thumbnail decodes, every link resolves to a report page, the console stays clean."""
    from tokenflow.quality.report import write_report_index

    for name in ("1-glass", "2-marble"):
        shutil.copytree(report, tmp_path / name)
    write_report_index(str(tmp_path / "index.html"), [("1-glass", tmp_path / "1-glass"), ("2-marble", tmp_path / "2-marble")])
    page = browser.open_page()
    state = settle(page, tmp_path)
    assert [i["src"] for i in state["images"]] == ["1-glass/thumbnail.png", "2-marble/thumbnail.png"]
    assert all(i["width"] == 240 for i in state["images"]), state["images"]
    links = page.evaluate("Array.from(document.links, a => a.getAttribute('href'))")
    assert set(links) == {"1-glass/index.html", "2-marble/index.html"}
    assert page.problems() == []
    page.navigate((tmp_path / "2-marble" / "index.html").as_uri())
    assert page.evaluate("document.querySelector('h1').textContent").startswith("tokenflow edit")
