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

from tokenflow.app.locks import (
    OutputLock,
    OutputLocks,
    _take_over_guard,
    guard_path,
    guard_stale_reason,
    lock_path,
    read_lock,
    sweep_leftovers,
)
from tokenflow.errors import LockedError
from tokenflow.io import owners
from tokenflow.io.cache import InversionCache, InversionKey
from tokenflow.io.outputs import (
    FOREIGN_TEMP_AGE_S,
    TEMP_MARK,
    atomic_file,
    atomic_path,
    check_writable,
    is_temp_of,
    rename_exchange,
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

    from .test_output_naming import made_by

    out = tmp_path / "o.mp4"
    (tmp_path / "in.mp4").write_bytes(b"the input")
    config = EditConfig(video=str(tmp_path / "in.mp4"), prompt="glass", output=str(out), model="tiny")
    done = made_by(config, out).read_bytes()   # made by this same job
    kill(python(IN_GUARD, out, "lock"))
    events = io.StringIO()
    assert run_edit(config, Reporter(json_stream=events)) == []
    kinds = [json.loads(line)["event"] for line in events.getvalue().splitlines()]
    assert "skipped" in kinds and "info" in kinds, kinds   # skipped, and said what it cleaned up
    assert sorted(os.listdir(tmp_path)) == ["in.mp4", "o.mp4"] and out.read_bytes() == done


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
    """Another boot of this machine (same machine tag, another boot id; our pid alive now) is gone,
    where the machine id tells this machine from any other; without one (or in a container) the
    same tag may be another machine's with our host name, so its temp waits as another machine's."""
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
    assert any("belongs to another process" in m for m in messages) and not reused.exists()
    if owners.STRONG_ID:
        assert hidden(tmp_path) == [], hidden(tmp_path)
        assert any("rebooted" in m for m in messages), messages
    else:
        assert hidden(tmp_path) == [rebooted.name] and not any("rebooted" in m for m in messages)
        age(rebooted, FOREIGN_TEMP_AGE_S + 60)
        assert "cannot be told from this one" in sweep_temps(out)[0] and hidden(tmp_path) == []


def other_machine_named_like_this_one() -> str:
    """The machine tag of a machine with this host name and PID namespace (on every Linux host the
    initial one is pid:[4026531836]) but another machine id: a clone of this VM, say."""
    other_id = "f" * 32 if owners.MACHINE_ID != "f" * 32 else "e" * 32
    tag = owners.machine_tag(owners.HOST, owners.PIDNS, other_id)
    assert tag != owners.MACHINE_TAG
    return tag


def test_another_machine_with_this_host_name_is_judged_by_age_not_as_this_one_rebooted(tmp_path):
    out = tmp_path / "out.mp4"
    clone = other_machine_named_like_this_one()
    ours = me()
    # its writer has our pid and start time (it is not ours: a live process over there), another boot
    staged = temp_name(out, owners.Owner(ours.pid, ours.start, clone, OTHER_BOOT), ".new.mp4")
    staged.write_bytes(b"their staged video")
    now = time.time()
    record = {"pid": ours.pid, "host": owners.HOST, "pidns": owners.PIDNS, "boot": "an-earlier-boot-id",
              "pid_start": ours.start, "machine": clone, "started": now, "heartbeat": now, "token": "t",
              "output": str(out)}
    Path(lock_path(out)).write_text(json.dumps(record))
    with pytest.raises(LockedError, match="s old without a heartbeat"):
        OutputLock(out).acquire()                       # alive over there: its heartbeat is fresh
    assert sweep_leftovers([out]) == [] and sweep_temps(out) == [] and staged.exists()
    age(staged, FOREIGN_TEMP_AGE_S - 60)
    assert sweep_temps(out) == [] and staged.exists()   # untouched for less than an hour: kept
    record["heartbeat"] = now - 600                     # that worker stopped renewing its lock
    Path(lock_path(out)).write_text(json.dumps(record))
    age(Path(lock_path(out)), 600)
    lock = OutputLock(out).acquire()
    lock.release()
    assert "has not renewed it" in lock.broken[0], lock.broken
    assert len(lock.swept) == 1 and "written on another machine" in lock.swept[0] and not staged.exists()
    assert os.listdir(tmp_path) == []


def test_machine_identity_rule(tmp_path):
    """io.owners.placement: another boot of this machine's tag is this machine rebooted only with a
    strong identity (a machine id, in the initial PID namespace); records of older versions, which
    carry no machine tag, count as this machine's only during this very boot."""
    assert owners.MACHINE_TAG == owners.machine_tag(owners.HOST, owners.PIDNS, owners.MACHINE_ID)
    assert owners.STRONG_ID == (owners.MACHINE_ID is not None and owners.PIDNS == owners.INIT_PIDNS)
    other_boot = owners.BOOT_TAG[::-1] if owners.BOOT_TAG[::-1] != owners.BOOT_TAG else OTHER_BOOT
    clone = other_machine_named_like_this_one()
    for strong in (True, False):
        assert owners.placement(owners.MACHINE_TAG, owners.BOOT_TAG, strong=strong) == (
            owners.HERE if owners.BOOT_TAG != owners.UNKNOWN_BOOT or strong else owners.ELSEWHERE)
        assert owners.placement(clone, owners.BOOT_TAG, strong=strong) == owners.ELSEWHERE
        assert owners.placement(clone, other_boot, strong=strong) == owners.ELSEWHERE
    assert owners.placement(owners.MACHINE_TAG, other_boot, strong=True) == (
        owners.REBOOTED if owners.BOOT_TAG != owners.UNKNOWN_BOOT else owners.HERE)
    assert owners.placement(owners.MACHINE_TAG, other_boot, strong=False) == owners.ELSEWHERE
    assert owners.placement(owners.MACHINE_TAG, owners.UNKNOWN_BOOT, strong=True) == owners.HERE
    assert owners.placement(owners.MACHINE_TAG, owners.UNKNOWN_BOOT, strong=False) == owners.ELSEWHERE
    if owners.BOOT is None:
        return
    old = (owners.HOST, owners.PIDNS)                   # an older tokenflow's record: no machine tag
    assert owners.record_placement(None, *old, owners.BOOT) == owners.HERE
    assert owners.record_placement(None, *old, "an-earlier-boot-id") == owners.ELSEWHERE
    assert owners.record_placement(None, *old, None) == owners.ELSEWHERE
    assert owners.record_placement(None, "another-host", owners.PIDNS, owners.BOOT) == owners.ELSEWHERE
    assert owners.record_placement(owners.MACHINE_TAG, *old, owners.BOOT) == owners.HERE
    assert owners.record_placement(clone, *old, owners.BOOT) == owners.ELSEWHERE


def test_an_older_versions_lock_is_this_machines_only_during_this_boot(tmp_path):
    """A lock record without a machine tag (written before it existed): during this boot under our
    host name and PID namespace its pid decides; from another boot it is judged by its heartbeat."""
    if owners.BOOT is None:
        pytest.skip("no boot id here")
    out = tmp_path / "out.mp4"
    now = time.time()
    old = {"host": owners.HOST, "pidns": owners.PIDNS, "started": now, "heartbeat": now, "token": "t", "output": str(out)}
    Path(lock_path(out)).write_text(json.dumps({**old, "pid": DEAD_PID, "boot": owners.BOOT}))
    lock = OutputLock(out).acquire()                    # this boot, a dead pid: broken at once
    lock.release()
    assert f"pid {DEAD_PID} on this machine has exited" in lock.broken[0]
    Path(lock_path(out)).write_text(json.dumps({**old, "pid": os.getpid(), "boot": "an-earlier-boot-id"}))
    with pytest.raises(LockedError):
        OutputLock(out).acquire()                       # maybe another machine with our host name
    Path(lock_path(out)).write_text(json.dumps({**old, "pid": os.getpid(), "boot": "an-earlier-boot-id",
                                                "heartbeat": now - 600}))
    age(Path(lock_path(out)), 600)
    lock = OutputLock(out).acquire()
    lock.release()
    assert "has not renewed it" in lock.broken[0]


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


def test_a_temp_belongs_to_the_target_its_leading_dots_and_marks_say(tmp_path):
    """k leading dots and k temp marks: ``..a.mp4.tmp-…`` is the temp of ``.a.mp4`` and must not be
    swept under the lock of ``a.mp4``; ``..a.mp4.tmp-….new.mp4.tmp-…`` (a temp of a temp, as
    write_video makes) is a.mp4's."""
    a, dot_a = tmp_path / "a.mp4", tmp_path / ".a.mp4"
    dead = owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG).token
    mark = f"{TEMP_MARK}{dead}"
    of_a = tmp_path / f".a.mp4{mark}-0badc0de.new.mp4"
    nested_of_a = tmp_path / f"..a.mp4{mark}-0badc0de.new.mp4{mark}-0badc0df.mp4"
    of_dot_a = tmp_path / f"..a.mp4{mark}-0badc0e0.new.mp4"
    nested_of_dot_a = tmp_path / f"...a.mp4{mark}-0badc0e1.new.mp4{mark}-0badc0e2.mp4"
    for temp in (of_a, nested_of_a, of_dot_a, nested_of_dot_a):
        temp.write_bytes(b"x")
    temps = (of_a, nested_of_a, of_dot_a, nested_of_dot_a)
    assert [is_temp_of(p.name, "a.mp4") for p in temps] == [True, True, False, False]
    assert [is_temp_of(p.name, ".a.mp4") for p in temps] == [False, False, True, True]
    lock = OutputLock(a).acquire()
    lock.release()
    assert len(lock.swept) == 2 and not of_a.exists() and not nested_of_a.exists()
    assert of_dot_a.exists() and nested_of_dot_a.exists()
    assert len(sweep_temps(dot_a)) == 2 and hidden(tmp_path) == []


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


