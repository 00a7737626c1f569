"""The fault corpus: bad, hostile and odd-but-valid inputs, each answered as the contract says.

The contract (docs/events.md, docs/faults.md): a bad input gives ONE line on stderr starting
``tokenflow: error:`` that names the input, no traceback, the documented exit code (2 config or
job file, 3 input video, 4 model, 5 output, 6 out of memory, 7 locked, 75 interrupted with a
checkpoint, 130 interrupted), no output file, no temp files left behind, and an older output at
the same path left byte-for-byte intact. Odd but valid inputs (one frame, odd or huge source
sizes, variable frame rate, rotation metadata, ...) succeed with a checked output.

Every case is data (``CORPUS``): id, category, what it is, how it is made, the expected exit code
and a fragment the message must contain. ``python -m tests.test_fault_corpus`` prints the table
of docs/faults.md; ``python -m tests.test_fault_corpus --write`` rewrites it there, and
``test_docs_list_every_case`` fails when the two drift apart.

Cases that fail fast run two at a time in the background (each CLI process spends most of its
few seconds importing torch); cases that run an edit run one by one in their test.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, List, Optional

import av
import av.error
import numpy as np
import pytest

from tests.test_leftovers import LIVE as LIVE_WRITER  # a process inside atomic_file until its stdin closes
from tokenflow.errors import EXIT_NAMES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "faults.md"
TABLE_START, TABLE_END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"

FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4",
        "--frames", "5"]
FAST_INVERT = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--frames", "5"]
OLDER = b"an older output that must survive\n"
MAX_LINE = 2000          # the one error line must be readable: the longest legitimate one lists all config keys
FSIZE_LIMIT = 4096       # "disk full": writes past 4 KiB fail with EFBIG (the lock record is 1 KiB, a video ~9 KiB)
WORKERS = 2
CATEGORIES = ("video", "job file", "config", "model", "environment", "data safety", "resources", "leftovers", "farm")


# ----------------------------------------------------------------------------- running the CLI


@dataclass
class Ctx:
    """One case's world: its own folder, the shared tiny model and sample clip."""

    root: Path
    model: Path
    clip: Path
    cleanups: List[Callable[[], None]] = field(default_factory=list)
    inputs: Dict[Path, str] = field(default_factory=dict)   # inputs that must stay byte-identical (``kept``)

    @property
    def work(self) -> Path:
        """Where the case makes its inputs (created on first use)."""
        path = self.root / "work"
        path.mkdir(exist_ok=True)
        return path

    @property
    def out(self) -> Path:
        return self.root / "result.mp4"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    argv: List[str]
    out: Path

    def events(self) -> List[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    return {**os.environ, **(extra or {})}


def cli(argv, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m tokenflow ARGV`` in a fresh process (the determinism test and the cold mode)."""
    return subprocess.run([sys.executable, "-m", "tokenflow", *map(str, argv)], capture_output=True, text=True,
                          env=_env(env), cwd=ROOT, timeout=timeout)


# Every CLI process spends ~5 s of CPU importing torch, diffusers and torch._dynamo before it looks
# at its input. The corpus therefore runs the CLI in forks of one warm process that imported those
# modules once (a multiprocessing forkserver, started clean with fork+exec): each fork runs
# ``tokenflow.app.cli.main()`` exactly as ``python -m tokenflow`` does (sys.argv, environment, working
# folder, stdout/stderr into files, an uncaught exception printed as a traceback and exit 1, atexit
# handlers run). TOKENFLOW_FAULT_CORPUS_COLD=1 runs every case in a fresh interpreter instead.
COLD = os.environ.get("TOKENFLOW_FAULT_CORPUS_COLD") == "1"
WARM_MODULES = ["tokenflow.app.cli", "tokenflow.app.jobs", "tokenflow.app.jobfile.run", "tokenflow.app.farm.cli",
                "tokenflow.method.editor", "tokenflow.models.load", "tokenflow.io.read", "tokenflow.io.write",
                "tokenflow.app.locks", "tokenflow.io.checkpoint", "tokenflow.app.export", "tokenflow.app.doctor",
                "tokenflow.quality.cli", "tests.test_fault_corpus"]   # not tokenflow.benchmark.run: it registers
                                                                     # the benchmark-only kernel backends
_warm_context = None
_warm_lock = threading.Lock()


def _warm():
    global _warm_context
    with _warm_lock:
        if _warm_context is None:
            import multiprocessing

            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(WARM_MODULES)
            _warm_context = context
        return _warm_context


def _limit_file_size() -> None:
    """As on a full disk: writes past FSIZE_LIMIT bytes fail with EFBIG instead of killing the process."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def _forked_cli(argv, env, out_path, err_path, fsize) -> None:   # pragma: no cover - runs in the fork
    import atexit
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if fsize:
        _limit_file_size()
    sys.argv = ["tokenflow", *argv]
    try:
        from tokenflow.app.cli import main

        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


class Proc:
    """One running ``tokenflow ARGV``: its pid, what it wrote so far, its end."""

    def __init__(self, argv, env: Optional[Dict[str, str]] = None, fsize: bool = False):
        self.argv = [str(a) for a in argv]
        self._folder = tempfile.mkdtemp(prefix="fault-corpus-io-")
        self.out_path, self.err_path = os.path.join(self._folder, "out"), os.path.join(self._folder, "err")
        for path in (self.out_path, self.err_path):
            open(path, "wb").close()
        full_env = _env(env)
        if COLD:
            command = [sys.executable, "-m", "tokenflow", *self.argv]
            if fsize:
                command = [sys.executable, "-c", "import runpy, sys, tests.test_fault_corpus as t; "
                           "t._limit_file_size(); sys.argv = ['tokenflow'] + sys.argv[1:]; "
                           "runpy.run_module('tokenflow', run_name='__main__', alter_sys=True)", *self.argv]
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self._popen = subprocess.Popen(command, stdout=out, stderr=err, env=full_env, cwd=ROOT)
            self.pid = self._popen.pid
        else:
            self._process = _warm().Process(target=_forked_cli, args=(self.argv, full_env, self.out_path,
                                                                      self.err_path, fsize), daemon=True)
            self._process.start()
            self.pid = self._process.pid

    def stdout_so_far(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def running(self) -> bool:
        return self._popen.poll() is None if COLD else self._process.is_alive()

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            if COLD:
                code = self._popen.wait(timeout)
            else:
                self._process.join(timeout)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join()
                    raise subprocess.TimeoutExpired(self.argv, timeout)
                code = self._process.exitcode
            with open(self.err_path, encoding="utf-8", errors="replace") as f:
                return subprocess.CompletedProcess(self.argv, code, self.stdout_so_far(), f.read())
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


def run_cli(argv, env=None, fsize: bool = False) -> subprocess.CompletedProcess:
    return Proc(argv, env, fsize).wait()


def _plain(ctx: Ctx, argv: List[str], env: dict) -> subprocess.CompletedProcess:
    return run_cli(argv, env)


def _disk_full(ctx: Ctx, argv: List[str], env: dict) -> subprocess.CompletedProcess:
    """The CLI with RLIMIT_FSIZE set and SIGXFSZ ignored: any write past the limit fails with EFBIG,
    as on a full disk (set in the child itself: preexec_fn is unsafe while this module's threads run)."""
    return run_cli(argv, env, fsize=True)


def _sigterm_during_inversion(ctx: Ctx, argv: List[str], env: dict) -> subprocess.CompletedProcess:
    """Start the edit (--log-json), send SIGTERM once the inversion stage has started."""
    proc = Proc(argv, env)
    deadline = time.monotonic() + 600
    while proc.running() and time.monotonic() < deadline:
        if any('"stage_start"' in line and '"invert"' in line for line in proc.stdout_so_far().splitlines()):
            os.kill(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    return proc.wait()


def _while_locked(ctx: Ctx, argv: List[str], env: dict) -> subprocess.CompletedProcess:
    """The CLI while this (live) process holds the output's lock, as another worker would."""
    from tokenflow.app.locks import OutputLocks

    with OutputLocks([ctx.out]):
        return run_cli(argv, env)


def run_case(case: "Case", ctx: Ctx) -> Result:
    argv = [str(a) for a in case.args(ctx)]
    command = argv[0]
    if command in ("edit", "invert"):   # tiny settings first: the case's own flags come last and win
        argv = [command, *(FAST if command == "edit" else FAST_INVERT), *argv[1:]]
        if command == "edit" and "-o" not in argv:
            argv += ["-o", str(ctx.out)]
    out = Path(argv[argv.index("-o") + 1]) if "-o" in argv else ctx.out
    if case.older:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(OLDER)
        argv.append("--overwrite")
    if "--log-json" not in argv and command not in ("farm", "metrics"):   # no -q there (their lines are their report)
        argv.append("-q")
    if case.before:
        case.before(ctx)
    done = (case.runner or _plain)(ctx, argv, dict(case.env(ctx)) if case.env else {})
    return Result(done.returncode, done.stdout, done.stderr, argv, out)


# ----------------------------------------------------------------------------- checking the answer


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else f"...[{len(text) - n} characters]...{text[-n:]}"


def leftovers(root: Path) -> List[str]:
    """Temp files and locks a run left under ``root``: ``.name.tmp-*``, write probes, cache and
    calibration temps, ``*.lock``, lock removal guards (``.*.lock.break``)."""
    found = []
    for path in root.rglob("*"):
        name = path.name
        if name.endswith((".lock", ".lock.break")) or (name.startswith(".") and any(
                marker in name for marker in ("tmp", "tokenflow-write-test", ".calibration."))):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def assert_answer(case: "Case", ctx: Ctx, res: Result) -> None:
    where = f"{case.id}: {' '.join(res.argv)[:400]}\nstderr: {_tail(res.stderr)}"
    assert "Traceback" not in res.stderr, where
    assert res.returncode == case.code, f"exit {res.returncode}, expected {case.code}; {where}"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if case.code:
        assert len(lines) == 1, f"{len(lines)} lines on stderr; {where}"
        line = lines[0]
        assert line.startswith("tokenflow: error:"), where
        assert len(line) <= MAX_LINE, f"the error line has {len(line)} characters; {where}"
        assert case.needle in line, f"{case.needle!r} not in the message; {where}"
        if "--log-json" in res.argv:   # the machine-readable answer agrees (docs/events.md)
            last = res.events()[-1]
            assert (last["event"], last["exit_code"], last["code"]) == ("error", case.code, EXIT_NAMES[case.code]), where
        if case.older:
            assert res.out.read_bytes() == OLDER, f"the older output was changed or lost; {where}"
        elif res.out.resolve() not in {path.resolve() for path in ctx.inputs}:   # -o aliases a kept input
            assert not res.out.exists(), f"an output was written; {where}"
    else:
        assert not [line for line in lines if line.startswith("tokenflow: error")], where
    assert leftovers(ctx.root) == [], where
    changed = [str(path) for path, digest in ctx.inputs.items() if _digest(path) != digest]
    assert not changed, f"inputs were changed: {changed}; {where}"
    if case.check:
        case.check(ctx, res)


def frames_of(path) -> np.ndarray:
    """Every frame of ``path`` as uint8 [N, H, W, 3] (decoded independently of tokenflow)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_rgb().to_ndarray() for frame in container.decode(video=0)])


def expect_video(frames: int, size=(64, 64)) -> Callable[[Ctx, Result], None]:
    def check(ctx: Ctx, res: Result) -> None:
        decoded = frames_of(res.out)
        assert decoded.shape[:3] == (frames, size[1], size[0]), decoded.shape
    return check


def both(*checks) -> Callable[[Ctx, Result], None]:
    def check(ctx: Ctx, res: Result) -> None:
        for one in checks:
            one(ctx, res)
    return check


# ----------------------------------------------------------------------------- making inputs


def _codec(name: str) -> None:
    if name not in av.codecs_available:
        pytest.skip(f"codec {name} is not in this PyAV build")


def encode(path, frames: np.ndarray, *, codec="libx264", container_format=None, fps=10, pix_fmt="yuv420p",
           pts=None, time_base=None, rotation=None) -> Path:
    """uint8 [N, H, W, 3] frames -> a video written with PyAV directly (formats tokenflow never writes)."""
    _codec(codec)
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = stream.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index if pts is None else pts[index]
            if time_base is not None:
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return Path(path)


def render(n: int, size) -> np.ndarray:
    from tokenflow.io.samples import render_frames

    return render_frames(n, size)


def corrupt_bytes(ctx: Ctx) -> Path:
    path = ctx.work / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def empty_avi(ctx: Ctx) -> Path:
    path = ctx.work / "empty.avi"
    with av.open(str(path), "w") as container:
        container.add_stream("mpeg4", rate=10)
    return path


def truncated(ctx: Ctx, n_frames: int, name: str) -> Path:
    """The sample clip's encoding of ``n_frames`` frames, cut to half its bytes."""
    from tokenflow.io.samples import make_sample_clip

    full = make_sample_clip(ctx.work / f"full-{name}", n_frames=n_frames, size=(96, 64), fps=12)
    data = Path(full).read_bytes()
    path = ctx.work / name
    path.write_bytes(data[: len(data) // 2])
    os.remove(full)
    return path


def decodable_frames(path) -> int:
    """How many frames FFmpeg decodes from ``path`` before the first error."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.error.FFmpegError:
        pass
    return count


def unknown_codec(ctx: Ctx) -> Path:
    """An MP4 whose video sample entry says 'zzzz' instead of 'avc1': a codec no decoder knows."""
    path = encode(ctx.work / "mystery.mp4", render(3, (64, 64)))
    data = path.read_bytes()
    assert data.count(b"avc1") >= 1
    path.write_bytes(data.replace(b"avc1", b"zzzz"))
    return path


def audio_only(ctx: Ctx) -> Path:
    from tokenflow.io.samples import _write_tone

    path = ctx.work / "tone.mp4"
    _write_tone(str(path), 0.5)
    return path


def image_folder(ctx: Ctx, files: Dict[str, object]) -> Path:
    """A folder of frames: name -> (W, H) for a black PNG, or bytes written as they are."""
    from PIL import Image

    folder = ctx.work / "frames"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            Image.new("RGB", content, (20, 40, 60)).save(folder / name)
    return folder


VFR_PTS = [0, 40, 200, 230, 600, 610]   # milliseconds: gaps of 40, 160, 30, 370 and 10 ms


def variable_frame_rate(ctx: Ctx) -> Path:
    return encode(ctx.work / "vfr.mp4", render(len(VFR_PTS), (96, 64)), fps=None, pts=VFR_PTS,
                  time_base=Fraction(1, 1000))


def rotated(ctx: Ctx) -> Path:
    """Lossless (PNG in MOV) 128x64 frames with a 90-degree display rotation, and their upright twin
    (the same pixels turned a quarter counter-clockwise, 64x128, no rotation tag)."""
    frames = render(2, (128, 64))
    encode(ctx.work / "upright.mov", np.ascontiguousarray(np.rot90(frames, 1, axes=(1, 2))), codec="png",
           pix_fmt="rgb24")
    return encode(ctx.work / "phone.mov", frames, codec="png", pix_fmt="rgb24", rotation=90)


def yaml_file(ctx: Ctx, name: str, text: str) -> Path:
    path = ctx.work / name
    path.write_text(text)
    return path


def under_a_file(ctx: Ctx, *parts: str) -> Path:
    (ctx.work / "file.txt").write_text("x")
    return ctx.work.joinpath("file.txt", *parts)


def read_only_output(ctx: Ctx) -> Path:
    """An output inside a folder this process cannot write: chmod 0o500, or (root ignores modes)
    sysfs, where nobody can create files."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        folder = ctx.work / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        ctx.cleanups.append(lambda: folder.chmod(0o700))
        return folder / "result.mp4"
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root and /sys is not mounted: no folder here refuses root")
    return Path("/sys/tokenflow-fault-corpus.mp4")


def job(ctx: Ctx, name: str, extra: str = "", drop=()) -> Path:
    """A job file with video, prompt, output and model (minus ``drop``) plus ``extra`` lines."""
    base = {"video": f"'{ctx.clip}'", "prompt": "a glass sculpture", "output": f"'{ctx.out}'",
            "model": f"'{ctx.model}'", "inversion_steps": "10", "steps": "5", "size": "64x64", "frames": "5"}
    given = {line.split(":")[0] for line in extra.splitlines()}
    lines = [f"{key}: {value}" for key, value in base.items() if key not in drop and key not in given]
    return yaml_file(ctx, name, "\n".join(lines) + "\n" + extra)


def older_output(ctx: Ctx) -> Path:
    ctx.out.write_bytes(OLDER)
    return ctx.out


def other_job_output(ctx: Ctx) -> Path:
    """``ctx.out`` as the edit of another prompt wrote it (its record names that job's settings)."""
    from tokenflow.config import EditConfig

    from .test_output_naming import made_by

    made_by(EditConfig(video=str(ctx.clip), model=str(ctx.model), prompt="another prompt"), ctx.out)
    return kept(ctx, ctx.out)


def latin1_job(ctx: Ctx) -> Path:
    path = ctx.work / "job.yaml"
    path.write_bytes(f"video: '{ctx.clip}'\nprompt: caf\xe9\noutput: '{ctx.out}'\n".encode("latin-1"))
    return path


def alias_bomb(levels: int) -> str:
    """A YAML 'billion laughs': ``levels`` nested anchors, each nine aliases of the previous one."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


DEEP = "[" * 1000 + "]" * 1000


def model_copy(ctx: Ctx, name: str, change: Callable[[Path], None]) -> Path:
    folder = ctx.work / name
    shutil.copytree(ctx.model, folder)
    change(folder)
    return folder


def _pickle_unet(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    for weights in (folder / "unet").glob("*.safetensors"):
        torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
        weights.unlink()


def _truncate_unet(folder: Path) -> None:
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- special cases


def _cache_root() -> Path:
    from tokenflow.io.caches import default_cache_root

    return default_cache_root()   # tests/conftest.py points $TOKENFLOW_CACHE at a session folder


def _cache_entry(prompt: str) -> Path:
    for meta in (_cache_root() / "inversions").glob("*/meta.json"):
        if json.loads(meta.read_text())["key"]["prompt"] == prompt:
            return meta.parent
    raise AssertionError(f"no inversion cache entry for {prompt!r} under {_cache_root()}")


def _corrupt_prompt(ctx: Ctx) -> str:
    return f"fault corpus {ctx.root.name}"   # a cache entry of this case only


def _invert_then_corrupt(ctx: Ctx) -> None:
    done = run_cli(["invert", ctx.clip, "--model", ctx.model, *FAST_INVERT, "--inversion-prompt", _corrupt_prompt(ctx), "-q"])
    assert done.returncode == 0, done.stderr
    data = _cache_entry(_corrupt_prompt(ctx)) / "latents.safetensors"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = b"\xff" * 64   # flipped bits in the tensors: the checksum fails
    data.write_bytes(bytes(blob))


def _recomputed_with_a_warning(ctx: Ctx, res: Result) -> None:
    events = res.events()
    assert any(e["event"] == "warning" and "corrupt" in e["message"] for e in events), res.stdout[-2000:]
    done = [e for e in events if e["event"] == "done"][0]
    assert "invert" in done["stages"]   # not read from the damaged entry
    entry = _cache_entry(_corrupt_prompt(ctx))
    assert json.loads((entry / "meta.json").read_text())["sha256"] == _sha256(entry / "latents.safetensors")


def _invert_upright_twin(ctx: Ctx) -> None:
    done = run_cli(["invert", ctx.work / "upright.mov", "--model", ctx.model, *FAST_INVERT, "--size", "64x128",
                "--inversion-prompt", f"upright {ctx.root.name}", "-q"])
    assert done.returncode == 0, done.stderr


def _upright(ctx: Ctx, res: Result) -> None:
    """The rotated video decoded to exactly the pixels of its upright twin: the edit reused the
    twin's cached inversion, whose key is the sha256 of the decoded frames."""
    assert any("reusing cached" in e.get("message", "") for e in res.events()), res.stdout[-2000:]
    with av.open(str(res.out)) as container:
        frame = next(container.decode(video=0))
        assert frame.rotation == 0   # the pixels are upright; no rotation tag is passed on


def _partly_decodable(ctx: Ctx, res: Result) -> None:
    source = ctx.work / "half.mp4"
    expected = decodable_frames(source)
    assert 0 < expected < 24
    assert frames_of(res.out).shape[:3] == (expected, 64, 64)
    assert any(e["event"] == "warning" and f"ended after {expected} of the 24 frames" in e["message"]
               for e in res.events()), res.stdout[-2000:]


def _irregular_source(ctx: Ctx, res: Result) -> None:
    with av.open(str(ctx.work / "vfr.mp4")) as container:
        stream = container.streams.video[0]
        times = [round(float(frame.pts * stream.time_base) * 1000) for frame in container.decode(stream)]
    assert len({b - a for a, b in zip(times, times[1:])}) > 2, times   # really variable
    expect_video(len(VFR_PTS))(ctx, res)


def _marker_absent(ctx: Ctx, res: Result) -> None:
    assert not (ctx.work / "PWNED").exists(), "the YAML tag ran a command"


def _checkpoint_saved(ctx: Ctx, res: Result) -> None:
    saved = sorted(p.name for p in (ctx.work / "checkpoints").iterdir())
    assert saved and all(name.endswith(".pt") for name in saved), saved


def _lock_intact(ctx: Ctx, res: Result) -> None:
    assert not Path(str(ctx.out) + ".lock").exists()   # ours, released after the run; theirs never touched


def _not_skipped(ctx: Ctx, res: Result) -> None:
    assert ctx.out.read_bytes() == OLDER
    assert not [e for e in res.events() if e["event"] == "skipped"]


def _partial_kept(ctx: Ctx, res: Result) -> None:
    assert (ctx.work / "lat.npy").read_bytes() == OLDER


def _cache_warning(ctx: Ctx, res: Result) -> None:
    assert any(e["event"] == "warning" and "cache" in e["message"] for e in res.events()), res.stdout[-2000:]
    expect_video(5)(ctx, res)


# ----------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One fault: ``args(ctx)`` makes the input under ``ctx.work`` and returns the CLI arguments
    (``edit``/``invert`` get the tiny settings and ``-o`` added)."""

    id: str
    category: str
    what: str                       # what the input is (the docs' "input" column)
    how: str                        # how the test makes it
    code: int                       # the expected exit code
    needle: str                     # a fragment the error line must contain ("" for successes)
    args: Callable[[Ctx], list]
    answer: str = ""                # the expected answer, for the docs (default: from code and needle)
    check: Optional[Callable[[Ctx, Result], None]] = None
    older: bool = False             # an older output sits at the output path (and --overwrite is given)
    before: Optional[Callable[[Ctx], None]] = None
    runner: Optional[Callable] = None
    env: Optional[Callable[[Ctx], Dict[str, str]]] = None
    slow: bool = False              # runs (most of) an edit
    bug: str = ""                   # a known product bug: the case is an expected failure until fixed

    @property
    def background(self) -> bool:
        return not (self.slow or self.runner or self.before)

    def expected_answer(self) -> str:
        if self.answer:
            text = self.answer
        else:
            text = f"one line naming `{self.needle}`; no output"
            if self.older:
                text += ", the older output intact"
        if self.bug:
            text += f" — **known bug**: {self.bug}"
        return text


def _edit(video, *extra):
    return lambda x: ["edit", video(x) if callable(video) else video, "--model", x.model, "--prompt", "x", *extra]


def _flags(*extra):
    return lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", *extra]


VIDEO = [
    Case("missing-video", "video", "a path that does not exist", "`work/nope.mp4`", 3, "nope.mp4",
         lambda x: ["edit", x.work / "nope.mp4", "--model", x.model, "--prompt", "x"]),
    Case("corrupt-bytes", "video", "random bytes named .mp4", "4096 random bytes", 3, "corrupt.mp4",
         _edit(corrupt_bytes)),
    Case("empty-file", "video", "a 0-byte .mp4", "an empty file", 3, "empty.mp4",
         _edit(lambda x: yaml_file(x, "empty.mp4", ""))),
    Case("text-named-mp4", "video", "a text file named .mp4", "a line of text", 3, "notes.mp4",
         _edit(lambda x: yaml_file(x, "notes.mp4", "this is not a video\n"))),
    Case("zero-frames", "video", "a container with a video stream and no frames", "PyAV: AVI, mpeg4 stream, "
         "nothing encoded", 3, "empty.avi", _edit(empty_avi)),
    Case("truncated-unreadable", "video", "a valid MP4 cut to half its size, nothing decodable",
         "the 12-frame sample (faststart) truncated to 50%", 3, "truncated.mp4",
         _edit(lambda x: truncated(x, 12, "truncated.mp4"))),
    Case("truncated-partly-decodable", "video", "a valid MP4 cut to half its size, the first frames decodable",
         "the 24-frame sample truncated to 50% (6 frames decode), `--frames 24`", 0, "",
         _edit(lambda x: truncated(x, 24, "half.mp4"), "--frames", "24", "--log-json"),
         answer="succeeds with the frames that decode (fewer than asked) and a warning that the file ended "
                "early", check=_partly_decodable,
         slow=True),
    Case("audio-only", "video", "a file with no video stream", "an AAC tone in an MP4", 3, "has no video stream",
         _edit(audio_only)),
    Case("unknown-codec", "video", "a video stream no decoder knows", "an H.264 MP4 with its 'avc1' sample "
         "entry renamed 'zzzz'", 3, "mystery.mp4", _edit(unknown_codec)),
    Case("empty-folder", "video", "a folder without images", "an empty folder", 3, "work",
         lambda x: ["edit", x.work, "--model", x.model, "--prompt", "x"]),
    Case("images-differ-in-size", "video", "a folder of frames of different sizes", "0.png 64x64, 1.png 80x64", 3,
         "differ in size", _edit(lambda x: image_folder(x, {"0.png": (64, 64), "1.png": (80, 64)}))),
    Case("fake-png", "video", "a frames folder with a non-image named .png", "0.png real, 1.png text", 3, "1.png",
         _edit(lambda x: image_folder(x, {"0.png": (64, 64), "1.png": b"not a png"}))),
    Case("start-past-the-end", "video", "`--start 500` on a 12-frame clip", "the sample clip", 3, "500",
         _flags("--start", "500")),
    Case("one-frame", "video", "a one-frame video", "libx264, 1 frame 96x64", 0, "",
         _edit(lambda x: encode(x.work / "one.mp4", render(1, (96, 64)))),
         answer="succeeds: a 1-frame 64x64 output", check=expect_video(1), slow=True),
    Case("huge-dimensions", "video", "a 3000x2000 source", "libx264, 2 frames 3000x2000", 0, "",
         _edit(lambda x: encode(x.work / "huge.mp4", render(2, (3000, 2000)))),
         answer="succeeds: resized to `--size 64x64`, 2 frames", check=expect_video(2), slow=True),
    Case("odd-source-size", "video", "a 99x57 source (odd width and height)", "libx264 yuv444p, 3 frames 99x57",
         0, "", _edit(lambda x: encode(x.work / "odd.mp4", render(3, (99, 57)), pix_fmt="yuv444p")),
         answer="succeeds: resized to `--size 64x64`, 3 frames", check=expect_video(3), slow=True),
    Case("variable-frame-rate", "video", "a variable-frame-rate video", "libx264, 6 frames at pts 0, 40, 200, 230, "
         "600, 610 ms", 0, "", _edit(variable_frame_rate, "--frames", "6"),
         answer="succeeds: all 6 frames, 64x64", check=_irregular_source, slow=True),
    Case("rotation-metadata", "video", "phone footage: a display rotation of 90 degrees",
         "PNG-in-MOV 128x64 frames with a display matrix, and their upright twin", 0, "",
         lambda x: ["edit", rotated(x), "--model", x.model, "--prompt", "x", "--size", "64x128",
                    "--inversion-prompt", f"upright {x.root.name}", "--log-json"],
         answer="succeeds upright: decodes to exactly the upright twin's pixels (the edit reuses the twin's "
                "cached inversion, keyed by the frames' sha256); 64x128 output without a rotation tag",
         check=both(expect_video(2, (64, 128)), _upright), before=_invert_upright_twin, slow=True),
]


CONFIG = [   # flags and --config files of `tokenflow edit`
    Case("unsupported-size", "config", "`--size 100x100`", "flag", 2, "100x100", _flags("--size", "100x100")),
    Case("odd-size-request", "config", "`--size 100x60` (not multiples of 8)", "flag", 2, "100x60",
         _flags("--size", "100x60")),
    Case("negative-steps", "config", "`--steps -5`", "flag", 2, "steps", _flags("--steps", "-5")),
    Case("threshold-above-1", "config", "`--pnp-f-t 1.5`", "flag", 2, "pnp_f_t", _flags("--pnp-f-t", "1.5")),
    Case("spacing-below-1", "config", "`--keyframe-spacing 0`", "flag", 2, "keyframe_spacing",
         _flags("--keyframe-spacing", "0")),
    Case("empty-prompt", "config", "`--prompt '  '`", "flag", 2, "prompt",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "  "]),
    Case("no-prompt", "config", "no `--prompt`", "flags", 2, "prompt", lambda x: ["edit", x.clip, "--model", x.model]),
    Case("one-empty-prompt-of-two", "config", "`--prompt x --prompt ' '`", "flags", 2, "prompt",
         _flags("--prompt", " ")),
    Case("incompatible-steps", "config", "`--inversion-steps 50 --steps 30` (edit steps not inversion steps)",
         "flags", 2, "inversion", _flags("--inversion-steps", "50", "--steps", "30")),
    Case("bad-device", "config", "`--device tpu`", "flag", 2, "tpu", _flags("--device", "tpu")),
    Case("bad-dtype", "config", "`--dtype int8`", "flag", 2, "int8", _flags("--dtype", "int8")),
    Case("tiny-sdedit-start", "config", "`--method sdedit --sdedit-start 0.1`", "flags", 2, "sdedit_start",
         _flags("--method", "sdedit", "--sdedit-start", "0.1")),
    Case("chunk-below-1", "config", "`--chunk-frames 0`", "flag", 2, "chunk_frames", _flags("--chunk-frames", "0")),
    Case("bad-memory-budget", "config", "`--memory-budget lots`", "flag", 2, "memory_budget",
         _flags("--memory-budget", "lots")),
    Case("window-below-1", "config", "`--keyframe-window 0`", "flag", 2, "keyframe_window",
         _flags("--keyframe-window", "0")),
    Case("unknown-backend", "config", "`--attention-backend flash`", "flag", 2, "flash",
         _flags("--attention-backend", "flash")),
    Case("backend-that-cannot-run", "config", "`--attention-backend xformers` on CPU", "flag", 2, "xformers",
         _flags("--attention-backend", "xformers")),
    Case("config-bad-value", "config", "a --config file with `H: abc`", "YAML file", 2, "H=",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--config", yaml_file(x, "c.yaml", "H: abc\n")]),
    Case("config-missing", "config", "`--config` of a file that does not exist", "a path", 2, "none.yaml",
         lambda x: ["edit", "--config", x.work / "none.yaml"]),
    Case("config-unknown-key", "config", "a --config file with an unknown key", "`colour: red`", 2, "colour",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--config",
                    yaml_file(x, "c.yaml", "colour: red\n")]),
    Case("config-not-a-mapping", "config", "a --config file holding a list", "`- a` / `- b`", 2, "c.yaml",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--config", yaml_file(x, "c.yaml", "- a\n- b\n")]),
    Case("config-python-tag", "config", "a --config file with `!!python/object/apply:os.system`",
         "`prompt: !!python/object/apply:os.system [touch PWNED]`", 2, "c.yaml",
         lambda x: ["edit", x.clip, "--model", x.model, "--config", yaml_file(
             x, "c.yaml", f"prompt: !!python/object/apply:os.system ['touch {x.work / 'PWNED'}']\n")],
         answer="one line naming `c.yaml`; nothing executed (the marker file is not created); no output",
         check=_marker_absent),
    Case("config-deep-nesting", "config", "a --config value nested 1000 lists deep", "`H: [[[...]]]`", 2, "c.yaml",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--config", yaml_file(x, "c.yaml", f"H: {DEEP}\n")]),
    Case("config-alias-bomb", "config", "a --config prompt that is a YAML alias bomb ('billion laughs')",
         "5 levels of 9 aliases (59049 strings, 60 bytes of YAML per level)", 2, "prompt",
         lambda x: ["edit", x.clip, "--model", x.model, "--config", yaml_file(x, "c.yaml", f"prompt: {alias_bomb(5)}\n")]),
]


JOB_FILE = [   # `tokenflow run JOB.yaml` (tokenflow/app/jobfile/)
    Case("job-wrong-type", "job file", "`steps: many`", "a job file", 2, "steps:",
         lambda x: ["run", job(x, "job.yaml", "steps: many\n")]),
    Case("job-unknown-key", "job file", "`colour: red`", "a job file", 2, "colour: unknown key",
         lambda x: ["run", job(x, "job.yaml", "colour: red\n")]),
    Case("job-out-of-range", "job file", "`pnp_f_t: 1.5`", "a job file", 2, "pnp_f_t:",
         lambda x: ["run", job(x, "job.yaml", "pnp_f_t: 1.5\n")]),
    Case("job-no-video", "job file", "no `video` key", "a job file", 2, "video: is required",
         lambda x: ["run", job(x, "job.yaml", drop=("video",))]),
    Case("job-no-prompt", "job file", "no `prompt` key", "a job file", 2, "prompt: is required",
         lambda x: ["run", job(x, "job.yaml", drop=("prompt",))]),
    Case("job-video-not-on-disk", "job file", "`video:` names a file that does not exist", "a job file", 2,
         "video: no such file", lambda x: ["run", job(x, "job.yaml", f"video: '{x.work / 'gone.mp4'}'\n")]),
    Case("job-steps-above-inversion", "job file", "`steps: 60` with `inversion_steps: 50`", "a job file", 2,
         "steps: 60 exceeds", lambda x: ["run", job(x, "job.yaml", "steps: 60\ninversion_steps: 50\n")]),
    Case("job-yaml-syntax", "job file", "a YAML syntax error", "`video: [unclosed`", 2, "is not valid YAML",
         lambda x: ["run", yaml_file(x, "job.yaml", "video: [unclosed\nprompt: x\n")]),
    Case("job-duplicate-key", "job file", "a key given twice", "`prompt:` twice", 2, "given twice",
         lambda x: ["run", yaml_file(x, "job.yaml", f"video: '{x.clip}'\nprompt: a\nprompt: b\noutput: '{x.out}'\n")]),
    Case("job-python-tag", "job file", "`!!python/object/apply:os.system`", "`prompt: !!python/object/apply:"
         "os.system [touch PWNED]`", 2, "is refused",
         lambda x: ["run", job(x, "job.yaml", f"prompt: !!python/object/apply:os.system ['touch {x.work / 'PWNED'}']\n")],
         answer="one line: the tag is refused; nothing executed (the marker file is not created); no output",
         check=_marker_absent),
    Case("job-is-a-list", "job file", "a list instead of a mapping", "`- video: ...` / `- prompt: ...`", 2,
         "must be a mapping", lambda x: ["run", yaml_file(x, "job.yaml", f"- video: '{x.clip}'\n- prompt: x\n")]),
    Case("job-empty-file", "job file", "an empty job file", "0 bytes", 2, "is empty",
         lambda x: ["run", yaml_file(x, "job.yaml", "")]),
    Case("job-not-utf8", "job file", "a job file in Latin-1", "`prompt: café` encoded as Latin-1", 2, "not UTF-8",
         lambda x: ["run", latin1_job(x)]),
    Case("job-file-missing", "job file", "a job path that does not exist", "`work/nothere.yaml`", 2, "nothere.yaml",
         lambda x: ["run", x.work / "nothere.yaml"]),
    Case("job-deep-nesting", "job file", "a value nested 1000 lists deep", "`name: [[[...]]]`", 2, "job.yaml",
         lambda x: ["run", job(x, "job.yaml", f"name: {DEEP}\n")]),
    Case("job-alias-bomb", "job file", "a YAML alias bomb ('billion laughs')", "`name:` = 6 levels of 9 aliases "
         "(531441 strings from 400 bytes of YAML)", 2, "name:",
         lambda x: ["run", job(x, "job.yaml", f"name: {alias_bomb(6)}\n")]),
]


MODEL = [
    Case("missing-model", "model", "`--model` folder that does not exist", "`work/no-model`", 4, "no-model",
         lambda x: ["edit", x.clip, "--model", x.work / "no-model", "--prompt", "x"]),
    Case("unreachable-hub-model", "model", "a Hub id that cannot be fetched", "`someone/not-a-model` with "
         "HF_HUB_OFFLINE=1", 4, "--model", lambda x: ["edit", x.clip, "--model", "someone/not-a-model", "--prompt", "x"]),
    Case("model-is-a-file", "model", "`--model` names a file", "the sample clip", 4, "is a file",
         lambda x: ["edit", x.clip, "--model", x.clip, "--prompt", "x"]),
    Case("model-without-unet", "model", "a model folder missing `unet/`", "a copy of the tiny model without unet/",
         4, "missing unet", lambda x: ["edit", x.clip, "--model", model_copy(
             x, "no-unet", lambda f: shutil.rmtree(f / "unet")), "--prompt", "x"]),
    Case("pickle-only-weights", "model", "a model whose UNet has only pickle weights (.bin)", "the tiny model with "
         "unet/*.safetensors re-saved by torch.save as .bin", 4, "--allow-pickle",
         lambda x: ["edit", x.clip, "--model", model_copy(x, "pickled", _pickle_unet), "--prompt", "x"],
         answer="one line naming the .bin file, safetensors and `--allow-pickle`; nothing unpickled; no output",
         check=lambda x, r: _all_in(r.stderr, "safetensors", "diffusion_pytorch_model.bin")),
    Case("truncated-weights", "model", "a model whose UNet safetensors file is cut in half",
         "a copy of the tiny model, unet weights truncated", 4, "could not load the unet",
         lambda x: ["edit", x.clip, "--model", model_copy(x, "truncated", _truncate_unet), "--prompt", "x"]),
    Case("bad-tiny-seed", "model", "`--model tiny:abc`", "flag", 4, "tiny:abc",
         lambda x: ["edit", x.clip, "--model", "tiny:abc", "--prompt", "x"]),
    Case("missing-lora", "model", "`--lora` names a file that does not exist", "`--lora work/no.safetensors:0.8`", 4,
         "no.safetensors", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--lora",
                                      f"{x.work / 'no.safetensors'}:0.8"]),
    Case("not-a-lora", "model", "`--lora` names a safetensors file without LoRA weights", "one tensor `foo.weight`",
         4, "is not a LoRA", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--lora",
                                         _tensors_file(x, "plain.safetensors", {"foo.weight": (3, 3)})]),
    Case("embedding-of-another-width", "model", "`--embedding` trained for SD 1.x (768 wide) on the tiny model (32)",
         "`{'<x>': [1, 768]}`", 4, "width 768", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "a <x>",
                                                            "--embedding", _tensors_file(x, "e.safetensors",
                                                                                         {"<x>": (1, 768)})]),
    Case("controlnet-without-control", "config", "`--controlnet` without its `--control`", "flags", 2,
         "1 controlnet(s) but 0 control(s)", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x",
                                                         "--controlnet", x.work / "net"]),
    Case("depth-maps-on-a-plain-model", "config", "`--depth-maps` for a model without a depth input",
         "the tiny (4-channel) model", 2, "no depth model",
         lambda x: ["edit", x.clip, *FAST, "--model", x.model, "--prompt", "x", "--depth-maps", _depth_maps(x, 5)]),
    Case("depth-maps-count", "model", "`--depth-maps` with fewer maps than edited frames", "2 maps for 5 frames, "
         "`--model tiny-depth`", 3, "has 2 depth maps but the edit has 5 frames",
         lambda x: ["edit", x.clip, *FAST, "--model", "tiny-depth", "--prompt", "x", "--depth-maps", _depth_maps(x, 2)]),
    Case("pickle-single-file", "model", "`--model file.ckpt` without `--allow-pickle`", "a small pickle file", 4,
         "--allow-pickle", lambda x: ["edit", x.clip, "--model", _pickle_file(x), "--prompt", "x"],
         answer="one line naming the .ckpt, safetensors and `--allow-pickle`; nothing unpickled; no output"),
]


def _tensors_file(ctx: Ctx, name: str, shapes: Dict[str, tuple]) -> Path:
    """A safetensors file of zero tensors of ``shapes`` in the case's work folder."""
    import torch
    from safetensors.torch import save_file

    path = ctx.work / name
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


def _depth_maps(ctx: Ctx, count: int) -> Path:
    path = ctx.work / f"depth-{count}.npy"
    np.save(path, np.random.default_rng(0).random((count, 64, 64), dtype=np.float32))
    return path


def _pickle_file(ctx: Ctx) -> Path:
    path = ctx.work / "model.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.")   # an empty dict, pickled: never unpickled without --allow-pickle
    return path


ENVIRONMENT = [
    Case("output-under-a-file", "environment", "`-o` inside a path whose parent is a regular file",
         "`-o work/file.txt/o.mp4`", 5, "file.txt",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "-o", under_a_file(x, "o.mp4")]),
    Case("read-only-folder", "environment", "`-o` in a folder that cannot be written",
         "chmod 0o500 (as root, whom modes do not stop: a file in /sys)", 5, "cannot write output",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "-o", read_only_output(x)]),
    Case("latents-path-is-a-folder", "environment", "`--save-latents` names an existing folder", "a folder", 5,
         "is a folder", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--save-latents", x.work]),
    Case("frames-path-is-a-file", "environment", "`--save-frames` names an existing file", "a file", 5, "is a file",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--save-frames", under_a_file(x)]),
    Case("disk-full", "environment", "the disk fills up while the output is written",
         f"RLIMIT_FSIZE {FSIZE_LIMIT} bytes and SIGXFSZ ignored: writes past it fail with EFBIG; `--no-cache`", 5,
         "File too large", _flags("--no-cache"), older=True, runner=_disk_full, slow=True),
    # 200 inversion steps: the signal, sent when this process sees the event, lands in the
    # inversion even when a loaded machine delays it by seconds; the run stops there anyway
    Case("interrupted", "environment", "SIGTERM during the inversion, no checkpoint folder",
         "`--no-cache --log-json --inversion-steps 200`; SIGTERM at the `invert` stage_start event", 130, "SIGTERM",
         _flags("--no-cache", "--log-json", "--inversion-steps", "200"), older=True, runner=_sigterm_during_inversion,
         slow=True),
    Case("interrupted-with-checkpoint", "environment", "SIGTERM during the inversion with `--checkpoint-dir`",
         "as above, plus `--checkpoint-dir work/checkpoints`", 75, "--resume",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--no-cache", "--log-json",
                    "--inversion-steps", "200", "--checkpoint-dir", x.work / "checkpoints"],
         answer="one line naming `--resume`; a checkpoint (*.pt) saved; no output, the older output intact",
         older=True, runner=_sigterm_during_inversion, check=_checkpoint_saved, slow=True),
    Case("locked-output", "environment", "another live worker holds the output's lock",
         "this test process holds `result.mp4.lock` (tokenflow.app.locks.OutputLocks)", 7, "is locked by pid",
         _flags(), older=True, runner=_while_locked, check=_lock_intact),
    Case("budget-below-the-weights", "environment", "`--memory-budget 1MB`", "flag", 6, "--memory-budget",
         _flags("--memory-budget", "1MB")),
    Case("some-outputs-exist", "environment", "the latents of an earlier run exist, the video does not",
         "`--save-latents work/lat.npy` already there, no `--overwrite`", 5, "some outputs of this job exist",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--save-latents",
                    yaml_file(x, "lat.npy", OLDER.decode())],
         answer="one line naming the existing and the missing outputs and `--overwrite`; both left as they were",
         check=_partial_kept),
    Case("all-outputs-exist", "environment", "the output exists, made by something else, and `--overwrite` is not "
         "given (it used to be \"skipped\", exit 0)", "an older `result.mp4` (not a tokenflow output)", 5,
         "was not made by tokenflow", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x",
                                                 "-o", kept(x, older_output(x)), "--log-json"],
         answer="one line naming the output, that it records no settings, and `--overwrite` or another `-o`; the "
                "older output untouched", check=_not_skipped),
    Case("output-of-another-job", "environment", "the output exists, made by tokenflow with another prompt, and "
         "`--overwrite` is not given", "`result.mp4` recording the job `--prompt 'another prompt'`", 5,
         "made with other settings (the prompt: 'another prompt' there, 'x' now",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "-o", other_job_output(x)],
         answer="one line naming the output, the settings that differ (the prompt first) and `--overwrite` or "
                "another `-o`; the output untouched"),
    Case("bad-lock-ttl", "environment", "`TOKENFLOW_LOCK_TTL=abc`", "environment variable", 2, "TOKENFLOW_LOCK_TTL",
         _flags(), env=lambda x: {"TOKENFLOW_LOCK_TTL": "abc"}),
    Case("corrupt-cache-entry", "environment", "a damaged inversion cache entry",
         "`tokenflow invert`, then 64 bytes of its latents.safetensors overwritten", 0, "",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--inversion-prompt", _corrupt_prompt(x),
                    "--log-json"],
         answer="succeeds with a warning naming the corrupt entry; the inversion is recomputed and the entry "
                "replaced by a valid one", before=_invert_then_corrupt, check=_recomputed_with_a_warning, slow=True),
    Case("unwritable-cache", "environment", "`$TOKENFLOW_CACHE` cannot be created", "`TOKENFLOW_CACHE=work/file.txt/"
         "cache`", 0, "", _flags("--log-json"), env=lambda x: {"TOKENFLOW_CACHE": str(under_a_file(x, "cache"))},
         answer="succeeds with a warning that the inversion cache cannot be written; a 5-frame output",
         check=_cache_warning, slow=True),
]

