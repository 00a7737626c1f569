"""One command that measures what issue 18 owes on a GPU, inside a global deadline (default 470 s).

Stages run in priority order, each in its own subprocess (``--run-stage N``, bodies in
``bench/gpu_check_stages.py``) with its own timeout, never beyond what is left of the global deadline:

  0 machine        device, memory, copy bandwidth (H2D, D2D), fp16/bf16 matmul TFLOP/s
  1 triton_warmup  autotune + compile the Triton kernels at the SD 2.1 shapes (fp16 first, then bf16)
  2 gpu_tests      ``pytest -m gpu`` on tests/gpu's kernel and edit checks (TRITON_INTERPRET unset)
  3 kernels        keyframe attention vs every SDPA backend, nearest vs matmul+argmax, gather vs copy
  4 end_to_end     SD 2.1-base (random weights) 512^2, 40 then 200 frames, few steps, extrapolated
  5 call_sweep     UNet rows/s and VAE frames/s per call size, beside the planner's call caps
  6 compile        tests/gpu's compile check (tiny model), then --backend compile vs eager (SD 2.1, 256^2)
  7 original       the original implementation's 40-frame run (reference kit in .gpu/kit) if time remains
  8 sdxl           (opt-in: ``--stages 8``, not in a default run) SDXL base 1.0 (random weights, fp16,
                   float32 VAE) at 1024^2, 40 frames, 3 + 3 steps, 80 GB budget: per-stage times
                   extrapolated to 200 frames and 50 + 50 steps (issue 20)
  9 inversion      (opt-in: ``--stages 9``) SD 2.1-base 512^2, 40 frames, whole edits at the original's
                   defaults: DDIM inversion 500 + 50 edit steps against ``--inversion ddpm`` at 50 (issue 21)

Time (``limits``): the own timeouts of a full run sum to the usable deadline (deadline less
``RESERVE_S``); the original's is 0, "whatever is left". At each stage's start its limit is its own
timeout times (usable time left / own timeouts of this and the later chosen stages), never less than
its own, never more than the time left: time an early stage does not use goes to the later ones,
and a subset (``--stages 6,7 --deadline 280``) scales its stages up to fill the deadline.

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
import math
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
RESERVE_S = 10.0       # kept back at every stage for killing it (_kill: up to 3 + 5 s) and writing the summary
MIN_STAGE_S = 3.0      # a stage is not started with less than this left
SCHEMA = 1


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    timeout_s: float           # its own limit on a GPU (0: whatever is left); scaled by ``limits``
    dry_timeout_s: float       # and in the dry run
    interpret: bool = False    # dry run: the stage runs Triton kernels through the interpreter


# a full run's own timeouts sum to DEADLINE_S - RESERVE_S = 460 s (tests/test_gpu_check.py checks it)
STAGES = [
    Stage(0, "machine", 25, 40),
    Stage(1, "triton_warmup", 45, 50, interpret=True),
    Stage(2, "gpu_tests", 70, 50),
    Stage(3, "kernels", 50, 80, interpret=True),
    Stage(4, "end_to_end", 120, 100),
    Stage(5, "call_sweep", 40, 50),
    Stage(6, "compile", 110, 90),
    Stage(7, "original", 0, 0),
]
# stages a default run leaves out (``--stages`` names them): their own timeouts are outside the
# 460 s above; alone they get the whole deadline (``allotment`` scales a subset up)
OPT_IN_STAGES = [
    Stage(8, "sdxl", 240, 150),
    Stage(9, "inversion", 180, 90),
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
    (7, "original_over_ours_40_frames", "the original's 40-frame run beside ours (ratio, > 1: ours faster)",
     None),
    (7, "original_over_ours_method_40_frames", "the same, like for like: the method's work on both sides "
     "(encode, inversion, edit, decode; no model load, no reconstruction check, no setup)", None),
    (8, "sdxl_extrapolated_s_200_frames", "SDXL base 1.0 1024^2, 200 frames, 50+50 steps (extrapolated; issue 20 "
     "sets no goal)", None),
    (9, "ddim500_over_ddpm50_total", "SD 2.1-base 512^2, 40 frames: DDIM 500 + 50 edit steps over DDPM inversion at 50 "
     "(whole-edit ratio, > 1: DDPM faster; issue 21 sets no goal)", None),
]


class Interrupted(Exception):
    pass


KILL_WORST_S = 3 + 5   # _kill: SIGTERM, 3 s, SIGKILL, 5 s


def own_timeout(stage: Stage, dry_run: bool) -> float:
    return stage.dry_timeout_s if dry_run else stage.timeout_s


def allotment(stage: Stage, remaining: List[Stage], usable_left: float, dry_run: bool) -> float:
    """Seconds ``stage`` may run: its own timeout scaled by (usable time left / own timeouts of
    ``remaining``, the chosen stages from it on), at least its own; 0 own: all that is left. The
    caller cuts it to the time left (module doc)."""
    own = own_timeout(stage, dry_run)
    if own <= 0:
        return max(0.0, usable_left)
    total = sum(own_timeout(s, dry_run) for s in remaining)
    return own * max(1.0, usable_left / total)


def finite(value, path: str = "", notes: Optional[List[str]] = None):
    """``value`` (JSON-like) with every non-finite float (NaN, inf) replaced by None; each one's
    path goes to ``notes`` (strict JSON has no NaN, and a stage may well measure one)."""
    if isinstance(value, float) and not math.isfinite(value):
        if notes is not None:
            notes.append(f"{path}: {value!r} written as null")
        return None
    if isinstance(value, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{path}[{i}]", notes) for i, v in enumerate(value)]
    return value


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
        self.errors: List[str] = []   # what went wrong in the orchestrator itself (the summary lists it)
        out.mkdir(parents=True, exist_ok=True)
        self.lines = out / "gpu_check.jsonl"
        self.summary_path = out / "gpu_check_summary.json"
        self.log = out / "gpu_check.log"
        for path in (self.lines, self.log):
            path.write_text("")

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)

    def safely(self, what: str, fn, *args, **kwargs) -> None:
        """``fn(*args)``; an exception is noted in ``errors`` (and the summary), never raised: the
        summary and the status lines must come out whatever a stage wrote."""
        try:
            fn(*args, **kwargs)
        except Interrupted:
            raise
        except Exception as exc:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:500])
            print(f"gpu_check: {self.errors[-1]}", file=sys.stderr, flush=True)

    def event(self, **fields) -> None:
        fields = {"time": round(time.time(), 3), "elapsed_s": round(time.monotonic() - self.start, 3), **fields}
        line = json.dumps(finite(fields), default=str, allow_nan=False)
        with open(self.lines, "a") as f:
            f.write(line + "\n")

    def record(self, stage: Stage, result: dict) -> None:
        notes: List[str] = []
        result = finite(result, stage.name, notes)
        if notes:
            result["non_finite"] = notes
        self.results[stage.name] = {"stage": stage.number, **result}
        self.safely(f"event stage_end {stage.name}", self.event, event="stage_end", name=stage.name, **result)
        self.safely(f"summary after {stage.name}", self.write_summary)

    def targets(self) -> List[dict]:
        rows = []
        by_number = {s.number: s.name for s in STAGES + OPT_IN_STAGES}
        left_out = {s.number for s in OPT_IN_STAGES} - {s.number for s in self.stages}
        for number, key, goal, test in TARGETS:
            if number in left_out:   # an opt-in stage this run did not choose: no row
                continue
            measured = ((self.results.get(by_number[number]) or {}).get("measured") or {}).get(key)
            try:
                met = None if measured is None or test is None or self.dry_run else bool(test(measured))
            except Exception as exc:   # a measured value of the wrong kind: noted, not judged
                met = None
                measured = f"{measured!r} ({type(exc).__name__})"
            rows.append({"stage": number, "key": key, "goal": goal, "measured": measured, "met": met})
        return rows

    def write_summary(self) -> None:
        notes: List[str] = []
        doc = {"schema": SCHEMA, "what": "bench/gpu_check.py: GPU checks and measurements of issue 18",
               "dry_run": self.dry_run, "started": self.started, "deadline_s": self.deadline_s,
               "elapsed_s": round(time.monotonic() - self.start, 3), "command": [Path(sys.executable).name, *sys.argv],
               "interrupted": self.interrupted,
               "complete": len(self.results) == len(self.stages),
               "stages": self.results, "targets": self.targets(), "errors": self.errors}
        try:
            doc = finite(doc, "", notes)   # stages were cleaned in record(); this catches the rest
            if notes:
                doc["non_finite"] = notes
            text = json.dumps(doc, indent=1, default=str, allow_nan=False)
        except Exception as exc:   # whatever it was, a summary still comes out, saying why it is short
            self.errors.append(f"summary: {type(exc).__name__}: {exc}"[:500])
            short = {k: v for k, v in doc.items() if k not in ("stages", "targets")}
            short.update(statuses={n: str(r.get("status")) for n, r in self.results.items()}, errors=self.errors)
            text = json.dumps(finite(short), indent=1, default=str)
        # The driver stays stdlib-only (it must report even when the carried wheels or torch fail to
        # import), so it does not use tokenflow.io.outputs.atomic_file: temp file and rename by hand.
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, self.summary_path)

    def status_lines(self) -> List[str]:
        lines = []
        for stage in self.stages:
            r = self.results.get(stage.name) or {"status": "SKIP", "reason": "not reached"}
            seconds = f"{r['seconds']:7.1f} s" if isinstance(r.get("seconds"), (int, float)) else "        -"
            lines.append(f"gpu_check stage {stage.number} {stage.name:14s} {str(r.get('status', 'FAIL')):4s} "
                         f"{seconds}  {r.get('reason', '')}".rstrip())
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
    left = check.left() - RESERVE_S
    if left < MIN_STAGE_S:
        return {"status": "SKIP", "reason": f"global deadline: {max(0.0, check.left()):.0f} s left", "seconds": 0.0}
    own = allotment(stage, [s for s in check.stages if s.number >= stage.number], left, check.dry_run)
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
        check.safely(f"event stage_start {stage.name}", check.event, event="stage_start", name=stage.name,
                     number=stage.number, timeout_s=round(limit, 1), pid=proc.pid)
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
            _remove_temps(result_file)
            check.results[stage.name] = {"stage": stage.number, **partial, "status": "SKIP",
                                         "reason": f"interrupted by {exc} after {time.monotonic() - started:.0f} s "
                                                   "(partial results kept)"}
            raise
    seconds = time.monotonic() - started
    result = _read(result_file)
    result_file.unlink(missing_ok=True)
    _remove_temps(result_file)   # a write the kill interrupted
    result["seconds"] = round(seconds, 2)
    if timed_out:
        cut = limit < own
        result["status"] = "SKIP" if cut else "FAIL"
        result["reason"] = (f"stopped at the global deadline after {seconds:.0f} s (partial results kept)" if cut
                            else f"timed out after its {own:.0f} s (partial results kept)")
        if own_timeout(stage, check.dry_run) <= 0:   # an optional stage given the rest of the time
            result["status"] = "SKIP"
            result["reason"] = f"optional: the {seconds:.0f} s left ran out (partial results kept)"
        result["timed_out"] = True
    elif proc.returncode != 0 and result.get("status") != "FAIL":
        result["status"] = "FAIL"
        result["reason"] = f"exit status {proc.returncode} (see gpu_check.log)" + \
            (f"; {result['reason']}" if result.get("reason") else "")
    result.setdefault("status", "FAIL")
    return result


def _remove_temps(path: Path) -> None:
    """The temps a killed stage's save left beside ``path``: tokenflow.io.outputs names them
    ``.<name>.tmp-<owner>-<hex>`` (matched here without importing tokenflow: the driver stays stdlib-only)."""
    for temp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            temp.unlink()
        except OSError:
            pass


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL after 3 s (KILL_WORST_S in all, < RESERVE_S)."""
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
    """A stage's result file (json reads NaN / Infinity; ``Check.record`` turns them into null)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": "the stage wrote no result"}
    return doc if isinstance(doc, dict) else {"reason": f"the stage wrote {type(doc).__name__}, not an object"}


def orchestrate(args) -> int:
    chosen = (list(STAGES) if args.stages is None
              else [s for s in STAGES + OPT_IN_STAGES if s.number in args.stages])
    check = Check(Path(args.out), args.deadline, args.dry_run, chosen)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    check.safely("event start", check.event, event="start", dry_run=args.dry_run, deadline_s=args.deadline,
                 stages=[s.name for s in chosen])
    check.safely("first summary", check.write_summary)
    context = check.summary_path   # later stages read earlier ones' numbers (copy ceiling, 40-frame time)
    current = None
    try:
        for stage in chosen:
            current = stage
            try:
                result = run_stage(check, stage, context)
            except Interrupted:
                raise
            except Exception as exc:   # the orchestrator's own failure: this stage fails, the run goes on
                result = {"status": "FAIL", "reason": f"gpu_check: {type(exc).__name__}: {exc}"[:300]}
            check.record(stage, result)
        current = None
    except Interrupted as exc:
        check.interrupted = str(exc)
        if current is not None and current.name not in check.results:
            check.results[current.name] = {"stage": current.number, "status": "SKIP",
                                           "reason": f"interrupted by {exc}"}
        check.safely("event interrupted", check.event, event="interrupted", signal=str(exc))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the summary short
        for stage in chosen:
            if stage.name not in check.results:
                check.results[stage.name] = {"stage": stage.number, "status": "SKIP",
                                             "reason": f"interrupted by {check.interrupted}" if check.interrupted
                                             else "not reached"}
        check.safely("final summary", check.write_summary)
        check.safely("event end", check.event, event="end",
                     statuses={n: r.get("status") for n, r in check.results.items()})
        signal.signal(signal.SIGTERM, previous)
    for line in check.status_lines():
        print(line, flush=True)
    print(f"gpu_check: summary {check.summary_path}", flush=True)
    if check.interrupted:
        return 128 + signal.SIGTERM
    return 1 if any(r.get("status") == "FAIL" for r in check.results.values()) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for gpu_check.jsonl, gpu_check_summary.json, "
                   "gpu_check.log (default bench/results)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="global deadline in seconds (default 470)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    p.add_argument("--stages", type=lambda s: {int(x) for x in s.split(",")}, default=None,
                   help="comma-separated stage numbers to run (default all but the opt-in 8, sdxl, and 9, inversion)")
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
