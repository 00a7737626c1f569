"""Outputs and caches under concurrency (docs/farm.md): the inversion cache hammered by several
processes, output locks (live, dead, killed, other hosts, racing breakers), and the skip rule."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenflow.app.locks import OutputLock, OutputLocks, lock_path, read_lock
from tokenflow.config import EditConfig
from tokenflow.errors import LockedError, OutputError
from tokenflow.io import owners
from tokenflow.io.cache import InversionCache, InversionKey

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--frames", "5", "--keyframe-spacing", "4",
        "--device", "cpu"]
KEY = InversionKey("abc", (64, 64), "model-x", "a wolf", 10, "float32", "cpu")
DEAD_PID = 99_999_999   # above any pid_max: os.kill says "no such process"
# where a lock of this machine, this boot, says it was written (app/locks records all four)
THIS_MACHINE = {"host": socket.gethostname(), "machine": owners.MACHINE_TAG, "boot": owners.BOOT, "pidns": owners.PIDNS}


def python(code, *args, **popen):
    """A helper process running ``code`` (stdout piped)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def tokenflow(*args):
    return subprocess.run([sys.executable, "-m", "tokenflow", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def write_lock(target, **record):
    path = Path(lock_path(target))
    path.write_text(json.dumps(record))
    return path


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(3, 4, 8, 8, generator=g) for t in (1, 101, 981)}


# ----------------------------------------------------------------------------- the inversion cache

HAMMER = r"""
import json, os, sys, time, warnings
import torch
from tokenflow.io.cache import InversionCache, InversionKey

root, me, go, rounds, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
KEY = InversionKey("same", (64, 64), "m", "p", 10, "float32", "cpu")
TS = (1, 201, 401, 601, 801)
HANG_GUARD_S = 300      # only ends a run that would otherwise never end; the test then fails on "hung"

def entry(writer, round_):
    # every tensor of an entry says who wrote it, in which round; the rest follows from those two
    g = torch.Generator().manual_seed(writer * 1_000_003 + round_)
    out = {t: torch.randn(2, 4, 48, 48, generator=g) for t in TS}
    for t in TS:
        out[t][0, 0, 0, 0], out[t][0, 0, 0, 1] = writer, round_
    return out

def check(loaded):
    writer, round_ = int(loaded[TS[0]][0, 0, 0, 0]), int(loaded[TS[0]][0, 0, 0, 1])
    want = entry(writer, round_)
    if set(loaded) != set(TS) or not all(torch.equal(loaded[t], want[t]) for t in TS):
        raise AssertionError(f"mixed or partial entry (claims writer {writer}, round {round_})")
    return writer

cache = InversionCache(root)
open(f"{go}.ready-{me}", "w").close()
deadline = time.monotonic() + HANG_GUARD_S
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
stats = {"saves": 0, "hits": 0, "misses_after_hit": 0, "writers_seen": set(), "warnings": [], "rounds": 0,
         "hung": False}
satisfied = f"{go}.satisfied-{me}"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # Until every worker has done its rounds and has read an entry of another writer: all of them
    # overlap for as long as any still needs the others (the end is an event, not a clock).
    while True:
        stats["rounds"] += 1
        round_ = stats["rounds"]
        if me < 2 or round_ % 4 == 0:      # two busy writers, two mostly readers
            cache.save(KEY, entry(me, round_))
            stats["saves"] += 1
        loaded = cache.load(KEY, TS[:2])
        if loaded is None:
            stats["misses_after_hit"] += bool(stats["hits"])
        else:
            stats["writers_seen"].add(check(loaded))
            stats["hits"] += 1
        if round_ >= rounds and len(stats["writers_seen"]) >= 2 and not os.path.exists(satisfied):
            open(satisfied, "w").close()
        if all(os.path.exists(f"{go}.satisfied-{i}") for i in range(workers)):
            break
        if time.monotonic() > deadline:
            stats["hung"] = True
            break
    stats["warnings"] = [str(w.message) for w in caught]
stats["writers_seen"] = sorted(stats["writers_seen"])
print(json.dumps(stats))
"""


def _start_together(tmp_path, code, n, *args):
    """n helper processes running ``code`` (argv: me, the go file, *args), released together once
    all have imported and signalled ready (an event: however long the imports take)."""
    go = tmp_path / "go"
    workers = [python(code, *args[:1], me, go, *args[1:]) for me in range(n)]
    while len(list(tmp_path.glob("go.ready-*"))) < n:
        for w in workers:
            assert w.poll() is None, w.communicate()[1][-3000:]   # died before it was ready
        time.sleep(0.02)
    go.touch()
    return workers


def test_concurrent_processes_never_read_a_partial_or_mixed_entry(tmp_path):
    rounds = 25
    workers = _start_together(tmp_path, HAMMER, 4, tmp_path / "cache", rounds, 4)
    results = []
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]   # no exception escaped, no inconsistent entry was read
        results.append(json.loads(out))
    assert not any(r["hung"] for r in results), results
    assert all(r["warnings"] == [] for r in results), [r["warnings"] for r in results]   # nothing looked corrupt
    assert all(r["rounds"] >= rounds and r["hits"] for r in results)
    assert all(len(r["writers_seen"]) >= 2 for r in results)        # they really did overwrite each other
    loads = sum(r["hits"] + r["misses_after_hit"] for r in results)
    assert sum(r["misses_after_hit"] for r in results) <= 0.02 * loads   # a replaced entry never vanishes for long
    folder = tmp_path / "cache" / "inversions"
    same = InversionKey("same", (64, 64), "m", "p", 10, "float32", "cpu")
    assert [p.name for p in folder.iterdir()] == [same.digest()]   # no temp folder left behind


