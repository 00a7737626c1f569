"""Whole jobs as the CLI runs them: load, invert/edit, write every output atomically, summarise."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tokenflow.app.locks import OutputLocks, sweep_leftovers
from tokenflow.app.outputs import per_prompt_folders, prompt_outputs, resolve_output
from tokenflow.app.paths import check_no_aliasing, job_inputs, job_output_paths
from tokenflow.app.skip import Skip, job_fields, job_outputs
from tokenflow.config import EditConfig, default_size
from tokenflow.device import resolve_device, resolve_dtype, versions
from tokenflow.engine.backends import describe_ran, what_ran
from tokenflow.engine.host_plan import HostPlan, before_read
from tokenflow.engine.planner import MemoryPlan
from tokenflow.errors import ConfigError, InputError, Interrupted, OutputError
from tokenflow.interrupt import StopFlag, stop_on_signals
from tokenflow.io.checkpoint import remove_checkpoint
from tokenflow.io.outputs import (
    atomic_file,
    check_frames_target,
    check_writable,
    remove_path,
    swap_folder_into_place,
    temp_sibling,
)
from tokenflow.io.progress import Reporter
from tokenflow.io.read import Clip, count_selected
from tokenflow.io.stamps import FOLDER_STAMP, sidecar_path, video_metadata, write_stamp_file
from tokenflow.io.write import video_settings, write_frames, write_video
from tokenflow.kernels import check_backends
from tokenflow.kernels.dispatch import forget_used, used
from tokenflow.method.depth import refuse_depth_options
from tokenflow.method.editor import Editor, EditResult, read_clip
from tokenflow.method.schedule import check_steps
from tokenflow.models.architectures import architecture_of, meta_model, weights_on_disk
from tokenflow.models.load import family_of, scheduler_config_for
from tokenflow.models.random_weights import scheduler_config as default_scheduler_config
from tokenflow.quality.cli import evaluate, load_scorer
from tokenflow.quality.flow import require_cv2
from tokenflow.quality.provenance import edit_tags
from tokenflow.quality.report import (
    check_index_target,
    check_report_support,
    check_report_target,
    write_report,
    write_report_index,
)

TINY_NOTE = "made with --model tiny: random weights, the output is NOT a real edit (offline demo/test model)"


def run_edit(config: EditConfig, reporter: Reporter, stop: Optional[StopFlag] = None,
             inputs: Sequence[Tuple[str, str]] = ()) -> List[EditResult]:
    """Edit ``config.video`` and write every output atomically; the results (``[]`` when skipped).

    ``stop``: the caller's stop request (``tokenflow run`` keeps one across its jobs). Without one,
    SIGTERM/SIGINT are handled for the whole job here. A stop before or during the edit ends it
    after the current step (exit 75 with a checkpoint folder, else 130); once the edit is done,
    the outputs are still written, so a signal never leaves a half-written file behind.
    ``inputs``: (label, path) of inputs the config does not name (the ``--config`` file, the job
    file); no output may be, contain or lie inside any input (OutputError, before anything else).
    """
    config.validate()
    if not config.video:
        raise InputError("no input video: pass a video file or a folder of numbered frames (tokenflow edit VIDEO ...)")
    check_model_and_steps(config)
    prompts = config.prompts
    outputs = prompt_outputs(resolve_output(config), prompts)   # ConfigError: -o is not a video name or folder
    video_settings(config.codec, config.pix_fmt, config.crf)   # ConfigError: no encoder here, a pixel format it lacks
    check_no_aliasing(job_output_paths(config, outputs), job_inputs(config, inputs))   # even with --overwrite
    latents_out = prompt_outputs(config.save_latents, prompts) if config.save_latents else [None] * len(prompts)
    frames_out = per_prompt_folders(config.save_frames, prompts)
    reports_out = per_prompt_folders(config.report, prompts)
    targets = job_outputs(outputs, latents_out, frames_out, reports_out)
    skip = Skip(targets, config)
    if skip(reporter):   # every output exists, made by this job (docs/farm.md): nothing to do
        for message in sweep_leftovers(path for path, _ in targets):   # but a killed worker's lock or temps
            reporter.info(message)
        return []
    with _folders_made_for(path for path, _ in targets):   # a failed job leaves no empty folders of its own
        return _run_checked(config, reporter, stop, skip, outputs, latents_out, frames_out, reports_out)


def _run_checked(config: EditConfig, reporter: Reporter, stop: Optional[StopFlag], skip: Skip, outputs: list,
                 latents_out: list, frames_out: list, reports_out: list) -> List[EditResult]:
    """run_edit once nothing is aliased or skipped: the checks before work, the locks, the edit."""
    # every output target and the input are checked before any expensive work
    for target in outputs + [p for p in latents_out if p]:
        check_writable(target)
    for target in frames_out:
        if target:
            check_frames_target(target)
    if config.clip_model and not config.report:
        raise ConfigError("--clip-model scores the report's frames; add --report DIR (or use `tokenflow metrics`)")
    if config.report:
        require_cv2()
        check_report_support()
        for target in reports_out:
            check_report_target(target)
        if len(reports_out) > 1:
            check_index_target(config.report)
    # several prompts' reports share DIR/index.html: locked too, so two jobs never race to write it
    index = [os.path.join(config.report, "index.html")] if config.report and len(reports_out) > 1 else []
    signals = contextlib.nullcontext(stop) if stop is not None else stop_on_signals()
    with signals as stop, OutputLocks([path for path, _ in skip.targets] + index) as locks:   # LockedError (7): another holds one
        for message in locks.broken:
            reporter.info(message)
        if skip(reporter, final=True):   # done by another worker meanwhile?
            return []
        return _edit_locked(config, reporter, locks, stop, outputs, latents_out, frames_out, reports_out)


@contextlib.contextmanager
def _folders_made_for(targets):
    """The folders missing above ``targets`` now (the checks and the writers create them) are
    removed again, deepest first and only while empty, when the block fails: an error, an
    interrupt or an out-of-memory refusal leaves the tree as it found it."""
    missing = set()
    for target in targets:
        folder = os.path.dirname(os.path.abspath(target))
        while folder and not os.path.exists(folder) and folder not in missing:
            missing.add(folder)
            folder = os.path.dirname(folder)
    try:
        yield
    except BaseException:
        for folder in sorted(missing, key=len, reverse=True):
            try:
                os.rmdir(folder)
            except OSError:   # not empty (another job's files, a checkpoint), or gone
                pass
        raise


def _edit_locked(config: EditConfig, reporter: Reporter, locks: OutputLocks, stop: StopFlag, outputs: list,
                 latents_out: list, frames_out: list, reports_out: list) -> List[EditResult]:
    """run_edit's work, while this worker holds the lock of every output."""
    device = resolve_device(config.device)
    reporter.use_device(device)   # stage timings wait for the device's queued work (CUDA, MPS)
    check_backends(device, resolve_dtype(config.dtype, device), config.attention_backend, config.nearest_backend)
    host = check_host_memory(config, len(config.prompts), device.type)   # before anything is decoded or loaded
    scorer = None
    if config.clip_model:   # (after the host check: loading CLIP takes time and memory)
        scorer = load_scorer(config.clip_model, config.device)   # a missing model fails before the decoding
    start = time.perf_counter()
    clip, editor = read_and_load(config, reporter, host, len(config.prompts), device.type)
    if stop.requested:   # during the read or the model load: no step has run, nothing new to save
        raise Interrupted(f"stopped by {stop.reason} before the edit began; nothing was written")
    forget_used()   # from here on, the kernel calls the dispatcher resolves are this edit's (the summary's "ran")
    results = editor.edit_many(clip, config=config, interrupt=stop)   # a stop: step, checkpoint, exit 75 (130)
    ran = ran_by(editor)
    video = video_settings(config.codec, config.pix_fmt, config.crf)
    fields = job_fields(config, input_sha256=clip.content_hash)
    with reporter.stage("write"), _staging() as staged:   # all to temp names, then the locks, then renames
        for result, output, frames_dir, latents_path in zip(results, outputs, frames_out, latents_out):
            metadata = {**edit_tags(result.prompt, config.model, result.model_is_tiny, TINY_NOTE),
                        "encoded_with": video.describe(),
                        **video_metadata(fields)}   # the job's settings: the skip rule reads them back
            temp = temp_sibling(output, ".new" + Path(output).suffix)
            with _naming(output, temp):
                staged.append((write_video(result.frames, temp, config.fps or result.clip.fps, audio_from=result.clip,
                                           metadata=metadata, codec=config.codec, pix_fmt=config.pix_fmt,
                                           crf=config.crf, colour=result.clip.colour), output))
            result.output = output
            if frames_dir:
                temp = temp_sibling(frames_dir, ".new")
                with _naming(frames_dir, temp):
                    staged.append((write_frames(result.frames, temp, config.frames_format), frames_dir))
                    write_stamp_file(os.path.join(temp, FOLDER_STAMP), fields)
            if latents_path:
                temp = temp_sibling(latents_path, ".new.npy")
                with _naming(latents_path, temp):
                    staged.append((save_npy(result.latents.numpy(), temp), latents_path))
                    # the record after its file: a crash between the renames leaves a file that records nothing
                    staged.append((write_stamp_file(temp_sibling(latents_path, ".new.json"), fields),
                                   sidecar_path(latents_path)))
        commit_outputs(staged, locks)
    remove_checkpoint(config.checkpoint_dir)   # the outputs hold the result now (docs/checkpoints.md)
    for result in results:
        result.timings = dict(reporter.timings)
    if config.report:
        with reporter.stage("report"), _staging() as staged:
            run = _run_facts(config, editor, time.perf_counter() - start)
            for result, folder in zip(results, reports_out):
                staged.append((write_edit_report(result, temp_sibling(folder, ".new"), config, scorer, run), folder))
                write_stamp_file(os.path.join(staged[-1][0], FOLDER_STAMP), fields)
            if len(reports_out) > 1:   # DIR/index.html links each prompt's DIR/K-slug/
                index = os.path.join(config.report, "index.html")
                staged.append((write_report_index(temp_sibling(index, ".new.html"), [
                    (os.path.basename(folder), temp) for temp, folder in staged],
                    title=f"tokenflow edit of {Path(str(config.video)).name}: {len(results)} prompts"), index))
            commit_outputs(staged, locks)
    summary = _summary(results, config, time.perf_counter() - start, editor)
    summary["ran"] = ran   # the UNet backend and each kernel op's backend that ran, with how verified
    summary["video"] = video.as_dict()   # which encoder ran, with what pixel format and CRF
    reporter.event("done", **summary)
    if not reporter.quiet and reporter.json_stream is None:
        print(format_summary(summary), file=sys.stderr)
    return results


