"""The stages of ``bench/gpu_check.py``, one function each, run one per process (``--run-stage N``).

Each writes its result file after every measurement (``Result``), so a stage killed at its timeout
keeps what it had measured: {"status": PASS|FAIL|SKIP, "reason", "measured": {flat numbers the
summary's targets read}, "details": {...}}. ``dry_run``: the CPU at tiny shapes (the Triton
kernels through the interpreter where the orchestrator set TRITON_INTERPRET=1, the tiny model);
what needs CUDA is recorded as SKIP with the reason. Everything that needs CUDA here is
unverified on a GPU until the first recorded run (bench/results/).

Result files may hold NaN / inf (a diff of non-finite latents): the orchestrator writes them as null
with a note. ``GPU_CHECK_INJECT_NAN=<stage number>`` adds such values to that stage's result (the
seam tests/test_gpu_check.py uses to check that path).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tokenflow.benchmark.measure import median_seconds  # noqa: E402
from tokenflow.device import device_name, sync, versions  # noqa: E402
from tokenflow.errors import one_line  # noqa: E402
from tokenflow.io.outputs import atomic_file  # noqa: E402

GB = 1e9
KIT = ROOT / ".gpu" / "kit" / "gpu_run.sh"   # the reference kit (../shared/reference/gpu_kit.sh)
# SD 2.1-base at 512x512: (tokens, heads) of the self-attention layers (head dim 64), and
# (tokens, channels) of the nearest-neighbour search
SD21_ATTENTION = [(4096, 5), (1024, 10), (256, 20)]
SD21_NEAREST = [(4096, 320), (1024, 640), (256, 1280)]
EXTRAPOLATE_STEPS = 50


class Result:
    """A stage's result file, rewritten after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.doc: dict = {"status": None, "reason": "", "measured": {}, "details": {}}
        self.save()

    def measure(self, **values) -> None:
        self.doc["measured"].update(values)
        self.save()

    def detail(self, key: str, value) -> None:
        self.doc["details"][key] = value
        self.save()

    def save(self) -> None:
        with atomic_file(self.path) as f:
            f.write(json.dumps(self.doc, default=str))   # NaN / Infinity tokens allowed: gpu_check.finite


class Ctx:
    def __init__(self, dry_run: bool, time_limit: float, context: Path):
        self.dry_run, self.time_limit, self.start = dry_run, time_limit, time.monotonic()
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        try:
            self.summary = json.loads(Path(context).read_text())
        except (OSError, ValueError):
            self.summary = {}

    def left(self) -> float:
        return self.time_limit - (time.monotonic() - self.start)

    def earlier(self, stage: str, key: str):
        return ((self.summary.get("stages") or {}).get(stage) or {}).get("measured", {}).get(key)


def _error(exc: BaseException) -> str:
    return one_line(exc)


# ----------------------------------------------------------------------------- 0 machine and ceilings


def stage_machine(ctx: Ctx, res: Result) -> Tuple[str, str]:
    from tokenflow.benchmark import peak

    dev = ctx.device
    res.detail("versions", versions())
    res.measure(device=device_name(dev), device_type=dev.type)
    if not ctx.cuda and not ctx.dry_run:
        return "FAIL", "no CUDA device visible (this command is meant for the GPU machine)"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(dev)
        res.measure(total_memory_gb=props.total_memory / GB, multiprocessors=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(dev))))
        res.detail("cuda", torch.version.cuda)
    nbytes = (1 << 30) if ctx.cuda else (8 << 20)
    reps = 10 if ctx.cuda else 3
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=ctx.cuda)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    h2d = median_seconds(lambda: a.copy_(host, non_blocking=True), dev, reps)
    d2h = median_seconds(lambda: host.copy_(a, non_blocking=True), dev, reps)
    d2d = median_seconds(lambda: b.copy_(a), dev, reps)
    # copy bandwidth counts bytes moved once (H2D, D2H) and read + written (D2D, as for a gather)
    res.measure(h2d_gbps=nbytes / h2d / GB, d2h_gbps=nbytes / d2h / GB, d2d_gbps=2 * nbytes / d2d / GB)
    res.detail("copy_note", "H2D/D2H: pinned host, bytes/s of one direction; D2D: (read + write) bytes/s")
    dtypes = [torch.float16, torch.bfloat16] if ctx.cuda else [torch.float32]
    for dtype in dtypes:
        m = peak.measure(dev, dtype, size=8192 if ctx.cuda else 256, repeats=10 if ctx.cuda else 2)
        res.measure(**{f"matmul_tflops_{m.dtype}": m.tflops})
    return "PASS", ""


# ----------------------------------------------------------------------------- 1 Triton warm-up