@pytest.mark.parametrize("damage", ["truncate data", "truncate meta", "delete data", "tensors unlike meta"])
def test_a_damaged_entry_is_a_miss_with_a_warning_and_a_save_repairs_it(tmp_path, damage):
    cache = InversionCache(tmp_path)
    entry = cache.save(KEY, _latents())
    data, meta = entry / "latents.safetensors", entry / "meta.json"
    if damage == "truncate data":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "truncate meta":
        os.truncate(meta, meta.stat().st_size // 2)
    elif damage == "delete data":
        data.unlink()
    else:  # a valid file with a matching checksum, but not the timesteps meta.json lists
        import hashlib

        from safetensors.torch import save

        raw = save({"t_1": torch.zeros(1)})
        data.write_bytes(raw)
        record = json.loads(meta.read_text())
        meta.write_text(json.dumps({**record, "sha256": hashlib.sha256(raw).hexdigest()}))
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.load(KEY, {1}) is None
    cache.save(KEY, _latents())
    loaded = cache.load(KEY, {1, 101})
    assert loaded is not None and all(torch.equal(loaded[t], v) for t, v in _latents().items())


def test_replacing_an_entry_without_an_atomic_exchange(tmp_path, monkeypatch):
    import tokenflow.io.outputs as outputs_module  # the folder swap the cache uses

    monkeypatch.setattr(outputs_module, "_rename_exchange", lambda a, b: False)   # e.g. NFS: move aside, rename
    cache = InversionCache(tmp_path)
    cache.save(KEY, _latents(0))
    cache.save(KEY, _latents(1))
    loaded = cache.load(KEY, {1})
    assert all(torch.equal(loaded[t], v) for t, v in _latents(1).items())
    assert [p.name for p in (tmp_path / "inversions").iterdir()] == [KEY.digest()]


def test_temp_folders_of_killed_writers_are_swept_once_old(tmp_path):
    cache = InversionCache(tmp_path)
    folder = tmp_path / "inversions"
    dead, live = folder / f".{KEY.digest()}.tmp-dead", folder / f".{KEY.digest()}.tmp-live"
    for temp in (dead, live):
        temp.mkdir(parents=True)
        (temp / "latents.safetensors").write_bytes(b"half")
    old = time.time() - 2 * 3600
    for path in (dead / "latents.safetensors", dead):   # nothing in it touched for two hours
        os.utime(path, (old, old))
    cache.save(KEY, _latents())
    assert not dead.exists() and live.exists()   # a writer may still be filling the young one


# ----------------------------------------------------------------------------- locks

HOLD = r"""
import sys
from tokenflow.app.locks import OutputLocks
with OutputLocks([sys.argv[1]], heartbeat_s=0.2):
    print("held", flush=True)
    sys.stdin.read()     # until the test closes our stdin (or kills us)
"""


def hold(target):
    holder = python(HOLD, target, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    return holder


def test_a_lock_held_by_a_live_process_is_respected_and_released_at_exit(tmp_path):
    out = tmp_path / "o.mp4"
    holder = hold(out)
    with pytest.raises(LockedError, match=f"pid {holder.pid} on host '{socket.gethostname()}'"):
        OutputLock(out).acquire()
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert not Path(lock_path(out)).exists()
    OutputLock(out).acquire().release()


def test_the_lock_of_a_killed_process_is_broken(tmp_path):
    out = tmp_path / "o.mp4"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)   # no finally runs: the lock file stays
    os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)   # until it has died; not reaped: a zombie
    lock = OutputLock(out).acquire()     # a zombie holds nothing
    holder.wait()
    assert lock.broken and f"pid {holder.pid}" in lock.broken[0]
    assert read_lock(lock_path(out)).record["pid"] == os.getpid()
    lock.release()