# Reliability II (issue 16): each class below has its own list, filled by the change that closes it.
def _digest(path: Path) -> str:
    """sha256 of a file, or of every file's name and bytes under a folder."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode() + b"\0" + item.read_bytes())
        return digest.hexdigest()
    return _sha256(path) if path.exists() else "missing"


def kept(ctx: Ctx, path) -> Path:
    """``path``, an input the answer must leave byte-identical (``assert_answer`` compares digests)."""
    ctx.inputs[Path(path)] = _digest(Path(path))
    return Path(path)


def clip_copy(ctx: Ctx) -> Path:
    """A kept copy of the sample clip as work/clip.mp4: the shared clip is never a case's output."""
    path = ctx.work / "clip.mp4"
    shutil.copy(ctx.clip, path)
    return kept(ctx, path)


def link_to_clip(ctx: Ctx, kind: str) -> Path:
    """work/<kind>.mp4: a symbolic or hard link to a kept copy of the clip (itself kept)."""
    clip, link = clip_copy(ctx), ctx.work / f"{kind}.mp4"
    try:
        if kind == "symlink":
            link.symlink_to(clip)
        else:
            os.link(clip, link)
    except OSError as exc:
        pytest.skip(f"cannot make a {kind} here: {exc}")
    return kept(ctx, link)