def _kernel_cases(ctx: Ctx):
    """(dtype, label, callable) of every Triton launch the SD 2.1 shapes use, fp16 first."""
    from tokenflow.kernels.gather import gather_blend
    from tokenflow.kernels.keyframe_attention import keyframe_attention
    from tokenflow.kernels.nearest import cosine_nearest

    dev = ctx.device
    if ctx.dry_run:
        dtypes, attention, nearest, kfs, dim = [torch.float16], [(16, 1)], [(16, 16)], [2], 16
    else:
        dtypes, attention, nearest, kfs, dim = [torch.float16, torch.bfloat16], SD21_ATTENTION, SD21_NEAREST, [5, 25], 64
    for dtype in dtypes:
        for n_kf in kfs:   # autotuned per (seq, n_kf, head dim): 40 frames -> 5 keyframes, 200 -> 25
            for seq, heads in attention:
                def attn(seq=seq, heads=heads, n_kf=n_kf, dtype=dtype):
                    q = torch.randn(3, n_kf, seq, heads * dim, device=dev, dtype=dtype)
                    return keyframe_attention(q, q, q, heads, backend="triton")
                yield dtype, f"attention S={seq} H={heads} K={n_kf}", attn
        for seq, channels in nearest:
            def near(seq=seq, channels=channels, dtype=dtype):
                x = torch.randn(8, seq, channels, device=dev, dtype=dtype)
                keys = torch.randn(3, seq, channels, device=dev, dtype=dtype)
                pairs = torch.tensor([[0, 1]] * 8, device=dev)
                idx = cosine_nearest(x, keys, pairs, backend="triton")
                kf_out = torch.randn(3, 3, seq, channels, device=dev, dtype=dtype)
                weights = torch.full((8, 2), 0.5, device=dev)
                return gather_blend(kf_out, idx, pairs, weights, backend="triton")
            yield dtype, f"nearest+gather S={seq} C={channels}", near


def stage_triton_warmup(ctx: Ctx, res: Result) -> Tuple[str, str]:
    from tokenflow.kernels import support

    missing = support.triton_missing()
    if missing:
        return "SKIP", missing
    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    done = {}
    for dtype, label, fn in _kernel_cases(ctx):
        if ctx.left() < 8:
            res.detail("compiled", done)
            return "PASS", f"partial: stage time ran out after {len(done)} launches"
        started = time.perf_counter()
        fn()
        sync(ctx.device)
        done[f"{str(dtype).removeprefix('torch.')} {label}"] = round(time.perf_counter() - started, 3)
        res.detail("compiled", done)
    res.measure(launches=len(done), compile_s=sum(done.values()))
    return "PASS", ""


# ----------------------------------------------------------------------------- 2 tests/gpu


# cheap and important first (pytest keeps this order): the kernels at SD shapes, then whole edits;
# the compile check (cold inductor compiles) runs in stage 6, where its time is budgeted
GPU_TESTS = ["tests/gpu/test_kernels_sd.py", "tests/gpu/test_edit_gpu.py"]
COMPILE_TESTS = ["tests/gpu/test_compile_gpu.py"]


def stage_gpu_tests(ctx: Ctx, res: Result) -> Tuple[str, str]:
    return _pytest(ctx, res, GPU_TESTS, ctx.left() - 3)


def _pytest(ctx: Ctx, res: Result, files, timeout: float, key: str = "tests") -> Tuple[str, str]:
    """``pytest -m gpu files`` in its own process without TRITON_INTERPRET; per-test outcomes in
    ``details[key]``, counts in ``measured[key_passed]`` etc."""
    import xml.etree.ElementTree as ET

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *files,
               f"--junitxml={xml}"]
        sys.stdout.flush()
        try:   # its output goes straight to gpu_check.log: test by test, also when it is cut short
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=max(5.0, timeout))
        except subprocess.TimeoutExpired as exc:
            return "FAIL", f"pytest did not finish in {exc.timeout:.0f} s (gpu_check.log lists the tests that ran)"
        if not xml.exists():
            return "FAIL", f"pytest exit status {proc.returncode}, no report"
        cases = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                    text = (child.get("message") or "")[:300]
            cases.append({"test": f"{case.get('classname')}.{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": text})
    res.detail(key, cases)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    res.measure(**{f"{key}_{k}": v for k, v in counts.items()})
    if counts["failed"] or counts["error"] or proc.returncode not in (0, 5):
        bad = [c["test"] for c in cases if c["outcome"] in ("failed", "error")]
        return "FAIL", f"{len(bad)} failed: {', '.join(bad)[:300]}"
    if not counts["passed"]:
        reasons = sorted({c["message"] for c in cases if c["outcome"] == "skipped"})
        return "SKIP", f"all {len(cases)} skipped: {'; '.join(reasons)[:200]}"
    return "PASS", f"{counts['passed']} passed, {counts['skipped']} skipped"


# ----------------------------------------------------------------------------- 3 kernel benchmarks


def _time_variants(ctx: Ctx, build: Callable, names, case: dict, reference: Optional[str] = None) -> Dict[str, dict]:
    rows, ref = {}, None
    reps = 10 if ctx.cuda else 2
    for name in names:
        if ctx.left() < 5:
            rows[name] = {"error": "stage time ran out"}
            continue
        try:
            fn = build(name, case)
            out = fn()
            if ref is None and (reference is None or name == reference):
                ref = out
            row = {"ms": median_seconds(fn, ctx.device, reps=reps, warmup=2 if ctx.cuda else 1) * 1e3}
            if ref is not None and out is not ref:
                row["diff_vs_first"] = ((out.float() - ref.float()).abs().max().item() if out.is_floating_point()
                                        else (out == ref).float().mean().item())
            del fn, out
        except Exception as exc:  # an SDPA backend that refuses, an OOM: recorded, the stage goes on
            row = {"error": _error(exc)}
        if ctx.cuda:
            torch.cuda.empty_cache()
        rows[name] = row
    return rows


