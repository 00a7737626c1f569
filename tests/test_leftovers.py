"""Leftovers of killed writers (docs/checkpoints.md "Leftovers"): temp names carry their owner
(pid, start time, machine, boot), and the next run or atomic write on an output removes the temps,
locks and removal guards whose owner is gone, never a live writer's, never another machine's while
it may be alive, never a file that merely looks like a temp."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenflow.app.locks import OutputLock, OutputLocks, guard_path, lock_path, read_lock, sweep_leftovers
from tokenflow.io import owners
from tokenflow.io.cache import InversionCache, InversionKey
from tokenflow.io.outputs import (
    FOREIGN_TEMP_AGE_S,
    TEMP_MARK,
    atomic_file,
    atomic_path,
    check_writable,
    sweep_folder_temps,
    sweep_temps,
    temp_sibling,
)

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 99_999_999   # above any pid_max: os.kill says "no such process"
OTHER_MACHINE = "0123456789ab"
OTHER_BOOT = "deadbeef"
HOUR = 3600.0


def python(code, *args):
    """A helper process running ``code``; it prints one line once it is where the test wants it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline().strip()
    assert line == "ready", child.stderr.read()
    return child


def kill(child) -> None:
    child.send_signal(signal.SIGKILL)   # no finally, no atexit: whatever it had open stays on disk
    child.wait()
    child.stdin.close()


# A writer in the middle of a job: the locks of its outputs held, a half-written video (atomic_file),
# a frames folder being filled (atomic_path) and, as `tokenflow edit` stages outputs, a temp of a
# temp (write_video writes into its staged name through atomic_path).
WRITER = r"""
import os, sys
from tokenflow.app.locks import OutputLocks
from tokenflow.io.outputs import atomic_file, atomic_path, temp_sibling
out, frames = sys.argv[1], sys.argv[2]
with OutputLocks([out, frames], heartbeat_s=0.2):
    with atomic_file(out, "wb") as f, atomic_path(frames) as folder, atomic_path(temp_sibling(out, ".new.mp4")) as nested:
        f.write(b"half a video")
        f.flush()
        os.mkdir(folder)
        open(os.path.join(folder, "00000.png"), "wb").close()
        open(nested, "wb").close()
        print("ready", flush=True)
        sys.stdin.read()
"""

# A worker killed inside the removal guard of its lock, releasing it: before ("lock") or after
# ("guard") it deleted the lock file.
IN_GUARD = r"""
import os, sys
from tokenflow.app.locks import OutputLock, _removal_guard
lock = OutputLock(sys.argv[1]).acquire()
with _removal_guard(lock.path):
    if sys.argv[2] == "guard":
        os.unlink(lock.path)
    print("ready", flush=True)
    sys.stdin.read()
"""