@contextlib.contextmanager
def _staging():
    """A list of (temp, final) outputs; the temps left over when the block ends (failed, or not
    committed) are removed."""
    staged: list = []
    try:
        yield staged
    finally:
        for temp, _ in staged:
            remove_path(temp)


@contextlib.contextmanager
def _naming(final: str, temp: str):
    """An OutputError about the staged ``temp`` path names the user's ``final`` path instead."""
    try:
        yield
    except OutputError as exc:
        message = re.sub(r"\.*" + re.escape(os.path.basename(temp).lstrip(".")) + r"[^'\s]*", os.path.basename(final),
                         str(exc))
        raise OutputError(message.replace(os.path.dirname(os.path.abspath(temp)) + os.sep + os.path.basename(final),
                                          str(final))) from None


def commit_outputs(staged: list, locks: OutputLocks) -> None:
    """Check that every lock is still ours, then rename each staged output into place."""
    locks.verify()
    for temp, final in staged:
        try:
            if os.path.isdir(temp):
                swap_folder_into_place(temp, final)
            else:
                os.replace(temp, final)
        except OSError as error:
            raise OutputError(f"could not move the finished output into place at '{final}': "
                              f"{error.strerror or error}. Check free disk space and permissions.") from None


def write_edit_report(result: EditResult, folder: str, config: EditConfig, scorer=None,
                      run: Optional[Dict] = None) -> str:
    """Metrics of the in-memory edited frames against the source frames, then the report folder.
    run: ``_run_facts`` (model, device, dtype, seconds so far, peak memory)."""
    metrics = evaluate(result.clip.frames, result.frames, prompt=result.prompt, scorer=scorer)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if v is not None and k != "prompt"}
    folder = write_report(folder, source=result.clip.frames, edited=result.frames, fps=config.fps or result.clip.fps,
                          metrics=metrics, prompt=result.prompt, title=f"tokenflow edit: {Path(result.output).name}",
                          settings=settings, timings={k: v for k, v in result.timings.items()}, versions=versions(),
                          inputs={"source": str(config.video), "output": str(result.output),
                                  "model": str(config.model)},
                          notes=[TINY_NOTE] if result.model_is_tiny else [], run=run, keyframes=result.keyframes)
    return str(folder)