def test_a_skipping_run_leaves_a_live_remote_workers_leftovers_alone(tmp_path):
    """A run that skips sweeps without a lock; while a worker on another machine holds the output's
    lock (fresh heartbeat), its staged output may wait untouched for over an hour (it encodes the
    job's other outputs): neither that temp nor the lock's guard is touched."""
    out = tmp_path / "b.mp4"
    out.write_bytes(b"done")
    remote = owners.Owner(4242, "100", OTHER_MACHINE, OTHER_BOOT)
    now = time.time()
    record = {"pid": 4242, "host": "node-7", "started": now, "heartbeat": now, "token": "t", "output": str(out),
              "boot": "x", "pidns": "pid:[1]", "pid_start": "100", "machine": OTHER_MACHINE}
    lock_file = Path(lock_path(out))
    lock_file.write_text(json.dumps(record))
    staged = temp_name(out, remote, ".new.mp4")
    staged.write_bytes(b"a complete staged video")
    age(staged, FOREIGN_TEMP_AGE_S + 60)
    guard = Path(guard_path(lock_path(out)))
    guard.write_text(remote.token)                      # an old guard of theirs: dead by the 30 s rule
    age(guard, 40)
    assert sweep_leftovers([out]) == []
    assert staged.exists() and guard.exists() and read_lock(str(lock_file)).record == record
    record["heartbeat"] = now - 600                     # once their lock is stale, the same sweep cleans up
    lock_file.write_text(json.dumps(record))
    age(lock_file, 600)
    messages = sweep_leftovers([out])
    assert any("broke the stale lock" in m for m in messages) and any("another machine" in m for m in messages)
    assert sorted(os.listdir(tmp_path)) == ["b.mp4"] and out.read_bytes() == b"done"


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