def stage_kernels(ctx: Ctx, res: Result) -> Tuple[str, str]:
    import bench_keyframe_attention as bka
    import bench_nearest as bn

    from tokenflow.kernels import support

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    dtype = "float16" if ctx.cuda else "float32"
    esize = torch.finfo(getattr(torch, dtype)).bits // 8
    triton = [] if support.triton_missing() else ["triton"]
    # keyframe attention: the shape on a GPU; FLOPs of the three products per head
    seq, heads, dim, n_kf = (4096, 5, 64, 25) if ctx.cuda else (32, 1, 16, 2)
    case = {"device": str(ctx.device), "dtype": dtype, "K": n_kf, "S": seq, "heads": heads, "D": dim}
    flops = 4.0 * dim * heads * (n_kf * seq * seq + 2 * n_kf * seq * n_kf * seq)
    res.detail("attention_flop_formula", "4 * D * heads * (K * S^2 [source branch, per frame] + 2 * (K * S)^2 "
                                         "[uncond + cond, joint over keyframes])")
    names = triton + [f"sdpa-{n}" for n in bka.SDPA]
    math_bytes = 2 * heads * (n_kf * seq) ** 2 * esize   # scores + probabilities of one branch
    if ctx.cuda and math_bytes > 0.8 * torch.cuda.mem_get_info(ctx.device)[0]:
        names.remove("sdpa-math")
        res.detail("sdpa_math", f"skipped: its score matrix needs {math_bytes / GB:.0f} GB")
    rows = _time_variants(ctx, bka.build, names, case)
    for row in rows.values():
        if "ms" in row:
            row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
    res.detail("attention", {"case": case, "flops": flops, "variants": rows})
    sdpa = [r["tflops"] for n, r in rows.items() if n.startswith("sdpa-") and "tflops" in r]
    if "tflops" in rows.get("triton", {}):
        res.measure(attention_triton_tflops=rows["triton"]["tflops"],
                    attention_best_sdpa_tflops=max(sdpa) if sdpa else None,
                    attention_triton_vs_best_sdpa=rows["triton"]["tflops"] / max(sdpa) if sdpa else None)
    # nearest neighbours vs matmul + argmax, and the gather against the copy ceiling
    sizes = SD21_NEAREST if ctx.cuda else [(32, 16)]
    frames, pairs, keyframes = (8, 2, 5) if ctx.cuda else (2, 2, 3)
    ceiling = ctx.earlier("machine", "d2d_gbps")
    nearest = []
    for seq, channels in sizes:
        case = {"device": str(ctx.device), "dtype": dtype, "F": frames, "P": pairs, "K": keyframes, "S": seq,
                "C": channels}
        gather_bytes = 3 * frames * (pairs + 1) * seq * channels * esize
        rows = _time_variants(ctx, bn.build, ["matmul-argmax"] + triton, case)
        rows.update(_time_variants(ctx, bn.build, ["propagate-torch"] + [f"propagate-{t}" for t in triton], case))
        for name, row in rows.items():
            if name.startswith("propagate") and "ms" in row:
                row["gbps"] = gather_bytes / (row["ms"] / 1e3) / GB
                row["fraction_of_d2d_copy"] = row["gbps"] / ceiling if ceiling else None
        if "ms" in rows.get("triton", {}) and "ms" in rows.get("matmul-argmax", {}):
            rows["triton"]["speedup_vs_matmul_argmax"] = rows["matmul-argmax"]["ms"] / rows["triton"]["ms"]
        nearest.append({"case": case, "variants": rows})
        res.detail("nearest_and_gather", nearest)
    first = nearest[0]["variants"]
    res.measure(nearest_speedup_vs_matmul_argmax=first.get("triton", {}).get("speedup_vs_matmul_argmax"),
                gather_gbps=first.get("propagate-triton", {}).get("gbps"),
                gather_fraction_of_copy=first.get("propagate-triton", {}).get("fraction_of_d2d_copy"))
    variants = {**{f"attention {n}": r for n, r in res.doc["details"]["attention"]["variants"].items()},
                **{f"nearest {n}": r for n, r in first.items()}}
    failed = [f"{n}: {r['error']}" for n, r in variants.items() if "error" in r and n.endswith("triton")]
    if failed:
        return "FAIL", "; ".join(failed)[:300]
    others = [f"{n} ({r['error'][:50]})" for n, r in variants.items() if "error" in r]
    return "PASS", ("variants that did not run: " + "; ".join(others))[:300] if others else ""


# ----------------------------------------------------------------------------- 4 end to end