def _run_facts(config: EditConfig, editor: Editor, seconds: float) -> Dict:
    device = editor.model.device
    return {"model": str(config.model), "device": str(device), "dtype": str(editor.model.dtype).replace("torch.", ""),
            "seconds": round(seconds, 3), "peak_memory_bytes": _peak_memory(device), "vae": vae_facts(editor),
            "peak_memory_kind": "reserved by torch's allocator" if device.type == "cuda" else "process peak RSS"}


def kept_latents(config: EditConfig) -> int:
    """[N,4,h,w] tensors an edit keeps from its inversion, from the settings alone: DDIM's of every
    edit timestep and the noisiest; the DDPM inversion's noisy latents and noise maps of the
    timesteps after its skip (SDEdit: of its shorter schedule, so this bounds them)."""
    return 2 * (config.steps - config.skip) if config.inversion == "ddpm" else config.steps + 1


def check_host_memory(config: EditConfig, prompts: int, device_type: str, family: Optional[str] = None) -> HostPlan:
    """The job's host memory (engine.planner.HostPlan) from the input's headers and the config,
    before anything is decoded or loaded: ResourceError (exit 6) with the numbers and the flags
    that fix it when it cannot fit. ``prompts`` 0: an inversion only. ``family``: the model's
    (default: ``family_of`` the --model string, for the default size)."""
    count = count_selected(str(config.video), frames=config.frames, start=config.start_frame, stride=config.stride)
    width, height = config.size or default_size(*count.source_size, family or family_of(config.model))
    return before_read(frames=count.frames, frames_source=count.how, width=width, height=height,
                       source_pixels=count.source_size[0] * count.source_size[1], prompts=prompts,
                       timesteps=kept_latents(config), device_type=device_type, inverted_latents=config.inverted_latents,
                       use_cache=config.use_cache).check()


