"""Typed, validated settings. Defaults are the original implementation's.

``EditConfig`` holds everything one run needs; ``PRESETS`` names a few useful variants;
``load_yaml`` reads our own keys and the original repository's (``configs/config_pnp.yaml``,
``configs/config_sdedit.yaml`` and the ``preprocess.py`` flags).

What a field accepts is declared once, on the field: its type by its annotation, its limits,
choices and pattern by the ``Rule`` in its metadata. ``EditConfig.validate()`` (and ``errors()``,
every problem at once) checks exactly that, and ``tokenflow schema`` publishes it as the job
files' JSON Schema (``field_specs()``). Every numeric field has a minimum and a maximum (the
``MAX_*`` limits below); ``--help`` and docs/options.md show them (``FieldSpec.range_text``), and
non-finite floats are never accepted.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

from tokenflow.errors import ConfigError, first_line, short_repr

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_FRAMES = 40   # a cap: a shorter clip is edited whole (any other --frames that asks for more is warned about)
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"

# The original's ``sd_version`` values and the Hub ids it maps them to.
SD_VERSIONS = {
    "2.1": "stabilityai/stable-diffusion-2-1-base",
    "2.0": "stabilityai/stable-diffusion-2-base",
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # runwayml/... was taken down
    "2-depth": "stabilityai/stable-diffusion-2-depth",      # the original's sd_version: depth (5-channel UNet)
    "xl": "stabilityai/stable-diffusion-xl-base-1.0",       # SDXL base 1.0 (two text encoders, 1024x1024)
}
# the original's sd_version values that are no SD_VERSIONS key
SD_VERSION_ALIASES = {"depth": "2-depth"}

METHODS = ("pnp", "sdedit")
PLACES = ("auto", "device", "host")
PROPAGATIONS = ("original", "paper")
INVERSIONS = ("ddim", "ddpm")   # ddim: the original's; ddpm: edit-friendly DDPM (method/ddpm.py)
DTYPES = ("float32", "float16", "bfloat16")
ONNX_BF16 = ("bfloat16 cannot run with --backend onnx (tokenflow passes ONNX Runtime no bfloat16 tensors): "
             "use --dtype float16 (GPU) or float32 with it, or keep bfloat16 with another --backend")
BACKENDS = ("eager", "compile", "aot", "onnx", "tensorrt")
CODECS = ("h264", "hevc", "prores", "ffv1")          # of the output video (io.write.CODECS: encoders, containers)
FRAME_FORMATS = ("png", "png16", "exr", "exr32")     # of --save-frames: 8/16-bit PNG, half/float OpenEXR
CRF_CODECS = ("h264", "hevc")                        # the codecs with a constant-rate factor
DEPTH_NORMALIZE = ("frame", "clip")                  # per-frame min/max (the original) or one min/max per clip
CONTROL_BUILTIN = ("canny", "depth")                 # --control conditions computed here (else a folder of images)
MAX_CONTROLNETS = 8

# Upper limits of the numeric fields (docs/options.md lists every range, generated from the Rules).
MAX_FRAMES = 100_000               # frames of one edit (about 55 min at 30 fps): more cannot be held in memory
MAX_FRAME_INDEX = 10_000_000       # a source frame number (about 92 h at 30 fps)
MAX_SIDE = 65_536                  # pixels per side of --size; far sizes are refused by the host-memory check
TRAIN_STEPS = 1000                 # the SD schedulers' num_train_timesteps: at most one DDIM step per timestep
MAX_GUIDANCE = 100.0               # classifier-free guidance: useful values are 1..30
MAX_FPS = 1000.0                   # output frame rate
MAX_SEED = 2**64 - 1               # what torch.Generator.manual_seed accepts (0..2^64-1)
MAX_BYTES = 2**50                  # 1 PiB: a memory budget beyond that is a typo
MAX_CRF = 51                       # libx264 / libx265: 0 (best) .. 51 (worst)

# Patterns are JSON Schema (ECMA-262) regular expressions too: `tokenflow schema` uses them as they are.
NONEMPTY_PATTERN = r"\S"
PIX_FMT_PATTERN = r"^[a-z0-9_]+$"                         # an FFmpeg pixel format name: yuv420p, yuv422p10le
SIZE_PATTERN = r"^\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*$"      # WIDTHxHEIGHT
BYTES_PATTERN = r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([bB]|[kKmMgGtTpP](?:[iI]?[bB])?)?\s*$"   # 12GB, 16GiB, 1.5e9


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c}]" for c in word)


# cpu, mps, cuda or cuda:N in any case, as tokenflow.device.resolve_device reads a device name
DEVICE_PATTERN = rf"^\s*({_any_case('cpu')}|{_any_case('mps')}|{_any_case('cuda')}(:[0-9]+)?)\s*$"


def parse_size(text: str) -> Tuple[int, int]:
    """'672x384' -> (672, 384) as (width, height)."""
    match = re.match(SIZE_PATTERN, str(text))
    if not match:
        raise ConfigError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512 or 672x384")
    return int(match.group(1)), int(match.group(2))


def parse_bytes(text, name: str = "memory_budget") -> int:
    """'12GB' (10^9), '12GiB' (2^30), '800MB', '1.5e9', or an int -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.match(BYTES_PATTERN, str(text))
        if not match:
            raise ConfigError(f"{name}={text!r} is not a size: use e.g. 12GB, 16GiB or 800MB")
        value, unit = float(match.group(1)), (match.group(2) or "").lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size > MAX_BYTES:
        raise ConfigError(f"{name}={text!r} is too large: at most {MAX_BYTES} bytes (1 PiB)")
    if int(size) <= 0:
        raise ConfigError(f"{name}={text!r} must be positive")
    return int(size)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "pib": 2**50}