def _step_clock(device):
    from tokenflow.io.progress import Reporter

    class StepClock(Reporter):
        """Quiet reporter that timestamps every finished inversion / edit step (device-synchronised)."""

        def __init__(self):
            super().__init__(quiet=True)
            self.marks: Dict[str, list] = {}

        def event(self, kind: str, **fields) -> None:
            stage = fields.get("stage")
            if kind in ("stage_start", "progress") and stage in ("invert", "edit"):
                marks = self.marks.setdefault(stage, [])
                done = fields.get("done", fields.get("done_before", 0))
                if kind == "stage_start" or not marks or done > marks[-1][0]:
                    sync(device)
                    marks.append((done, time.perf_counter()))

        def steps(self, stage: str) -> list:
            marks = self.marks.get(stage, [])
            return [b[1] - a[1] for a, b in zip(marks, marks[1:])]

    return StepClock()


def _edit(model, ctx: Ctx, frames: int, size: int, inv_steps: int, steps: int, spacing: int,
          arch: str = "sd21", budget: str = "16GB", extra: Optional[dict] = None) -> dict:
    from tokenflow.benchmark import run
    from tokenflow.benchmark.config import BenchConfig, Variant
    from tokenflow.engine.backends import describe_ran, what_ran
    from tokenflow.io.cache import InversionCache
    from tokenflow.kernels.dispatch import forget_used, used
    from tokenflow.method.editor import Editor

    dtype = model.dtype
    config = BenchConfig(arch=arch, frames=frames, size=(size, size), inversion_steps=inv_steps, steps=steps,
                         keyframe_spacing=spacing)
    overrides = {**({"memory_budget": budget} if ctx.cuda else {}), **(extra or {})}
    cfg = run.edit_config(config, Variant("gpu_check", overrides), ctx.device, dtype, model.name)
    clip = run.synthetic_clip(frames, (size, size))
    clock = _step_clock(ctx.device)
    editor = Editor(model, cache=InversionCache(enabled=False), reporter=clock)
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    sync(ctx.device)
    forget_used()   # the kernel backends the dispatcher resolves from here on are this edit's
    started = time.perf_counter()
    try:
        result = editor.edit(clip, config=cfg)
        sync(ctx.device)
        total = time.perf_counter() - started
        ran = what_ran(editor.runner.backend, ctx.device, dtype, used())   # what ran, as the run summary says it
        backend = editor.runner.backend
    finally:
        editor.tokenflow.remove()   # the next run's Editor installs its own processors on the same UNet
    t = {k: float(v) for k, v in result.timings.items()}
    inv, edit = clock.steps("invert"), clock.steps("edit")
    four = sum(t.get(k, 0.0) for k in ("encode", "invert", "edit", "decode"))
    other = max(0.0, total - four)
    extrapolated = (t.get("encode", 0.0) + EXTRAPOLATE_STEPS * statistics.median(inv)
                    + EXTRAPOLATE_STEPS * statistics.median(edit) + t.get("decode", 0.0) + other)
    out = {"frames": frames, "size": size, "inversion_steps": inv_steps, "steps": steps, "wall_s": total,
           "timings_s": t, "inversion_step_s": inv, "edit_step_s": edit, "other_s": other,
           "extrapolated_50_50_s": extrapolated, "finite": bool(torch.isfinite(result.latents).all()),
           "ran": ran, "ran_described": describe_ran(ran),
           "unet_backend": backend.describe() if backend is not None else "eager",
           "plan": result.plan.as_dict() if result.plan is not None else None}
    if ctx.cuda:
        total_mem = torch.cuda.get_device_properties(ctx.device).total_memory
        out.update(peak_reserved_bytes=torch.cuda.max_memory_reserved(ctx.device),
                   peak_allocated_bytes=torch.cuda.max_memory_allocated(ctx.device),
                   device_used_at_end_bytes=total_mem - torch.cuda.mem_get_info(ctx.device)[0])
        if out["plan"]:   # measured reserved vs the plan's peak (what it predicted) and usable (its bound)
            out["reserved_over_plan"] = out["peak_reserved_bytes"] / out["plan"]["peak"]
            out["reserved_within_usable"] = out["peak_reserved_bytes"] <= out["plan"]["usable"]
    return out


def stage_end_to_end(ctx: Ctx, res: Result) -> Tuple[str, str]:
    from tokenflow.benchmark import architectures

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    res.detail("extrapolation", f"encode_s + {EXTRAPOLATE_STEPS} * median(inversion step s) + {EXTRAPOLATE_STEPS} * "
                                "median(edit step s) + decode_s + other_s (wall total less the four stages: plan, "
                                "prompts, setup); step times are device-synchronised at every step's end")
    if ctx.cuda:
        arch, dtype, size, spacing, runs = "sd21", torch.float16, 512, 8, [(40, 5, 5), (200, 3, 3)]
    else:
        arch, dtype, size, spacing, runs = "tiny", torch.float32, 64, 2, [(2, 2, 1), (3, 2, 1)]
    started = time.perf_counter()
    model = architectures.build_model(arch, ctx.device, dtype)
    res.detail("model", {"arch": arch, "dtype": str(dtype), "build_s": time.perf_counter() - started,
                         "budget": "16GB" if ctx.cuda else "default (CPU)"})
    for frames, inv_steps, steps in runs:
        key = f"{frames}_frames"
        try:
            out = _edit(model, ctx, frames, size, inv_steps, steps, spacing)
        except Exception as exc:
            res.detail(key, {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]})
            return "FAIL", f"{frames} frames: {_error(exc)}"
        res.detail(key, out)
        res.measure(**{f"extrapolated_s_{key}": out["extrapolated_50_50_s"],
                       f"method_s_{key}": out["extrapolated_50_50_s"] - out["other_s"]})   # stage 7's like for like
        if "peak_reserved_bytes" in out:
            res.measure(**{f"peak_reserved_gb_{key}": out["peak_reserved_bytes"] / GB,
                           f"plan_peak_gb_{key}": out["plan"]["peak"] / GB if out["plan"] else None,
                           f"reserved_over_plan_peak_{key}": out.get("reserved_over_plan")})
        if not out["finite"]:
            return "FAIL", f"{frames} frames: non-finite latents"
    return "PASS", ""


