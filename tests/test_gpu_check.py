"""bench/gpu_check.py's CPU dry run (tiny shapes, Triton interpreter, tiny model): every stage's code
path, the JSON lines, the summary, the per-stage status lines, the global deadline and SIGTERM, NaN in
a stage's result; and the stage time budgets."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
KIT = ROOT / ".gpu" / "kit" / "gpu_run.sh"   # the reference kit, where one was prepared
STAGES = ["machine", "triton_warmup", "gpu_tests", "kernels", "end_to_end", "call_sweep", "compile", "original"]
LINE = re.compile(r"^gpu_check stage (\d) (\S+) +(PASS|FAIL|SKIP) ")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_INJECT_NAN")}
    env.update(HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _start(tmp_path, *args, **env):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *args],
                            cwd=ROOT, env={**_env(tmp_path), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


def _outputs(tmp_path):
    out = tmp_path / "out"
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    events = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return summary, events


def _statuses(stdout: str) -> dict:
    return {m.group(2): m.group(3) for m in map(LINE.match, stdout.splitlines()) if m}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = _start(tmp)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr, tmp


def test_dry_run_walks_every_stage_and_ends_with_one_line_per_stage(dry_run):
    rc, stdout, stderr, tmp = dry_run
    assert rc == 0, stdout + stderr + (tmp / "out" / "gpu_check.log").read_text()[-4000:]
    statuses = _statuses(stdout)
    assert list(statuses) == STAGES
    ran = ("machine", "triton_warmup", "kernels", "end_to_end", "call_sweep", "compile")
    assert {s: statuses[s] for s in ran} == dict.fromkeys(ran, "PASS")
    assert statuses["gpu_tests"] == "SKIP"    # no CUDA device: every tests/gpu check skips
    assert statuses["original"] == "SKIP"     # no CUDA device (and no reference kit unless prepared)


def test_dry_run_writes_json_lines_and_the_summary(dry_run):
    rc, stdout, stderr, tmp = dry_run
    summary, events = _outputs(tmp)
    assert summary["dry_run"] is True and summary["complete"] is True and summary["interrupted"] is None
    assert [summary["stages"][s]["stage"] for s in STAGES] == list(range(8))
    assert summary["errors"] == []
    assert "needs a CUDA device" in summary["stages"]["gpu_tests"]["reason"]
    machine = summary["stages"]["machine"]["measured"]
    assert machine["d2d_gbps"] > 0 and machine["matmul_tflops_float32"] > 0
    e2e = summary["stages"]["end_to_end"]
    assert "50 * median(inversion step s)" in e2e["details"]["extrapolation"]
    assert e2e["measured"]["extrapolated_s_3_frames"] > 0
    ran = e2e["details"]["3_frames"]["ran"]   # what the edit ran (dispatcher's record), not a sample choice
    assert ran["unet"]["backend"] == "eager"
    assert ran["kernels"]["keyframe_attention"] and all(e["calls"] > 0 for e in ran["kernels"]["keyframe_attention"])
    sweep = summary["stages"]["call_sweep"]["measured"]
    assert sweep["unet_rows_flat"] in (1, 2, 4) and sweep["vae_frames_flat"] in (1, 2)
    assert sweep["unet_best_rows_per_s"] > 0 and sweep["planner_unet_rows"] > 0 and sweep["planner_vae_frames"] > 0
    compiled = summary["stages"]["compile"]
    assert "compile_tests_status" in compiled["details"]
    variants = compiled["details"]["variants"]   # the compile backend ran (dynamo graphs through aot_eager)
    assert set(variants) == {"eager", "compile"} and all("error" not in v for v in variants.values()), variants
    assert variants["compile"]["max_abs_latent_diff_vs_eager"] < 1e-4 and compiled["measured"]["compile_stats"]["compile"]
    kernels = summary["stages"]["kernels"]["measured"]
    assert kernels["attention_triton_tflops"] > 0 and kernels["nearest_speedup_vs_matmul_argmax"] > 0
    targets = {t["key"]: t for t in summary["targets"]}
    assert targets["attention_triton_tflops"]["measured"] == kernels["attention_triton_tflops"]
    assert all(t["met"] is None for t in summary["targets"])   # a dry run judges no target
    kinds = [(e["event"], e.get("name")) for e in events]
    assert kinds[0] == ("start", None) and kinds[-1] == ("end", None)
    ended = [name for kind, name in kinds if kind == "stage_end"]
    assert ended == STAGES
    started = [name for kind, name in kinds if kind == "stage_start"]
    assert started == [s for s in STAGES if s != "original" or KIT.exists()]   # no kit: no process for stage 6


def test_a_tiny_global_deadline_skips_later_stages_and_still_writes_the_summary(tmp_path):
    """16 s: stage 0 gets 6 s (the deadline less the reserve), which importing torch mostly outlasts;
    the reserve covers killing it, so the run ends inside the deadline."""
    proc = _start(tmp_path, "--deadline", "16")
    stdout, stderr = proc.communicate(timeout=120)
    summary, events = _outputs(tmp_path)
    assert summary["complete"] is True
    assert summary["elapsed_s"] <= 16 and events[-1]["elapsed_s"] <= 16
    statuses = _statuses(stdout)
    assert list(statuses) == STAGES
    machine = summary["stages"]["machine"]
    if machine["status"] != "PASS":   # cut at the deadline: killed, what it had measured kept
        assert machine["status"] == "SKIP" and machine["timed_out"] is True
        assert "stopped at the global deadline" in machine["reason"]
    for name in STAGES[1:]:
        assert summary["stages"][name]["status"] == "SKIP"
        assert "global deadline" in summary["stages"][name]["reason"]


def test_sigterm_stops_the_stage_and_writes_the_summary(tmp_path):
    proc = _start(tmp_path, "--stages", "0,4")
    lines = tmp_path / "out" / "gpu_check.jsonl"
    deadline = time.monotonic() + 60
    child = None
    while child is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if lines.exists():
            starts = [json.loads(x) for x in lines.read_text().splitlines() if '"stage_start"' in x]
            child = starts[0]["pid"] if starts else None
    assert child is not None, "stage 0 never started"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    summary, events = _outputs(tmp_path)
    assert summary["interrupted"] == "SIGTERM"
    assert summary["stages"]["machine"]["status"] == "SKIP"
    assert "interrupted by SIGTERM" in summary["stages"]["machine"]["reason"]
    assert summary["stages"]["end_to_end"]["status"] == "SKIP"
    assert events[-1]["event"] == "end"
    assert _statuses(stdout) == {"machine": "SKIP", "end_to_end": "SKIP"}
    with pytest.raises(ProcessLookupError):   # the stage's process was ended with the run
        os.kill(child, 0)


def test_stage_budgets_fit_the_deadline_and_scale_up_for_a_subset():
    gc = _gpu_check()
    assert gc.RESERVE_S >= gc.KILL_WORST_S + 2   # killing a stage and writing the summary fit in the reserve
    usable = gc.DEADLINE_S - gc.RESERVE_S
    for dry in (False, True):
        assert sum(gc.own_timeout(s, dry) for s in gc.STAGES) <= usable
        # a full run: the first stage gets its own timeout; the optional last stage (0) what is left
        assert gc.allotment(gc.STAGES[0], gc.STAGES, usable, dry) == pytest.approx(
            gc.own_timeout(gc.STAGES[0], dry) * max(1.0, usable / sum(gc.own_timeout(s, dry) for s in gc.STAGES)))
        assert gc.allotment(gc.STAGES[-1], gc.STAGES[-1:], 123.0, dry) == 123.0
    # the documented rerun --stages 6,7 --deadline 280: compile may use all 270 usable seconds
    subset = [s for s in gc.STAGES if s.number in (6, 7)]
    assert gc.allotment(subset[0], subset, 280 - gc.RESERVE_S, False) == pytest.approx(270.0)
    # an early stage that finished quickly leaves its time to the later ones
    later = gc.STAGES[4:]
    assert gc.allotment(later[0], later, 300.0, False) > later[0].timeout_s


def test_a_stage_result_with_nan_and_inf_still_gives_the_summary_and_status_lines(tmp_path):
    """GPU_CHECK_INJECT_NAN=0: stage 0 adds NaN / inf to its result (the seam of gpu_check_stages.run);
    the summary holds null for each with a note, and the run still ends with its status lines."""
    proc = _start(tmp_path, "--stages", "0", GPU_CHECK_INJECT_NAN="0")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout + stderr
    assert _statuses(stdout) == {"machine": "PASS"}
    summary, events = _outputs(tmp_path)
    machine = summary["stages"]["machine"]
    assert machine["measured"]["injected_nan"] is None and machine["measured"]["injected_inf"] is None
    assert machine["details"]["injected"] == {"max_abs_latent_diff_vs_eager": None, "rows": [1.0, None]}
    assert any("injected_nan" in note and "nan" in note for note in machine["non_finite"])
    assert summary["errors"] == [] and summary["complete"] is True
    ended = next(e for e in events if e["event"] == "stage_end")
    assert ended["measured"]["injected_nan"] is None


def test_the_originals_method_seconds_from_a_kit_result_line():
    """Stage 7's like-for-like side: the flat ``timings_s`` a GPU_RUN_RESULT line carries
    (shared/reference/gpu_run.sh): encode + inversion + denoise + decode, not loads or the reconstruction."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check_stages as stages
    finally:
        sys.path.remove(str(ROOT / "bench"))
    line = ('GPU_RUN_RESULT {"timings_s": {"import": 4.1, "pre_frames_extract": 0.5, "pre_model_load": 6.0, '
            '"pre_load_frames_vae_encode": 1.5, "inversion": 20.0, "pre_reconstruction_ddim": 18.0, '
            '"pre_reconstruction_decode": 2.0, "edit_model_load": 5.0, "edit_load_frames_vae_encode_eps": 1.4, '
            '"editing_denoise": 30.0, "decode": 2.5, "wall_total": 95.0}}')
    timings = json.loads(line.split(" ", 1)[1])["timings_s"]
    assert stages.original_method_seconds(timings) == pytest.approx(1.5 + 20.0 + 30.0 + 2.5)
    assert stages.original_method_seconds({**timings, "editing_denoise": 0.0}) is None   # stopped before the edit
    assert stages.original_method_seconds({"inversion": 20.0, "editing_denoise": 30.0}) == 50.0