def a_guard(path: Path, token: str, seconds_old: float = 0.0) -> bytes:
    content = f"{token} {os.urandom(8).hex()}".encode()
    path.write_bytes(content)
    if seconds_old:
        age(path, seconds_old)
    return content


def exchange_works(folder: Path) -> bool:
    a, b = folder / "exchange-a", folder / "exchange-b"
    a.write_text("a")
    b.write_text("b")
    try:
        swapped = rename_exchange(a, b)
        if swapped:
            assert a.read_text() == "b"
            a.unlink()
            with pytest.raises(FileNotFoundError):   # a missing path is not "unsupported"
                rename_exchange(b, a)
        return swapped
    finally:
        for path in (a, b):
            path.unlink(missing_ok=True)


def test_a_guard_that_went_and_came_back_fresh_is_never_deleted(tmp_path):
    """The takeover judged an old guard dead; before it acted, another remover took that one over and
    finished, and a live remover made a fresh guard. Whether the exchange then finds the guard
    missing (ENOENT: look again) or the file system cannot exchange (the 30-second rule, on the very
    file judged only), the fresh guard stays, the same file."""
    guard = tmp_path / ".out.mp4.lock.break"
    remote = owners.Owner(7, "1", OTHER_MACHINE, OTHER_BOOT).token

    def went_then_fresh(supported: bool):
        def exchange(mine, target):
            os.unlink(target)                            # taken over and released meanwhile
            try:
                return rename_exchange(mine, target) if supported else False
            finally:
                fresh.append(a_guard(Path(target), me().token))   # a live remover is inside
                fresh.append(os.stat(target).st_ino)
        return exchange

    for supported in (True, False):
        a_guard(guard, remote, seconds_old=40)
        fresh: list = []
        taken, _ = _take_over_guard(str(guard), exchange=went_then_fresh(supported))
        assert taken is not True and guard.read_bytes() == fresh[0] and guard.stat().st_ino == fresh[1]
        assert guard_stale_reason(str(guard)) is None and hidden(tmp_path) == [guard.name]
        guard.unlink()                                   # that remover is done


