"""``tokenflow farm``: job files on Ray, retries that resume from checkpoints, the report.

The end-to-end test starts a local Ray cluster on CPU with three tiny jobs (a, b = a with another
output, c), SIGKILLs job a's Ray worker and job c's ``tokenflow run`` child once each has saved a
checkpoint, and checks that every job still finishes, that the report counts the retries and that
a's result is bit-identical to b's uninterrupted run. The other tests need neither Ray nor a model
run: validation before submission, the install hint, and the task's retry policy with fake children.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tokenflow.app.farm import cli as farm_cli
from tokenflow.app.farm.status import FARM_DIR
from tokenflow.app.farm.task import JobAttempts
from tokenflow.app.locks import same_process

from .inprocess import run_tokenflow

TINY = {"inversion_steps": 20, "steps": 5, "size": "64x64", "frames": 5, "keyframe_spacing": 4, "device": "cpu",
        "checkpoint_every": 1}


def _write_job(folder: Path, name: str, **settings) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _tiny_job(folder: Path, name: str, clip: str, model, out: Path, prompt: str) -> Path:
    return _write_job(folder, name, video=str(clip), output=str(out / f"{name}.mp4"), prompt=prompt,
                      model=str(model), save_latents=str(out / f"{name}.npy"), save_frames=str(out / f"{name}-frames"),
                      **TINY)


def _png_frames(folder: Path) -> np.ndarray:
    from PIL import Image

    frames = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]
    assert frames, f"no frames in {folder}"
    return np.stack(frames)


def _decode(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# --------------------------------------------------------------------------------- no Ray needed

def test_bad_jobs_are_refused_before_anything_is_submitted(tmp_path, sample_clip, monkeypatch, capsys):
    from tokenflow.app.cli import main

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    _write_job(jobs, "good", video=str(sample_clip), output=str(tmp_path / "good.mp4"), prompt="x", model="tiny")
    _write_job(jobs, "bad", video=str(tmp_path / "missing.mp4"), output=str(tmp_path / "bad.mp4"), stpes=3)
    contacted = []
    monkeypatch.setattr(farm_cli, "import_ray", lambda: contacted.append(1) or pytest.fail("Ray was contacted"))
    report = tmp_path / "report.json"
    code = main(["farm", str(jobs), "--ray", "local", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2
    assert not contacted and not report.exists() and not (tmp_path / "checkpoints").exists()
    assert "stpes: unknown key" in err and "did you mean 'steps'" in err   # every problem, not the first
    assert "prompt" in err and "missing.mp4" in err
    assert "nothing was submitted" in err


def test_a_report_at_a_job_file_or_input_or_output_is_refused(tmp_path, sample_clip, monkeypatch, capsys):
    from tokenflow.app.cli import main

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    job = _write_job(jobs, "a", video=str(sample_clip), output=str(tmp_path / "a.mp4"), prompt="x", model="tiny",
                     save_frames=str(tmp_path / "frames"))
    before = job.read_bytes()
    monkeypatch.setattr(farm_cli, "import_ray", lambda: pytest.fail("Ray was contacted"))
    for report, needle in ((job, "is the job file"), (sample_clip, "is the input video"),
                           (tmp_path / "a.mp4", "is also an output of job 'a'"),
                           (tmp_path / "frames" / "r.json", "is also an output of job 'a' (its save_frames")):
        code = main(["farm", str(jobs), "--ray", "local", "--report", str(report), "--checkpoint-root",
                     str(tmp_path / "ck")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 5 and len(lines) == 1 and needle in lines[0], lines
    assert job.read_bytes() == before and not (jobs / "checkpoints").exists() and not (tmp_path / "ck").exists()


def test_missing_ray_gives_the_install_hint(tmp_path, sample_clip, monkeypatch):
    job = _write_job(tmp_path, "job", video=str(sample_clip), output=str(tmp_path / "out.mp4"), prompt="x",
                     model="tiny")
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError, as where it is not installed
    proc = run_tokenflow("farm", job, "--ray", "local", "--report", tmp_path / "r.json")
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'tokenflow[farm]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_bad_flags_are_config_errors(tmp_path, sample_clip):
    from tokenflow.app.cli import main

    job = _write_job(tmp_path, "job", video=str(sample_clip), output=str(tmp_path / "out.mp4"), prompt="x",
                     model="tiny")
    assert main(["farm", str(job), "--ray", "local", "--max-retries", "-1"]) == 2
    assert main(["farm", str(job), "--ray", "local", "--cpus-per-job", "-1"]) == 2


class _FakeChildren(JobAttempts):
    """The task with a scripted child instead of ``tokenflow run``: exit codes in order, one per run."""

    script: list = []

    def command(self):
        count = os.path.join(os.path.dirname(self.spec["status"]), "runs")
        code = textwrap.dedent(f"""
            import json, os, signal, sys
            n = int(open({count!r}).read()) if os.path.exists({count!r}) else 0
            open({count!r}, "w").write(str(n + 1))
            code = {self.script!r}[n]
            print(json.dumps({{"event": "checkpoint", "phase": "edit", "step": n + 1, "total": 5}}), flush=True)
            if code == "skip":
                print(json.dumps({{"event": "job_end", "status": "skipped", "outputs": ["o.mp4"]}}))
                sys.exit(0)
            if code == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if code == 0:
                print(json.dumps({{"event": "done", "outputs": ["o.mp4"], "stages": {{"edit": 1.0}}}}))
            print(json.dumps({{"event": "job_end", "status": "done" if code == 0 else "failed",
                              "message": "" if code == 0 else "boom %d" % code}}))
            sys.exit(code)
        """)
        return [sys.executable, "-c", code]


def _spec(tmp_path, max_attempts=4):
    farm_dir = tmp_path / "root" / FARM_DIR
    return {"run_id": "r1", "job": "j", "file": str(tmp_path / "j.yaml"), "root": str(tmp_path / "root"),
            "overwrite": False, "max_attempts": max_attempts, "outputs": [str(tmp_path / "o.mp4")],
            "checkpoint_dir": str(tmp_path / "root" / "j"), "status": str(farm_dir / "j.json"),
            "log": str(farm_dir / "j.log"), "events": str(farm_dir / "j.events.jsonl"), "cwd": str(tmp_path)}


@pytest.mark.parametrize("script, status, code, attempts", [
    ([0], "ok", 0, 1),
    (["skip"], "skipped", 0, 1),
    ([75, 130, 0], "ok", 0, 3),                 # interrupted: rerun (with --resume) in the same task
    (["kill", 0], "ok", 0, 2),                  # the child killed by a signal: rerun
    ([75, "skip"], "ok", 0, 2),                 # an earlier attempt wrote the outputs: not "skipped"
    ([3], "failed", 3, 1),                      # bad input: never retried
    ([75, 6], "failed", 6, 2),                  # out of memory: final
    ([7], "failed", 7, 1),                      # locked by another run's worker on the first attempt: final
    ([75, 75, 75], "failed", 1, 3),             # the budget is spent (no checkpoint left: exit 1)
])
def test_task_retry_policy(tmp_path, script, status, code, attempts):
    _FakeChildren.script = script
    result = _FakeChildren(_spec(tmp_path, max_attempts=3)).run()
    assert (result["status"], result["exit_code"], result["attempts"]) == (status, code, attempts), result
    saved = json.loads(Path(_spec(tmp_path)["status"]).read_text())
    assert saved["result"]["status"] == status and len(saved["attempts"]) == attempts
    assert all(a["child_pid"] and a["worker_pid"] == os.getpid() for a in saved["attempts"])
    assert saved["attempts"][-1]["checkpoint"]["step"] == attempts
    if status == "failed" and attempts == 1:
        assert result["error"] == f"boom {code}"
    if script[0] == "kill":
        assert saved["attempts"][0]["outcome"] == "killed by SIGKILL"


def test_task_after_a_lost_worker(tmp_path):
    """Ray reruns the task after its worker died: the history goes on, and a finished result is returned as is."""
    spec = _spec(tmp_path, max_attempts=3)
    Path(spec["status"]).parent.mkdir(parents=True)
    lost = {"attempt": 1, "host": "another-host", "worker_pid": 1, "child_pid": None, "outcome": "running",
            "started": time.time() - 5}
    Path(spec["status"]).write_text(json.dumps({"run_id": "r1", "attempts": [lost], "result": None}))
    _FakeChildren.script = [0]
    result = _FakeChildren(spec).run()
    assert (result["status"], result["attempts"]) == ("ok", 2)
    assert result["attempt_log"][0]["outcome"] == "worker lost"
    assert result["attempt_log"][0]["child_end"] == "unknown: the lost attempt recorded no child"
    again = _FakeChildren(spec).run()                 # lost again after finishing: no third run
    assert (again["status"], again["attempts"]) == ("ok", 2)
    assert (Path(spec["status"]).parent / "runs").read_text() == "1"
    finished = dict(spec, run_id="r3")                # the lost worker's child finished the job by itself
    events = Path(spec["events"])
    offset = events.stat().st_size
    with events.open("a") as f:
        f.write(json.dumps({"event": "done", "outputs": ["o.mp4"], "stages": {"edit": 2.0}}) + "\n")
        f.write(json.dumps({"event": "job_end", "status": "done"}) + "\n")
        f.write(json.dumps({"event": "run_done", "exit_code": 0}) + "\n")
    Path(spec["status"]).write_text(json.dumps({"run_id": "r3", "attempts": [dict(lost, events_offset=offset)],
                                                "result": None}))
    result = _FakeChildren(finished).run()
    assert (result["status"], result["attempts"], result["stages"]) == ("ok", 1, {"edit": 2.0})
    assert (result["attempt_log"][0]["child_exit_code"], result["attempt_log"][0]["child_exit_note"]) == (0, None)
    assert (Path(spec["status"]).parent / "runs").read_text() == "1"
    other = dict(spec, run_id="r2")                   # another farm run: a fresh history
    _FakeChildren.script = [0, 0]
    assert _FakeChildren(other).run()["attempts"] == 1


def _lost_attempt(tmp_path, spec, on_sigterm: str) -> subprocess.Popen:
    """A lost attempt of this host whose child is still running: ``on_sigterm`` "report" writes a
    run_done event (exit 75) to the job's events file and exits; "ignore" keeps running."""
    import socket

    from tokenflow.app.locks import pid_start

    Path(spec["status"]).parent.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import json, signal, sys, time
        def report(signum, frame):
            print(json.dumps({{"event": "job_end", "status": "interrupted"}}))
            print(json.dumps({{"event": "run_done", "exit_code": 75}}), flush=True)
            sys.exit(75)
        signal.signal(signal.SIGTERM, report if {on_sigterm!r} == "report" else signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        time.sleep(120)
    """)
    with open(spec["events"], "ab") as events:
        offset = events.seek(0, os.SEEK_END)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=events)
    while not ready.exists():
        time.sleep(0.02)
    lost = {"attempt": 1, "host": socket.gethostname(), "worker_pid": 1, "child_pid": child.pid,
            "child_start": pid_start(child.pid), "events_offset": offset, "outcome": "running",
            "started": time.time() - 5}
    Path(spec["status"]).write_text(json.dumps({"run_id": "r1", "attempts": [lost], "result": None}))
    return child


def _retry_after_a_lost_child(tmp_path, monkeypatch, behaviour: str, grace: str, stopped: bool = False):
    """A second attempt (the fake child exits 0) of a job whose first attempt's child (``behaviour``:
    see ``_lost_attempt``) is still running, frozen with SIGSTOP when ``stopped``, under
    TOKENFLOW_FARM_GRACE ``grace`` -> (result, the lost attempt's record, the lost child)."""
    spec = _spec(tmp_path, max_attempts=2)
    child = _lost_attempt(tmp_path, spec, behaviour)
    if stopped:
        os.kill(child.pid, signal.SIGSTOP)
    monkeypatch.setenv("TOKENFLOW_FARM_GRACE", grace)
    _FakeChildren.script = [0]
    try:
        result = _FakeChildren(spec).run()
    finally:
        child.kill()
        child.wait()
    return result, result["attempt_log"][0], child


def test_a_retry_wakes_a_stopped_lost_child_and_reads_its_exit(tmp_path, monkeypatch):
    """The lost child is frozen (SIGSTOP) when the retry starts: the retry's SIGTERM and SIGCONT let
    it report and exit; its run_done gives the record's child_exit_code."""
    result, lost, _ = _retry_after_a_lost_child(tmp_path, monkeypatch, "report", grace="60", stopped=True)
    assert (result["status"], result["attempts"]) == ("ok", 2), lost
    assert lost["child_end"] == "gone after this retry's SIGTERM", lost
    assert (lost["child_exit_code"], lost["child_exit_note"], lost["job_status"]) == (75, None, "interrupted"), lost


def test_a_lost_child_that_outlives_the_grace_period_is_killed_and_the_record_says_so(tmp_path, monkeypatch):
    result, lost, child = _retry_after_a_lost_child(tmp_path, monkeypatch, "ignore", grace="0.5")
    assert child.returncode == -signal.SIGKILL
    assert lost["child_end"] == "killed (SIGKILL) after the 0.5 s grace period (TOKENFLOW_FARM_GRACE)", lost
    assert lost["child_exit_code"] is None and "no run_done" in lost["child_exit_note"], lost
    assert result["status"] == "ok" and result["attempts"] == 2


# ------------------------------------------------------------------------------------ on Ray

def _still_editing(events_file: Path, offset: int) -> bool:
    """Whether the attempt whose events start at ``offset`` has not finished its edit (no decode yet)."""
    with open(events_file, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    return not any('"stage_start"' in line and '"decode"' in line for line in lines)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{exc}>"


def _job_story(root: Path, job: str, record) -> str:
    """For a failure message: an attempt's (or job's) record and the tails of the job's events and log."""
    farm = root / FARM_DIR
    return (f"\n--- record:\n{json.dumps(record, indent=1, default=str)}\n--- {job}.events.jsonl (tail):\n"
            f"{_tail(farm / f'{job}.events.jsonl')}\n--- {job}.log (tail):\n{_tail(farm / f'{job}.log')}")


def _kill_when_checkpointed(root: Path, targets: dict, farm_proc, deadline: float) -> dict:
    """SIGKILL each job's Ray worker (``targets[job] == "worker"``) or its ``tokenflow run`` child
    ("child") once the job's first checkpoint is on disk; the attempts killed, by job.

    The child is frozen (SIGSTOP) while the test checks that its edit is still running, so the kill
    lands mid-edit however late this loop noticed the checkpoint on a loaded machine; a child whose
    worker was killed gets its parent-death SIGTERM when it is let go (SIGCONT)."""
    killed = {}
    while len(killed) < len(targets):
        assert time.time() < deadline, f"no checkpoint in time from {sorted(set(targets) - set(killed))}"
        if farm_proc.poll() is not None:
            pytest.fail(f"the farm ended (exit {farm_proc.returncode}) before {sorted(set(targets) - set(killed))} "
                        f"were killed:\n{farm_proc.stderr.read()[-3000:]}")
        for job, which in targets.items():
            status = root / FARM_DIR / f"{job}.json"
            if job in killed or not glob.glob(str(root / job / "*.pt")) or not status.exists():
                continue
            attempt = json.loads(status.read_text())["attempts"][-1]
            if attempt["outcome"] != "running" or not attempt["child_pid"]:
                continue
            child = attempt["child_pid"]
            assert same_process(child, attempt["child_start"]), f"job {job} finished before it could be killed"
            os.kill(child, signal.SIGSTOP)
            try:
                events = root / FARM_DIR / f"{job}.events.jsonl"
                assert _still_editing(events, attempt["events_offset"]), \
                    f"job {job} finished its edit before this test could stop it (machine too loaded?)"
                victim = attempt["worker_pid" if which == "worker" else "child_pid"]
                os.kill(victim, signal.SIGKILL)
                killed[job] = attempt
                gone_by = time.time() + 30   # the worker's exit sends the frozen child its SIGTERM
                while same_process(victim, None) and time.time() < gone_by:
                    time.sleep(0.01)
            finally:
                if which == "worker" or job not in killed:
                    os.kill(child, signal.SIGCONT)
        time.sleep(0.02)
    return killed


def test_farm_on_local_ray_survives_killed_workers(tmp_path, tiny_model_dir, sample_clip):
    pytest.importorskip("ray")
    jobs, out = tmp_path / "jobs", tmp_path / "out"
    jobs.mkdir()
    _tiny_job(jobs, "a", sample_clip, tiny_model_dir, out, "a marble statue")
    _tiny_job(jobs, "b", sample_clip, tiny_model_dir, out, "a marble statue")   # a's uninterrupted twin
    _tiny_job(jobs, "c", sample_clip, tiny_model_dir, out, "a bronze statue")
    report, root = tmp_path / "farm-report.json", tmp_path / "checkpoints"
    env = dict(os.environ, TOKENFLOW_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TOKENFLOW_FARM_GRACE="60")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "tokenflow", "farm", str(jobs), "--ray", "local", "--local-cpus",
                             "2", "--report", str(report), "--max-retries", "2", "--log-json"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = start + 240
        killed = _kill_when_checkpointed(root, {"a": "worker", "c": "child"}, proc, deadline)
        stdout, stderr = proc.communicate(timeout=max(10, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)      # the farm stops its jobs and shuts its Ray cluster down
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    seconds = time.time() - start
    assert proc.returncode == 0, stderr[-3000:] + "".join(_job_story(root, job, "see the files") for job in "abc")

    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events][0] == "farm_start" and events[-1]["event"] == "farm_done"
    assert sorted(e["job"] for e in events if e["event"] == "job_done") == ["a", "b", "c"]

    data = json.loads(report.read_text())
    assert data["state"] == "finished" and data["exit_code"] == 0 and data["cluster"]["resources"]["CPU"] == 2
    jobs_by_name = {j["job"]: j for j in data["jobs"]}
    assert data["totals"]["ok"] == 3 and data["totals"]["retried"] >= 2
    for name, job in jobs_by_name.items():
        assert job["status"] == "ok" and job["exit_code"] == 0 and job["error"] is None
        assert job["outputs"] == [str(out / f"{name}.mp4")]
        assert job["seconds"] > 0 and job["started"] >= job["submitted"] and job["host"]
        frames = _decode(out / f"{name}.mp4")
        assert frames.shape == (5, 64, 64, 3)

    a, b, c = jobs_by_name["a"], jobs_by_name["b"], jobs_by_name["c"]
    assert b["attempts"] == 1, _job_story(root, "b", b)
    # a: its Ray worker was killed; Ray reran the task, which waited for the old child's checkpoint and resumed
    assert a["attempts"] >= 2, _job_story(root, "a", a)
    first = a["attempt_log"][0]
    assert first["outcome"] == "worker lost" and first["worker_pid"] == killed["a"]["worker_pid"], \
        _job_story(root, "a", first)
    # SIGTERM on parent death: a checkpoint, run_done with exit 75 (child_end/child_exit_note say why not)
    assert first["child_exit_code"] == 75 and first["job_status"] == "interrupted", _job_story(root, "a", first)
    assert first["child_end"] in ("gone before this retry looked", "gone after this retry's SIGTERM"), \
        _job_story(root, "a", first)
    assert a["attempt_log"][1]["worker_pid"] != killed["a"]["worker_pid"], _job_story(root, "a", a)
    assert a["resumed"] and a["resumed"][0].startswith("resuming"), _job_story(root, "a", a)
    # c: its child was killed; the same task reran it from the checkpoint
    assert c["attempts"] >= 2 and c["attempt_log"][0]["outcome"] == "killed by SIGKILL", _job_story(root, "c", c)
    assert c["attempt_log"][0]["child_pid"] == killed["c"]["child_pid"] and c["resumed"], _job_story(root, "c", c)
    # the interrupted job's result is the uninterrupted one's, bit for bit: latents and frames (the
    # videos are not compared: libx264 encodes the same frames differently now and then under load)
    assert np.array_equal(np.load(out / "a.npy"), np.load(out / "b.npy"))
    assert np.array_equal(_png_frames(out / "a-frames"), _png_frames(out / "b-frames"))
    assert not glob.glob(str(root / "*" / "*.pt"))          # finished runs leave no checkpoints
    print(f"farm with two kills: {seconds:.1f} s")