@dataclass(frozen=True)
class Rule:
    """What an EditConfig field accepts besides its annotated type (the field's ``metadata["rule"]``)."""

    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above: Optional[float] = None            # exclusive minimum
    multiple_of: Optional[int] = None        # of a number, or of each item of a list (size)
    choices: Tuple[str, ...] = ()
    kernel_op: Optional[str] = None          # choices: "auto" or a backend registered for this kernel op
    pattern: Optional[str] = None            # for strings
    means: str = ""                          # what the field accepts, in words (else derived from the above)
    spelled: Optional[str] = None            # a string spelling that coerce() turns into the value (size: "WxH")
    check: Optional[Callable[[Any], Any]] = None   # a parser whose ConfigError refuses the value
    path: bool = False                       # a file or folder: os.PathLike is accepted as a string
    description: str = ""                    # when the CLI flag's help does not describe the field
    unit: str = ""                           # of the numbers in the range, for --help and docs/options.md


def _field(default: Any, **rule: Any) -> Any:
    return dataclasses.field(default=default, metadata={"rule": Rule(**rule)})


@dataclass(frozen=True)
class EditConfig:
    """All settings of an inversion + edit. Field names double as YAML keys and CLI flags.

    Sizes: ``size`` is (width, height) in pixels; None picks 512x512 for square input and the
    original's recommended 672x384 (landscape) / 384x672 (portrait) otherwise.
    """

    # input video and frame selection
    video: Optional[str] = _field(None, path=True)
    frames: Optional[int] = _field(DEFAULT_FRAMES, minimum=1, maximum=MAX_FRAMES)          # None = every selected frame
    start_frame: int = _field(0, minimum=0, maximum=MAX_FRAME_INDEX)
    stride: int = _field(1, minimum=1, maximum=MAX_FRAMES)
    size: Optional[Tuple[int, int]] = _field(
        None, minimum=64, maximum=MAX_SIDE, multiple_of=8, spelled=SIZE_PATTERN, unit="pixels per side",
        means=f"WIDTHxHEIGHT or [width, height], each side a multiple of 8 from 64 to {MAX_SIDE} (Stable Diffusion "
              "works on 8x downsampled latents), e.g. 512x512 or 672x384")
    crop: bool = False                  # centre-crop to the target aspect before resizing

    # model and device
    model: str = _field(DEFAULT_MODEL, pattern=NONEMPTY_PATTERN, path=True,
                        means="a Hub id, a local diffusers folder or 'tiny' (not empty)")
    device: Optional[str] = _field(None, pattern=DEVICE_PATTERN, means="cpu, mps, cuda or cuda:N")   # None: the best
    dtype: Optional[str] = _field(None, choices=DTYPES)   # None: float16 on accelerators, float32 on cpu

    # inversion (the original's preprocess.py)
    inversion_prompt: str = ""
    inversion_steps: int = _field(500, minimum=1, maximum=TRAIN_STEPS)
    # ddpm: edit-friendly DDPM inversion on the edit's own timesteps (noise maps; inversion_steps unused)
    inversion: str = _field("ddim", choices=INVERSIONS)
    eta: float = _field(1.0, above=0, maximum=1)     # ddpm: the sampler's eta (1: the DDPM posterior)
    skip: int = _field(0, minimum=0, maximum=TRAIN_STEPS - 1)   # ddpm: edit from step `skip` of the schedule
    # frames per inversion call (None: the memory plan)
    inversion_batch_size: Optional[int] = _field(None, minimum=1, maximum=MAX_FRAMES)

    # editing
    method: str = _field("pnp", choices=METHODS)
    prompt: Union[str, Tuple[str, ...]] = _field(   # several prompts: one edit each, sharing the inversion
        "", description="what the video should become; a list gives one edit (and output) per prompt")
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = _field(50, minimum=1, maximum=TRAIN_STEPS)
    guidance_scale: float = _field(7.5, minimum=0, maximum=MAX_GUIDANCE)
    keyframe_spacing: int = _field(8, minimum=1, maximum=MAX_FRAMES)           # the original's batch_size
    # frames per propagation UNet call (None: the memory plan)
    chunk_frames: Optional[int] = _field(None, minimum=1, maximum=MAX_FRAMES)
    keyframe_window: Optional[int] = _field(None, minimum=1, maximum=MAX_FRAMES)   # keyframes per extended attention (None: all)
    pnp_attn_t: float = _field(0.5, minimum=0, maximum=1)
    pnp_f_t: float = _field(0.8, minimum=0, maximum=1)
    sdedit_start: float = _field(0.9, above=0, maximum=1)  # the original's `start`
    use_ddim_noise: bool = _field(
        True, description="SDEdit: noise with the inversion's noise (default true) instead of one random draw")
    propagation: str = _field("original", choices=PROPAGATIONS)
    seed: int = _field(1, minimum=0, maximum=MAX_SEED)

    # how the UNet runs: eager (diffusers + processors), compile (torch.compile), aot (AOTInductor
    # packages), onnx (ONNX Runtime), tensorrt (engines from the ONNX graphs; never run here)
    backend: str = _field("eager", choices=BACKENDS)

    # kernels ("auto": the best backend that runs here; see `tokenflow doctor`)
    attention_backend: str = _field("auto", kernel_op="keyframe_attention")   # auto, triton, xformers, torch
    nearest_backend: str = _field("auto", kernel_op="cosine_nearest")   # auto, triton, faiss, torch

    # memory (see `tokenflow edit --plan`)
    memory_budget: Optional[Union[int, str]] = _field(   # bytes or "12GB"/"16GiB"; None: free device memory - margin
        None, minimum=1, maximum=MAX_BYTES, pattern=BYTES_PATTERN, check=parse_bytes, unit="bytes",
        means="a size like '12GB', '16GiB' or '800MB', or a number of bytes, from 1 byte to 1 PiB (2^50 bytes)")
    keyframe_store: str = _field("auto", choices=PLACES)   # auto, device, host (pinned; chunks stage their keyframes)
    inverted_latents: str = _field("auto", choices=PLACES + ("disk",))   # disk: the original's per-group reloads

    # outputs and cache
    output: Optional[str] = _field(None, path=True)
    save_frames: Optional[str] = _field(None, path=True)   # folder for numbered PNGs
    save_latents: Optional[str] = _field(None, path=True)  # .npy of the final latents [N,4,h,w]
    report: Optional[str] = _field(None, path=True)        # folder for an HTML report (frames, side by side, metrics)
    clip_model: Optional[str] = _field(None, path=True)    # CLIP model (Hub id or folder) for the report's CLIP scores
    fps: Optional[float] = _field(None, above=0, maximum=MAX_FPS)           # None = the source frame rate
    codec: str = _field("h264", choices=CODECS)                             # of the output video
    crf: Optional[int] = _field(None, minimum=0, maximum=MAX_CRF)           # h264/hevc only; None: 18 (h264), 22 (hevc)
    pix_fmt: Optional[str] = _field(None, pattern=PIX_FMT_PATTERN)         # None: the codec's default (docs/outputs.md)
    frames_format: str = _field("png", choices=FRAME_FORMATS)              # of save_frames
    cache_dir: Optional[str] = _field(None, path=True)     # None: io.caches.default_cache_root
    use_cache: bool = _field(True, description="read and write the inversion cache (default true)")
    overwrite: bool = False             # False: a job whose outputs all exist is skipped

    # unattended runs (see docs/farm.md)
    checkpoint_dir: Optional[str] = _field(None, path=True)   # save resumable state here
    checkpoint_every: int = _field(5, minimum=1, maximum=TRAIN_STEPS)   # steps (inversion and edit) between checkpoints
    resume: bool = False                  # continue from the checkpoint in checkpoint_dir
    strict_resume: bool = False           # with resume: refuse a checkpoint saved with other threads/versions/device
    allow_pickle: bool = False            # load .bin/.ckpt (pickle) weights; default safetensors only
    # single-file checkpoints: which config (1.5, 2.0, 2.1, 2-depth or a diffusers folder); None: from the keys
    model_config: Optional[str] = _field(None, path=True)
    vae: Optional[str] = _field(None, path=True)   # another VAE (diffusers folder or Hub id); None: the model's own

    # adapters (docs/models.md): "PATH_OR_ID[:SCALE]" / "PATH[:TOKEN]", one string or a list
    lora: Union[str, Tuple[str, ...]] = _field((), description="LoRA weights, PATH_OR_ID[:SCALE]; a list for several")
    embedding: Union[str, Tuple[str, ...]] = _field(
        (), description="textual-inversion embeddings, PATH[:TOKEN]; a list for several")

    # depth models (--model 2-depth): where the depth maps come from and how they are normalised
    # DPT folder / Hub id; None: the model's own depth_estimator/, else Intel/dpt-hybrid-midas
    depth_model: Optional[str] = _field(None, path=True)
    depth_maps: Optional[str] = _field(None, path=True)    # raw maps: .npy [N,H,W] or a folder of 16-bit PNGs
    depth_normalize: str = _field("frame", choices=DEPTH_NORMALIZE)

    # ControlNet: each controlnet "MODEL[:SCALE]" pairs in order with a control "canny", "depth" or a folder
    controlnet: Union[str, Tuple[str, ...]] = _field(
        (), description="ControlNet models, MODEL[:SCALE]; a list for several (each pairs with a control)")
    control: Union[str, Tuple[str, ...]] = _field(
        (), description="the condition of each ControlNet, in order: canny, depth or a folder of control images")
    control_start: float = _field(0.0, minimum=0, maximum=1)   # fraction of the edit steps (diffusers' control_guidance_start)
    control_end: float = _field(1.0, minimum=0, maximum=1)
    control_during_inversion: bool = False   # also condition the inversion (and the source branch) on the controls
    canny_low: int = _field(100, minimum=0, maximum=255)
    canny_high: int = _field(200, minimum=0, maximum=255)

    @property
    def prompts(self) -> Tuple[str, ...]:
        """The edit prompts: one per output (``prompt`` may be a string or a list of strings)."""
        if isinstance(self.prompt, str):
            return (self.prompt,) if self.prompt else ()
        return tuple(self.prompt)

    @property
    def loras(self) -> Tuple[str, ...]:
        return _as_tuple(self.lora)

    @property
    def embeddings(self) -> Tuple[str, ...]:
        return _as_tuple(self.embedding)

    @property
    def controlnets(self) -> Tuple[str, ...]:
        return _as_tuple(self.controlnet)

    @property
    def controls(self) -> Tuple[str, ...]:
        return _as_tuple(self.control)

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, *, need_prompt: bool = True) -> "EditConfig":
        """Raise the first of ``errors()`` (a ConfigError naming the field and what it accepts); return self."""
        found = self.errors(need_prompt=need_prompt)
        if found:
            raise found[0]
        return self

    def errors(self, *, need_prompt: bool = True) -> List[ConfigError]:
        """Every problem of this config, field by field (type, limits, choices: each field's Rule),
        then the rules between fields; empty when it is valid."""
        found = []
        for name, spec in field_specs().items():
            reason = spec.problem(getattr(self, name))
            if reason:
                found.append(ConfigError.of_field(name, reason))
        bad = {error.field for error in found}
        if self.inversion == "ddim" and not bad & {"inversion", "skip", "eta"}:
            for name, default in (("skip", 0), ("eta", 1.0)):
                if getattr(self, name) != default:
                    found.append(ConfigError.of_field(
                        name, f"applies to the DDPM inversion (--inversion ddpm), not the original's DDIM one: "
                              f"drop --{name}, or add --inversion ddpm"
                              + (" (with DDIM, --method sdedit --sdedit-start F starts the edit later)"
                                 if name == "skip" else "")))
        if self.inversion == "ddpm" and not bad & {"inversion", "skip", "steps"} and self.skip >= self.steps:
            found.append(ConfigError.of_field(
                "skip", f"{self.skip} skips every one of the {self.steps} steps: use a skip below --steps"))
        if self.inversion == "ddim" and not bad & {"steps", "inversion_steps"} and self.steps > self.inversion_steps:
            found.append(ConfigError.of_field(
                "steps", f"{self.steps} exceeds inversion_steps={self.inversion_steps}: every edit timestep must be "
                         "an inversion timestep; raise inversion_steps or lower steps"))
        if self.resume and not self.checkpoint_dir and not bad & {"resume", "checkpoint_dir"}:
            found.append(ConfigError.of_field(
                "resume", "needs checkpoint_dir, the folder the interrupted run used (--checkpoint-dir DIR; "
                          "with job files also `tokenflow run --checkpoint-root DIR`)"))
        if self.crf is not None and self.codec not in CRF_CODECS and not bad & {"crf", "codec"}:
            found.append(ConfigError.of_field(
                "crf", f"applies to {' and '.join(CRF_CODECS)}, not codec {self.codec} "
                       f"({'lossless' if self.codec == 'ffv1' else 'a fixed-quality profile'}): drop --crf or pick "
                       f"--codec {CRF_CODECS[0]}"))
        if self.backend == "onnx" and self.dtype == "bfloat16" and not bad & {"backend", "dtype"}:
            found.append(ConfigError.of_field("dtype", ONNX_BF16))
        if not bad & {"controlnet", "control"} and len(self.controlnets) != len(self.controls):
            found.append(ConfigError.of_field(
                "control", f"{len(self.controlnets)} controlnet(s) but {len(self.controls)} control(s): give one "
                           f"--control ({', '.join(CONTROL_BUILTIN)} or a folder of images) per --controlnet, in order"))
        if len(self.controlnets) > MAX_CONTROLNETS and "controlnet" not in bad:
            found.append(ConfigError.of_field("controlnet", f"{len(self.controlnets)} ControlNets; at most {MAX_CONTROLNETS}"))
        if self.controlnets and self.backend != "eager" and not bad & {"controlnet", "backend"}:
            found.append(ConfigError.of_field(
                "backend", f"{self.backend} cannot run ControlNets (--controlnet runs with --backend eager only): its "
                           "exported UNet graphs take no ControlNet residual inputs; drop --backend or the ControlNets"))
        if not bad & {"control_start", "control_end"} and self.control_start > self.control_end:
            found.append(ConfigError.of_field(
                "control_end", f"{self.control_end} is below control_start={self.control_start} (fractions of the "
                               "edit steps in which the ControlNets act)"))
        if need_prompt and "prompt" not in bad:
            prompts = self.prompts
            empty = [k for k, text in enumerate(prompts, 1) if not text.strip()]
            if not prompts or (len(prompts) == 1 and empty):
                found.append(ConfigError.of_field(
                    "prompt", "the edit prompt is empty: say what the video should become (--prompt TEXT; repeat "
                              "--prompt, or give a list, for several edits of the same video)"))
            elif empty:
                found.append(ConfigError.of_field(
                    "prompt", f"prompt {empty[0]} of {len(prompts)} is empty: say what each edit should become"))
        return found