def test_locks_from_other_hosts_expire_by_heartbeat(tmp_path, monkeypatch):
    out = tmp_path / "o.mp4"
    now = time.time()
    write_lock(out, pid=1, host="render-node-9", started=now - 3600, heartbeat=now - 1)
    with pytest.raises(LockedError, match="pid 1 on host 'render-node-9'"):
        OutputLock(out).acquire()
    path = write_lock(out, pid=1, host="render-node-9", started=now - 3600, heartbeat=now - 30)
    os.utime(path, (now - 30, now - 30))
    with pytest.raises(LockedError):
        OutputLock(out).acquire()             # 30 s < the default TTL of 120 s
    monkeypatch.setenv("TOKENFLOW_LOCK_TTL", "10")
    lock = OutputLock(out).acquire()          # 30 s > 10 s: that worker is presumed dead
    assert "render-node-9" in lock.broken[0]
    lock.release()


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "unreadable and old"])
def test_stale_locks_on_this_host_are_broken(tmp_path, case):
    out = tmp_path / "o.mp4"
    now = time.time()
    if case == "dead pid":
        write_lock(out, pid=DEAD_PID, started=now, heartbeat=now, **THIS_MACHINE)
    elif case == "reused pid":   # our pid is alive, but it is not the process that took the lock
        write_lock(out, pid=os.getpid(), started=now, heartbeat=now, pid_start="1", **THIS_MACHINE)
    else:
        path = Path(lock_path(out))
        path.write_text("")
        os.utime(path, (now - 600, now - 600))
    OutputLock(out).acquire().release()
    assert not Path(lock_path(out)).exists()


def test_an_unreadable_fresh_lock_is_respected(tmp_path):
    out = tmp_path / "o.mp4"
    Path(lock_path(out)).write_text("")    # a worker between creating and filling its lock
    with pytest.raises(LockedError, match="unreadable"):
        OutputLock(out).acquire()