def check_model_and_steps(config: EditConfig) -> None:
    """Before anything is read, loaded or downloaded: a known v-prediction model (ModelError) and
    edit steps whose timesteps the inversion does not hold (ConfigError naming step counts that
    fit), from the model's scheduler config alone (the load checks the real one again). For a Hub
    model not downloaded yet, whose scheduler is only guessed (Stable Diffusion's), a misfit is a
    warning instead: its own scheduler may serve these steps."""
    refuse_depth_options(config, family_of(config.model), config.model)
    known = scheduler_config_for(config.model, guess=False)
    if known is not None:
        check_steps(known, config)
        return
    try:
        check_steps(default_scheduler_config(), config)
    except ConfigError as exc:
        warnings.warn(f"{exc} (checked against Stable Diffusion's scheduler: {config.model} is not downloaded "
                      "yet, its own is checked when it loads)")


def read_checked(config: EditConfig, reporter: Reporter, host: HostPlan, family: Optional[str] = None) -> Clip:
    """Decode the frames ``config`` selects, checking ``host`` before each frame beyond the count
    it was checked for (a container that did not list them). ``family``: as ``check_host_memory``."""
    return read_clip(str(config.video), config, reporter, on_frame=host.check_frames,
                     family=family or family_of(config.model))


FAMILY_WORDS = {"sdxl": "an SDXL model", "sd": "a Stable Diffusion 1.x/2.x model"}


def read_and_load(config: EditConfig, reporter: Reporter, host: HostPlan, prompts: int, device_type: str,
                  load: Optional[Callable[[], Editor]] = None) -> Tuple[Clip, Editor]:
    """(clip, editor: ``load()``'s, by default the model of ``config``). Without
    --size the frames are read at the default size of the family ``family_of`` finds before the
    load; for a Hub model not downloaded yet (or a pickle file) that is a guess (SD), and when the
    loaded model is of another family they are read again at its default size (SDXL's 1024-pixel
    class, not SD's 512), after the host check at that size."""
    guessed = family_of(config.model)   # before the load: afterwards the Hub cache holds its config
    clip = read_checked(config, reporter, host, guessed)
    editor = load() if load is not None else _load_editor(config, reporter)
    actual = editor.model.family
    if config.size is None and actual != guessed:
        clip = None   # the first read is not kept while the frames are read again
        host = check_host_memory(config, prompts, device_type, actual)
        reporter.info(f"{config.model} is {FAMILY_WORDS.get(actual, actual)} (known once it loaded): reading the "
                      "frames again at its default size (--size sets one)")
        clip = read_checked(config, reporter, host, actual)
    return clip, editor