# ----------------------------------------------------------------------------- 8 SDXL (opt-in)

SDXL_TARGET_FRAMES = 200


def sdxl_extrapolation(out: dict, frames: int, unet_config, latent_hw: Tuple[int, int], spacing: int) -> dict:
    """Per-stage seconds of a ``frames``-frame SDXL edit at 50 + 50 steps from a shorter run ``out``
    (``_edit``'s result). Encode, decode, the inversion steps and the propagation scale with the
    frames (one UNet sample per frame and branch; every frame is matched against its two nearest
    keyframes). The keyframe pass does not: its extended attention grows with K^2 (K = ceil(frames /
    spacing) keyframes, 5 at 40 frames, 25 at 200), so the median edit step is split between the
    passes in the measured ratio of their times and the keyframe share scaled by the FLOP model's
    ``keyframe_pass(K_target) / keyframe_pass(K_measured)`` (``tokenflow.benchmark.flops``). The rest
    (plan, prompts, setup) is as measured."""
    from tokenflow.benchmark import flops

    scale = frames / out["frames"]
    t = out["timings_s"]
    k_now, k_then = math.ceil(out["frames"] / spacing), math.ceil(frames / spacing)
    cost = flops.unet_cost(unet_config, *latent_hw)
    keyframe_scale = cost.keyframe_pass(k_then) / cost.keyframe_pass(k_now)
    passes = t.get("keyframes", 0.0) + t.get("propagate", 0.0)
    keyframe_share = t.get("keyframes", 0.0) / passes if passes > 0 else 0.0
    step = statistics.median(out["edit_step_s"])
    stages = {"encode": scale * t.get("encode", 0.0),
              "invert": scale * EXTRAPOLATE_STEPS * statistics.median(out["inversion_step_s"]),
              "edit": EXTRAPOLATE_STEPS * step * (keyframe_share * keyframe_scale + (1 - keyframe_share) * scale),
              "decode": scale * t.get("decode", 0.0), "other": out["other_s"]}
    return {**stages, "total": sum(stages.values()), "keyframe_share": keyframe_share,
            "keyframe_pass_scale": keyframe_scale, "frame_scale": scale}


def stage_sdxl(ctx: Ctx, res: Result) -> Tuple[str, str]:
    """SDXL base 1.0 (random weights, fp16, its VAE float32) at 1024^2, 40 frames, few steps:
    per-stage times extrapolated to 200 frames and 50 + 50 steps (opt-in: ``--stages 8``).
    Dry run: the tiny SDXL at 64^2, 2 frames."""
    from tokenflow.benchmark import architectures
    from tokenflow.models.load import load_model

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    if ctx.cuda:
        dtype, size, spacing, (frames, inv_steps, steps), budget = torch.float16, 1024, 8, (40, 3, 3), "80GB"
    else:
        dtype, size, spacing, (frames, inv_steps, steps), budget = torch.float32, 64, 2, (2, 2, 2), ""
    started = time.perf_counter()
    model = (architectures.build_model("sdxl", ctx.device, dtype) if ctx.cuda
             else load_model("tiny-xl", ctx.device, dtype))
    res.detail("model", {"arch": "sdxl" if ctx.cuda else "tiny-xl", "dtype": str(dtype), "vae_upcast": model.vae_upcast,
                         "build_s": time.perf_counter() - started, "budget": budget or "default (CPU)"})
    res.detail("extrapolation", f"x {SDXL_TARGET_FRAMES} / frames for encode, decode, the inversion steps and "
                                "the propagation's share of the edit steps; the keyframe pass's share x the FLOP "
                                "model's keyframe_pass(K_200) / keyframe_pass(K_measured) (extended attention grows "
                                f"with K^2); {EXTRAPOLATE_STEPS} x median step s for inversion and edit; other_s "
                                "as measured (sdxl_extrapolation)")
    try:
        out = _edit(model, ctx, frames, size, inv_steps, steps, spacing, arch="sdxl", budget=budget)
    except Exception as exc:
        res.detail("run", {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]})
        return "FAIL", f"{frames} frames: {_error(exc)}"
    res.detail("run", out)
    latent = size // model.vae_scale_factor
    per_stage = sdxl_extrapolation(out, SDXL_TARGET_FRAMES, model.unet.config, (latent, latent), spacing)
    res.detail("extrapolated_200_frames_50_50_s", per_stage)
    res.measure(sdxl_extrapolated_s_200_frames=per_stage["total"],
                **{f"sdxl_{k}_s_{frames}_frames": float(v) for k, v in out["timings_s"].items()})
    if "peak_reserved_bytes" in out:
        res.measure(sdxl_peak_reserved_gb=out["peak_reserved_bytes"] / GB,
                    sdxl_plan_peak_gb=out["plan"]["peak"] / GB if out["plan"] else None)
    if not out["finite"]:
        return "FAIL", "non-finite latents"
    return "PASS", ""