def test_heartbeat_keeps_the_lock_fresh_and_a_lost_lock_is_noticed(tmp_path):
    out = tmp_path / "o.mp4"
    with OutputLocks([out], ttl=2.0) as locks:   # heartbeat every 0.5 s
        first = read_lock(lock_path(out))
        beats = [first.record["heartbeat"]]
        hang_guard = time.monotonic() + 120     # waits for two beats, however late a loaded machine runs them
        while len(beats) < 3:
            assert time.monotonic() < hang_guard, beats
            time.sleep(0.05)
            beats.append(read_lock(lock_path(out)).record["heartbeat"])
            beats = sorted(set(beats))
        now = read_lock(lock_path(out))
        assert beats[0] == first.record["started"] and now.record["heartbeat"] >= beats[2]   # renewed twice
        assert now.mtime > first.mtime and now.inode == first.inode   # the same file, rewritten in place
        locks.verify()
        # another worker breaks it (it looked dead to them) and takes it
        os.rename(lock_path(out), tmp_path / "moved")
        write_lock(out, pid=DEAD_PID + 1, host="other", started=time.time(), heartbeat=time.time())
        with pytest.raises(LockedError, match="lost the lock"):
            locks.verify()
    assert read_lock(lock_path(out)).record["host"] == "other"   # released: theirs was left alone


RACE = r"""
import json, os, sys, time
from tokenflow.errors import LockedError
from tokenflow.app.locks import OutputLock

target, me, go, rounds, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
HANG_GUARD_S = 300      # only ends a run that would otherwise never end; the test then fails on "hung"
open(f"{go}.ready-{me}", "w").close()
deadline = time.monotonic() + HANG_GUARD_S
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
held, n, hung, broken_then_lost = [], 0, False, 0
satisfied = f"{go}.satisfied-{me}"
# Until every worker has held the lock ``rounds`` times: all of them contend for as long as any
# still needs to (the end is an event, not a clock).
while not all(os.path.exists(f"{go}.satisfied-{i}") for i in range(workers)):
    if time.monotonic() > deadline:
        hung = True
        break
    lock = OutputLock(target, ttl=60)
    try:
        lock.acquire()
    except LockedError:
        broken_then_lost += len(lock.broken)   # broke a stale lock, then another worker took the free name
        time.sleep(0.001)
        continue
    start = time.monotonic()   # one clock for all processes (CLOCK_MONOTONIC), immune to NTP steps
    time.sleep(0.01)           # hold it a while: the others try to take it meanwhile
    try:
        lock.verify()
        ok = True
    except LockedError:
        ok = False
    held.append([start, time.monotonic(), ok, len(lock.broken)])
    n += 1
    if n % 2:
        lock.release()
    else:                  # "die" holding it: the record names a dead pid, the file stays
        lock.record["pid"] = 99_999_999
        lock._write()
        os.close(lock.fd)
        lock.fd = None
    if n == rounds:
        open(satisfied, "w").close()
print(json.dumps({"held": held, "hung": hung, "broken_then_lost": broken_then_lost}))
"""


