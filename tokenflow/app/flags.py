"""The flags of `tokenflow edit` and `tokenflow invert`, and how they become an EditConfig.

Shared by the CLI (``tokenflow.app.cli``) and the job-file schema, which describes each field with
its flag's help (``field_help``).
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, Optional

from tokenflow.config import (
    BACKENDS,
    CODECS,
    DEFAULT_NEGATIVE_PROMPT,
    DEPTH_NORMALIZE,
    FRAME_FORMATS,
    INVERSIONS,
    METHODS,
    PLACES,
    PRESETS,
    PROPAGATIONS,
    EditConfig,
    field_specs,
    from_mapping,
    load_yaml,
    parse_size,
    preset_changes,
)
from tokenflow.errors import ConfigError
from tokenflow.gpu_runs import gpu_note


def size_flag(text: str):
    """--size WxH for argparse: a bad spelling is a usage error."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_config_flags(p: argparse.ArgumentParser, edit: bool) -> None:
    """The flags of `tokenflow edit` (``edit``) or `tokenflow invert`: one per EditConfig field, and --config/--preset."""
    p.add_argument("video", nargs="?", help="input video (mp4, mov, webm, mkv, gif, ...) or a folder of numbered images")
    p.add_argument("--config", metavar="YAML", help="YAML config; our keys or the original repo's "
                   "(data_path, n_frames, n_timesteps, batch_size, sd_version, ...). --preset and flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset: "
                   "original (the paper's defaults, i.e. no change), fast (50 inversion / 10 edit steps), tiny "
                   "(offline demo); over a --config file a preset sets only the fields where it differs from the "
                   "defaults, and flags beat both")
    g = p.add_argument_group("frames")
    g.add_argument("--frames", type=int, metavar="N", help="number of frames to edit (default 40; 0 = all)")
    g.add_argument("--start", metavar="I", help="first source frame index (default 0)")
    g.add_argument("--stride", type=int, metavar="S", help="take every S-th source frame (default 1)")
    g.add_argument("--size", type=size_flag, metavar="WxH", help="frame size, multiples of 8 (default 512x512 for "
                   "square input, 672x384 / 384x672 otherwise; SDXL models twice that: 1024x1024, 1344x768 / "
                   "768x1344); multiples of 64 (SD) or 32 (SDXL) keep the UNet's levels even")
    g.add_argument("--crop", action="store_true", default=None,
                   help="centre-crop to the target aspect ratio instead of stretching")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hub id, local diffusers folder, single-file checkpoint (.safetensors), SD "
                   "version (1.5, 2.0, 2.1, 2-depth, xl = SDXL base 1.0) or 'tiny' / 'tiny-xl' (random weights, "
                   "offline). Default stabilityai/stable-diffusion-2-1-base")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", help="float32, float16 or bfloat16 (default float16 on GPUs, float32 on CPU)")
    g.add_argument("--allow-pickle", action="store_true", default=None, help="also load pickle weights (.bin/.ckpt); "
                   "default: safetensors only (pickle can run code: only for weights you trust)")
    g.add_argument("--model-config", metavar="NAME|DIR", help="for a single-file checkpoint (--model file.safetensors): "
                   "which Stable Diffusion it is, 1.5, 2.0, 2.1 (512px base), 2-depth or xl (SDXL base), or a "
                   "diffusers folder with its configs (default: read from the checkpoint's keys and shapes)")
    g.add_argument("--vae", metavar="DIR|ID", help="another VAE instead of the model's own (a diffusers AutoencoderKL "
                   "folder or Hub id), e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in float16, so "
                   "without one it runs in float32 under --dtype float16/bfloat16 (docs/models.md)")
    g.add_argument("--lora", action="append", metavar="PATH_OR_ID[:SCALE]", help="LoRA weights (a .safetensors file, "
                   "a folder or a Hub id; kohya/A1111 or diffusers layout) fused into the model at SCALE (default 1.0); "
                   "repeat for several")
    g.add_argument("--embedding", action="append", metavar="PATH[:TOKEN]", help="a textual-inversion embedding "
                   "(.safetensors/.pt/.bin) added as TOKEN (default: the token it names, else its file name); repeat "
                   "for several")
    g = p.add_argument_group("depth models (--model 2-depth; docs/models.md)")
    g.add_argument("--depth-maps", metavar="FILE|DIR", help="your own raw depth maps, one per frame: a .npy "
                   "[N,H,W] float32 or a folder of 16-bit PNGs (default: estimated with --depth-model)")
    g.add_argument("--depth-model", metavar="MODEL", help="DPT depth estimator, folder or Hub id (default: the "
                   "model's own depth_estimator/, else Intel/dpt-hybrid-midas)")
    g.add_argument("--depth-normalize", choices=DEPTH_NORMALIZE, help="frame (default, the original: min/max of "
                   "each frame to [-1, 1]) or clip (one min/max for the whole clip: no depth-scale flicker)")
    g = p.add_argument_group("ControlNet (docs/models.md)")
    g.add_argument("--controlnet", action="append", metavar="MODEL[:SCALE]", help="a ControlNet (folder, Hub id or "
                   "single file) at SCALE (default 1.0); repeat for several, each paired in order with a --control")
    g.add_argument("--control", action="append", metavar="canny|depth|DIR", help="the condition of the ControlNet "
                   "of the same position: canny (OpenCV edges, --canny-low/--canny-high), depth (the DPT depth "
                   "estimator) or a folder of one control image per frame (your own annotator's: pose, lineart, ...)")
    g.add_argument("--control-start", type=float, metavar="F", help="fraction of the edit steps at which the "
                   "ControlNets start (default 0)")
    g.add_argument("--control-end", type=float, metavar="F", help="fraction of the edit steps at which they stop "
                   "(default 1)")
    g.add_argument("--control-during-inversion", action="store_true", default=None, help="also condition the "
                   "inversion (and with it the source branch) on the controls, as the original's preprocessing did "
                   "for canny; changes the inverted latents (docs/models.md)")
    g.add_argument("--canny-low", type=int, metavar="T", help="canny's lower threshold (default 100)")
    g.add_argument("--canny-high", type=int, metavar="T", help="canny's upper threshold (default 200)")
    g = p.add_argument_group("inversion")
    g.add_argument("--inversion-prompt", help="text describing the source video (default empty)")
    g.add_argument("--inversion", choices=INVERSIONS, help="ddim (default: the original's DDIM inversion) or ddpm "
                   "(edit-friendly DDPM inversion, Huberman-Spiegelglas et al. 2024: noise maps on the edit's own "
                   "timesteps, ~10x fewer UNet calls than 500 DDIM steps, exact reconstruction; results differ from "
                   "the original's; docs/inversion.md)")
    g.add_argument("--inversion-steps", type=int, metavar="N", help="DDIM inversion steps (default 500; unused "
                   "with --inversion ddpm, which inverts at the edit's --steps timesteps)")
    g.add_argument("--eta", type=float, metavar="E", help="--inversion ddpm: the sampler's eta in (0, 1] "
                   "(default 1, the DDPM posterior)")
    g.add_argument("--skip", type=int, metavar="S", help="--inversion ddpm: start the edit S steps into the schedule, "
                   "from the inverted latent there (default 0; the paper's T_skip)")
    if not edit:
        g.add_argument("--seed", type=int, help="--inversion ddpm: seed of its noise (default 1; an edit's --seed "
                       "is also its keyframe seed)")
    g.add_argument("--inversion-batch-size", type=int, metavar="B", help="frames per UNet call while inverting "
                   "(--inversion ddpm: rows, each a frame at one timestep; default: the memory plan's)")
    g.add_argument("--cache-dir", help="cache root: inversions, graphs, engines (default $TOKENFLOW_CACHE, else "
                   "$XDG_CACHE_HOME/tokenflow, else ~/.cache/tokenflow)")
    g.add_argument("--no-cache", action="store_true", default=None, help="neither read nor write the inversion cache")
    if edit:
        g = p.add_argument_group("editing")
        g.add_argument("--prompt", action="append", help="what the video should become (required); repeat it "
                       "for several edits of the same video in one run (shared inversion, one output each)")
        g.add_argument("--negative-prompt", help=f"default: {DEFAULT_NEGATIVE_PROMPT!r}")
        g.add_argument("--method", choices=METHODS, help="pnp (default, TokenFlow + Plug-and-Play) or "
                       "sdedit (TokenFlow + SDEdit, the original's run_tokenflow_sdedit.py)")
        g.add_argument("--steps", type=int, metavar="N", help="denoising steps (default 50); every edit timestep "
                       "must be an inversion timestep")
    else:
        p.add_argument("--steps", type=int, metavar="N", help="the edit steps the inversion must serve (default 50)")
        p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    if edit:
        g.add_argument("--guidance-scale", type=float, metavar="G", help="classifier-free guidance (default 7.5)")
        g.add_argument("--keyframe-spacing", type=int, metavar="B", help="frames per group, one random keyframe "
                       "each (the original's batch_size; default 8)")
        g.add_argument("--pnp-attn-t", type=float, metavar="F", help="fraction of steps with PnP Q/K injection (default 0.5)")
        g.add_argument("--pnp-f-t", type=float, metavar="F",
                       help="fraction of steps with PnP ResNet feature injection (default 0.8)")
        g.add_argument("--sdedit-start", type=float, metavar="F", help="SDEdit: start fraction (the original's "
                       "`start`, default 0.9); `--start 0.9` is accepted with --method sdedit")
        g.add_argument("--no-ddim-noise", action="store_true", default=None,
                       help="SDEdit: noise with one random draw instead of the inversion's noise")
        g.add_argument("--propagation", choices=PROPAGATIONS, help="original (default: the authors' "
                       "code) or paper (nearest keyframes before/after, linear weights, matched on attention outputs)")
        g.add_argument("--seed", type=int, help="seed of the keyframe draws (default 1)")
        g = p.add_argument_group("memory (see --plan)")
        g.add_argument("--memory-budget", metavar="SIZE", help="device memory the edit may use, e.g. 12GB or "
                       "16GiB (default: what the device has free; on CUDA the plan keeps the CUDA context, library "
                       "workspaces and a 5%% margin out of it); sets the chunk sizes")
        g.add_argument("--plan", action="store_true", help="print the memory plan (chunk sizes, predicted peak, "
                       "keyframe store size) and exit without editing")
        g.add_argument("--chunk-frames", type=int, metavar="N", help="frames per UNet call of the propagation "
                       "pass (default: the memory plan's); changes memory and speed, not the result")
        g.add_argument("--keyframe-window", type=int, metavar="W", help="each keyframe attends to the keyframes "
                       "of its window of W (shifted by W/2 every other step), so long videos cost linear time "
                       "and memory (default: all keyframes, the original)")
        g.add_argument("--keyframe-store", choices=PLACES, help="where the keyframe "
                       "features live: device, host (pinned memory, staged per chunk; "
                       f"{gpu_note('keyframe_store:host')}) or auto (default: on the device unless the plan "
                       "needs the room)")
        g.add_argument("--inverted-latents", choices=PLACES + ("disk",), help="where the "
                       "inverted latents live (default auto); disk reloads them per call, as the original does")
        g.add_argument("--backend", choices=BACKENDS, help="how the UNet runs: "
                       f"eager (default), compile (torch.compile; CUDA graphs on GPU: {gpu_note('backend:compile')}), "
                       "aot (AOTInductor packages: compiled once per model/shape/machine, loaded without tracing in "
                       f"later runs; on CUDA: {gpu_note('backend:aot')}), onnx (exported graphs in ONNX Runtime; "
                       f"`tokenflow export`; on CUDA: {gpu_note('backend:onnx')}), tensorrt (engines built from "
                       "those graphs; never run anywhere yet: unverified, docs/backends.md)")
        g = p.add_argument_group("kernels (see `tokenflow doctor` for what runs here)")
        g.add_argument("--attention-backend", metavar="NAME", help="keyframe attention: auto (default: triton "
                       "on CUDA in float16/bfloat16, else torch, i.e. SDPA), triton, xformers (unverified; only by "
                       "name) or torch (SDPA; the reference)")
        g.add_argument("--nearest-backend", metavar="NAME", help="nearest-neighbour search: auto (default: "
                       "triton on CUDA, faiss on CPU for searches of at least 2^24 similarities when it is "
                       "installed, else torch), triton, faiss, torch (the reference) or static (the torch "
                       "search without data-dependent shapes; graph --backends use it in place of torch)")
        g = p.add_argument_group("outputs")
        g.add_argument("-o", "--output", help="output video: a .mp4/.m4v/.mov name for h264/hevc (an MP4 either way), "
                       ".mov for prores, .mkv for ffv1 (source fps, source audio, source colour tags), or a folder "
                       "(ending in '/', or existing) that gets the default name (default "
                       "tokenflow-results/<video>-<method>-<prompt>.mp4, .mov or .mkv); never one of the job's inputs")
        g.add_argument("--codec", choices=CODECS, help="video codec: h264 (default, libx264), hevc (libx265), "
                       "prores (ProRes 422 HQ / 4444, .mov) or ffv1 (lossless RGB, .mkv); the summary names the encoder")
        g.add_argument("--crf", type=int, metavar="N", help="h264/hevc quality: lower is better and larger "
                       "(default 18 for h264, 22 for hevc; 0: lossless YUV with libx264)")
        g.add_argument("--pix-fmt", metavar="FMT", help="pixel format (default yuv420p for h264/hevc, yuv422p10le "
                       "for prores, bgr0 for ffv1); e.g. yuv444p, yuv420p10le, yuv444p10le (prores 4444)")
        g.add_argument("--save-frames", metavar="DIR", help="also write numbered frames into DIR (--frames-format)")
        g.add_argument("--frames-format", choices=FRAME_FORMATS, help="of --save-frames: png (default, 8-bit), "
                       "png16 (16-bit PNG), exr (OpenEXR half float) or exr32 (OpenEXR float); values as decoded, not linearised")
        g.add_argument("--save-latents", metavar="PATH", help="also write the final latents [N,4,h,w] as .npy")
        g.add_argument("--fps", type=float, help="output frame rate (default: the source's)")
        g.add_argument("--report", metavar="DIR", help="also write an HTML report into DIR: frames side by side, "
                       "a side-by-side video, warp error / flicker per frame, stage timings, settings "
                       "(needs opencv-python-headless and matplotlib)")
        g.add_argument("--clip-model", metavar="MODEL", help="CLIP model (Hub id or folder) for the report's CLIP "
                       "text alignment and frame consistency (default: skipped)")
        g.add_argument("--overwrite", action="store_true", default=None,
                       help="replace existing outputs (default: a job whose outputs all exist is skipped, exit 0)")
        g = p.add_argument_group("unattended runs (docs/checkpoints.md, docs/farm.md)")
        g.add_argument("--checkpoint-dir", metavar="DIR", help="save resumable state (latents, step, RNG) into DIR")
        g.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (default 5)")
        g.add_argument("--resume", action="store_true", default=None,
                       help="continue from the checkpoint in --checkpoint-dir (refused if it was made with other settings)")
        g.add_argument("--strict-resume", action="store_true", default=None, help="with --resume: refuse (exit 2) a "
                       "checkpoint saved with another torch thread count, torch/diffusers version or device instead of "
                       "warning that the result then equals an uninterrupted run only to float rounding")
    g = p.add_argument_group("logging")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    g.add_argument("--log-json", action="store_true", help="JSON-lines events on stdout instead of progress bars")
    for action in p._actions:   # every numeric flag says its range, from the field's Rule (docs/options.md)
        spec = field_specs().get(FLAG_FIELDS.get(action.dest, action.dest))
        if spec is not None and spec.numeric and action.help and action.help != argparse.SUPPRESS:
            action.help += f" [range: {spec.range_text()}]"