# ----------------------------------------------------------------------------- 9 inversion (opt-in)


def stage_inversion(ctx: Ctx, res: Result) -> Tuple[str, str]:
    """Whole SD 2.1-base edits (random weights, fp16, 512^2, 40 frames, 16 GB budget) at the
    original's defaults: DDIM inversion of 500 steps + 50 edit steps, then ``--inversion ddpm`` at
    the same 50 steps, measured, not extrapolated (opt-in: ``--stages 9``). Dry run: the tiny model,
    2 frames, DDIM 4 + 2 against DDPM at 2."""
    from tokenflow.benchmark import architectures

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    if ctx.cuda:
        arch, dtype, size, spacing, frames, ddim_steps, steps = "sd21", torch.float16, 512, 8, 40, 500, 50
    else:
        arch, dtype, size, spacing, frames, ddim_steps, steps = "tiny", torch.float32, 64, 2, 2, 4, 2
    model = architectures.build_model(arch, ctx.device, dtype)
    res.detail("model", {"arch": arch, "dtype": str(dtype), "frames": frames, "size": size})
    runs = {}
    for name, inv_steps, extra in ((f"ddim{ddim_steps}", ddim_steps, {"inversion": "ddim"}),
                                   (f"ddpm{steps}", steps, {"inversion": "ddpm"})):
        try:
            runs[name] = _edit(model, ctx, frames, size, inv_steps, steps, spacing, arch=arch, extra=extra)
        except Exception as exc:
            res.detail(name, {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]})
            return "FAIL", f"{name}: {_error(exc)}"
        res.detail(name, runs[name])
        if not runs[name]["finite"]:
            return "FAIL", f"{name}: non-finite latents"
    ddim, ddpm = (runs[k] for k in runs)
    res.measure(ddim500_over_ddpm50_total=ddim["wall_s"] / ddpm["wall_s"],
                ddim_over_ddpm_invert=ddim["timings_s"].get("invert", 0.0) / max(ddpm["timings_s"].get("invert", 0.0), 1e-9),
                ddim_wall_s=ddim["wall_s"], ddpm_wall_s=ddpm["wall_s"])
    return "PASS", ""


# ----------------------------------------------------------------------------- 5 call-size sweep

SWEEP_UNET_ROWS = [16, 32, 64, 128, 192, 256]
SWEEP_VAE_FRAMES = [1, 2, 4, 8, 16]
FLAT = 0.95   # speed has flattened at the first size within 5% of the best rate


def flattens_at(rates: Dict[int, float]) -> Optional[int]:
    """The first size (ascending) whose rate is within 5% of the best; None without rates."""
    if not rates:
        return None
    best = max(rates.values())
    return min(n for n, rate in rates.items() if rate >= FLAT * best)


def _sweep(ctx: Ctx, sizes, make: Callable[[int], Callable], unit: str) -> Tuple[Dict[int, dict], Dict[int, float]]:
    """Device-synchronised median seconds of ``make(n)()`` for each n in ``sizes`` ascending; stops at
    the first size that does not fit (or fails: larger ones would too) or would outlast the stage."""
    reps, warmup = (3, 1) if ctx.cuda else (2, 1)
    rows: Dict[int, dict] = {}
    rates: Dict[int, float] = {}
    for n in sizes:
        if rates and (reps + warmup) * n / max(rates.values()) > ctx.left() - 3:
            rows[n] = {"skipped": "stage time: would not finish"}
            break
        try:
            fn = make(n)
            seconds = median_seconds(fn, ctx.device, reps=reps, warmup=warmup)
        except torch.OutOfMemoryError as exc:
            rows[n] = {"skipped": f"does not fit: {_error(exc)[:120]}"}
            break
        except Exception as exc:   # e.g. past a kernel's int32 indexing
            rows[n] = {"error": _error(exc)}
            break
        finally:
            fn = None
            if ctx.cuda:
                torch.cuda.empty_cache()
        rates[n] = n / seconds
        rows[n] = {"ms": seconds * 1e3, f"{unit}_per_s": rates[n]}
    return rows, rates