def kept_folder(ctx: Ctx, name: str, files: Dict[str, bytes]) -> Path:
    folder = ctx.work / name
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return kept(ctx, folder)


def kept_frames(ctx: Ctx) -> Path:
    return kept(ctx, image_folder(ctx, {f"{i:05d}.png": (64, 64) for i in range(3)}))


def _alias(what: str) -> str:
    return f"one line naming the output and {what}; refused before any work, with or without --overwrite; " \
           "the input byte-identical, nothing written"


DATA_SAFETY: List[Case] = [   # an output that is, contains or lies inside an input; outputs we cannot write
    Case("output-is-the-input", "data safety", "`-o` is the input video, with `--overwrite`",
         "a copy of the sample clip as VIDEO and as `-o`", 5, "is the input video",
         lambda x: ["edit", clip_copy(x), "--model", x.model, "--prompt", "x", "-o", x.work / "clip.mp4",
                    "--overwrite"], answer=_alias("the input video")),
    Case("output-is-the-input-no-overwrite", "data safety", "`-o` is the input video, no `--overwrite`",
         "as above, without `--overwrite` (it used to be \"skipped: every output already exists\", exit 0)", 5,
         "is the input video", lambda x: ["edit", clip_copy(x), "--model", x.model, "--prompt", "x",
                                          "-o", x.work / "clip.mp4"], answer=_alias("the input video")),
    Case("output-symlink-to-input", "data safety", "`-o` is a symbolic link to the input video",
         "`work/symlink.mp4` -> `work/clip.mp4`, `--overwrite`", 5, "through a symbolic link",
         lambda x: ["edit", x.work / "clip.mp4", "--model", x.model, "--prompt", "x", "-o",
                    link_to_clip(x, "symlink"), "--overwrite"], answer=_alias("the symbolic link")),
    Case("output-hard-link-to-input", "data safety", "`-o` is a hard link to the input video",
         "`work/hardlink.mp4` = `work/clip.mp4` (os.link), `--overwrite`", 5, "is a hard link to the input video",
         lambda x: ["edit", x.work / "clip.mp4", "--model", x.model, "--prompt", "x", "-o",
                    link_to_clip(x, "hardlink"), "--overwrite"], answer=_alias("the hard link")),
    Case("output-inside-frame-folder", "data safety", "`-o` inside the input folder of frames",
         "VIDEO = `work/frames/` (3 PNGs), `-o work/frames/o.mp4`", 5, "lies inside the input frame folder",
         lambda x: ["edit", kept_frames(x), "--model", x.model, "--prompt", "x", "-o", x.work / "frames" / "o.mp4"],
         answer=_alias("the frame folder")),
    Case("frames-folder-holds-the-input", "data safety", "`--save-frames` is the folder holding the input video",
         "`--save-frames work` with VIDEO `work/clip.mp4`", 5, "save_frames",
         lambda x: ["edit", clip_copy(x), "--model", x.model, "--prompt", "x", "--save-frames", x.work,
                    "--overwrite"], answer=_alias("the input video it contains")),
    Case("checkpoint-dir-is-the-frame-folder", "data safety", "`--checkpoint-dir` is the input frame folder",
         "VIDEO `work/frames` (3 PNGs), `--checkpoint-dir work/frames`", 5, "is the input frame folder",
         lambda x: ["edit", kept_frames(x), "--model", x.model, "--prompt", "x", "--checkpoint-dir", x.work / "frames"],
         answer=_alias("the frames in it")),
    Case("latents-over-the-config-file", "data safety", "`--save-latents` is the `--config` file",
         "`--config work/c.yaml --save-latents work/c.yaml --overwrite`", 5, "is the --config file",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--config",
                    kept(x, yaml_file(x, "c.yaml", "seed: 1\n")), "--save-latents", x.work / "c.yaml", "--overwrite"],
         answer=_alias("the --config file")),
    Case("output-inside-the-model-folder", "data safety", "`-o` inside the local `--model` folder",
         "`--model work/model` (a folder), `-o work/model/o.mp4`", 5, "lies inside the model folder",
         lambda x: ["edit", x.clip, "--model", kept_folder(x, "model", {"model_index.json": b"{}"}), "--prompt", "x",
                    "-o", x.work / "model" / "o.mp4"], answer=_alias("the model folder")),
    Case("job-output-is-its-video", "data safety", "a job file whose `output` is its `video`",
         "`video:` and `output:` both `work/clip.mp4`", 2, "is the input video",
         lambda x: ["run", job(x, "job.yaml", f"video: '{clip_copy(x)}'\noutput: '{x.work / 'clip.mp4'}'\n"),
                    "--overwrite"], answer="one line `job.yaml: output: '...clip.mp4' is the input video ...`; "
                                           "nothing runs; the input byte-identical"),
    Case("job-report-holds-the-job-file", "data safety", "a job file whose `report` folder holds the job file",
         "`report: work` with the job file in `work/`", 2, "contains the job file",
         lambda x: ["run", kept(x, job(x, "job.yaml", f"report: '{x.work}'\n"))],
         answer="one line naming `report`, the folder and the job file; nothing runs; the job file byte-identical"),
    Case("output-not-a-video-name", "data safety", "`-o out.txt` (used to become a folder holding "
         "`<video>-pnp.mp4`)", "flag", 2, "ends in '.txt'",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "-o", x.work / "out.txt"],
         answer="one line naming `out.txt` and the containers tokenflow writes (.mp4, .m4v, .mov; .mov for "
                "prores, .mkv for ffv1) or a folder ending in '/'; nothing written"),
    Case("output-without-extension", "data safety", "`-o results` (no extension, not an existing folder)", "flag",
         2, "has no file extension", lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "-o",
                                                x.work / "results"]),
    Case("job-output-not-a-video-name", "data safety", "a job file with `output: result.txt`", "a job file", 2,
         "ends in '.txt'", lambda x: ["run", job(x, "job.yaml", f"output: '{x.work / 'result.txt'}'\n")]),
    Case("two-outputs-one-path", "data safety", "`--save-latents` at the video output's path", "`-o result.mp4 "
         "--save-latents result.mp4`", 5, "is also the save_latents output",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--save-latents", x.out]),
    Case("report-folder-holds-the-output", "data safety", "`--report` names the folder the video goes into",
         "`-o result.mp4 --report .` (the case's folder)", 5, "lies inside the report folder",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--report", x.root]),
    Case("checkpoint-file-is-an-input", "data safety", "`--checkpoint-dir` holds an input named as its own state "
         "file (it used to write over it and delete it, exit 0)", "`--embedding work/edit.pt --allow-pickle "
         "--checkpoint-dir work`", 5, "would write and then delete 'edit.pt'",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--allow-pickle", "--embedding",
                    kept(x, _file(x.work / "edit.pt", b"a user's embedding")), "--checkpoint-dir", x.work],
         answer=_alias("the embedding it would replace")),
    Case("metrics-json-is-the-source", "data safety", "`tokenflow metrics --json` at the source video (it used to "
         "write JSON over it)", "`metrics work/clip.mp4 EDIT --json work/clip.mp4`", 5, "is the source video",
         lambda x: ["metrics", clip_copy(x), x.clip, "--json", x.work / "clip.mp4"], answer=_alias("the video")),
    Case("farm-report-is-a-job-file", "data safety", "`tokenflow farm --report` at one of its job files (it used "
         "to overwrite it)", "`farm work/job.yaml --report work/job.yaml`", 5, "is the job file",
         lambda x: ["farm", kept(x, job(x, "job.yaml")),
                    "--ray", "local", "--report", x.work / "job.yaml"],
         answer="one line naming `--report` and the job file; nothing submitted; the job file byte-identical"),
]


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