# flag -> config field where the names differ
FLAG_FIELDS = {"start": "start_frame", "no_cache": "use_cache", "no_ddim_noise": "use_ddim_noise"}
NOT_CONFIG = {"command", "config", "preset", "quiet", "log_json", "plan"}


def config_from_args(args: argparse.Namespace, note: Optional[Callable[[str], None]] = None) -> EditConfig:
    """Flags > --preset > --config YAML > defaults (a preset sets only its own fields, e.g. fast: the
    step counts, tiny: also model, size, frames). ``note``: gets the YAML's info line (ignored keys)."""
    config = EditConfig()
    if args.config:
        config = load_yaml(args.config, config, note=note)
    if args.preset:
        config = config.replace(**preset_changes(args.preset))
    changes = {}
    for name, value in vars(args).items():
        if name in NOT_CONFIG or value is None:
            continue
        if name == "start":
            name, value = _parse_start(value, args)
        elif name in ("no_cache", "no_ddim_noise"):
            value = not value
        elif name == "prompt":
            value = value[0] if len(value) == 1 else tuple(value)
        elif name in ("lora", "embedding", "controlnet", "control"):
            value = tuple(value)
        changes[FLAG_FIELDS.get(name, name)] = value
    if changes.get("frames") == 0:
        changes["frames"] = None
    return from_mapping(changes, config, source="flags")


