"""End to end against the original implementation: whole commands, interleaved rounds, ratios.

Issue 4's CPU target: 40 frames of a real clip at 128x128, the tiny 16-block model, 50 inversion /
10 edit steps, keyframe spacing 8, one thread each; wall time of the whole process (imports, load,
invert, edit, write). The original runs through the reference harness (``../shared/reference``),
which this script only calls: pass its Python and its ``run_reference.py``.

Each round runs every variant once, in order, after waiting for an idle machine; a warm-up run of
each variant first fills caches (exported graphs, compiled packages) and is reported apart as
``cold``. Per round the ratio is original wall / variant wall, so a slow period of the VM hits both
sides; the summary gives medians of walls and of ratios. Wall, user and system seconds come from
``os.wait4`` on the child.

    python bench/e2e_vs_original.py --reference-python /work/refh/venv/bin/python \\
        --reference-script ../shared/reference/run_reference.py --model /work/refh/models/tiny-sd \\
        --reference-dir /work/refh/TokenFlow --video ../shared/data/wolf.mp4 --variants onnx,eager --rounds 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenflow.benchmark.report import write_json  # noqa: E402
from tokenflow.benchmark.system import git_revision, load_snapshot, wait_until_idle  # noqa: E402

SETTINGS = {"frames": 40, "size": 128, "inversion_steps": 50, "steps": 10, "spacing": 8, "seed": 1,
            "inversion_prompt": "a wolf", "prompt": "a marble sculpture of a wolf",
            "negative_prompt": "ugly, blurry, low res, unrealistic, unaesthetic"}


def ours_command(backend: str, args, out: Path) -> List[str]:
    s = SETTINGS
    return [sys.executable, "-m", "tokenflow", "edit", args.video, "--model", args.model, "--frames", str(s["frames"]),
            "--size", f"{s['size']}x{s['size']}", "--inversion-steps", str(s["inversion_steps"]),
            "--steps", str(s["steps"]), "--keyframe-spacing", str(s["spacing"]), "--seed", str(s["seed"]),
            "--inversion-prompt", s["inversion_prompt"], "--prompt", s["prompt"],
            "--negative-prompt", s["negative_prompt"], "--device", "cpu", "--no-cache", "--backend", backend,
            "--overwrite", "-q", "-o", str(out / f"{backend}.mp4")]


def original_command(args, out: Path) -> List[str]:
    s = SETTINGS
    return [args.reference_python, args.reference_script, "--model", args.model, "--video", args.video,
            "--out", str(out / "original"), "--n_frames", str(s["frames"]), "--H", str(s["size"]), "--W", str(s["size"]),
            "--inversion_steps", str(s["inversion_steps"]), "--save_steps", str(s["steps"]),
            "--edit_steps", str(s["steps"]), "--batch_size", str(s["spacing"]), "--pnp_attn_t", "0.5",
            "--pnp_f_t", "0.8", "--seed", str(s["seed"]), "--threads", "1",
            "--inversion_prompt", s["inversion_prompt"], "--prompt", s["prompt"],
            "--negative_prompt", s["negative_prompt"], "--no_nn", "--no_step_latents"]


def timed(command: List[str], cwd: Path, env_extra: Dict[str, str]) -> Dict[str, float]:
    """Run ``command`` with one thread; wall, user and system seconds of the child."""
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed with exit {code}:\n"
                         f"{err.decode(errors='replace')[-2000:]}")
    return {"wall": round(wall, 3), "user": round(usage.ru_utime, 3), "sys": round(usage.ru_stime, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True, help="the Python of the reference harness's venv")
    p.add_argument("--reference-script", required=True, help="run_reference.py of the reference harness")
    p.add_argument("--reference-dir", default=os.environ.get("TOKENFLOW_REF_DIR"),
                   help="checkout of the original code the harness runs (default: $TOKENFLOW_REF_DIR)")
    p.add_argument("--model", required=True, help="tiny model folder both sides load")
    p.add_argument("--video", required=True)
    p.add_argument("--variants", default="onnx,eager", help="our backends, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="output (default bench/results/e2e_cpu_vs_original_<date>.json)")
    args = p.parse_args()
    args.video, args.model = str(Path(args.video).resolve()), str(Path(args.model).resolve())
    args.reference_script = str(Path(args.reference_script).resolve())
    if not args.reference_dir:
        p.error("--reference-dir (or TOKENFLOW_REF_DIR) must name the original implementation's checkout")
    env_extra = {"TOKENFLOW_REF_DIR": str(Path(args.reference_dir).resolve())}
    variants = ["original"] + [v for v in args.variants.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="tokenflow-e2e-"))
    commands = {v: original_command(args, work) if v == "original" else ours_command(v, args, work) for v in variants}
    try:
        cold = {v: timed(commands[v], ROOT, env_extra) for v in variants}    # fills caches; not part of the result
        print("cold:", {v: c["wall"] for v, c in cold.items()}, flush=True)
        rounds = []
        for r in range(args.rounds):
            record = {}
            for v in variants:
                before = {**wait_until_idle(), **load_snapshot()}
                record[v] = {**timed(commands[v], ROOT, env_extra), "before": before}
            record["ratios"] = {v: round(record["original"]["wall"] / record[v]["wall"], 3)
                                for v in variants if v != "original"}
            rounds.append(record)
            print(f"round {r + 1}: " + ", ".join(f"{v} {record[v]['wall']:.2f} s" for v in variants)
                  + "; original/ours " + ", ".join(f"{v} {x:.2f}" for v, x in record["ratios"].items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {v: {"median_wall": round(statistics.median(r[v]["wall"] for r in rounds), 3)} for v in variants}
    for v in variants[1:]:
        summary[v]["median_ratio"] = round(statistics.median(r["ratios"][v] for r in rounds), 3)
    doc = {
        "what": "end to end wall time of the whole command, ours vs the original implementation, one thread each",
        "settings": SETTINGS, "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "git": git_revision(),
        "commands": {v: " ".join(c) for v, c in commands.items()}, "cold": cold, "rounds": rounds, "summary": summary,
        "target": "original / ours >= 2", "met": {v: summary[v]["median_ratio"] >= 2 for v in variants[1:]},
    }
    path = write_json(doc, args.json or str(ROOT / "bench" / "results" / f"e2e_cpu_vs_original_{doc['date']}.json"))
    print("summary:", summary)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