def stage_call_sweep(ctx: Ctx, res: Result) -> Tuple[str, str]:
    """Where UNet and VAE calls stop getting faster per row / frame, beside the planner's GPU caps
    (``GPU_UNET_ROWS``, the VAE cap ``call_caps`` derives): the numbers to set them from."""
    from tokenflow.benchmark import architectures
    from tokenflow.engine import planner
    from tokenflow.engine.memory import INT32_ELEMENTS, unet_largest_row_elements, vae_largest_frame_elements

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    if ctx.cuda:
        arch, dtype, size, unet_sizes, vae_sizes = "sd21", torch.float16, 512, SWEEP_UNET_ROWS, SWEEP_VAE_FRAMES
    else:
        arch, dtype, size, unet_sizes, vae_sizes = "tiny", torch.float32, 64, [1, 2, 4], [1, 2]
    model = architectures.build_model(arch, ctx.device, dtype)
    unet, vae, dev = model.unet, model.vae, ctx.device
    lat = size // model.vae_scale_factor
    channels = unet.config.in_channels

    def unet_call(n: int) -> Callable:   # the plain UNet (diffusers' attention), one timestep, SD's 77 tokens
        x = torch.randn(n, channels, lat, lat, device=dev, dtype=dtype)
        t = torch.full((n,), 500, device=dev, dtype=torch.long)
        text = torch.randn(n, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
        return lambda: unet(x, t, encoder_hidden_states=text).sample

    def vae_call(n: int) -> Callable:
        z = torch.randn(n, vae.config.latent_channels, lat, lat, device=dev, dtype=dtype)
        return lambda: vae.decode(z).sample

    vae_cap = min(planner.GPU_VAE_FRAMES,
                  max(1, planner.GPU_VAE_ELEMENTS // vae_largest_frame_elements(vae.config, size, size)))
    res.measure(planner_unet_rows=planner.GPU_UNET_ROWS, planner_vae_frames=vae_cap)
    res.detail("case", {"arch": arch, "dtype": str(dtype), "size": size, "rule": (
        f"flat = the first size within {round((1 - FLAT) * 100)}% of the best rate (device-synchronised medians); "
        "set GPU_UNET_ROWS / GPU_VAE_FRAMES in tokenflow/engine/planner.py from unet_rows_flat / vae_frames_flat"),
        "int32_unet_rows": INT32_ELEMENTS // unet_largest_row_elements(unet.config, lat, lat),
        "int32_vae_frames": INT32_ELEMENTS // vae_largest_frame_elements(vae.config, size, size)})
    with torch.inference_mode():
        for key, sizes, make, unit in (("unet", unet_sizes, unet_call, "rows"), ("vae", vae_sizes, vae_call, "frames")):
            rows, rates = _sweep(ctx, sizes, make, unit)
            res.detail(key, rows)
            flat = flattens_at(rates)
            res.measure(**{f"{key}_{unit}_flat": flat,
                           f"{key}_best_{unit}_per_s": max(rates.values()) if rates else None})
            if not rates:
                return "FAIL", f"{key}: no call size ran ({next(iter(rows.values()), {})})"[:300]
    m = res.doc["measured"]
    return "PASS", (f"UNet flat from {m['unet_rows_flat']} rows (planner {m['planner_unet_rows']}), VAE from "
                    f"{m['vae_frames_flat']} frames (planner {m['planner_vae_frames']})")


# ----------------------------------------------------------------------------- 6 compile vs eager


def stage_compile(ctx: Ctx, res: Result) -> Tuple[str, str]:
    from tokenflow.benchmark import architectures, run
    from tokenflow.benchmark.config import BenchConfig, Variant, variant_overrides

    if not ctx.cuda and not ctx.dry_run:
        return "SKIP", "no CUDA device"
    # first tests/gpu's compile check (tiny model: graphs counted, defects 1-4), with under half the time
    tests, tests_reason = _pytest(ctx, res, COMPILE_TESTS, min(0.45 * ctx.left(), ctx.left() - 10), key="compile_tests")
    res.detail("compile_tests_status", [tests, tests_reason])
    # then SD 2.1-base eager vs compile, small so a cold inductor compile + CUDA graph capture fits
    if ctx.cuda:
        config = BenchConfig(arch="sd21", frames=8, size=(256, 256), inversion_steps=2, steps=2, keyframe_spacing=4,
                             repeats=1, warmup=1, device="cuda", dtype="float16")
        names = ["eager", "compile"]
    else:   # inductor's code generation takes minutes on a CPU: the dry run compiles with dynamo's graphs
        # run by aot_eager (tracing, guards, graph counting and the backend's own paths; no codegen)
        os.environ["TOKENFLOW_COMPILER"] = "aot_eager"   # this stage's own process (run_stage)
        config = BenchConfig(arch="tiny", frames=2, size=(64, 64), inversion_steps=1, steps=1, keyframe_spacing=2,
                             repeats=1, warmup=0, idle_wait_s=0, device="cpu", dtype="float32")
        names = ["eager", "compile"]
    model = architectures.build_model(config.arch, ctx.device, getattr(torch, config.dtype))
    clip = run.synthetic_clip(config.frames, config.size)
    entries, first = {}, None
    for name in names:
        try:
            entry = run.run_variant(model, clip, config, Variant(name, variant_overrides(name)), ctx.device,
                                    model.dtype, None, model.name)
        except Exception as exc:
            entries[name] = {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]}
            res.detail("variants", entries)
            continue
        latents = entry.pop("_latents")
        first = latents if first is None else first
        entries[name] = {"total_s": entry["stages"]["total"]["seconds"], "warmup_s": entry["warmup_seconds"],
                         "unet_backend": entry["unet_backend"], "finite": entry["finite"], "notes": entry["notes"],
                         "max_abs_latent_diff_vs_eager": float((latents - first).abs().max())}
        res.detail("variants", entries)
    eager = entries.get("eager", {}).get("total_s")
    for name, e in entries.items():
        if e.get("total_s") and eager:
            res.measure(**{f"{name.replace('+', '_').replace('=', '_')}_speedup_vs_eager": eager / e["total_s"]})
    graphs = {n: e["unet_backend"].get("stats") for n, e in entries.items() if "unet_backend" in e}
    res.measure(compile_stats=graphs)
    failed = [f"{n}: {e['error']}" for n, e in entries.items() if "error" in e]
    if tests == "FAIL":
        failed.insert(0, f"compile check: {tests_reason}")
    if failed:
        return "FAIL", "; ".join(failed)[:300]
    return "PASS", "" if ctx.cuda else f"dry run: compile through aot_eager (no inductor codegen); compile check {tests}"


# ----------------------------------------------------------------------------- 7 the original


ORIGINAL_METHOD_STAGES = ("pre_load_frames_vae_encode", "inversion", "editing_denoise", "decode")


def original_method_seconds(timings: dict) -> Optional[float]:
    """The original's own work in its GPU_RUN_RESULT ``timings_s`` (flat keys, shared/reference/gpu_run.sh),
    like ours in stage 4's ``method_s``: encode once, invert, denoise, decode; not its imports,
    model loads, reconstruction check of the preprocessing, or the edit's second encode. None when
    the run did not get that far."""
    parts = [timings.get(k) for k in ORIGINAL_METHOD_STAGES]
    if not all(isinstance(p, (int, float)) and p > 0 for p in parts[1:3]):
        return None
    return float(sum(p for p in parts if isinstance(p, (int, float))))


def stage_original(ctx: Ctx, res: Result) -> Tuple[str, str]:
    if not KIT.exists():
        return "SKIP", f"reference kit not prepared ({KIT.relative_to(ROOT)}; docs/benchmarks.md says how)"
    if not ctx.cuda:
        return "SKIP", "no CUDA device" + (" (dry run)" if ctx.dry_run else "")
    budget = int(ctx.left() - 10)
    if budget < 60:
        return "SKIP", f"{budget} s left: too little for the original's 40-frame run"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}   # its files stay out of $OUT
    proc = subprocess.run(["bash", str(KIT), "--frames", "40", "--timeout", str(budget)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    print(proc.stdout[-8000:], proc.stderr[-4000:], sep="\n")
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("GPU_RUN_RESULT ")), None)
    stopped = proc.returncode in (3, 124, 137)   # its own timeout (3), or killed at a limit: optional, so SKIP
    if line is None:
        if stopped:
            return "SKIP", f"optional: the reference run stopped before a result (exit status {proc.returncode})"
        return "FAIL", f"no GPU_RUN_RESULT line (exit status {proc.returncode})"
    found = json.loads(line.split(" ", 1)[1])
    res.detail("original", found)
    timings = found.get("timings_s") or {}
    wall = timings.get("wall_total")
    ours = ctx.earlier("end_to_end", "extrapolated_s_40_frames")
    method = original_method_seconds(timings)
    ours_method = ctx.earlier("end_to_end", "method_s_40_frames")
    res.measure(original_wall_s_40_frames=wall, original_over_ours_40_frames=wall / ours if wall and ours else None,
                original_method_s_40_frames=method,
                original_over_ours_method_40_frames=method / ours_method if method and ours_method else None)
    if stopped:
        return "SKIP", f"optional: the reference run stopped (exit status {proc.returncode}; 3: its own timeout)"
    if proc.returncode != 0:
        return "FAIL", f"exit status {proc.returncode}"
    return "PASS", ""


STAGE_FUNCTIONS = {0: stage_machine, 1: stage_triton_warmup, 2: stage_gpu_tests, 3: stage_kernels,
                   4: stage_end_to_end, 5: stage_call_sweep, 6: stage_compile, 7: stage_original, 8: stage_sdxl,
                   9: stage_inversion}


def run(number: int, result_path: Path, context: Path, dry_run: bool, time_limit: float) -> int:
    res = Result(result_path)
    ctx = Ctx(dry_run, time_limit, context)
    try:
        status, reason = STAGE_FUNCTIONS[number](ctx, res)
        if os.environ.get("GPU_CHECK_INJECT_NAN") == str(number):   # the test seam (module doc)
            res.measure(injected_nan=float("nan"), injected_inf=float("inf"))
            res.detail("injected", {"max_abs_latent_diff_vs_eager": float("nan"), "rows": [1.0, float("-inf")]})
    except Exception as exc:
        traceback.print_exc()
        status, reason = "FAIL", _error(exc)
        res.detail("traceback", traceback.format_exc()[-3000:])
    res.doc.update(status=status, reason=reason)
    res.save()
    print(f"stage {number}: {status} {reason}")
    return 0 if status != "FAIL" else 1
