"""The benchmark runner: whole edits, timed per stage, for each variant.

For every variant: one ``tokenflow.method.editor.Editor`` on the shared model (inversion cache off),
``warmup`` untimed edits, a bounded wait for an idle CPU (CPU devices), then ``repeats`` timed
edits of the same clip. A stage's time is ``EditResult.timings[stage]`` (the editor's own stage
timers: "encode", "invert", "edit", "decode", and the device-synchronised sub-stages "keyframes"
and "propagate" of "edit"); "total" is the wall time of ``Editor.edit`` (device-synchronised).
Each stage reports the median over the repeats and, from the analytic work of the edit
(``flops.edit_work``: every UNet sample and VAE frame of this very run, keyframes and pairs
included), frames/s, UNet samples/s, achieved TFLOP/s and the fraction of the measured matmul
peak (``peak.py``) of the run's dtype, plus the stage's peak memory (``system.MemoryTracker``).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch

from tokenflow.benchmark import architectures, flops, original_kernels, peak, system  # noqa: F401  original: registers its backends
from tokenflow.benchmark.conditions import BenchEditor, build_controlnets
from tokenflow.benchmark.config import STAGES, BenchConfig, Variant, variant_overrides
from tokenflow.config import EditConfig
from tokenflow.device import device_name, resolve_device, resolve_dtype, sync, versions
from tokenflow.engine.backends import what_ran
from tokenflow.errors import ConfigError, ResourceError, TokenFlowError, first_line, one_line
from tokenflow.io.cache import InversionCache
from tokenflow.io.progress import Reporter
from tokenflow.io.read import Clip, read_video
from tokenflow.io.samples import render_frames
from tokenflow.kernels import check_backends
from tokenflow.kernels.dispatch import forget_used, used
from tokenflow.method import schedule
from tokenflow.method.keyframes import groups, keyframe_windows, original_plan, paper_plan
from tokenflow.models.random_weights import scheduler_config

PROMPT = "a benchmark edit of a synthetic clip"
INVERSION_PROMPT = "coloured shapes moving over a gradient"
SCHEMA = 1


def log(message: str) -> None:
    print(f"tokenflow bench: {message}", file=sys.stderr, flush=True)


def synthetic_clip(n_frames: int, size, seed: int = 0) -> Clip:
    """``n_frames`` frames of ``tokenflow.io.samples.render_frames`` as a Clip: [N, 3, H, W] in [0, 1]."""
    pixels = torch.from_numpy(render_frames(n_frames, tuple(size), seed))
    frames = pixels.permute(0, 3, 1, 2).float() / 255.0
    return Clip(frames=frames.contiguous(), fps=12.0, source="synthetic", source_size=tuple(size),
                indices=list(range(n_frames)), content_hash=f"synthetic:{n_frames}:{size[0]}x{size[1]}:{seed}",
                audio=False, start_time=0.0, end_time=n_frames / 12.0)


def load_clip(config: BenchConfig) -> Clip:
    if config.video is None:
        return synthetic_clip(config.frames, config.size)
    return read_video(config.video, frames=config.frames, size=config.size)


def check_schedule(config: BenchConfig) -> None:
    """ConfigError now (before any model builds) if a variant's step counts do not fit together
    (variants may set their own inversion: ddimN, ddpm)."""
    for name in config.variants:
        overrides = variant_overrides(name)
        if overrides.get("inversion", "ddim") == "ddpm":
            continue
        inversion_steps = overrides.get("inversion_steps", config.inversion_steps)
        if config.steps > inversion_steps:
            raise ConfigError(f"--steps {config.steps} exceeds the {inversion_steps} inversion steps of variant "
                              f"{name!r} (--inversion-steps, or ddimN)")
        sched = scheduler_config()
        schedule.inversion_save_timesteps(schedule.timesteps_of(sched, inversion_steps),
                                          schedule.timesteps_of(sched, config.steps))


def edit_config(config: BenchConfig, variant: Variant, device: torch.device, dtype: torch.dtype,
                model_name: str) -> EditConfig:
    """The EditConfig of one variant; overrides EditConfig lacks are skipped with a note."""
    fields = EditConfig.__dataclass_fields__
    base = dict(frames=config.frames, size=tuple(config.size), model=model_name, device=str(device),
                dtype=str(dtype).removeprefix("torch."), inversion_prompt=INVERSION_PROMPT, prompt=PROMPT,
                inversion_steps=config.inversion_steps, steps=config.steps,
                keyframe_spacing=config.keyframe_spacing, chunk_frames=config.chunk_frames,
                attention_backend=config.attention_backend, nearest_backend=config.nearest_backend,
                seed=config.seed)
    overrides = dict(variant.overrides)
    overrides.pop("_controlnets", None)   # the runner gives the editor its ControlNets
    ddpm_steps = overrides.pop("_ddpm_steps", None)
    if ddpm_steps is not None and ddpm_steps != config.steps:
        raise ConfigError(f"variant {variant.name!r}: the DDPM inversion runs at the edit's timesteps, so its "
                          f"steps are --steps ({config.steps}): use --steps {ddpm_steps}, or name the variant ddpm")
    if overrides.pop("_original", False):  # the original propagates one keyframe group per UNet call
        overrides.setdefault("chunk_frames", min(config.keyframe_spacing, config.frames))
    for key in list(overrides):
        if key not in fields:
            variant.notes.append(f"{key}={overrides.pop(key)!r} skipped: this tokenflow's EditConfig has no {key}")
    cfg = EditConfig(**{**base, **overrides})
    return cfg.validate()


def work_of(model, result, cfg: EditConfig, n_frames: int, latent_hw, nets=()) -> flops.EditWork:
    """Analytic work of the edit that produced ``result`` (its keyframes, windows and pairs; ``nets``:
    the ControlNets it ran on the non-source rows of every step)."""
    spacing = min(cfg.keyframe_spacing, n_frames)
    n_groups = len(groups(n_frames, spacing))
    window = getattr(cfg, "keyframe_window", None)
    calls, pairs = [], []
    for step, keyframes in enumerate(result.keyframes):
        spans = keyframe_windows(n_groups, window, step)
        calls.append([b - a for a, b in spans])
        plans = [original_plan(g, n_frames, spacing) if cfg.propagation == "original" else
                 paper_plan(g, n_frames, spacing, torch.tensor(keyframes)) for g in range(n_groups)]
        pairs.append([int((row >= 0).sum()) for p in plans for row in p.pairs])
    prompts = len(cfg.prompts) if hasattr(cfg, "prompts") else 1
    # the DDPM inversion evaluates every frame once per timestep the edit denoises at (after its skip)
    inverted = len(result.timesteps) if getattr(cfg, "inversion", "ddim") == "ddpm" else cfg.inversion_steps
    return flops.edit_work(model.unet.config, model.vae.config, n_frames, latent_hw, inverted,
                           calls, pairs, propagation=cfg.propagation, branches=1 + 2 * prompts,
                           text_tokens=int(getattr(model.tokenizer, "model_max_length", flops.TEXT_TOKENS)),
                           controlnet_config=nets[0].config if nets else None, controlnets=len(nets))


def timed_edit(editor, clip: Clip, cfg: EditConfig, device: torch.device) -> dict:
    """One edit with per-stage timings, peak memory and counted UNet samples."""
    tracker = system.MemoryTracker(device)
    editor.reporter = system.MeasuringReporter(tracker).use_device(device)   # stages wait for queued work
    runner = getattr(editor, "runner", None)
    samples_before = getattr(runner, "samples", None)
    sync(device)
    with tracker.stage("total"):
        start = time.perf_counter()
        result = editor.edit(clip, config=cfg)
        sync(device)
        total = time.perf_counter() - start
    samples_after = getattr(runner, "samples", None)
    timings = {k: float(v) for k, v in result.timings.items()}
    timings["total"] = total
    counted = None if samples_before is None or samples_after is None else samples_after - samples_before
    return {"result": result, "timings": timings, "peaks": dict(tracker.peaks), "samples_counted": counted,
            "memory_method": tracker.method}


def summarise(runs: List[dict], work: flops.EditWork, peak_tflops: Optional[float]) -> Dict[str, dict]:
    """Per stage: median seconds, every repeat, rates, fraction of peak, peak memory."""
    stages = {}
    for stage in STAGES:
        times = [r["timings"].get(stage) for r in runs]
        if any(t is None for t in times):
            stages[stage] = {"seconds": None, "repeats_s": times,
                             "note": "this tokenflow's editor does not time this stage"}
            continue
        median = statistics.median(times)
        fl, samples = work.flops[stage], work.samples[stage]
        tflops = fl / median / 1e12 if median > 0 else None
        mems = [r["peaks"].get(stage) for r in runs if r["peaks"].get(stage) is not None]
        stages[stage] = {
            "seconds": median, "repeats_s": times,
            "frames_per_s": work.frames / median if median > 0 else None,
            "unet_samples": samples or None,
            "samples_per_s": samples / median if samples and median > 0 else None,
            "flops": fl, "tflops": tflops,
            "fraction_of_peak": tflops / peak_tflops if tflops is not None and peak_tflops else None,
            "peak_memory_bytes": max(mems) if mems else None,
        }
    return stages


def run_variant(model, clip: Clip, config: BenchConfig, variant: Variant, device, dtype,
                peak_tflops: Optional[float], model_name: str, controlnets=()) -> dict:
    """``controlnets``: the run's random ControlNets; the variant uses its first ``controlnetN``."""
    cfg = edit_config(config, variant, device, dtype, model_name)
    nets = tuple(controlnets[:variant.overrides.get("_controlnets", 0)])
    editor = BenchEditor(model, nets=nets, cache=InversionCache(enabled=False), reporter=Reporter(quiet=True))
    warmup_s = []
    forget_used()   # the kernel backends the dispatcher resolves from here on are this variant's
    try:
        for i in range(config.warmup):
            log(f"{variant.name}: warm-up {i + 1}/{config.warmup}")
            warmup_s.append(timed_edit(editor, clip, cfg, device)["timings"]["total"])
        cpu = device.type == "cpu"
        budget = config.idle_wait_s           # seconds of waiting for an idle CPU, for all repeats
        waited = []
        load_before = system.load_snapshot()
        runs = []
        for i in range(config.repeats):
            if cpu:                           # before every repeat: others may have started meanwhile
                waited.append(system.wait_until_idle(budget))
                budget = max(0.0, budget - waited[-1]["waited_s"])
            with system.ContentionMeter() as meter:
                runs.append(timed_edit(editor, clip, cfg, device))
            runs[-1]["others_busy_cpus"] = meter.others_busy_cpus
            log(f"{variant.name}: repeat {i + 1}/{config.repeats}: {runs[-1]['timings']['total']:.2f} s"
                + (f" (other processes: {meter.others_busy_cpus:.2f} CPUs busy)" if cpu and meter.others_busy_cpus
                   is not None else ""))
        load_after = system.load_snapshot()
        if cpu and any(not w["idle"] for w in waited):
            variant.notes.append(f"the machine was still busy after waiting {config.idle_wait_s:g} s before a "
                                 "repeat: timings may be inflated")
        busy = [r["others_busy_cpus"] for r in runs if r["others_busy_cpus"] is not None]
        threshold = max(0.5, 0.1 * (os.cpu_count() or 1))
        if cpu and busy and max(busy) > threshold:
            variant.notes.append(f"other processes kept up to {max(busy):.2f} CPUs busy during timed repeats "
                                 "(others_busy_cpus in the JSON): CPU timings are disturbed")
    finally:
        remove = getattr(getattr(editor, "tokenflow", None), "remove", None)
        if remove is not None:
            remove()
    last = runs[-1]["result"]
    n, _, height, width = clip.frames.shape
    latent_hw = (height // model.vae_scale_factor, width // model.vae_scale_factor)
    work = work_of(model, last, cfg, n, latent_hw, nets)
    counted = runs[-1]["samples_counted"]
    if counted is not None and counted != work.samples["total"]:
        variant.notes.append(f"the runner counted {counted} UNet samples, the FLOP model {work.samples['total']}")
    finite = bool(torch.isfinite(last.latents).all() and torch.isfinite(last.frames).all())
    if not finite:
        variant.notes.append("the edit produced NaN/inf values (random weights overflowing this dtype?)")
    plan = getattr(last, "plan", None)
    extra = sorted(set(runs[-1]["timings"]) - set(STAGES))
    backend = getattr(getattr(editor, "runner", None), "backend", None)
    return {
        "name": variant.name, "overrides": {k: v for k, v in variant.overrides.items() if not k.startswith("_")},
        "controlnets": len(nets), "edit_config": _jsonable(asdict(cfg)), "notes": variant.notes,
        "idle_wait": waited or None, "load_before": load_before, "load_after": load_after,
        "others_busy_cpus": [r["others_busy_cpus"] for r in runs],
        "unet_samples_counted": counted, "memory_method": runs[-1]["memory_method"], "finite": finite,
        "other_timings_s": {k: statistics.median(r["timings"][k] for r in runs) for k in extra},
        "plan": _jsonable(plan.as_dict()) if hasattr(plan, "as_dict") else None,
        # compiled backends pay compilation/export in the warm-up: its wall time is that cost + one edit
        "warmup_seconds": warmup_s,
        "unet_backend": {"name": getattr(backend, "name", "eager"),
                         "stats": _jsonable(backend.stats()) if backend is not None else {}},
        # the UNet backend and each kernel op's backends that ran (warm-up and repeats), how verified
        "ran": what_ran(backend, device, dtype, used()),
        "stages": summarise(runs, work, peak_tflops),
        "_latents": last.latents,
    }


def failed_variant(variant: Variant, exc: BaseException) -> dict:
    """The entry of a variant that could not finish (out of memory, a kernel that raised, a bug): no
    numbers; the error's type and first line, and the exit code it would have had on its own
    (``tokenflow.errors``: its own for a TokenFlowError, 6 for host memory, else 1)."""
    error = one_line(exc) if not isinstance(exc, TokenFlowError) else first_line(exc)
    code = exc.exit_code if isinstance(exc, TokenFlowError) else (
        ResourceError.exit_code if isinstance(exc, MemoryError) else TokenFlowError.exit_code)
    stages = {stage: {"seconds": None, "repeats_s": [], "error": error} for stage in STAGES}
    return {"name": variant.name, "overrides": {k: v for k, v in variant.overrides.items() if not k.startswith("_")},
            "error": error, "error_type": type(exc).__name__, "exit_code": code,
            "notes": variant.notes + [f"failed: {error}"], "stages": stages, "_latents": None,
            "memory_method": None, "ran": None}


def resolve(config: BenchConfig):
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    return device, dtype


def run(config: BenchConfig, *, on_variant: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every variant of ``config``; returns the JSON document (see ``report.write_json``).

    ``on_variant(doc)``: called after every variant, finished or failed, with the document so far
    (``complete`` False until the last one), so a caller can write it each time."""
    config = config.validate()
    check_schedule(config)
    device, dtype = resolve(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, device, dtype, on_variant)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, device: torch.device, dtype: torch.dtype,
         on_variant: Optional[Callable[[dict], None]]) -> dict:
    variants = [Variant(name, variant_overrides(name)) for name in config.variants]
    for variant in variants:  # bad or unavailable backends etc. fail now, before the model is built
        cfg = edit_config(config, Variant(variant.name, dict(variant.overrides)), device, dtype, "check")
        check_backends(device, dtype, cfg.attention_backend, cfg.nearest_backend, self_check=False)
    load_start = system.load_snapshot()
    clip = load_clip(config)                      # a bad --video fails before any model builds
    dtype_name = str(dtype).removeprefix("torch.")
    log(f"building {'model ' + config.model if config.model else config.arch} on {device} ({dtype_name})")
    started = time.perf_counter()
    model = architectures.load(config.model, device, dtype) if config.model else \
        architectures.build_model(config.arch, device, dtype)
    most = max((v.overrides.get("_controlnets", 0) for v in variants), default=0)
    controlnets = build_controlnets(model, most, device, dtype, config.model or config.arch) if most else []
    build_s = time.perf_counter() - started
    peak_wait = system.wait_until_idle(config.idle_wait_s) if device.type == "cpu" else None
    log("measuring the matmul peak")
    with system.ContentionMeter() as meter:
        peaks = peak.measure_all(device, peak.default_dtypes(device, dtype))
    peak_tflops = peaks[str(dtype).removeprefix("torch.")].tflops
    n, _, height, width = clip.frames.shape
    doc = {
        "benchmark": "tokenflow bench", "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": device_name(device), "type": device.type, "torch_threads": torch.get_num_threads()},
        "versions": versions(), "git": system.git_revision(),
        "command": None, "argv": list(sys.argv),
        "settings": _jsonable({**asdict(config), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}),
        "model": {"name": model.name, "identity": model.identity, "arch": None if config.model else config.arch,
                  "random_weights": config.model is None or model.is_tiny,
                  "is_tiny": model.is_tiny, "build_s": build_s, "in_channels": int(model.unet.config.in_channels),
                  "controlnets_built": len(controlnets)},
        "clip": {"source": clip.source, "frames": n, "size": [width, height],
                 "latent": [height // model.vae_scale_factor, width // model.vae_scale_factor]},
        "load": {"start": load_start, "end": None},
        "matmul_peak": {k: v.as_dict() for k, v in peaks.items()}, "matmul_peak_idle_wait": peak_wait,
        "matmul_peak_others_busy_cpus": meter.others_busy_cpus,
        "peak_dtype": str(dtype).removeprefix("torch."),
        "flop_model": "tokenflow.benchmark.flops: analytic multiply-adds x 2 of convs, linears and attention "
                      "products (see its docstring)",
        "variants_planned": [v.name for v in variants],
        "complete": False,      # True once every planned variant ran (or failed)
        "failed": [],           # names of the variants that raised (each entry has error, error_type)
        "variants": [],
        "ratios": {},
    }
    baseline = None
    for index, variant in enumerate(variants):
        try:
            entry = run_variant(model, clip, config, variant, device, dtype, peak_tflops, model.name, controlnets)
        except Exception as exc:   # out of memory, a kernel that raised, a bug: recorded, the others still run
            entry = failed_variant(variant, exc)
            log(f"{variant.name}: failed: {entry['error']}")
        latents = entry.pop("_latents")
        if index == 0:
            baseline = latents
        entry["max_abs_latent_diff_vs_first"] = (None if latents is None or baseline is None else
                                                 float((latents - baseline).abs().max()))
        doc["variants"].append(entry)
        doc["failed"] = [e["name"] for e in doc["variants"] if e.get("error")]
        doc["ratios"] = ratios(doc["variants"])
        doc["load"]["end"] = system.load_snapshot()
        doc["complete"] = index == len(variants) - 1
        if on_variant is not None:
            on_variant(doc)
    return doc


def ratios(results: List[dict]) -> Dict[str, Dict[str, Optional[float]]]:
    """{variant: {stage: first variant's seconds / this variant's}} (> 1: faster than the first)."""
    first = results[0]["stages"]
    out = {}
    for entry in results:
        out[entry["name"]] = {
            stage: (first[stage]["seconds"] / s["seconds"]
                    if first[stage].get("seconds") and s.get("seconds") else None)
            for stage, s in entry["stages"].items()}
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value):
        return _jsonable(asdict(value))
    return str(value)