def run_plan(config: EditConfig, reporter: Reporter) -> MemoryPlan:
    """``tokenflow edit --plan``: load the model (a named version not downloaded: its architecture
    alone), read the clip, print the memory plan (device and host); no edit."""
    config.validate(need_prompt=False)
    if not config.video:
        raise InputError("no input video: --plan needs the video whose edit it plans (tokenflow edit VIDEO --plan)")
    check_model_and_steps(config)
    prompts, device_type = max(1, len(config.prompts)), resolve_device(config.device).type
    host = check_host_memory(config, prompts, device_type)
    made = {}

    def load() -> Editor:
        editor, made["from"] = _plan_editor(config, reporter)
        return editor

    clip, editor = read_and_load(config, reporter, host, prompts, device_type, load=load)
    plan = editor.plan(clip, config.replace(prompt=config.prompts or ("plan",)))
    plan = dataclasses.replace(plan, made_from=made["from"])
    reporter.event("plan", **plan.as_dict())
    if reporter.json_stream is None:
        print(plan.describe())
    return plan


def _plan_editor(config: EditConfig, reporter: Reporter) -> Tuple[Editor, str]:
    """(editor, what the plan is made from): the loaded model ("") or, for a named SD version whose
    weights are not on this machine, its architecture (``models.architectures``: nothing downloaded)."""
    named = architecture_of(config.model)
    if named is None or weights_on_disk(config.model):
        return _load_editor(config, reporter), ""
    arch, name = named
    device = resolve_device(config.device)
    model = meta_model(arch, name, device, resolve_dtype(config.dtype, device))
    return Editor(model, reporter=reporter), f"the architecture of {name} (its weights are not on this machine)"


def _load_editor(config: EditConfig, reporter: Reporter) -> Editor:
    editor = Editor.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                    cache_dir=config.cache_dir, use_cache=config.use_cache, reporter=reporter,
                                    allow_pickle=config.allow_pickle, model_config=config.model_config,
                                    loras=config.loras, embeddings=config.embeddings, vae=config.vae)
    if editor.model.is_tiny:
        reporter.info(f"NOTE: {TINY_NOTE}")
    return editor


def run_invert(config: EditConfig, reporter: Reporter) -> Dict:
    config.validate(need_prompt=False)
    if not config.video:
        raise InputError("no input video: pass a video file or a folder of numbered frames (tokenflow invert VIDEO ...)")
    check_model_and_steps(config)
    start = time.perf_counter()
    device = resolve_device(config.device)
    reporter.use_device(device)   # stage timings wait for the device's queued work (CUDA, MPS)
    host = check_host_memory(config, 0, device.type)   # before anything is decoded or loaded
    clip, editor = read_and_load(config, reporter, host, 0, device.type)
    forget_used()
    inversion = editor.invert(clip, config=config)
    summary = {"ran": None if inversion.from_cache else ran_by(editor),   # null: the cache held it, nothing ran
               "frames": int(inversion.z0.shape[0]), "timesteps": sorted(inversion.latents),
               "tiny_model": editor.model.is_tiny,
               "from_cache": inversion.from_cache, "cache": str(editor.cache.root),
               "inversion": inversion_facts(config),
               "seconds": round(time.perf_counter() - start, 3),
               "stages": {k: round(v, 3) for k, v in reporter.timings.items()}}
    reporter.event("done", **summary)
    if not reporter.quiet and reporter.json_stream is None:
        state = "reused from" if inversion.from_cache else "stored in"
        how = (f"{config.inversion_steps} DDIM steps" if config.inversion == "ddim" else
               f"edit-friendly DDPM at {config.steps} edit timesteps, skip {config.skip}; noise maps too")
        print(f"inverted {summary['frames']} frames ({how}); latents {state} "
              f"{summary['cache']}; {summary['seconds']:.1f} s", file=sys.stderr)
    return summary


def ran_by(editor: Editor) -> Dict:
    """What the editor's last run ran (``engine.backends.what_ran``): its UNet backend and the kernel
    backends the dispatcher resolved since ``forget_used()`` (or the graph backend's)."""
    return what_ran(editor.runner.backend, editor.model.device, editor.model.dtype, used())


def save_npy(array: np.ndarray, path: str) -> str:
    """np.save through a temp file + rename (no partial file on failure)."""
    with atomic_file(path, "wb") as f:
        np.save(f, array)
    return str(path)