def _parse_start(value: str, args: argparse.Namespace):
    """--start is the first frame index; a decimal like 0.9 means SDEdit's start under --method sdedit."""
    if value.strip().lstrip("+").isdigit():
        return "start_frame", int(value)
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigError(f"--start {value!r} must be a frame index (integer >= 0)") from None
    if getattr(args, "method", None) == "sdedit":
        return "sdedit_start", fraction
    raise ConfigError(f"--start {value!r}: the first frame index must be an integer >= 0 "
                      "(for SDEdit's start fraction use --method sdedit --sdedit-start F)")


def flag_names() -> Dict[str, str]:
    """EditConfig field -> its `tokenflow edit` flag (fields without one are left out)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_flags(parser, edit=True)
    fields = field_specs()
    return {FLAG_FIELDS.get(a.dest, a.dest): max(a.option_strings, key=len) for a in parser._actions
            if a.option_strings and not a.dest.startswith("no_") and FLAG_FIELDS.get(a.dest, a.dest) in fields}


def options_table() -> str:
    """The Markdown table of every numeric option's range (docs/options.md), from the fields' Rules."""
    flags = flag_names()
    rows = ["| flag | job-file key | range | default |", "| --- | --- | --- | --- |"]
    for name, spec in field_specs().items():
        if spec.numeric:
            default = "x".join(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default
            flag = f"`{flags[name]}`" if name in flags else "(job files only)"
            rows.append(f"| {flag} | `{name}` | {spec.range_text()} | {'automatic' if default is None else default} |")
    return "\n".join(rows) + "\n"


def field_help() -> Dict[str, str]:
    """EditConfig field -> the help of its flag (flags that negate a field, --no-*, are left out)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_flags(parser, edit=True)
    return {FLAG_FIELDS.get(a.dest, a.dest): " ".join(a.help.split()) for a in parser._actions
            if a.help and a.help != argparse.SUPPRESS and not a.dest.startswith("no_")}
