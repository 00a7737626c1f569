"""Soak: several `tokenflow run` workers on overlapping job lists, one output folder, one inversion
cache, one checkpoint root, killed with SIGKILL at seeded random moments and restarted until each
has exited 0. However the kills fall, the end state is the same: every output exists exactly once
and is bit-identical to an uninterrupted run of its job, nothing else is left (no temp, no lock, no
removal guard) anywhere under the work folder or the cache, and every cache entry verifies.

Kills are driven by events: a worker is killed a seeded random delay after its n-th JSON event
(n seeded too). The assertions never depend on when a kill lands. After every kill the test also
leaves what a kill inside a write would (a dead writer's temp beside each of the worker's
outputs): the end state must not hold any of them. A worker that exits 7 (another
live worker holds one of its outputs) is restarted once a worker that was not locked out has ended
(or none runs).
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load as load_safetensors

from tests.test_fault_corpus import Proc, leftovers
from tokenflow.io.cache import InversionCache, InversionKey

SEED = 16
JOBS = {"glass": "a glass sculpture", "wood": "a wooden carving", "ice": "an ice statue"}
LISTS = [("glass", "wood"), ("wood", "ice"), ("ice", "glass")]   # each job in two workers' lists
MAX_KILLS = 5            # in all; then the workers run to the end
KILL_CHANCE = 0.7        # per start, while kills are left
EVENTS_PER_JOB = 24      # about what one job emits with --log-json at these settings
HANG_GUARD_S = 1500      # only ends a soak that would otherwise never end (it then fails as "hung")


def job_file(folder: Path, name: str, clip, model, **extra) -> Path:
    """One job, its output beside the job file's folder (``out/<name>.mp4``); tiny settings."""
    lines = {"name": name, "video": str(clip), "model": str(model), "output": f"../out/{name}.mp4",
             "prompt": JOBS[name], "inversion_prompt": "shapes", "size": "64x64", "frames": 3,
             "inversion_steps": 4, "steps": 2, "keyframe_spacing": 2, "device": "cpu", **extra}
    path = folder / f"{name}.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return path


def make_world(root: Path, clip, model, **extra) -> Path:
    (root / "jobs").mkdir(parents=True)
    (root / "out").mkdir()
    for name in JOBS:
        job_file(root / "jobs", name, clip, model, **extra)
    return root