def linked_frames(ctx: Ctx, n: int) -> Path:
    """A frames folder of ``n`` images: one 64x64 PNG and n - 1 symbolic links to it (cheap to make)."""
    folder = image_folder(ctx, {"0.png": (64, 64)})
    for index in range(1, n):
        os.symlink(folder / "0.png", folder / f"{index}.png")
    return folder


RESOURCES: List[Case] = [     # sizes and counts that cannot fit, numeric options out of range
    Case("size-beyond-host-memory", "resources", "`--size 65536x65536`", "flag (5 frames)", 6,
         "not enough host memory for 5 frames at 65536x65536", _flags("--size", "65536x65536"),
         answer="one line before anything is decoded or loaded: the GiB needed and usable, the largest `--size` "
                "that fits; no output, no lock", check=lambda x, r: _all_in(r.stderr, "GiB", "usable", "--size")),
    Case("invert-size-beyond-host-memory", "resources", "`tokenflow invert --size 65536x65536`", "flag (5 frames)",
         6, "not enough host memory for 5 frames at 65536x65536",
         lambda x: ["invert", x.clip, "--model", x.model, "--size", "65536x65536"]),
    Case("frames-beyond-host-memory", "resources", "a 10000-frame folder at `--size 4096x4096 --frames 0`",
         "one 64x64 PNG and 9999 symbolic links to it", 6, "not enough host memory for 10000 frames at 4096x4096",
         _edit(lambda x: linked_frames(x, 10_000), "--frames", "0", "--size", "4096x4096"),
         answer="one line naming the frame count (from the folder, before decoding), the GiB needed and usable "
                "and the most `--frames` that fit; no output", check=lambda x, r: _all_in(r.stderr, "--frames", "GiB")),
    Case("seed-overflow", "resources", "`--seed 99999999999999999999999` (beyond torch's 2^64-1)", "flag", 2,
         "seed: must be an integer in [0, 2^64-1]", _flags("--seed", "99999999999999999999999")),
    Case("guidance-nan", "resources", "`--guidance-scale nan`", "flag", 2, "guidance_scale: must be a number",
         _flags("--guidance-scale", "nan")),
    Case("fps-infinite", "resources", "`--fps inf`", "flag", 2, "fps: must be a number", _flags("--fps", "inf")),
    Case("frames-too-many", "resources", "`--frames 99999999999`", "flag", 2, "frames: must be an integer in [1, ",
         _flags("--frames", "99999999999")),
    Case("memory-budget-overflow", "resources", "`--memory-budget 1e999` (infinite bytes)", "flag", 2,
         "memory_budget", _flags("--memory-budget", "1e999")),
    Case("window-too-large", "resources", "`--keyframe-window 1000000`", "flag", 2, "keyframe_window",
         _flags("--keyframe-window", "1000000")),
    Case("job-seed-out-of-range", "resources", "`seed: 99999999999999999999999` in a job file", "a job file", 2,
         "seed: must be an integer", lambda x: ["run", job(x, "job.yaml", "seed: 99999999999999999999999\n")]),
]

