"""``tokenflow farm`` on a Ray cluster of two nodes, one of which dies mid-job (docs/farm.md,
"Several machines").

The cluster is started the way one starts it on two machines, both on this one: ``ray start --head``
(node A) and ``ray start --address=<head>`` (node B), each with one CPU, a custom resource naming
it and its own ``--temp-dir``, with token authentication (a token of the test's own, for both nodes
and the farm's driver). "Shared storage" is one folder both nodes see: job files, the model, the
clip, the outputs, the checkpoint root and the inversion cache.

Three tiny jobs (one CPU each) are farmed out; two run at once, so one runs on each node. Once the
job on node B has saved a checkpoint, its ``tokenflow run`` child is frozen (SIGSTOP) while the test
checks that the job is still mid-edit, then node B is killed: SIGKILL of every process of that node,
found through /proc (the processes whose command line names B's temp dir, its raylet among them, and
all their descendants: the raylet's agents, the Ray worker running the job and that worker's child).
No process of the head is touched. Then:

- the other two jobs finish on node A, in one attempt each;
- Ray declares node B dead and retries the lost job's task; it runs on node A and resumes from the
  checkpoint the killed child left on the shared storage;
- the farm's report and the job's status file show both attempts (``worker lost`` on B, ``done`` on
  A, with their node ids), and the resumed attempt saw the same environment (no warning);
- every job's result (latents and frames) is bit-identical to the same jobs run uninterrupted, up
  front, by ``tokenflow run`` without Ray (one torch thread everywhere, as Ray gives a one-CPU task).
  The videos are not compared byte for byte: libx264 (through PyAV) encodes the very same frames
  differently now and then on a loaded machine (seen in 2-30% of encodes under load, never on an
  idle one), so each video is checked against its own frames instead.

Node death is detected by the GCS health check, made faster for the test (``RAY_health_check_*``
on the head). Nothing waits for a fixed time: the test follows the farm's status files and the
processes; the deadlines are only guards. The jobs are short (20 inversion steps): the freeze
(SIGSTOP) makes the kill land mid-edit however soon after a checkpoint this test looks.
"""
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_farm import _decode, _png_frames, _still_editing
from tokenflow.app.farm.status import FARM_DIR
from tokenflow.app.locks import same_process

JOB_SETTINGS = {"inversion_steps": 20, "steps": 10, "size": "64x64", "frames": 5, "keyframe_spacing": 4,
                "device": "cpu", "checkpoint_every": 5}
PROMPTS = {"a": ("a marble statue", "shapes"), "b": ("a bronze statue", "moving shapes"),
           "c": ("a glass statue", "coloured shapes")}   # (prompt, inversion prompt): three different inversions
# Ray's GCS marks a node dead after this many missed health checks, one per period (defaults: 3 s, 5)
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
                 "RAY_health_check_initial_delay_ms": "0"}
ENCODER_ERROR = 20.0  # mean absolute error, 0-255, of a video against its PNG frames (noisy 64x64 frames, yuv420p)
DEADLINE_S = 420   # guard only: the whole test normally takes a third of that


def _ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "")


