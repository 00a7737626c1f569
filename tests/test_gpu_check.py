"""bench/gpu_check.py's CPU dry run (tiny shapes, Triton interpreter, tiny model): every stage's code
path, the JSON lines, the summary, the per-stage status lines, the global deadline and SIGTERM."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
KIT = ROOT / ".gpu" / "kit" / "gpu_run.sh"   # the reference kit, where one was prepared
STAGES = ["machine", "triton_warmup", "gpu_tests", "kernels", "end_to_end", "compile", "original"]
LINE = re.compile(r"^gpu_check stage (\d) (\S+) +(PASS|FAIL|SKIP) ")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _start(tmp_path, *args):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *args],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outputs(tmp_path):
    out = tmp_path / "out"
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    events = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return summary, events


def _statuses(stdout: str) -> dict:
    return {m.group(2): m.group(3) for m in map(LINE.match, stdout.splitlines()) if m}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = _start(tmp)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr, tmp


def test_dry_run_walks_every_stage_and_ends_with_one_line_per_stage(dry_run):
    rc, stdout, stderr, tmp = dry_run
    assert rc == 0, stdout + stderr + (tmp / "out" / "gpu_check.log").read_text()[-4000:]
    statuses = _statuses(stdout)
    assert list(statuses) == STAGES
    assert {s: statuses[s] for s in ("machine", "triton_warmup", "kernels", "end_to_end", "compile")} == \
        dict.fromkeys(("machine", "triton_warmup", "kernels", "end_to_end", "compile"), "PASS")
    assert statuses["gpu_tests"] == "SKIP"    # no CUDA device: every tests/gpu check skips
    assert statuses["original"] == "SKIP"     # no CUDA device (and no reference kit unless prepared)


def test_dry_run_writes_json_lines_and_the_summary(dry_run):
    rc, stdout, stderr, tmp = dry_run
    summary, events = _outputs(tmp)
    assert summary["dry_run"] is True and summary["complete"] is True and summary["interrupted"] is None
    assert [summary["stages"][s]["stage"] for s in STAGES] == list(range(7))
    assert "needs a CUDA device" in summary["stages"]["gpu_tests"]["reason"]
    machine = summary["stages"]["machine"]["measured"]
    assert machine["d2d_gbps"] > 0 and machine["matmul_tflops_float32"] > 0
    e2e = summary["stages"]["end_to_end"]
    assert "50 * median(inversion step s)" in e2e["details"]["extrapolation"]
    assert e2e["measured"]["extrapolated_s_3_frames"] > 0
    kernels = summary["stages"]["kernels"]["measured"]
    assert kernels["attention_triton_tflops"] > 0 and kernels["nearest_speedup_vs_matmul_argmax"] > 0
    targets = {t["key"]: t for t in summary["targets"]}
    assert targets["attention_triton_tflops"]["measured"] == kernels["attention_triton_tflops"]
    assert all(t["met"] is None for t in summary["targets"])   # a dry run judges no target
    kinds = [(e["event"], e.get("name")) for e in events]
    assert kinds[0] == ("start", None) and kinds[-1] == ("end", None)
    ended = [name for kind, name in kinds if kind == "stage_end"]
    assert ended == STAGES
    started = [name for kind, name in kinds if kind == "stage_start"]
    assert started == [s for s in STAGES if s != "original" or KIT.exists()]   # no kit: no process for stage 6


def test_a_tiny_global_deadline_skips_later_stages_and_still_writes_the_summary(tmp_path):
    """8 s: stage 0 gets 4 s (the deadline less the reserve), which importing torch mostly outlasts."""
    proc = _start(tmp_path, "--deadline", "8")
    stdout, stderr = proc.communicate(timeout=120)
    summary, events = _outputs(tmp_path)
    assert summary["complete"] is True
    statuses = _statuses(stdout)
    assert list(statuses) == STAGES
    machine = summary["stages"]["machine"]
    if machine["status"] != "PASS":   # cut at the deadline: killed, what it had measured kept
        assert machine["status"] == "SKIP" and machine["timed_out"] is True
        assert "stopped at the global deadline" in machine["reason"]
    for name in STAGES[1:]:
        assert summary["stages"][name]["status"] == "SKIP"
        assert "global deadline" in summary["stages"][name]["reason"]


def test_sigterm_stops_the_stage_and_writes_the_summary(tmp_path):
    proc = _start(tmp_path, "--stages", "0,4")
    lines = tmp_path / "out" / "gpu_check.jsonl"
    deadline = time.monotonic() + 60
    child = None
    while child is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if lines.exists():
            starts = [json.loads(x) for x in lines.read_text().splitlines() if '"stage_start"' in x]
            child = starts[0]["pid"] if starts else None
    assert child is not None, "stage 0 never started"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    summary, events = _outputs(tmp_path)
    assert summary["interrupted"] == "SIGTERM"
    assert summary["stages"]["machine"]["status"] == "SKIP"
    assert "interrupted by SIGTERM" in summary["stages"]["machine"]["reason"]
    assert summary["stages"]["end_to_end"]["status"] == "SKIP"
    assert events[-1]["event"] == "end"
    assert _statuses(stdout) == {"machine": "SKIP", "end_to_end": "SKIP"}
    with pytest.raises(ProcessLookupError):   # the stage's process was ended with the run
        os.kill(child, 0)