def _dead_owner(boot: Optional[str] = None, machine: Optional[str] = None, pid: int = 99_999_999) -> str:
    """An owner token (tokenflow.io.owners) of a process that is gone: by default a dead pid of this
    machine; ``boot``/``machine``: another boot of this machine, another machine."""
    from tokenflow.io import owners

    return owners.Owner(pid, None, machine or owners.MACHINE_TAG, boot or owners.BOOT_TAG).token


def _other_boot() -> str:
    from tokenflow.io import owners

    return "00000001" if owners.BOOT_TAG != "00000001" else "00000002"


def _plant_lock(target: Path, pid: int, boot: Optional[str] = None, age: float = 0.0) -> Path:
    """A lock record of ``pid`` on this machine, as `tokenflow.app.locks` writes it."""
    from tokenflow.io import owners

    now = time.time() - age
    path = Path(str(target) + ".lock")
    path.write_text(json.dumps({"pid": pid, "host": owners.HOST, "started": now, "heartbeat": now, "token": "planted",
                                "output": str(target), "boot": boot or owners.BOOT, "pidns": owners.PIDNS,
                                "machine": owners.MACHINE_TAG}))
    return path


def _plant_dead_writers_temps(ctx: Ctx) -> None:
    """What `tokenflow edit -o result.mp4 --save-frames work/frames` leaves when killed while it writes:
    the staged video, the encoder's temp inside it (a temp of a temp), a staged frames folder; and,
    killed while it stored its inversion, a cache entry's temp folder (the case's own cache)."""
    dead = _dead_owner()
    (ctx.root / f".result.mp4.tmp-{dead}-0badc0de.new.mp4").write_bytes(b"a complete staged video")
    (ctx.root / f"..result.mp4.tmp-{dead}-0badc0df.new.mp4.tmp-{dead}-0badc0e0.mp4").write_bytes(b"half")
    staged = ctx.work / f".frames.tmp-{dead}-0badc0e1.new"
    staged.mkdir()
    (staged / "00000.png").write_bytes(b"png")
    entry = ctx.work / "cache" / "inversions" / f".{'0' * 32}.tmp-{dead}-0badc0e2"
    entry.mkdir(parents=True)
    (entry / "latents.safetensors").write_bytes(b"half")