def verify_cache(cache: Path) -> int:
    """Every entry: its latents' sha256 is meta.json's, and the product's own reader returns every
    timestep meta.json lists, without a warning. Returns the number of entries."""
    entries = sorted(p for p in (cache / "inversions").iterdir())
    for entry in entries:
        meta = json.loads((entry / "meta.json").read_text())
        data = (entry / "latents.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], entry
        assert set(load_safetensors(data)) == {f"t_{t}" for t in meta["timesteps"]}, entry
        key = InversionKey(**{**meta["key"], "size": tuple(meta["key"]["size"])})
        assert key.digest() == entry.name, entry
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = InversionCache(cache).load(key, meta["timesteps"])
        assert loaded is not None and all(torch.isfinite(v).all() for v in loaded.values()), entry
    return len(entries)


def plant_dead_writers_temps(paths: List[Path]) -> List[Path]:
    """What a writer killed mid-write leaves: a temp beside each of ``paths``, named by
    ``io.outputs.temp_sibling`` in a process that then exits (its owner is dead on this boot). The
    kills themselves rarely land inside a millisecond write; these make every sweep path run."""
    code = ("import sys\nfrom tokenflow.io.outputs import temp_sibling\n"
            "for target in sys.argv[1:]:\n    open(temp_sibling(target), 'wb').write(b'half a file')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, *map(str, paths)], check=True, env=env, timeout=120)
    return [t for p in paths for t in p.parent.glob(f".{p.name}.tmp-*")]


@dataclass
class Worker:
    """One job list, started again until it exits 0."""

    jobs: List[str]
    proc: Optional[Proc] = None
    kill_after: Optional[int] = None     # events seen before the kill is armed
    delay: float = 0.0
    kill_at: Optional[float] = None      # monotonic time the armed kill is due
    waiting: bool = False                # exited 7: restarted once another worker ends
    done: bool = False
    history: List[str] = field(default_factory=list)


def test_killed_and_restarted_workers_on_overlapping_jobs_end_in_one_clean_correct_state(tmp_path, tiny_model_dir,
                                                                                         sample_clip):
    rng = random.Random(SEED)
    began = time.monotonic()
    # the reference: every job once, uninterrupted, in its own folder with its own cache
    ref = make_world(tmp_path / "reference", sample_clip, tiny_model_dir)
    ref_cache = tmp_path / "reference-cache"
    done = Proc(["run", *sorted((ref / "jobs").glob("*.yaml")), "-q"], {"TOKENFLOW_CACHE": str(ref_cache)}).wait()
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {p.name: p.read_bytes() for p in (ref / "out").iterdir()}
    assert sorted(expected) == sorted(f"{name}.mp4" for name in JOBS)

    reference_s = time.monotonic() - began
    work = make_world(tmp_path / "soak", sample_clip, tiny_model_dir, checkpoint_every=1)
    cache = tmp_path / "soak-cache"
    cache.mkdir()
    # the device's memory calibration, measured once above: the same plan, and less CPU for the soak
    shutil.copy(ref_cache / "memory-calibration.json", cache / "memory-calibration.json")
    env = {"TOKENFLOW_CACHE": str(cache)}
    workers = [Worker(list(jobs)) for jobs in LISTS]
    kills_left = MAX_KILLS

    def start(worker: Worker) -> None:
        nonlocal kills_left
        worker.kill_after, worker.kill_at, worker.waiting = None, None, False
        if kills_left and rng.random() < KILL_CHANCE:
            kills_left -= 1
            worker.kill_after = rng.randint(1, EVENTS_PER_JOB * len(worker.jobs))
            worker.delay = rng.uniform(0.0, 0.3)
        worker.proc = Proc(["run", *(work / "jobs" / f"{name}.yaml" for name in worker.jobs), "--checkpoint-root",
                            work / "checkpoints", "--resume", "--log-json"], env)

    planted: List[Path] = []
    for worker in workers:
        start(worker)
    guard = time.monotonic() + HANG_GUARD_S
    while not all(w.done for w in workers):
        assert time.monotonic() < guard, f"hung: {[w.history for w in workers]}"
        ended = False
        for worker in workers:
            if worker.proc is None:
                continue
            if worker.proc.running():
                if worker.kill_after is not None and worker.kill_at is None:
                    events = sum(line.startswith("{") for line in worker.proc.stdout_so_far().splitlines())
                    if events >= worker.kill_after:
                        worker.kill_at = time.monotonic() + worker.delay
                if worker.kill_at is not None and time.monotonic() >= worker.kill_at:
                    os.kill(worker.proc.pid, signal.SIGKILL)
                    worker.kill_at = float("inf")      # sent; wait for the end
                continue
            result = worker.proc.wait()
            worker.proc, ended = None, ended or result.returncode != 7   # a lock may have been released
            worker.history.append(str(result.returncode))
            if result.returncode == 0:
                worker.done = True
            elif result.returncode == 7:               # another live worker holds a job: later
                worker.waiting = True
            else:
                assert result.returncode == -signal.SIGKILL, (worker.jobs, worker.history, result.stderr[-3000:])
                # as if the kill had landed inside a write: a dead writer's temp beside each of its
                # jobs' outputs, which its restart (running or skipping each job) sweeps. (The cache's
                # own temps are swept when a run reads or writes the cache: tests/test_leftovers.py.)
                planted += plant_dead_writers_temps([work / "out" / f"{name}.mp4" for name in worker.jobs])
                start(worker)
        for worker in workers:
            if worker.waiting and (ended or not any(w.proc for w in workers)):
                start(worker)
        time.sleep(0.02)

    history = {"+".join(w.jobs): w.history for w in workers}
    kills = sum(h.count(str(-signal.SIGKILL)) for h in history.values())
    assert kills >= 1, f"no worker was killed: the soak proved nothing; {history}"
    produced = {p.name: p.read_bytes() for p in (work / "out").iterdir()}
    assert sorted(produced) == sorted(expected), (sorted(os.listdir(work / "out")), history)   # once each, nothing else
    for name, data in expected.items():
        assert produced[name] == data, f"{name} differs from the uninterrupted run; {history}"
    assert planted and not [p for p in planted if p.exists()], "a dead writer's temp was not swept"
    assert leftovers(work) == [] and leftovers(cache) == [], (leftovers(work), leftovers(cache), history)
    assert verify_cache(cache) >= 1
    print(f"soak: {history} ({kills} kills); reference {reference_s:.0f} s, soak {time.monotonic() - began - reference_s:.0f} s")