def _processes() -> dict:
    """{pid: (parent pid, command line)} of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = (parent, cmdline)
    return found


def node_processes(marker: str) -> set:
    """The processes whose command line contains ``marker`` (a node's temp dir), and all their
    descendants (Ray renames its agents and workers, ``ray::...``, but they are the raylet's children)."""
    procs = _processes()
    tree = {pid for pid, (_, cmdline) in procs.items() if marker in cmdline and pid != os.getpid()}
    grown = True
    while grown:
        grown = False
        for pid, (parent, _) in procs.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return tree


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def raylet_node_id(temp_dir: str) -> str:
    """The node id of the raylet started with ``temp_dir`` (from its ``--node_id=`` argument)."""
    for _, cmdline in _processes().values():
        if f"{temp_dir}/" in cmdline and "raylet" in cmdline.split(" ", 1)[0]:
            for arg in cmdline.split():
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
    raise AssertionError(f"no raylet with --node_id runs under {temp_dir}")


class TwoNodes:
    """A head (node A) and a second node (node B) on this machine, each in its own temp dir under a
    short private folder (Ray's socket paths must stay under 108 bytes)."""

    def __init__(self, ray: str):
        self.ray = ray
        self.root = tempfile.mkdtemp(prefix="tfray-", dir="/tmp")
        self.temp = {"A": os.path.join(self.root, "a"), "B": os.path.join(self.root, "b")}
        # token authentication (recent Ray's default) with a token of its own: the nodes and the
        # driver need the same one, and no ~/.ray/auth_token of this machine is read or written
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(HEALTH_CHECKS, **self.auth, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
        self.address = None
        self.node_ids = {}

    def _start(self, node: str, *args: str) -> None:
        cmd = [self.ray, "start", "--num-cpus=1", f"--resources={json.dumps({'node' + node: 1})}",
               f"--temp-dir={self.temp[node]}", "--object-store-memory=100000000", "--disable-usage-stats", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=180)
        assert proc.returncode == 0, f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        self.node_ids[node] = raylet_node_id(self.temp[node])

    def start(self) -> "TwoNodes":
        self._start("A", "--head", "--port=0", "--include-dashboard=false")
        with open(os.path.join(self.temp["A"], "ray_current_cluster")) as f:   # the head's GCS address
            self.address = f.read().strip()
        self._start("B", f"--address={self.address}")
        return self

    def kill_node(self, node: str) -> set:
        """SIGKILL every process of ``node``, as if its machine vanished; the pids killed."""
        pids = node_processes(self.temp[node] + "/")
        kill_all(pids)
        return pids

    def stop(self) -> None:
        """Kill every process of both nodes (never `ray stop`: it would stop every Ray on this machine)."""
        kill_all(node_processes(self.root + "/"))
        shutil.rmtree(self.root, ignore_errors=True)


def _write_jobs(folder: Path, out: Path, clip, model) -> None:
    import yaml

    folder.mkdir(parents=True)
    for name, (prompt, inversion_prompt) in PROMPTS.items():
        job = {"video": str(clip), "model": str(model), "output": str(out / f"{name}.mp4"),
               "save_latents": str(out / f"{name}.npy"), "save_frames": str(out / f"{name}-frames"),
               "prompt": prompt, "inversion_prompt": inversion_prompt, **JOB_SETTINGS}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))


def _kill_node_b_mid_job(cluster: TwoNodes, root: Path, farm, deadline: float) -> dict:
    """Wait until a job running on node B has saved a checkpoint, freeze its child, check the job is
    still mid-edit, kill node B; return that job's attempt as the status file had it, plus the pids."""
    b_node = cluster.node_ids["B"]
    while True:
        assert time.time() < deadline, "no job on node B saved a checkpoint in time"
        if farm.poll() is not None:
            pytest.fail(f"the farm ended (exit {farm.returncode}) before node B was killed:\n{farm.stderr.read()[-3000:]}")
        for status in sorted((root / FARM_DIR).glob("*.json")):
            job = status.stem
            try:
                attempt = json.loads(status.read_text())["attempts"][-1]
            except (ValueError, KeyError, IndexError):
                continue
            if (attempt.get("node_id") != b_node or attempt.get("outcome") != "running" or not attempt.get("child_pid")
                    or not glob.glob(str(root / job / "*.pt"))):
                continue
            child = attempt["child_pid"]
            assert same_process(child, attempt["child_start"]), f"job {job} finished before node B could be killed"
            os.kill(child, signal.SIGSTOP)   # the kill lands mid-edit however late this loop noticed
            assert _still_editing(root / FARM_DIR / f"{job}.events.jsonl", attempt["events_offset"]), \
                f"job {job} finished its edit before node B could be killed (machine too loaded?)"
            checkpoints = sorted(Path(p).name for p in glob.glob(str(root / job / "*.pt")))
            killed = cluster.kill_node("B")
            assert child in killed and attempt["worker_pid"] in killed, "the job's processes are not node B's"
            while any(same_process(pid, None) for pid in killed):   # SIGKILL is not instant; zombies count as gone
                assert time.time() < deadline, "node B's processes did not die"
                time.sleep(0.05)
            return {"job": job, "attempt": attempt, "pids": killed, "checkpoints": checkpoints}
        time.sleep(0.05)


def test_farm_on_two_nodes_survives_losing_one(tmp_path, tiny_model_dir, sample_clip):
    pytest.importorskip("ray")
    ray = _ray_cli()
    if not ray:
        pytest.skip("the `ray` command is not installed")
    start = time.time()
    deadline = start + DEADLINE_S
    shared = tmp_path / "shared"   # what every node sees at the same path
    model, clip = shared / "model", shared / "clip.mp4"
    shutil.copytree(tiny_model_dir, model)
    shutil.copy(sample_clip, clip)
    _write_jobs(shared / "jobs", shared / "out", clip, model)
    _write_jobs(tmp_path / "baseline-jobs", tmp_path / "baseline", clip, model)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENFLOW_FARM_GRACE="60")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)

    # the same jobs, uninterrupted and without Ray, up front
    baseline = subprocess.run([sys.executable, "-m", "tokenflow", "run", str(tmp_path / "baseline-jobs"), "-q"],
                              capture_output=True, text=True, timeout=DEADLINE_S,
                              env=dict(env, TOKENFLOW_CACHE=str(tmp_path / "baseline-cache")))
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    baseline_seconds = time.time() - start

    cluster = TwoNodes(ray)
    farm = None
    try:
        cluster.start()
        root, report = shared / "checkpoints", shared / "farm-report.json"
        farm_start = time.time()
        farm = subprocess.Popen([sys.executable, "-m", "tokenflow", "farm", str(shared / "jobs"), "--ray",
                                 cluster.address, "--report", str(report), "--checkpoint-root", str(root),
                                 "--max-retries", "2", "--log-json"],
                                cwd=tmp_path, env=dict(env, TOKENFLOW_CACHE=str(shared / "cache"), **cluster.auth),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = _kill_node_b_mid_job(cluster, root, farm, deadline)
        stdout, stderr = farm.communicate(timeout=max(10, deadline - time.time()))
        farm_seconds = time.time() - farm_start
    finally:
        if farm is not None and farm.poll() is None:
            farm.send_signal(signal.SIGINT)
            try:
                farm.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                farm.kill()
        cluster.stop()
    assert farm.returncode == 0, stderr[-3000:]

    a_node, b_node = cluster.node_ids["A"], cluster.node_ids["B"]
    data = json.loads(report.read_text())
    assert data["state"] == "finished" and data["exit_code"] == 0
    assert data["cluster"]["nodes"] == 2 and data["cluster"]["resources"]["CPU"] == 2
    assert data["totals"]["ok"] == 3 and data["totals"]["retried"] == 1
    jobs = {j["job"]: j for j in data["jobs"]}
    lost = killed["job"]
    for name, job in jobs.items():
        assert job["status"] == "ok" and job["exit_code"] == 0 and job["error"] is None, job
        assert job["node_id"] == a_node   # every job finished on the node that stayed
        if name != lost:
            assert job["attempts"] == 1 and job["attempt_log"][0]["node_id"] == a_node

    # the lost job: started on B, lost with the node, resumed from its checkpoint on A
    job = jobs[lost]
    first, second = job["attempt_log"]
    assert (first["node_id"], first["outcome"]) == (b_node, "worker lost")
    assert first["child_pid"] == killed["attempt"]["child_pid"] and first["worker_pid"] in killed["pids"]
    assert first["child_exit_code"] is None and "no run_done" in first["child_exit_note"]   # SIGKILLed with its node
    assert (second["node_id"], second["outcome"], second["exit_code"]) == (a_node, "done", 0)
    assert second["worker_pid"] not in killed["pids"]
    assert len(job["resumed"]) == 1 and job["resumed"][0].startswith("resuming the ")
    assert str(root / lost) in job["resumed"][0]
    status = json.loads((root / FARM_DIR / f"{lost}.json").read_text())   # the task's own record agrees
    assert [a["outcome"] for a in status["attempts"]] == ["worker lost", "done"]
    assert [a["node_id"] for a in status["attempts"]] == [b_node, a_node]
    with open(root / FARM_DIR / f"{lost}.events.jsonl", "rb") as f:
        f.seek(second["events_offset"])
        resumed_events = [json.loads(line) for line in f.read().splitlines() if line.startswith(b"{")]
    assert not [e for e in resumed_events if e["event"] == "warning"]   # same threads and versions on A

    # every result is the uninterrupted run's, bit for bit: the latents and the frames (PNGs). The
    # videos are those frames through libx264, whose output for the same frames varies on a loaded
    # machine (see the module docstring): they are checked against their own frames, not for equality.
    for name in PROMPTS:
        out, base = shared / "out", tmp_path / "baseline"
        assert np.array_equal(np.load(out / f"{name}.npy"), np.load(base / f"{name}.npy")), name
        frames = _png_frames(out / f"{name}-frames")
        assert frames.shape == (5, 64, 64, 3) and np.array_equal(frames, _png_frames(base / f"{name}-frames")), name
        video = _decode(out / f"{name}.mp4")
        assert video.shape == frames.shape and np.abs(video.astype(int) - frames).mean() < ENCODER_ERROR, name
    assert not glob.glob(str(root / "*" / "*.pt"))   # finished jobs leave no checkpoints
    assert not glob.glob(str(shared / "out" / "*.lock"))
    print(f"two nodes, node B killed during job {lost} (checkpoints {killed['checkpoints']}): baseline "
          f"{baseline_seconds:.1f} s, farm {farm_seconds:.1f} s, total {time.time() - start:.1f} s")