def _dead_temps_swept(ctx: Ctx, res: Result) -> None:
    expect_video(5)(ctx, res)
    assert sorted(p.name for p in (ctx.work / "frames").iterdir()) == [f"{i:05d}.png" for i in range(5)] + [
        "tokenflow-job.json"]   # the frames and the job's record, nothing of the dead writer's
    removed = [e["message"] for e in res.events() if e["event"] == "info" and e["message"].startswith("removed")]
    assert len(removed) == 3 and all("pid 99999999 on this machine has exited" in m for m in removed), removed
    inversions = ctx.work / "cache" / "inversions"   # the cache's temp went when the cache was read
    assert [p.name for p in inversions.iterdir() if p.name.startswith(".")] == []
    assert len(list(inversions.glob("*/meta.json"))) == 1


def _plant_lock_and_guard(ctx: Ctx) -> None:
    """A worker killed while it released its lock: the lock and its removal guard, both naming a dead pid."""
    _plant_lock(ctx.out, 99_999_999)
    (ctx.root / ".result.mp4.lock.break").write_text(_dead_owner())


def _lock_broken(ctx: Ctx, res: Result) -> None:
    expect_video(5)(ctx, res)
    assert any("broke the stale lock" in e.get("message", "") and "pid 99999999 on this machine has exited"
               in e["message"] for e in res.events()), res.stdout[-2000:]


