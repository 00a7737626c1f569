"""The machine contract: every --log-json event matches tokenflow.io.progress.EVENT_FIELDS, errors carry
stable codes, and stdout holds results only."""
import json
import os
import subprocess
import sys

from tokenflow.errors import EXIT_CODES, EXIT_NAMES
from tokenflow.io.progress import EVENT_FIELDS

from .inprocess import run_tokenflow

FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4",
        "--frames", "5", "--no-cache"]


def tokenflow_process(*args):
    """``python -m tokenflow ARGS`` in a fresh interpreter: what a real process leaves on stdout."""
    return subprocess.run([sys.executable, "-m", "tokenflow", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ})


def tokenflow(*args):
    """The same command through tokenflow.app.cli.main in this process (tests/inprocess.py)."""
    return run_tokenflow(*args)


def check_event(event):
    kind = event["event"]
    assert kind in EVENT_FIELDS, f"undocumented event kind {kind!r}"
    assert isinstance(event["time"], float)
    missing = [f for f in EVENT_FIELDS[kind] if f not in event]
    assert not missing, f"{kind} event lacks {missing}: {event}"


def test_every_event_of_an_edit_follows_the_schema(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "o.mp4"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", out, "--log-json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    for event in events:
        check_event(event)
    assert events[0]["event"] == "start" and events[0]["command"] == "edit"
    assert events[-1]["event"] == "done" and events[-1]["outputs"] == [str(out)]
    edit_progress = [e for e in events if e["event"] == "progress" and e["stage"] == "edit"]
    assert edit_progress[-1]["done"] == edit_progress[-1]["total"] and edit_progress[-1]["eta_seconds"] == 0
    assert all(e["eta_seconds"] >= 0 for e in edit_progress)


def test_error_events_carry_a_stable_code(tmp_path, sample_clip):
    run = tokenflow("edit", tmp_path / "missing.mp4", "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4", "--log-json")
    assert run.returncode == 3
    events = [json.loads(line) for line in run.stdout.splitlines()]
    for event in events:
        check_event(event)
    error = events[-1]
    assert error["event"] == "error" and error["code"] == "input_error" and error["exit_code"] == 3
    assert "missing.mp4" in error["message"]


def test_exit_codes_and_names_are_the_documented_ones():
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 7, 75, 130]
    assert set(EXIT_NAMES) == set(EXIT_CODES) - {0}
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "events.md")).read()
    for code, name in EXIT_NAMES.items():
        assert f"| {code} | `{name}` |" in doc
    for kind in EVENT_FIELDS:
        assert f"| `{kind}` |" in doc


def test_stdout_holds_only_the_written_paths(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "o.mp4"
    run = tokenflow_process("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", out, "-q")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(out)] and run.stderr == ""


def test_the_summary_and_the_done_event_say_where_the_report_is(tmp_path, tiny_model_dir, sample_clip):
    report = tmp_path / "report"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4",
                    "--report", report, "--log-json")
    assert run.returncode == 0, run.stderr
    done = [json.loads(line) for line in run.stdout.splitlines()][-1]
    page = str(report / "index.html")
    assert done["event"] == "done" and done["report"] == page and done["reports"] == [page]
    assert os.path.isfile(page)
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "p", *FAST, "-o", tmp_path / "o.mp4",
                    "--report", report, "--overwrite")
    assert run.returncode == 0, run.stderr
    assert f"  report: {page}" in run.stderr.splitlines()
    assert run.stdout.splitlines() == [str(tmp_path / "o.mp4")]   # stdout: the videos only, as before


def test_a_multi_prompt_summary_names_the_top_report_and_each_prompts(tmp_path, tiny_model_dir, sample_clip):
    report = tmp_path / "report"
    prompts = ["a red fox", "a cat"]
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, *[x for p in prompts for x in ("--prompt", p)],
                    *FAST, "-o", tmp_path / "o.mp4", "--report", report)
    assert run.returncode == 0, run.stderr
    pages = [str(report / "1-a-red-fox" / "index.html"), str(report / "2-a-cat" / "index.html")]
    assert all(os.path.isfile(page) for page in pages)
    lines = run.stderr.splitlines()
    # the top-level page (written by the report's writer) links each prompt's
    assert f"  report: {report / 'index.html'}" in lines
    assert [f"    {page}  <- {prompt!r}" for page, prompt in zip(pages, prompts)] == \
        [line for line in lines if line.startswith("    ") and "index.html" in line]