def _as_tuple(value: Union[str, Tuple[str, ...], None]) -> Tuple[str, ...]:
    """A one-or-many string field as a tuple (an empty string is none)."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),) if os.fspath(value).strip() else ()
    return tuple(os.fspath(v) for v in value)


# --- what each field accepts ----------------------------------------------------------------

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_KIND_WORDS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string"}


@dataclass(frozen=True)
class FieldSpec:
    """One EditConfig field as validation and the job-file schema see it: JSON types from its
    annotation (``array`` for tuples, of ``items``, ``length`` long when fixed) and its Rule."""

    name: str
    kinds: Tuple[str, ...]
    nullable: bool
    items: Optional[str]
    length: Optional[int]
    rule: Rule
    default: Any

    @property
    def choices(self) -> Tuple[str, ...]:
        """The allowed values of a choice field (kernel backends: "auto" and the registered ones)."""
        if self.rule.kernel_op:
            from tokenflow.kernels.dispatch import AUTO, backend_names  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

            return (AUTO, *backend_names(self.rule.kernel_op))
        return self.rule.choices

    def expect(self) -> str:
        """What the field accepts, in words."""
        rule = self.rule
        if rule.means:
            text = rule.means
        elif rule.choices or rule.kernel_op:
            text = "one of: " + ", ".join(self.choices)
        else:
            text = " or ".join(f"a list of {self.items}s" if k == "array" else _KIND_WORDS[k] for k in self.kinds)
            if rule.above is not None:
                text += f" > {_num(rule.above)}" + (f" and <= {_num(rule.maximum)}" if rule.maximum is not None else "")
            elif rule.minimum is not None and rule.maximum is not None:
                text += f" in [{_num(rule.minimum)}, {_num(rule.maximum)}]"
            elif rule.minimum is not None:
                text += f" >= {_num(rule.minimum)}"
        return text + (" (or null)" if self.nullable else "")

    @property
    def numeric(self) -> bool:
        """A number, or a list of numbers (size)."""
        return bool({"integer", "number"} & {*self.kinds, self.items})

    def range_text(self) -> str:
        """The accepted range in words for --help and docs/options.md, e.g. ``1..1000``, ``>0..1``,
        ``64..65536, multiples of 8`` ("" for a field that is no number)."""
        rule = self.rule
        if not self.numeric:
            return ""
        low = f">{_num(rule.above)}" if rule.above is not None else "" if rule.minimum is None else _num(rule.minimum)
        high = "" if rule.maximum is None else _num(rule.maximum)
        return f"{low}..{high}" + (f" {rule.unit}" if rule.unit else "") \
            + (f", multiples of {rule.multiple_of}" if rule.multiple_of else "")

    def bounds(self) -> Tuple[Optional[float], Optional[float], bool]:
        """(lowest, highest, lowest excluded) accepted number (None: unbounded that way)."""
        rule = self.rule
        if rule.above is not None:
            return rule.above, rule.maximum, True
        return rule.minimum, rule.maximum, False

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is refused (``must be ..., got ...``), or None when it is accepted."""
        if value is None:
            return None if self.nullable else f"must be {self.expect()}, got null"
        kinds = [k for k in self.kinds if _is_kind(value, k, self)]
        if not kinds:
            hint = " (quote it in YAML)" if self.kinds == ("string",) and isinstance(value, (bool, int, float)) else ""
            return f"must be {self.expect()}, {self.got(value)}{hint}"
        rule = self.rule
        numbers = value if kinds[0] == "array" else [value] if kinds[0] in ("integer", "number") else []
        if not all(_in_limits(x, rule) for x in numbers) \
                or (rule.choices and value not in rule.choices) \
                or (rule.pattern and kinds[0] == "string" and not re.search(rule.pattern, os.fspath(value))):
            return f"must be {self.expect()}, {self.got(value)}"
        try:
            if rule.check:
                rule.check(value)
            if rule.kernel_op:
                from tokenflow.kernels.dispatch import check_names  # noqa: PLC0415 (imports torch: not while the CLI parses flags)

                check_names(rule.kernel_op, value, self.name)
        except ConfigError as error:
            text = str(error)
            return text[len(self.name) + 2:] if text.startswith(f"{self.name}: ") else \
                f"must be {self.expect()}, {self.got(value)}"
        return None

    def got(self, value: Any) -> str:
        if self.length and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            return "got " + "x".join(map(str, value))
        return f"got {short_repr(value)} ({kind_name(value)})"