def hidden(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def temp_name(target: Path, owner: owners.Owner, suffix: str = "") -> Path:
    return target.parent / f".{target.name}{TEMP_MARK}{owner.token}-0badc0de{suffix}"


def me() -> owners.Owner:
    return owners.Owner(os.getpid(), owners.pid_start(os.getpid()), owners.MACHINE_TAG, owners.BOOT_TAG)


def age(path: Path, seconds: float) -> Path:
    """Nothing in ``path`` touched for ``seconds``."""
    then = time.time() - seconds
    for inner in sorted(path.rglob("*"), reverse=True) if path.is_dir() else []:
        os.utime(inner, (then, then), follow_symlinks=False)
    os.utime(path, (then, then), follow_symlinks=False)
    return path


# ----------------------------------------------------------------------------- the names


def test_temp_names_carry_their_owner(tmp_path):
    name = Path(temp_sibling(tmp_path / "out.mp4", ".new.mp4")).name
    assert name.startswith(f".out.mp4{TEMP_MARK}") and name.endswith(".new.mp4")
    found = owners.owners_in(name, TEMP_MARK)
    assert found == [me()] and found[0].here and found[0].gone_reason() is None
    assert owners.Owner.parse(next(owners._TOKEN.finditer(me().token))) == me()   # the token round-trips


# ----------------------------------------------------------------------------- killed writers


def test_a_writer_killed_mid_write_leaves_temps_and_locks_the_next_run_removes_them(tmp_path):
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    writer = python(WRITER, out, frames)
    kill(writer)
    left = hidden(tmp_path)
    assert len(left) == 3, left      # the video, the frames folder and the temp of a temp ...
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["frames.lock", "out.mp4.lock"]
    assert all(f"{TEMP_MARK}{writer.pid}-" in name for name in left), left   # ... each naming its writer
    assert not out.exists() and not frames.exists()

    with OutputLocks([out, frames]) as locks:   # what the next run on these outputs does first
        messages = locks.broken
        assert hidden(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] != []
    assert sum(f"pid {writer.pid} on this machine has exited" in m for m in messages) == 2 + 3, messages
    assert sorted(os.listdir(tmp_path)) == []   # locks released, nothing else there


def test_the_next_atomic_write_of_a_target_removes_its_dead_writers_temps(tmp_path):
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    kill(python(WRITER, out, frames))
    with atomic_file(out, "wb") as f:
        f.write(b"whole")
    with atomic_path(frames) as folder:
        folder.mkdir()
        (folder / "00000.png").write_bytes(b"png")
    assert out.read_bytes() == b"whole" and os.listdir(frames) == ["00000.png"]
    # the temp of a temp (".<out>.tmp-....new.mp4.tmp-...") went with the output's temps
    assert hidden(tmp_path) == []
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["frames.lock", "out.mp4.lock"]   # not a lock's job


def test_a_run_that_takes_no_lock_still_sweeps_dead_workers_locks_guards_and_temps(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"    # both finished by workers killed before they released
    for out in (a, b):
        out.write_bytes(b"finished")
    in_release = python(IN_GUARD, a, "guard")        # killed in the guard, its lock file already deleted
    holding = python(WRITER, b, tmp_path / "b-frames")   # killed holding b's lock and writing temps
    kill(in_release)
    kill(holding)
    assert os.path.exists(guard_path(lock_path(a))) and not os.path.exists(lock_path(a))
    assert os.path.exists(lock_path(b)) and len(hidden(tmp_path)) == 1 + 2 + 1
    messages = sweep_leftovers([a, b, tmp_path / "b-frames"])
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"], os.listdir(tmp_path)
    assert a.read_bytes() == b.read_bytes() == b"finished"   # the outputs themselves are never touched
    assert any(".lock.break" in m and f"pid {in_release.pid}" in m for m in messages), messages
    assert any("broke the stale lock" in m and f"pid {holding.pid}" in m for m in messages), messages
    assert len(messages) == 1 + 2 + 3, messages   # a's guard; b's two locks; b's three temps


def test_a_dead_removers_guard_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out.mp4"
    kill(python(IN_GUARD, out, "lock"))
    guard = Path(guard_path(lock_path(out)))
    assert guard.exists() and time.time() - guard.stat().st_mtime < 30   # young: the 30 s rule would wait
    lock = OutputLock(out).acquire()     # the stale lock is broken under the guard, which is taken over
    assert lock.broken and not guard.exists()
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_skipping_edit_sweeps_the_leftovers_of_its_outputs(tmp_path):
    """`tokenflow edit` with every output there skips before taking any lock; a worker killed
    between renaming its outputs into place and releasing its locks must not leave them for ever."""
    from tokenflow.app.jobs import run_edit
    from tokenflow.config import EditConfig
    from tokenflow.io.progress import Reporter

    out = tmp_path / "o.mp4"
    out.write_bytes(b"done")
    kill(python(IN_GUARD, out, "lock"))
    events = io.StringIO()
    config = EditConfig(video=str(tmp_path / "in.mp4"), prompt="glass", output=str(out))
    assert run_edit(config, Reporter(json_stream=events)) == []
    kinds = [json.loads(line)["event"] for line in events.getvalue().splitlines()]
    assert "skipped" in kinds and "info" in kinds, kinds   # skipped, and said what it cleaned up
    assert os.listdir(tmp_path) == ["o.mp4"] and out.read_bytes() == b"done"


# ----------------------------------------------------------------------------- what is never removed


LIVE = r"""
import sys
from tokenflow.io.outputs import atomic_file
with atomic_file(sys.argv[1], "wb") as f:
    f.write(b"still writing")
    f.flush()
    print("ready", flush=True)
    sys.stdin.read()
"""


def sweep_everything(target: Path) -> None:
    """Every sweep a run does on ``target``: atomic writes, the lock, the lock-less sweep."""
    sweep_temps(target)
    sweep_leftovers([target])
    OutputLock(target).acquire().release()
    with atomic_file(target.parent / f"{target.name}.side", "w") as f:   # a neighbour's write
        f.write("x")
    (target.parent / f"{target.name}.side").unlink()


def test_a_live_writers_temp_is_kept_however_old(tmp_path):
    out = tmp_path / "out.mp4"
    mine = Path(temp_sibling(out))                     # this test process: alive
    mine.write_bytes(b"mine")
    age(mine, 10 * HOUR)
    child = python(LIVE, out)                          # a sleeping child, mid-write
    theirs = [tmp_path / n for n in hidden(tmp_path) if f"{TEMP_MARK}{child.pid}-" in n]
    assert len(theirs) == 1
    age(theirs[0], 10 * HOUR)
    sweep_everything(out)
    with atomic_file(out, "wb") as f:
        f.write(b"ours")
    assert mine.exists() and theirs[0].exists()
    kill(child)                                        # gone now: its temp goes with the next sweep
    assert sweep_temps(out) and not theirs[0].exists() and mine.exists()


def test_a_reused_pid_and_another_boot_of_this_machine_are_gone(tmp_path):
    out = tmp_path / "out.mp4"
    ours = me()
    if ours.start is None or owners.BOOT_TAG in (owners.UNKNOWN_BOOT, OTHER_BOOT):
        pytest.skip("no /proc here: start times and boot ids are unknown")
    reused = temp_name(out, owners.Owner(ours.pid, str(int(ours.start) + 1), ours.machine, ours.boot))
    rebooted = temp_name(out, owners.Owner(ours.pid, ours.start, ours.machine, OTHER_BOOT), ".new")
    rebooted.mkdir()
    (rebooted / "00000.png").write_bytes(b"png")         # a staged folder: removed whole
    reused.write_bytes(b"x")
    messages = sweep_temps(out)
    assert hidden(tmp_path) == [], hidden(tmp_path)
    assert any("rebooted" in m for m in messages) and any("belongs to another process" in m for m in messages)


def test_another_machines_temps_wait_until_untouched_long_enough(tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    foreign = temp_name(out, owners.Owner(DEAD_PID, "5", OTHER_MACHINE, OTHER_BOOT))   # a dead pid... of theirs
    foreign.write_bytes(b"theirs")
    filling = temp_name(out, owners.Owner(DEAD_PID, "5", OTHER_MACHINE, OTHER_BOOT), ".new")
    filling.mkdir()
    (filling / "00001.png").write_bytes(b"png")          # their writer still adds frames
    age(filling, 10 * HOUR)
    os.utime(filling / "00001.png")
    legacy = out.parent / f".{out.name}{TEMP_MARK}0123456789ab.new.mp4"   # an older tokenflow's: no owner
    legacy.write_bytes(b"old")
    for path in (foreign, legacy):
        age(path, 200)                                   # older than the lock TTL, younger than an hour
    monkeypatch.setenv("TOKENFLOW_LOCK_TTL", "3600")     # under the lock the TTL is the limit: 200 s < 1 h
    sweep_everything(out)
    assert foreign.exists() and legacy.exists() and filling.exists()
    monkeypatch.delenv("TOKENFLOW_LOCK_TTL")
    lock = OutputLock(out).acquire()                     # 200 s > the 120 s TTL: that writer lost the output
    lock.release()
    assert not foreign.exists() and not legacy.exists() and filling.exists()
    assert len(lock.swept) == 2 and all("another machine" in m or "does not say whose" in m for m in lock.swept)
    age(filling, FOREIGN_TEMP_AGE_S + 60)                # nothing in it changed for over an hour
    assert sweep_temps(out) and hidden(tmp_path) == []


def test_names_that_merely_look_like_temps_are_never_touched(tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    dead = owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG).token
    lookalikes = [f".{out.name}.tmp-notes", f".{out.name}.tmpfile", f"{out.name}.tmp-{dead}-0badc0de",
                  f".{out.name}tmp-{dead}-0badc0de", "tmp", ".tmp", "my.tmp", f".other.mp4x{TEMP_MARK}notes",
                  f".{out.name}{TEMP_MARK}0123456789abcdef", f".{out.name}.lock.breakfast", f"{out.name}.locked"]
    for name in lookalikes:
        (tmp_path / name).write_bytes(b"user")
        age(tmp_path / name, 10 * HOUR)
    monkeypatch.setenv("TOKENFLOW_LOCK_TTL", "1")
    sweep_everything(out)
    sweep_folder_temps(tmp_path)
    check_writable(out)
    cache = InversionCache(tmp_path)
    cache.load(InversionKey("f", (64, 64), "m", "p", 10, "float32", "cpu"), [1])   # sweeps the cache root
    assert sorted(os.listdir(tmp_path)) == sorted(lookalikes)
    assert all((tmp_path / name).read_bytes() == b"user" for name in lookalikes)


def test_another_targets_dead_temps_are_its_own_business(tmp_path):
    out, other = tmp_path / "out.mp4", tmp_path / "out.mp4.bak"
    dead = owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG)
    theirs = temp_name(other, dead)
    theirs.write_bytes(b"x")
    sweep_temps(out)
    assert theirs.exists()              # swept by the next write of out.mp4.bak, not of out.mp4
    sweep_temps(other)
    assert not theirs.exists()


def test_the_inversion_cache_sweeps_dead_writers_folders_on_load(tmp_path):
    cache = InversionCache(tmp_path)
    key = InversionKey("abc", (64, 64), "model-x", "a wolf", 10, "float32", "cpu")
    folder = tmp_path / "inversions"
    folder.mkdir()
    dead = owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG)
    entry_temp = folder / f".{key.digest()}{TEMP_MARK}{dead.token}-0badc0de"
    entry_temp.mkdir()
    (entry_temp / "latents.safetensors").write_bytes(b"half")
    calibration_temp = temp_name(tmp_path / "memory-calibration.json", dead)
    calibration_temp.write_text("{")
    live = folder / f".{key.digest()}{TEMP_MARK}{me().token}-0badc0de"
    live.mkdir()
    assert cache.load(key, [1]) is None
    assert not entry_temp.exists() and not calibration_temp.exists() and live.exists()


def test_a_lock_held_by_a_live_worker_keeps_its_temps(tmp_path):
    out = tmp_path / "out.mp4"
    child = python(WRITER, out, tmp_path / "frames")
    try:
        before = hidden(tmp_path)
        assert sweep_leftovers([out]) == [] and hidden(tmp_path) == before
        assert read_lock(lock_path(out)).record["pid"] == child.pid
    finally:
        kill(child)
    assert len(sweep_leftovers([out, tmp_path / "frames"])) == 2 + 3 and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- taking over a dead guard

GUARD_RACE = r"""
import json, os, random, sys, time
from tokenflow.app.locks import _removal_guard, guard_path
from tokenflow.io import owners

lock, me, go, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
guard, inside = guard_path(lock), lock + ".inside"
dead = owners.Owner(99_999_999, None, owners.MACHINE_TAG, owners.BOOT_TAG).token.encode()
rng = random.Random(me)
open(f"{go}.ready-{me}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
overlaps = entered = planted = refused = 0
for _ in range(rounds):
    if rng.random() < 0.2:       # a remover that dies right after taking the guard
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        os.write(fd, dead)
        os.close(fd)
        planted += 1
        continue
    with _removal_guard(lock, wait_s=600) as guarded:   # no deadline in practice: "refused" is a failure
        if not guarded:
            refused += 1
            continue
        entered += 1
        try:
            os.close(os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            overlaps += 1        # another process is inside too
            continue
        time.sleep(0.0005)
        os.unlink(inside)
print(json.dumps({"overlaps": overlaps, "entered": entered, "planted": planted, "refused": refused}))
"""


def test_dead_guards_are_taken_over_by_exactly_one_remover(tmp_path):
    """Removers racing for a guard that dead removers keep leaving behind: each dead guard is taken
    over, and no two removers are ever inside at once (a live guard is never deleted)."""
    lock, go, workers = tmp_path / "out.mp4.lock", tmp_path / "go", 4
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", GUARD_RACE, str(lock), str(i), str(go), "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(workers)]
    while not all((tmp_path / f"go.ready-{i}").exists() for i in range(workers)):
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert sum(r["overlaps"] for r in results) == 0, results
    assert sum(r["planted"] for r in results) >= 10 and sum(r["entered"] for r in results) >= 100, results
    assert sum(r["refused"] for r in results) == 0, results   # a dead guard never blocks for long