def test_racing_workers_break_stale_locks_without_ever_sharing_one(tmp_path):
    out, rounds = tmp_path / "o.mp4", 4
    workers = _start_together(tmp_path, RACE, 4, out, rounds, 4)
    held, deaths, breaks = [], 0, 0
    for w in workers:
        stdout, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
        result = json.loads(stdout)
        assert not result["hung"] and len(result["held"]) >= rounds, result
        held += result["held"]
        deaths += len(result["held"]) // 2
        breaks += result["broken_then_lost"]
    assert all(ok for _, _, ok, _ in held), "a holder lost its lock to another worker"
    held.sort()
    for (_, end, _, _), (start, _, _, _) in zip(held, held[1:]):
        assert start >= end, "two workers held the same lock at once"
    # every second hold "dies" holding it; each such stale lock is broken exactly once by whoever
    # comes next, and only the last one may be left when the workers stop
    breaks += sum(b for *_, b in held)
    assert deaths >= 4 * (rounds // 2) and deaths - 1 <= breaks <= deaths, (deaths, breaks)


# ----------------------------------------------------------------------------- the skip rule


def _config(tmp_path, **kw):
    (tmp_path / "in.mp4").write_bytes(b"the input")   # the outputs record its hash
    return EditConfig(video=str(tmp_path / "in.mp4"), prompt="glass", output=str(tmp_path / "o.mp4"), model="tiny",
                      **kw)


def test_skip_when_every_output_exists_else_refuse_a_partial_job(tmp_path, capsys):
    from tokenflow.app.jobs import run_edit
    from tokenflow.io.progress import Reporter

    from .test_output_naming import made_by

    made_by(_config(tmp_path, save_latents=str(tmp_path / "l.npy")), tmp_path / "o.mp4")   # made by this job
    made_by(_config(tmp_path, save_latents=str(tmp_path / "l.npy")), tmp_path / "l.npy", "latents")
    events = io.StringIO()
    assert run_edit(_config(tmp_path, save_latents=str(tmp_path / "l.npy")), Reporter(json_stream=events)) == []
    skipped = [json.loads(line) for line in events.getvalue().splitlines()]
    assert skipped[-1]["event"] == "skipped" and skipped[-1]["reason"] == "outputs exist"
    assert skipped[-1]["outputs"] == [str(tmp_path / "o.mp4"), str(tmp_path / "l.npy")]
    assert run_edit(_config(tmp_path), Reporter()) == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "--overwrite" in lines[0]
    assert run_edit(_config(tmp_path), Reporter(quiet=True)) == [] and capsys.readouterr().err == ""
    # one output there, one not: refused (before any work), naming both and --overwrite
    with pytest.raises(OutputError, match=r"existing: .*o\.mp4.*missing: .*png.*--overwrite"):
        run_edit(_config(tmp_path, save_frames=str(tmp_path / "png")), Reporter(quiet=True))
    assert not list(tmp_path.glob("*.lock"))


def test_edit_cli_breaks_a_dead_lock_refuses_a_live_one_skips_and_overwrites(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "out.mp4"
    args = ["edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", *FAST, "-o", out]
    killed = hold(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert Path(lock_path(out)).exists()
    # 1. the killed worker's lock is broken and the job runs, holding the lock while it works
    first = subprocess.Popen([sys.executable, "-m", "tokenflow", *map(str, args), "--log-json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    events = []
    for line in first.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "stage_start":
            break
    assert read_lock(lock_path(out)).record["pid"] == first.pid
    rest, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    events += [json.loads(line) for line in rest.splitlines()]
    assert any(f"pid {killed.pid} on this machine has exited" in e.get("message", "") for e in events)
    assert out.stat().st_size > 0 and not Path(lock_path(out)).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp or aside file left
    mtime = out.stat().st_mtime_ns
    # 2. the same job again: skipped at once, the output untouched
    again = tokenflow(*args, "--log-json")
    assert again.returncode == 0, again.stderr
    kinds = [json.loads(line)["event"] for line in again.stdout.splitlines()]
    assert "skipped" in kinds and "stage_start" not in kinds and "done" not in kinds
    assert out.stat().st_mtime_ns == mtime
    # 3. a second worker on an output a live worker holds: exit 7, one line naming the holder
    holder = hold(out)
    locked = tokenflow(*args, "--overwrite", "-q")
    holder.stdin.close()
    holder.wait(timeout=30)
    lines = [line for line in locked.stderr.splitlines() if line.strip()]
    assert locked.returncode == 7 and len(lines) == 1, locked.stderr
    assert f"pid {holder.pid} on host '{socket.gethostname()}'" in lines[0] and str(out) in lines[0]
    assert out.stat().st_mtime_ns == mtime
    # 4. --overwrite redoes it
    over = tokenflow(*args, "--overwrite", "-q")
    assert over.returncode == 0, over.stderr
    assert out.stat().st_mtime_ns != mtime and not Path(lock_path(out)).exists()
