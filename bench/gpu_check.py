"""One command that measures what issue 18 owes on a GPU, inside a global deadline (default 470 s).

Stages run in priority order, each in its own subprocess (``--run-stage N``, bodies in
``bench/gpu_check_stages.py``) with its own timeout, never beyond what is left of the global deadline:

  0 machine        device, memory, copy bandwidth (H2D, D2D), fp16/bf16 matmul TFLOP/s
  1 triton_warmup  autotune + compile the Triton kernels at the SD 2.1 shapes (fp16 first, then bf16)
  2 gpu_tests      ``pytest -m gpu tests/gpu`` (TRITON_INTERPRET unset)
  3 kernels        keyframe attention vs every SDPA backend, nearest vs matmul+argmax, gather vs copy
  4 end_to_end     SD 2.1-base (random weights) 512^2, 40 then 200 frames, few steps, extrapolated
  5 compile        --backend compile vs eager
  6 original       the original implementation's 40-frame run (reference kit in .gpu/kit) if time remains

As it goes it appends JSON lines to ``<out>/gpu_check.jsonl`` and rewrites ``<out>/gpu_check_summary.json``
(every stage's result, the issue's targets beside the measured values) after every stage and on
SIGTERM; stage output goes to ``<out>/gpu_check.log``. It ends with one PASS/FAIL/SKIP line per stage.
Exit status: 0 when no stage failed, 1 otherwise, 143 after SIGTERM.

``--dry-run``: the same code paths on the CPU at tiny shapes (Triton interpreter, tiny model): CUDA-only
parts record SKIP with the reason. It runs in CI (tests/test_gpu_check.py).

    python bench/gpu_check.py --out $OUT                 # on the GPU machine (docs/benchmarks.md)
    python bench/gpu_check.py --dry-run --out /tmp/gc    # anywhere, ~30 s
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"
KIT = ROOT / ".gpu" / "kit" / "gpu_run.sh"   # the reference kit (../shared/reference/gpu_kit.sh)
DEADLINE_S = 470.0
RESERVE_S = 4.0        # kept back from every stage for killing it and writing the summary
MIN_STAGE_S = 3.0      # a stage is not started with less than this left
SCHEMA = 1


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    timeout_s: float           # its own limit on a GPU (the global deadline may cut it shorter)
    dry_timeout_s: float       # and in the dry run
    interpret: bool = False    # dry run: the stage runs Triton kernels through the interpreter


STAGES = [
    Stage(0, "machine", 40, 60),
    Stage(1, "triton_warmup", 60, 60, interpret=True),
    Stage(2, "gpu_tests", 150, 90),
    Stage(3, "kernels", 90, 90, interpret=True),
    Stage(4, "end_to_end", 170, 120),
    Stage(5, "compile", 150, 120),
    Stage(6, "original", 540, 30),
]

# the targets on the H200: (stage, key in that stage's "measured", goal text, test)
TARGETS = [
    (3, "attention_triton_tflops", "keyframe attention >= 350 TFLOP/s (S=4096, 5 heads, D=64, K=25, fp16)",
     lambda v: v >= 350.0),
    (3, "attention_triton_vs_best_sdpa", "keyframe attention >= the best SDPA backend (ratio >= 1)",
     lambda v: v >= 1.0),
    (3, "nearest_speedup_vs_matmul_argmax", "nearest >= 5x fp16 matmul+argmax (S=4096, C=320)", lambda v: v >= 5.0),
    (4, "extrapolated_s_200_frames", "SD 2.1-base 512^2, 200 frames, 50+50 steps <= 100 s (extrapolated)",
     lambda v: v <= 100.0),
    (4, "peak_reserved_gb_200_frames", "peak reserved memory at 200 frames <= 16 GB", lambda v: v <= 16.0),
    (6, "original_over_ours_40_frames", "the original's 40-frame run beside ours (ratio, > 1: ours faster)",
     None),
]


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


class Check:
    """The run: results so far, the JSON-lines file, the summary, the log."""

    def __init__(self, out: Path, deadline_s: float, dry_run: bool, stages: List[Stage]):
        self.out, self.deadline_s, self.dry_run, self.stages = out, deadline_s, dry_run, stages
        self.start = time.monotonic()
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.results: Dict[str, dict] = {}
        self.interrupted: Optional[str] = None
        out.mkdir(parents=True, exist_ok=True)
        self.lines = out / "gpu_check.jsonl"
        self.summary_path = out / "gpu_check_summary.json"
        self.log = out / "gpu_check.log"
        for path in (self.lines, self.log):
            path.write_text("")

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)

    def event(self, **fields) -> None:
        fields = {"time": round(time.time(), 3), "elapsed_s": round(time.monotonic() - self.start, 3), **fields}
        with open(self.lines, "a") as f:
            f.write(json.dumps(fields, default=str) + "\n")

    def record(self, stage: Stage, result: dict) -> None:
        self.results[stage.name] = {"stage": stage.number, **result}
        self.event(event="stage_end", name=stage.name, **result)
        self.write_summary()

    def targets(self) -> List[dict]:
        rows = []
        by_number = {s.number: s.name for s in STAGES}
        for number, key, goal, test in TARGETS:
            measured = (self.results.get(by_number[number]) or {}).get("measured", {}).get(key)
            met = None if measured is None or test is None or self.dry_run else bool(test(measured))
            rows.append({"stage": number, "key": key, "goal": goal, "measured": measured, "met": met})
        return rows

    def write_summary(self) -> None:
        doc = {"schema": SCHEMA, "what": "bench/gpu_check.py: GPU checks and measurements of issue 18",
               "dry_run": self.dry_run, "started": self.started, "deadline_s": self.deadline_s,
               "elapsed_s": round(time.monotonic() - self.start, 3), "command": [Path(sys.executable).name, *sys.argv],
               "interrupted": self.interrupted,
               "complete": len(self.results) == len(self.stages),
               "stages": self.results, "targets": self.targets()}
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")
        os.replace(tmp, self.summary_path)

    def status_lines(self) -> List[str]:
        lines = []
        for stage in self.stages:
            r = self.results.get(stage.name, {"status": "SKIP", "reason": "not reached"})
            seconds = f"{r['seconds']:7.1f} s" if isinstance(r.get("seconds"), (int, float)) else "        -"
            lines.append(f"gpu_check stage {stage.number} {stage.name:14s} {r['status']:4s} {seconds}  "
                         f"{r.get('reason', '')}".rstrip())
        return lines


def child_env(stage: Stage, dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    # stage 1's autotuning results serve the later stages' processes (Triton's on-disk cache)
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    # real kernels on a GPU; in the dry run the interpreter, for the stages that run Triton kernels
    env.pop("TRITON_INTERPRET", None)
    if dry_run and stage.interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_stage(check: Check, stage: Stage, context: Path) -> dict:
    """Run ``stage`` in its own process group; its result (partial if it was killed)."""
    own = stage.dry_timeout_s if check.dry_run else stage.timeout_s
    left = check.left() - RESERVE_S
    if left < MIN_STAGE_S:
        return {"status": "SKIP", "reason": f"global deadline: {max(0.0, check.left()):.0f} s left", "seconds": 0.0}
    limit = min(own, left)
    if stage.name == "original" and not KIT.exists():   # no process (and no torch import) for nothing
        return {"status": "SKIP", "reason": f"reference kit not prepared ({KIT.relative_to(ROOT)}; "
                                            "docs/benchmarks.md says how)", "seconds": 0.0}
    result_file = check.out / f".stage{stage.number}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", str(stage.number), "--result",
           str(result_file), "--context", str(context), "--time-limit", f"{limit:.1f}"]
    if check.dry_run:
        cmd.append("--dry-run")
    started = time.monotonic()
    with open(check.log, "a") as log:
        log.write(f"\n===== stage {stage.number} {stage.name} (timeout {limit:.0f} s) =====\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(stage, check.dry_run), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        check.event(event="stage_start", name=stage.name, number=stage.number, timeout_s=round(limit, 1), pid=proc.pid)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
        except Interrupted as exc:
            _kill(proc)
            partial = _read(result_file)
            result_file.unlink(missing_ok=True)
            result_file.with_suffix(".tmp").unlink(missing_ok=True)
            check.results[stage.name] = {"stage": stage.number, **partial, "status": "SKIP",
                                         "reason": f"interrupted by {exc} after {time.monotonic() - started:.0f} s "
                                                   "(partial results kept)"}
            raise
    seconds = time.monotonic() - started
    result = _read(result_file)
    result_file.unlink(missing_ok=True)
    result_file.with_suffix(".tmp").unlink(missing_ok=True)   # a write the kill interrupted
    result["seconds"] = round(seconds, 2)
    if timed_out:
        cut = limit < own
        result["status"] = "SKIP" if cut else "FAIL"
        result["reason"] = (f"stopped at the global deadline after {seconds:.0f} s (partial results kept)" if cut
                            else f"timed out after its {own:.0f} s (partial results kept)")
        result["timed_out"] = True
    elif proc.returncode != 0 and result.get("status") != "FAIL":
        result["status"] = "FAIL"
        result["reason"] = f"exit status {proc.returncode} (see gpu_check.log)" + \
            (f"; {result['reason']}" if result.get("reason") else "")
    result.setdefault("status", "FAIL")
    return result


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": "the stage wrote no result"}


def orchestrate(args) -> int:
    chosen = [s for s in STAGES if args.stages is None or s.number in args.stages]
    check = Check(Path(args.out), args.deadline, args.dry_run, chosen)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    check.event(event="start", dry_run=args.dry_run, deadline_s=args.deadline, stages=[s.name for s in chosen])
    check.write_summary()
    context = check.summary_path   # later stages read earlier ones' numbers (copy ceiling, 40-frame time)
    current = None
    try:
        for stage in chosen:
            current = stage
            check.record(stage, run_stage(check, stage, context))
        current = None
    except Interrupted as exc:
        check.interrupted = str(exc)
        if current is not None and current.name not in check.results:
            check.results[current.name] = {"stage": current.number, "status": "SKIP",
                                           "reason": f"interrupted by {exc}"}
        check.event(event="interrupted", signal=str(exc))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the summary short
        for stage in chosen:
            if stage.name not in check.results:
                check.results[stage.name] = {"stage": stage.number, "status": "SKIP",
                                             "reason": f"interrupted by {check.interrupted}" if check.interrupted
                                             else "not reached"}
        check.write_summary()
        check.event(event="end", statuses={n: r["status"] for n, r in check.results.items()})
        signal.signal(signal.SIGTERM, previous)
    for line in check.status_lines():
        print(line, flush=True)
    print(f"gpu_check: summary {check.summary_path}", flush=True)
    if check.interrupted:
        return 128 + signal.SIGTERM
    return 1 if any(r["status"] == "FAIL" for r in check.results.values()) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for gpu_check.jsonl, gpu_check_summary.json, "
                   "gpu_check.log (default bench/results)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="global deadline in seconds (default 470)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    p.add_argument("--stages", type=lambda s: {int(x) for x in s.split(",")}, default=None,
                   help="comma-separated stage numbers to run (default all)")
    p.add_argument("--run-stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    p.add_argument("--time-limit", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage is None:
        return orchestrate(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check_stages

    return gpu_check_stages.run(args.run_stage, Path(args.result), Path(args.context), args.dry_run,
                                args.time_limit or 60.0)


if __name__ == "__main__":
    sys.exit(main())