def _plant_other_boot(ctx: Ctx) -> None:
    """A lock and a staged video of pid 1 (alive now) written during another boot of this machine."""
    from tokenflow.io import owners

    if not owners.STRONG_ID:   # docs/checkpoints.md: without a machine id, another boot is another machine
        pytest.skip("this machine has no strong identity (machine id, initial PID namespace): "
                    "another boot is judged by age here (tests/test_leftovers.py covers that)")
    _plant_lock(ctx.out, 1, boot="an-earlier-boot")
    (ctx.root / f".result.mp4.tmp-{_dead_owner(boot=_other_boot(), pid=1)}-0badc0de.new.mp4").write_bytes(b"old")


def _other_boot_swept(ctx: Ctx, res: Result) -> None:
    expect_video(5)(ctx, res)
    rebooted = [e["message"] for e in res.events() if "machine has rebooted since" in e.get("message", "")]
    assert len(rebooted) == 2, res.stdout[-2000:]   # the lock and the temp


def _plant_other_machine(ctx: Ctx) -> None:
    """A staged video of a worker on another machine, untouched for 5 minutes (TTL 60 s)."""
    temp = ctx.root / f".result.mp4.tmp-{_dead_owner(machine='0123456789ab', boot='00c0ffee', pid=4242)}-0badc0de.new.mp4"
    temp.write_bytes(b"theirs")
    then = time.time() - 300
    os.utime(temp, (then, then))


def _other_machine_swept(ctx: Ctx, res: Result) -> None:
    expect_video(5)(ctx, res)
    assert any("written on another machine" in e.get("message", "") for e in res.events()), res.stdout[-2000:]


def _beside_a_live_writer(ctx: Ctx, argv: List[str], env: dict) -> subprocess.CompletedProcess:
    """The CLI while another live process (no lock: a Python API user) writes result.mp4 through
    atomic_file; then that writer is killed and the next sweep of result.mp4 removes its temp."""
    from tokenflow.io.outputs import sweep_temps

    child = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(ctx.out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=_env({"PYTHONPATH": str(ROOT)}))
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        temps = [p for p in ctx.root.iterdir() if p.name.startswith(".result.mp4.tmp-")]
        done = run_cli(argv, env)
        kept = [p.name for p in temps if p.exists()]
    finally:
        child.kill()
        child.communicate()
    swept = sweep_temps(ctx.out)
    (ctx.work / "live-writer.json").write_text(json.dumps({"temps": [p.name for p in temps], "kept": kept,
                                                          "swept": swept, "child": child.pid}))
    return done


def _live_writer_kept(ctx: Ctx, res: Result) -> None:
    expect_video(5)(ctx, res)
    seen = json.loads((ctx.work / "live-writer.json").read_text())
    assert len(seen["temps"]) == 1 and seen["kept"] == seen["temps"], seen   # alive: left alone during the run
    assert len(seen["swept"]) == 1 and f"pid {seen['child']} on this machine has exited" in seen["swept"][0], seen


LEFTOVERS: List[Case] = [     # temp files and locks of killed writers
    Case("leftover-temps-of-a-dead-pid", "leftovers", "temps of a killed writer of this machine next to the outputs "
         "and in the cache", "`.result.mp4.tmp-<dead pid>-…` (a staged video and a temp of a temp), a staged "
         "`.frames.tmp-<dead pid>-….new/` folder, `$TOKENFLOW_CACHE/inversions/.<key>.tmp-<dead pid>-…/`; "
         "`--save-frames work/frames --log-json`", 0, "",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", "--save-frames", x.work / "frames", "--log-json"],
         before=_plant_dead_writers_temps, check=_dead_temps_swept,
         env=lambda x: {"TOKENFLOW_CACHE": str(x.root / "work" / "cache")},
         answer="succeeds; the output's temps are removed once its locks are held (an `info` event each: the pid "
                "has exited), the cache's when the cache is read; a 5-frame output and 5 frames", slow=True),
    Case("leftover-lock-and-guard-of-a-dead-pid", "leftovers", "a killed worker's lock and removal guard",
         "`result.mp4.lock` and `.result.mp4.lock.break` naming a dead pid of this machine", 0, "",
         _flags("--log-json"), before=_plant_lock_and_guard, check=_lock_broken,
         answer="succeeds at once: the guard of a dead remover is taken over without waiting 30 s, the lock "
                "broken (`info`: the pid has exited); a 5-frame output, no lock or guard left", slow=True),
    Case("leftover-from-another-boot", "leftovers", "a lock and a temp written during an earlier boot of this machine",
         "both name pid 1, alive now, and another boot id", 0, "", _flags("--log-json"), before=_plant_other_boot,
         check=_other_boot_swept,
         answer="succeeds: both removed (`info`: the machine has rebooted since), although pid 1 runs", slow=True),
    Case("leftover-temp-of-another-machine", "leftovers", "a staged video of a worker on another machine, untouched "
         "for longer than the lock TTL", "owner token with another machine tag, mtime 5 min ago, "
         "`TOKENFLOW_LOCK_TTL=60`", 0, "", _flags("--log-json"), before=_plant_other_machine,
         check=_other_machine_swept, env=lambda x: {"TOKENFLOW_LOCK_TTL": "60"},
         answer="succeeds: removed under the output's lock (`info`: written on another machine, untouched for "
                "more than the TTL); younger ones, or without the lock an hour, are left alone", slow=True),
    Case("leftover-live-writers-temp", "leftovers", "a temp of a live writer next to the output",
         "a child process holds `atomic_file(result.mp4)` open during the edit, then is killed", 0, "",
         _flags(), runner=_beside_a_live_writer, check=_live_writer_kept,
         answer="succeeds; the live writer's temp is left alone, and removed by the next sweep once that writer "
                "is killed", slow=True),
]

def root_folder(ctx: Ctx, name: str = "root") -> Path:
    folder = ctx.work / name
    folder.mkdir(exist_ok=True)
    return folder


def symlink_out_of_root(ctx: Ctx) -> Path:
    """work/root/out -> the case's folder (outside work/root): an output path through it escapes."""
    (root_folder(ctx) / "out").symlink_to(ctx.root, target_is_directory=True)
    return ctx.work / "root" / "out" / "o.mp4"


