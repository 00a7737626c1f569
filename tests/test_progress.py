"""Progress counts the steps the user asked for (not passes); a resumed run goes on from the
absolute step (24/50, not 0/26) with an ETA from this process's steps; a stream that is not a
terminal gets throttled plain lines (no carriage returns), a terminal a bar."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys

from tokenflow.io.progress import Reporter, clock_text
from tokenflow.io.samples import make_sample_clip

from .test_checkpoint import ENV, SETTINGS, run, run_signalled


class FakeClock:
    """Seconds that move only when told to: throttling and ETAs without timing the machine."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def run_stage(reporter, clock, total, seconds_per_step, done_before=0):
    with reporter.stage("edit", total=total, done_before=done_before) as stage:
        for _ in range(done_before, total):
            clock.now += seconds_per_step
            stage.update()


def progress_lines(text):
    return [line for line in text.splitlines() if line.startswith("edit: ")]


def test_lines_when_not_a_terminal_are_throttled_to_5_percent_and_10_seconds():
    clock, stream = FakeClock(), io.StringIO()
    run_stage(Reporter(stream=stream, clock=clock), clock, total=100, seconds_per_step=1.0)
    text = stream.getvalue()
    assert "\r" not in text
    shown = [line.split()[1] for line in progress_lines(text)]
    # the start, the first step, then every 10 steps (10 s is rarer than 5 %), and the last
    assert shown == ["0/100", "1/100"] + [f"{k}/100" for k in range(11, 100, 10)] + ["100/100"]
    assert progress_lines(text)[2] == "edit: 11/100 steps (11%), 0:11 elapsed, ETA 1:29"
    assert progress_lines(text)[-1] == "edit: 100/100 steps (100%), 1:40 elapsed"


def test_slow_steps_give_a_line_per_5_percent_and_fast_ones_only_the_ends():
    clock, stream = FakeClock(), io.StringIO()
    run_stage(Reporter(stream=stream, clock=clock), clock, total=100, seconds_per_step=60.0)
    shown = [int(line.split()[1].split("/")[0]) for line in progress_lines(stream.getvalue())]
    assert shown == [0, 1] + list(range(6, 100, 5)) + [100]   # 5 % is rarer than 10 s here
    clock, stream = FakeClock(), io.StringIO()
    run_stage(Reporter(stream=stream, clock=clock), clock, total=500, seconds_per_step=0.01)
    assert [line.split()[1] for line in progress_lines(stream.getvalue())] == ["0/500", "1/500", "500/500"]


def test_a_terminal_gets_a_bar_that_starts_at_the_resumed_step():
    clock, stream = FakeClock(), FakeTerminal()
    run_stage(Reporter(stream=stream, clock=clock), clock, total=50, seconds_per_step=1.0, done_before=24)
    text = stream.getvalue()
    assert "\r" in text and "24/50" in text and "50/50" in text and "0/26" not in text
    assert not progress_lines(text)   # no plain lines on a terminal


def test_quiet_and_json_show_no_progress_to_people():
    for options in (dict(quiet=True), dict(json_stream=io.StringIO())):
        clock = FakeClock()
        reporter = Reporter(stream=io.StringIO(), clock=clock, **options)
        run_stage(reporter, clock, total=10, seconds_per_step=1.0)
        assert reporter.stream.getvalue() == ""


def test_events_count_steps_and_the_eta_counts_this_process_only():
    clock, events = FakeClock(), io.StringIO()
    reporter = Reporter(json_stream=events, clock=clock)
    with reporter.stage("edit", total=50, done_before=24) as stage:
        clock.now += 3.0
        stage.update(0, partial=0.5, step=24, pass_="keyframes")   # half of step 24 in 3 s
        clock.now += 3.0
        stage.update(1, step=24, pass_="chunk", chunk=0)
        clock.now += 6.0
        stage.update(1, step=25, pass_="chunk", chunk=0)
    records = [json.loads(line) for line in events.getvalue().splitlines()]
    start = records[0]
    assert start["event"] == "stage_start" and start["total"] == 50 and start["done_before"] == 24
    progress = [r for r in records if r["event"] == "progress"]
    assert [(p["done"], p["total"], p["done_before"]) for p in progress] == [(24, 50, 24), (25, 50, 24), (26, 50, 24)]
    # 6 s per step in this process, whatever the 24 steps before took
    assert [p["eta_seconds"] for p in progress] == [153.0, 150.0, 144.0]
    assert [p["elapsed"] for p in progress] == [3.0, 6.0, 12.0]