def _is_kind(value: Any, kind: str, spec: FieldSpec) -> bool:
    """Python values of a JSON type: a boolean is no number; floats must be finite."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == "string":
        return isinstance(value, str) or (spec.rule.path and isinstance(value, os.PathLike))
    if kind == "array":
        return isinstance(value, (list, tuple)) and len(value) == (spec.length or len(value)) and all(
            _is_kind(v, spec.items, spec) for v in value)
    return False


def _in_limits(x: Any, rule: Rule) -> bool:
    return not ((rule.minimum is not None and x < rule.minimum) or (rule.maximum is not None and x > rule.maximum)
                or (rule.above is not None and x <= rule.above) or (rule.multiple_of and x % rule.multiple_of))


def _num(x: float) -> str:
    """A limit as people read it: 1000, 0.5, 2^50, 2^64-1."""
    if isinstance(x, int) and x >= 2**30:
        for power, offset in ((x.bit_length() - 1, ""), (x.bit_length(), "-1")):
            if x == 2**power - (1 if offset else 0):
                return f"2^{power}{offset}"
    return str(int(x)) if float(x).is_integer() else str(x)


def kind_name(value: Any) -> str:
    """A value's JSON type in words, for messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)


@functools.lru_cache(maxsize=None)
def field_specs() -> Dict[str, FieldSpec]:
    """Every EditConfig field's FieldSpec, in field order."""
    hints, out = typing.get_type_hints(EditConfig), {}
    for f in dataclasses.fields(EditConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        kinds, items, length = [], None, None
        for arg in args:
            if typing.get_origin(arg) is tuple:
                members = typing.get_args(arg)
                kinds.append("array")
                items = _JSON_TYPES[members[0]]
                length = None if members[-1] is Ellipsis else len(members)
            elif arg in _JSON_TYPES:
                kinds.append(_JSON_TYPES[arg])
        out[f.name] = FieldSpec(f.name, tuple(kinds), type(None) in args, items, length,
                                f.metadata.get("rule", Rule()), f.default)
    return out


def coerce(name: str, value: Any) -> Any:
    """A value as YAML or JSON gives it -> the field's Python value: lists become tuples, whole
    floats of integer fields ints (JSON does not tell 64.0 from 64), a spelled size a pair.
    Anything else is returned as it is, for ``validate()`` to judge."""
    spec = field_specs()[name]
    if isinstance(value, str) and spec.rule.spelled and re.match(spec.rule.spelled, value):
        return parse_size(value)
    whole = "integer" in spec.kinds or spec.items == "integer"
    if isinstance(value, list):
        return tuple(int(v) if whole and _whole(v) else v for v in value)
    return int(value) if whole and _whole(value) else value


def _whole(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


class Ranged:
    """The argparse ``type=`` of a numeric flag (or environment variable) that is no EditConfig field,
    checked as a field is: ``Ranged("--repeats", int, Rule(minimum=1, maximum=1000))``, or
    ``Ranged("--frames", field="frames")`` for one that means a field (its type and Rule). A value
    outside the range, nan, inf or no number at all is a ConfigError ``<flag>: must be ..., got ...``
    (exit 2; argparse lets it through, ``tokenflow.app.cli.main`` prints it as one line).
    ``Ranged.add_to_help(parser)`` ends each such flag's help with ``[range: a..b]``."""

    def __init__(self, flag: str, kind: type = int, rule: Rule = Rule(), *, field: Optional[str] = None):
        if field is not None:
            spec = field_specs()[field]
            kind, rule = (int if "integer" in spec.kinds else float), spec.rule
        self.flag, self.kind, self.field = flag, kind, field
        self.spec = FieldSpec(flag, (_JSON_TYPES[kind],), False, None, None, rule, None)

    def __call__(self, text: str) -> Union[int, float]:
        try:
            value = self.kind(text)
        except ValueError:
            value = text   # refused below: "must be an integer ..., got '1.5' (string)"
        reason = self.spec.problem(value)
        if reason:
            raise ConfigError(f"{self.flag}: {reason}")
        return value

    def __repr__(self) -> str:
        return f"Ranged({self.flag!r}, {self.kind.__name__}, {self.range_text()!r})"

    def range_text(self) -> str:
        return self.spec.range_text()

    @staticmethod
    def add_to_help(parser) -> None:
        for action in parser._actions:
            if isinstance(action.type, Ranged) and action.help not in (None, argparse.SUPPRESS) \
                    and "[range: " not in action.help:
                action.help += f" [range: {action.type.range_text()}]"


# --- presets ------------------------------------------------------------------------------

PRESETS = {
    # the original's configs/config_pnp.yaml
    "original": EditConfig(),
    # a quick look: fewer inversion and edit steps (every 10-step timestep is a 50-step one)
    "fast": EditConfig(inversion_steps=50, steps=10),
    # offline smoke test with the tiny random-weight model (outputs are noise, by design)
    "tiny": EditConfig(model="tiny", size=(128, 128), frames=16, inversion_steps=50, steps=10),
}


def preset_changes(name: str) -> Dict[str, Any]:
    """What preset ``name`` sets: its fields that differ from the defaults (``original``: none)."""
    preset, default = PRESETS[name], EditConfig()
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(EditConfig)
            if getattr(preset, f.name) != getattr(default, f.name)}


# --- YAML ---------------------------------------------------------------------------------

# original key -> our field (values converted in from_mapping). Keys of configs/*.yaml and of what its
# scripts read (tests/data/upstream_configs/keys.json lists them); preprocess.py's `--steps` (inversion
# steps) and `--batch_size` (frames per inversion call) are not taken: our `steps` and the config
# files' `batch_size` mean other things.
ORIGINAL_KEYS = {
    "data_path": "video",                # a video, or the folder of frames preprocess.py writes
    "n_frames": "frames",
    "n_inversion_steps": "inversion_steps",
    "n_timesteps": "steps",
    "save_steps": "steps",               # preprocess.py's flag
    "batch_size": "keyframe_spacing",
    "latents_path": "cache_dir",         # where the inversion's latents are kept
    "save_dir": "cache_dir",             # preprocess.py's flag
    "output_path": "output",
    "start": "sdedit_start",
    "sd_version": "model",
}

# keys some version of the original reads that change nothing here: accepted for the values that
# mean what tokenflow does anyway, named in one info line; other values are refused.
IGNORED_KEYS = {
    # omerbt/TokenFlow PR #24 (DDPM inversion): its configs' skip_steps (edit steps skipped), read only
    # when `inversion: ddpm` (then it is our `skip`: from_mapping); its preprocess.py's --reconstruct
    "skip_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "the DDPM-inversion fork's skipped steps, used only with a DDPM inversion; read as skip only "
                   "when this YAML says inversion: ddpm (DDIM otherwise)", "a whole number >= 0"),
    "reconstruct": (lambda v: isinstance(v, bool), "the fork's preprocess.py flag for a reconstruction video",
                    "true or false"),
    # the cog predictor's (omerbt/TokenFlow PR #41) namespace
    "local_files_only": (lambda v: v is False, "downloads are allowed",
                         "false; for offline runs set HF_HUB_OFFLINE=1 or pass --model DIR"),
}