RESUMABLE = ("--no-cache", "--inversion-steps", "200")


def _checkpoint_from_another_machine(ctx: Ctx) -> None:
    """A checkpoint as another machine would leave it: an edit stopped by SIGTERM during the
    inversion, its saved environment then claiming 999 torch threads."""
    import torch

    argv = ["edit", *FAST, ctx.clip, "--model", ctx.model, "--prompt", "x", *RESUMABLE, "--log-json",
            "--checkpoint-dir", ctx.work / "checkpoints", "-o", ctx.out]
    done = _sigterm_during_inversion(ctx, [str(a) for a in argv], {})
    assert done.returncode == 75, done.stderr[-2000:]
    for state_file in (ctx.work / "checkpoints").glob("*.pt"):
        state = torch.load(state_file, weights_only=True)
        state["environment"]["threads"] = 999
        torch.save(state, state_file)


def _checkpoint_kept(ctx: Ctx, res: Result) -> None:
    assert "torch threads: checkpoint 999" in res.stderr, res.stderr
    assert sorted(p.suffix for p in (ctx.work / "checkpoints").iterdir()) == [".pt"], "the checkpoint was not kept"


FARM: List[Case] = [          # --output-root / --input-root confinement, resume across machines
    Case("output-root-dotdot-escape", "farm", "a job whose `output` climbs out of `--output-root` with `..`",
         "`tokenflow run job.yaml --output-root work/root`, `output: work/root/../escaped.mp4`", 2,
         "outside --output-root",
         lambda x: ["run", job(x, "job.yaml", f"output: '{root_folder(x)}/../escaped.mp4'\n"),
                    "--output-root", x.work / "root"],
         answer="one line naming the job file, `output`, the path and the root; nothing runs"),
    Case("output-root-symlink-escape", "farm", "a job whose `output` leaves `--output-root` through a symlink",
         "`work/root/out` -> outside, `output: work/root/out/o.mp4`", 2, "resolves to",
         lambda x: ["run", job(x, "job.yaml", f"output: '{symlink_out_of_root(x)}'\n"),
                    "--output-root", x.work / "root"],
         answer="one line naming `output`, the path, where it resolves to and the root; nothing runs"),
    Case("farm-checkpoint-outside-output-root", "farm", "a farm job whose own `checkpoint_dir` is outside "
         "`--output-root`", "`tokenflow farm job.yaml --ray local --output-root work/root`, output inside, "
         "`checkpoint_dir` outside", 2, "checkpoint_dir: ",
         lambda x: ["farm", job(x, "job.yaml", f"output: '{root_folder(x)}/o.mp4'\ncheckpoint_dir: '{x.root}/ck'\n"),
                    "--ray", "local", "--output-root", x.work / "root", "--report", x.work / "farm.json"],
         answer="one line naming `checkpoint_dir` and the root; nothing submitted, Ray never contacted"),
    Case("input-root-video-escape", "farm", "a job whose `video` is outside `--input-root`",
         "`tokenflow run job.yaml --input-root work/in` with the shared sample clip", 2, "outside --input-root",
         lambda x: ["run", job(x, "job.yaml", "model: tiny\n"), "--input-root", root_folder(x, "in")],
         answer="one line naming `video`, the path and the root; nothing runs"),
    Case("farm-model-outside-input-root", "farm", "a farm job whose local `model` folder is outside "
         "`--input-root`", "video inside `work/in`, `model:` the shared tiny model folder", 2, "model: ",
         lambda x: ["farm", job(x, "job.yaml", f"video: '{shutil.copy(x.clip, root_folder(x, 'in'))}'\n"),
                    "--ray", "local", "--input-root", x.work / "in", "--report", x.work / "farm.json"],
         answer="one line naming `model`, the folder and the root; nothing submitted"),
    Case("output-root-missing", "farm", "`--output-root` names no folder", "`--output-root work/nope`", 2,
         "does not exist", lambda x: ["run", job(x, "job.yaml"), "--output-root", x.work / "nope"]),
    Case("strict-resume-another-machine", "farm", "`--resume --strict-resume` of a checkpoint saved with another "
         "torch thread count", "an edit stopped by SIGTERM with `--checkpoint-dir`, its state's recorded threads "
         "set to 999", 2, "--strict-resume",
         lambda x: ["edit", x.clip, "--model", x.model, "--prompt", "x", *RESUMABLE, "--checkpoint-dir",
                    x.work / "checkpoints", "--resume", "--strict-resume"],
         answer="one line naming the difference (torch threads 999) and `--strict-resume`; the checkpoint kept; "
                "no output", before=lambda x: _checkpoint_from_another_machine(x), check=lambda x, r: _checkpoint_kept(x, r),
         slow=True),
]

CORPUS: List[Case] = VIDEO + CONFIG + JOB_FILE + MODEL + ENVIRONMENT + DATA_SAFETY + RESOURCES + LEFTOVERS + FARM
CASES: Dict[str, Case] = {case.id: case for case in CORPUS}


def _all_in(text: str, *needles: str) -> None:
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text[-1000:]!r}"


# ----------------------------------------------------------------------------- the tests


def _params():
    for case in CORPUS:
        marks = [pytest.mark.xfail(strict=True, reason=f"known bug: {case.bug}")] if case.bug else []
        yield pytest.param(case.id, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def background(request, tmp_path_factory, tiny_model_dir, sample_clip):
    """The selected fast cases, run WORKERS at a time from the first test on: {id: Future of (ctx, result)}."""
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_fault_case" and Path(str(item.fspath)) == Path(__file__)]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fault-corpus")
    futures = {}
    for case_id in selected:
        if CASES[case_id].background:
            ctx = Ctx(tmp_path_factory.mktemp(f"fault-{case_id}"), Path(tiny_model_dir), Path(sample_clip))
            futures[case_id] = pool.submit(lambda c, x: (x, run_case(c, x)), CASES[case_id], ctx)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case_id", list(_params()))
def test_fault_case(case_id, background, tmp_path, tiny_model_dir, sample_clip):
    case = CASES[case_id]
    if case_id in background:
        ctx, res = background[case_id].result()
    else:
        ctx = Ctx(tmp_path, Path(tiny_model_dir), Path(sample_clip))
        res = run_case(case, ctx)
    try:
        assert_answer(case, ctx, res)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()


def test_corpus_is_well_formed():
    assert len(CORPUS) >= 100 and len(CASES) == len(CORPUS), "case ids must be unique"
    for case in CORPUS:
        assert case.category in CATEGORIES, case.id
        assert case.code in (0, *EXIT_NAMES), case.id
        assert bool(case.needle) == bool(case.code), case.id   # failures name something; successes need a check
        assert case.code or case.check, case.id
    assert {case.category for case in CORPUS} == set(CATEGORIES)


def test_docs_list_every_case():
    text = DOC.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{DOC} lacks the table markers"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    missing = [case.id for case in CORPUS if f"`{case.id}`" not in table]
    assert not missing, f"{DOC} does not list {missing}: run `python -m tests.test_fault_corpus --write`"
    assert table == markdown_table().strip(), f"{DOC} is out of date: run `python -m tests.test_fault_corpus --write`"


@pytest.fixture(scope="module")
def twin_edits(tmp_path_factory, tiny_model_dir, sample_clip) -> Path:
    """The same tiny edit run twice in fresh processes (same seed and settings, CPU float32, no
    cache): a.mp4/a.npy/a-frames and b.mp4/b.npy/b-frames."""
    folder = tmp_path_factory.mktemp("determinism")
    for name in ("a", "b"):
        done = cli(["edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--inversion-prompt",
                    "shapes", *FAST, "--seed", "3", "--dtype", "float32", "--no-cache", "-o", folder / f"{name}.mp4",
                    "--save-latents", folder / f"{name}.npy", "--save-frames", folder / f"{name}-frames", "-q"])
        assert done.returncode == 0, done.stderr
    return folder


def test_same_seed_and_settings_give_bit_identical_latents_and_frames_on_cpu(twin_edits):
    a, b = np.load(twin_edits / "a.npy"), np.load(twin_edits / "b.npy")
    assert a.shape == (5, 4, 8, 8) and np.array_equal(a, b)
    pngs = sorted(p.name for p in (twin_edits / "a-frames").iterdir() if p.name != "tokenflow-job.json")   # + the record
    assert pngs == [f"{i:05d}.png" for i in range(5)]
    for name in pngs:   # the edited frames, before video encoding
        assert (twin_edits / "a-frames" / name).read_bytes() == (twin_edits / "b-frames" / name).read_bytes(), name


def test_same_seed_and_settings_give_identical_videos_on_cpu(twin_edits):
    frames_a, frames_b = frames_of(twin_edits / "a.mp4"), frames_of(twin_edits / "b.mp4")
    assert frames_a.shape == (5, 64, 64, 3) and np.array_equal(frames_a, frames_b)
    assert (twin_edits / "a.mp4").read_bytes() == (twin_edits / "b.mp4").read_bytes()


# ----------------------------------------------------------------------------- the docs' table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The table of docs/faults.md, one row per case, grouped by category."""
    rows = ["| case | category | input | how the test makes it | exit | expected answer |",
            "| --- | --- | --- | --- | --- | --- |"]
    for category in CATEGORIES:
        for case in (c for c in CORPUS if c.category == category):
            code = f"{case.code} (`{EXIT_NAMES[case.code]}`)" if case.code else "0"
            rows.append(f"| `{case.id}` | {category} | {_cell(case.what)} | {_cell(case.how)} | {code} | "
                        f"{_cell(case.expected_answer())} |")
    return "\n".join(rows) + "\n"


def write_doc_table(path: Path = DOC) -> None:
    text = path.read_text()
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n{markdown_table()}{TABLE_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_doc_table()
    else:
        print(markdown_table(), end="")