def test_clock_text():
    assert [clock_text(s) for s in (0, 59.6, 65, 3725.2)] == ["0:00", "1:00", "1:05", "1:02:05"]


def tiny_edit_args(clip, model, out, *extra):
    """A 50-step tiny-model edit (the tiny UNet takes well under a second per step)."""
    settings = {**SETTINGS, "--steps": "50", "--inversion-steps": "50", "--frames": "4", "--keyframe-spacing": "2"}
    return ["edit", str(clip), "--model", str(model), *[str(x) for kv in settings.items() for x in kv],
            "-o", str(out / "edit.mp4"), "--no-cache", *map(str, extra)]


def for_people(args):
    """The CLI with stderr a pipe (not a terminal), as in a farm log: -> (exit status, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "tokenflow", *args], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600)
    return proc.returncode, proc.stderr


def test_a_normal_edit_counts_steps_not_passes(tmp_path, tiny_model_dir):
    clip = make_sample_clip(str(tmp_path / "clip.mp4"), n_frames=4, size=(64, 64), fps=8)
    args = tiny_edit_args(clip, tiny_model_dir, tmp_path)
    code, events, err = run(args + ["--log-json"])
    assert code == 0, err
    for stage in ("invert", "edit"):
        progress = [e for e in events if e["event"] == "progress" and e["stage"] == stage]
        assert {e["total"] for e in progress} == {50} and {e["done_before"] for e in progress} == {0}
        assert progress[-1]["done"] == 50 and progress[-1]["eta_seconds"] == 0
        assert sorted({e["done"] for e in progress}) == list(range(1 if stage == "invert" else 0, 51))
    code, err = for_people(args + ["--overwrite"])
    assert code == 0, err
    assert "\r" not in err
    lines = progress_lines(err)
    assert lines[0] == "edit: 0/50 steps" and lines[-1].startswith("edit: 50/50 steps (100%)")
    assert len(lines) <= 2 + 20 + 1   # the start, the first step, at most one per 5 %, the last


def test_a_resumed_edit_shows_the_absolute_step(tmp_path, tiny_model_dir):
    """Stopped (SIGTERM) during step 23, the edit saves its checkpoint at step 24; the resumed run
    reports 24/50 onwards, to people and in its events."""
    clip = make_sample_clip(str(tmp_path / "clip.mp4"), n_frames=4, size=(64, 64), fps=8)
    out, folder = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    args = tiny_edit_args(clip, tiny_model_dir, out, "--checkpoint-dir", folder, "--checkpoint-every", "10")
    code, events, err = run_signalled(["progress", "edit", 23], signal.SIGTERM, args + ["--log-json"])
    assert code == 75, err
    assert [e["step"] for e in events if e["event"] == "checkpoint" and e["phase"] == "edit"][-1] == 24
    shutil.copytree(folder, tmp_path / "pristine")

    code, events, err = run(args + ["--resume", "--log-json"])
    assert code == 0, err
    start = [e for e in events if e["event"] == "stage_start" and e["stage"] == "edit"]
    assert [(e["total"], e["done_before"]) for e in start] == [(50, 24)]
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "edit"]
    assert sorted({e["done"] for e in progress}) == list(range(24, 51)) and {e["total"] for e in progress} == {50}
    assert progress[-1]["eta_seconds"] == 0 and min(e["step"] for e in progress) == 24

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "pristine", folder)
    code, err = for_people(args + ["--resume", "--overwrite"])
    assert code == 0, err
    lines = progress_lines(err)
    assert lines[0] == "edit: 24/50 steps (resumed)"
    assert lines[1].startswith("edit: 25/50 steps (50%)") and lines[-1].startswith("edit: 50/50 steps (100%)")
    assert "\r" not in err and "/26" not in err