def test_without_an_exchange_only_an_old_guard_is_deleted_and_only_the_one_judged(tmp_path):
    guard = tmp_path / ".out.mp4.lock.break"
    unsupported = lambda mine, target: False            # noqa: E731  (e.g. NFS)
    young_dead = a_guard(guard, owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG).token)
    assert _take_over_guard(str(guard), exchange=unsupported) == (False, "")   # the 30 s rule waits
    assert guard.read_bytes() == young_dead
    age(guard, 40)
    assert _take_over_guard(str(guard), exchange=unsupported) == (None, "")    # gone: compete for the name
    assert hidden(tmp_path) == []


def test_a_takeover_never_puts_back_the_guard_of_a_remover_that_has_left(tmp_path):
    """Two takers judged one dead guard: the first took it over (it is inside); the second swaps its
    own guard in and gets the first one's, alive. Then the first finishes (unlinking the guard: the
    second's file) and a remover is killed right after making a fresh guard. Swapping the live
    guard back would leave the first's guard there, naming a live process nobody will remove for a
    while, over the dead one; the second stands in instead, and deletes what it swapped out."""
    if not exchange_works(tmp_path):
        pytest.skip("no atomic exchange of two paths here")
    guard = tmp_path / ".out.mp4.lock.break"
    dead_then = a_guard(guard, owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG).token)
    killed = owners.Owner(DEAD_PID - 1, None, owners.MACHINE_TAG, owners.BOOT_TAG).token

    calls = []

    def first_taker_finishes(mine, target):
        calls.append(target)
        if len(calls) > 1:
            return rename_exchange(mine, target)         # (a swap back)
        os.unlink(target)                                # the first taker took it over ...
        a_guard(Path(target), me().token)                # ... and is inside: its guard names it, alive
        swapped = rename_exchange(mine, target)
        os.unlink(target)                                # done: it unlinks the guard, our file by now
        killed_guard.append(a_guard(Path(target), killed))   # a remover killed right after O_EXCL
        return swapped

    killed_guard: list = []
    taken, _ = _take_over_guard(str(guard), exchange=first_taker_finishes)
    assert taken is not True and len(calls) == 1 and dead_then != killed_guard[0]
    assert guard.read_bytes() == killed_guard[0] and guard_stale_reason(str(guard)) is not None
    assert hidden(tmp_path) == [guard.name]              # no temps: the live guard swapped out is gone


def test_a_taker_that_displaced_a_live_guard_stands_in_for_it(tmp_path):
    if not exchange_works(tmp_path):
        pytest.skip("no atomic exchange of two paths here")
    guard = tmp_path / ".out.mp4.lock.break"
    a_guard(guard, owners.Owner(DEAD_PID, None, owners.MACHINE_TAG, owners.BOOT_TAG).token)

    def replaced_by_a_live_one(mine, target):
        os.unlink(target)
        a_guard(Path(target), me().token)                # another remover took it over and is inside
        return rename_exchange(mine, target)

    taken, _ = _take_over_guard(str(guard), exchange=replaced_by_a_live_one, stand_in_s=0.01)
    assert taken is None and guard_stale_reason(str(guard)) is None   # still guarded: by our stand-in
    assert hidden(tmp_path) == [guard.name]
    guard.unlink()                                       # that remover is done: it unlinks the guard
    assert hidden(tmp_path) == []


def test_a_release_without_the_guard_leaves_the_lock_marked_released(tmp_path):
    out = tmp_path / "out.mp4"
    lock = OutputLock(out).acquire()
    guard = Path(guard_path(lock.path))
    a_guard(guard, me().token)                           # a live remover inside, longer than release waits
    lock.release()
    assert Path(lock.path).exists() and read_lock(lock.path).record["released"]   # not deleted unguarded
    assert lock.fd is None
    guard.unlink()
    again = OutputLock(out).acquire()                    # a released lock is broken at once
    again.release()
    assert len(again.broken) == 1 and "released it" in again.broken[0]
    assert os.listdir(tmp_path) == []

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