def _summary(results: List[EditResult], config: EditConfig, seconds: float, editor: Editor) -> Dict:
    first = results[0]
    n = int(first.frames.shape[0])
    summary = {
        "output": first.output, "outputs": [r.output for r in results], "prompts": [r.prompt for r in results],
        "frames": n, "size": list(first.frames.shape[-1:-3:-1]),
        "steps": len(first.timesteps), "method": config.method, "model": config.model,
        "device": str(editor.model.device), "dtype": str(editor.model.dtype).replace("torch.", ""),
        "seconds": round(seconds, 3), "frames_per_second": round(n * len(results) / seconds, 4) if seconds else None,
        "stages": {k: round(v, 3) for k, v in first.timings.items()},
        "peak_memory_bytes": _peak_memory(editor.model.device), "tiny_model": first.model_is_tiny,
        "vae": vae_facts(editor),
        "inversion": inversion_facts(config),
        "plan": {k: first.plan.as_dict()[k] for k in ("budget", "chunk_frames", "keyframe_call", "inversion_frames",
                                                      "vae_frames", "store_on", "latents_on", "peak")}
        if first.plan else None,
    }
    if config.report:   # the page to open: the top-level one links each prompt's (DIR/K-slug/index.html)
        summary["report"] = str(Path(config.report) / "index.html")
        summary["reports"] = [str(Path(folder) / "index.html")
                              for folder in per_prompt_folders(config.report, summary["prompts"])]
    return summary


def inversion_facts(config: EditConfig) -> Dict:
    """How the source was inverted: the original's DDIM (its step count) or the edit-friendly DDPM
    inversion (on the edit's timesteps; eta, noise seed, skipped steps)."""
    if config.inversion == "ddpm":
        return {"method": "ddpm", "steps": config.steps, "eta": config.eta, "seed": config.seed, "skip": config.skip}
    return {"method": "ddim", "steps": config.inversion_steps}


def vae_facts(editor: Editor) -> Dict:
    """Which VAE ran and in which dtype: the model's own or --vae's; float32 under a 16-bit model
    dtype when its config says ``force_upcast`` (SDXL's VAE overflows in float16)."""
    model = editor.model
    dtype = next(model.vae.parameters()).dtype
    return {"name": model.vae_name or "the model's own", "dtype": str(dtype).replace("torch.", ""),
            "upcast": bool(model.vae_upcast)}


def _peak_memory(device: torch.device) -> int:
    """CUDA: torch's reserved peak (what the planner predicts, and what fills a card); else peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_summary(s: Dict) -> str:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in s["stages"].items())
    lines = [f"done: {s['frames']} frames {s['size'][0]}x{s['size'][1]}, {s['steps']} steps ({s['method']}) "
             f"in {s['seconds']:.1f} s ({s['frames_per_second']:.2f} frames/s) on {s['device']} {s['dtype']}",
             f"  stages: {stages}",
             f"  peak memory: {s['peak_memory_bytes'] / 2**30:.2f} GiB"
             + ((" (reserved; plan predicted " if s["device"].startswith("cuda") else " (process RSS; plan's tensor peak ")
                + f"{s['plan']['peak'] / 2**30:.2f} GiB)" if s.get("plan") else "")]
    if s.get("report"):   # the page to open, then each prompt's
        lines.append(f"  report: {s['report']}")
        if len(s["reports"]) > 1:
            lines += [f"    {page}  <- {prompt!r}" for page, prompt in zip(s["reports"], s["prompts"])]
    lines += [f"  output: {out}" + (f"  <- {prompt!r}" if len(s["outputs"]) > 1 else "")
              for out, prompt in zip(s["outputs"], s["prompts"])]
    if s.get("video"):
        video = s["video"]
        lines.append(f"  video: {video['codec']} ({video['encoder']}, {video['pix_fmt']}"
                     + (f", crf {video['crf']})" if video["crf"] is not None else ")"))
    if s.get("ran"):
        lines.append("  ran: " + "\n       ".join(describe_ran(s["ran"])))
    if s.get("inversion"):
        inv = s["inversion"]
        lines.append(f"  inversion: DDIM, {inv['steps']} steps (the original's)" if inv["method"] == "ddim" else
                     f"  inversion: edit-friendly DDPM at the edit's {inv['steps']} timesteps (eta {inv['eta']}, noise "
                     f"seed {inv['seed']}, skip {inv['skip']}; not the original's DDIM: results differ)")
    if s.get("vae"):
        vae = s["vae"]
        lines.append(f"  vae: {vae['name']}, {vae['dtype']}"
                     + (f" (upcast from {s['dtype']}: its config's force_upcast)" if vae["upcast"] else ""))
    if s["tiny_model"]:
        lines.append(f"  NOTE: {TINY_NOTE}")
    return "\n".join(lines)