def _field_names() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EditConfig))


def from_mapping(data: dict, base: EditConfig = EditConfig(), *, source: str = "config",
                 note: Optional[Callable[[str], None]] = None) -> EditConfig:
    """Build a config from a dict of our keys and/or the original repository's keys.

    Keys of the original that change nothing here (``IGNORED_KEYS``) are named in one line passed
    to ``note`` (the CLI's info event); without ``note`` it is a warning."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = set(_field_names())
    changes: dict = {}
    data = dict(data)
    if "skip_steps" in data and "skip" not in data and data.get("inversion", base.inversion) == "ddpm":
        data["skip"] = data.pop("skip_steps")   # the fork reads it only for its DDPM inversion, as we do
    ignored = _pop_ignored(data, source)
    h, w = data.pop("H", None), data.pop("W", None)
    if h is not None or w is not None:
        try:
            # a side the mapping does not give is the original's default, 512 (its preprocess.py --H/--W)
            changes["size"] = (int(w if w is not None else 512), int(h if h is not None else 512))
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: H={short_repr(h)}, W={short_repr(w)} must be whole numbers of pixels") from None
    # the original's sdedit config is recognised by its keys
    if ("start" in data or "use_ddim_noise" in data) and "method" not in data:
        changes["method"] = "sdedit"
    for key, value in data.items():
        name = ORIGINAL_KEYS.get(key, key)
        if key == "sd_version":
            value = _model_from_sd_version(value, source)
        elif key == "size" and value is not None:
            value = _size_value(value, source)
        elif key == "output_path" and isinstance(value, str) and value.strip():
            value = os.path.join(value, "")   # the original writes its videos into this folder
        if name == "device" and value is not None:
            value = str(value)
        if name in ("prompt", "lora", "embedding", "controlnet", "control") and isinstance(value, list):
            value = tuple(value)
        if name not in fields:
            allowed = ", ".join(sorted(fields | set(ORIGINAL_KEYS) | set(IGNORED_KEYS) | {"H", "W"}))
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: {allowed}")
        changes[name] = value
    try:
        config = dataclasses.replace(base, **changes)
    except TypeError as exc:  # pragma: no cover - dataclasses reports unknown fields this way
        raise ConfigError(f"{source}: {exc}") from None
    if ignored:
        text = f"{source}: ignoring {', '.join(ignored)} of the original: changes nothing here (" \
               + "; ".join(f"{key}: {why}" for key, why in ignored.items()) + ")"
        if note is None:
            warnings.warn(text, stacklevel=2)
        else:
            note(text)
    return config


def _pop_ignored(data: dict, source: str) -> Dict[str, str]:
    """Remove the IGNORED_KEYS from ``data``: {key: why it changes nothing}; a value that would
    change something is a ConfigError."""
    ignored = {}
    for key, (accepts, why, expect) in IGNORED_KEYS.items():
        if key in data:
            value = data.pop(key)
            if not accepts(value):
                raise ConfigError(f"{source}: {key}={short_repr(value)} is not supported: {key} must be {expect}")
            ignored[key] = why
    return ignored


def _size_value(value: Any, source: str) -> Tuple[int, int]:
    if not isinstance(value, (list, tuple)):
        return parse_size(str(value))
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{source}: size={short_repr(value)} must be [width, height] or 'WIDTHxHEIGHT'")
    return tuple(value)


def _model_from_sd_version(value: Any, source: str) -> str:
    key = SD_VERSION_ALIASES.get(str(value), str(value))
    if key not in SD_VERSIONS:
        variant = {"ControlNet": " (the original never shipped its ControlNet variant: use --controlnet)"}.get(key, "")
        raise ConfigError(
            f"{source}: sd_version={short_repr(value)} is not supported{variant}; use one of {', '.join(SD_VERSIONS)} "
            "or set `model` to a Hub id / local diffusers folder")
    return SD_VERSIONS[key]


def load_yaml(path: str, base: EditConfig = EditConfig(), *, note: Optional[Callable[[str], None]] = None) -> EditConfig:
    """Read a YAML config (ours or the original repository's) on top of ``base`` (``note``: see from_mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML ({first_line(exc)}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r} is nested too deeply to be a config; fix the file") from None
    return from_mapping(data, base, source=f"config {path!r}", note=note)


def default_size(width: int, height: int, family: str = "sd") -> Tuple[int, int]:
    """The edit size (W, H) when --size is not given, for a source of ``width`` x ``height``: the
    original's choice for SD (512x512 for square input, its recommended 672x384 / 384x672
    otherwise), twice that for SDXL (``family`` "sdxl": 1024x1024, 1344x768 / 768x1344), the
    resolutions each was trained at."""
    scale = 2 if family == "sdxl" else 1
    if width == height:
        return 512 * scale, 512 * scale
    return (672 * scale, 384 * scale) if width > height else (384 * scale, 672 * scale)
