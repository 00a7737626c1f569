"""Typed, validated settings. Defaults are the original implementation's.

``EditConfig`` holds everything one run needs; ``PRESETS`` names a few useful variants;
``load_yaml`` reads our own keys and the original repository's (``configs/config_pnp.yaml``,
``configs/config_sdedit.yaml`` and the ``preprocess.py`` flags).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from tokenflow.errors import ConfigError, short_repr

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"

# The original's ``sd_version`` values and the Hub ids it maps them to.
SD_VERSIONS = {
    "2.1": "stabilityai/stable-diffusion-2-1-base",
    "2.0": "stabilityai/stable-diffusion-2-base",
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # runwayml/... was taken down
}

METHODS = ("pnp", "sdedit")
PLACES = ("auto", "device", "host")
PROPAGATIONS = ("original", "paper")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EditConfig:
    """All settings of an inversion + edit. Field names double as YAML keys and CLI flags.

    Sizes: ``size`` is (width, height) in pixels; None picks 512x512 for square input and the
    original's recommended 672x384 (landscape) / 384x672 (portrait) otherwise.
    """

    # input video and frame selection
    video: Optional[str] = None
    frames: Optional[int] = 40          # None = every selected frame
    start_frame: int = 0
    stride: int = 1
    size: Optional[Tuple[int, int]] = None
    crop: bool = False                  # centre-crop to the target aspect before resizing

    # model and device
    model: str = DEFAULT_MODEL
    device: Optional[str] = None        # None: cuda if available, else mps, else cpu
    dtype: Optional[str] = None         # None: float16 on accelerators, float32 on cpu

    # inversion (the original's preprocess.py)
    inversion_prompt: str = ""
    inversion_steps: int = 500
    inversion_batch_size: Optional[int] = None   # frames per inversion call (None: the memory plan)

    # editing
    method: str = "pnp"
    prompt: Union[str, Tuple[str, ...]] = ""    # several prompts: one edit each, sharing the inversion
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 50
    guidance_scale: float = 7.5
    keyframe_spacing: int = 8           # the original's batch_size
    chunk_frames: Optional[int] = None  # frames per propagation UNet call (None: the memory plan)
    keyframe_window: Optional[int] = None  # keyframes per extended attention (None: all, the original)
    pnp_attn_t: float = 0.5
    pnp_f_t: float = 0.8
    sdedit_start: float = 0.9           # the original's `start`
    use_ddim_noise: bool = True
    propagation: str = "original"
    seed: int = 1

    # how the UNet runs: eager (diffusers + processors), compile (torch.compile), aot (AOTInductor
    # packages), onnx (ONNX Runtime), tensorrt (engines from the ONNX graphs; never run here)
    backend: str = "eager"

    # kernels ("auto": the best backend that runs here; see `tokenflow doctor`)
    attention_backend: str = "auto"     # auto, triton, xformers, torch
    nearest_backend: str = "auto"       # auto, triton, faiss, torch (propagate follows when it can)

    # memory (see `tokenflow edit --plan`)
    memory_budget: Optional[Union[int, str]] = None  # bytes or "12GB"/"16GiB"; None: free device memory - margin
    keyframe_store: str = "auto"        # auto, device, host (pinned; chunks stage their keyframes)
    inverted_latents: str = "auto"      # auto, device, host, disk (disk: the original's per-group reloads)

    # outputs and cache
    output: Optional[str] = None
    save_frames: Optional[str] = None   # folder for numbered PNGs
    save_latents: Optional[str] = None  # .npy of the final latents [N,4,h,w]
    report: Optional[str] = None        # folder for an HTML report (frames, side by side, metrics)
    clip_model: Optional[str] = None    # CLIP model (Hub id or folder) for the report's CLIP scores
    fps: Optional[float] = None         # None = the source frame rate
    cache_dir: Optional[str] = None     # None = $TOKENFLOW_CACHE or ~/.cache/tokenflow
    use_cache: bool = True
    overwrite: bool = False             # False: a job whose outputs all exist is skipped

    # unattended runs (see docs/farm.md)
    checkpoint_dir: Optional[str] = None  # save resumable state here
    checkpoint_every: int = 5             # steps (inversion and edit) between checkpoints
    resume: bool = False                  # continue from the checkpoint in checkpoint_dir
    allow_pickle: bool = False            # load .bin/.ckpt (pickle) weights; default safetensors only

    @property
    def prompts(self) -> Tuple[str, ...]:
        """The edit prompts: one per output (``prompt`` may be a string or a list of strings)."""
        if isinstance(self.prompt, str):
            return (self.prompt,) if self.prompt else ()
        return tuple(self.prompt)

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, *, need_prompt: bool = True) -> "EditConfig":
        """Raise ConfigError naming the first bad field and its allowed values; return self."""
        _int_at_least("frames", self.frames, 1, allow_none=True)
        _int_at_least("start_frame", self.start_frame, 0)
        _int_at_least("stride", self.stride, 1)
        _int_at_least("inversion_steps", self.inversion_steps, 1)
        _int_at_least("inversion_batch_size", self.inversion_batch_size, 1, allow_none=True)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("keyframe_spacing", self.keyframe_spacing, 1)
        _int_at_least("chunk_frames", self.chunk_frames, 1, allow_none=True)
        _int_at_least("keyframe_window", self.keyframe_window, 1, allow_none=True)
        _int_at_least("checkpoint_every", self.checkpoint_every, 1)
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume needs checkpoint_dir: pass --checkpoint-dir DIR (the folder the killed run used)")
        _choice("keyframe_store", self.keyframe_store, PLACES)
        _choice("backend", self.backend, ("eager", "compile", "aot", "onnx", "tensorrt"))
        _choice("inverted_latents", self.inverted_latents, PLACES + ("disk",))
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        _int_at_least("seed", self.seed, 0)
        if self.steps > self.inversion_steps:
            raise ConfigError(
                f"steps={self.steps} exceeds inversion_steps={self.inversion_steps}: every edit "
                "timestep must be an inversion timestep; raise --inversion-steps or lower --steps")
        if self.inversion_steps > 1000:
            raise ConfigError(f"inversion_steps={self.inversion_steps} must be at most 1000")
        for name in ("pnp_attn_t", "pnp_f_t"):
            _fraction(name, getattr(self, name), low_open=False)
        _fraction("sdedit_start", self.sdedit_start, low_open=True)
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale) \
                or self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale={short_repr(self.guidance_scale)} must be a finite number >= 0 (default 7.5)")
        _choice("method", self.method, METHODS)
        _choice("propagation", self.propagation, PROPAGATIONS)
        from tokenflow.kernels.dispatch import check_names  # noqa: PLC0415 (keeps config import-light)

        check_names("keyframe_attention", self.attention_backend, "attention_backend")
        check_names("cosine_nearest", self.nearest_backend, "nearest_backend")
        if self.dtype is not None:
            _choice("dtype", self.dtype, DTYPES)
        if self.size is not None:
            w, h = self.size
            for name, v in (("width", w), ("height", h)):
                if not isinstance(v, int) or v < 64 or v % 8:
                    raise ConfigError(
                        f"size {w}x{h}: {name} must be a multiple of 8 and at least 64 "
                        "(Stable Diffusion works on 8x downsampled latents), e.g. 512x512 or 672x384")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or not self.fps > 0):
            raise ConfigError(f"fps={short_repr(self.fps)} must be a positive number")
        if not isinstance(self.prompt, (str, tuple, list)) or not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError(f"prompt={short_repr(self.prompt)} must be a string or a list of strings")
        if need_prompt and (not self.prompts or not all(p.strip() for p in self.prompts)):
            raise ConfigError("the edit prompt is empty: pass --prompt \"what the video should become\" "
                              "(repeat --prompt for several edits of the same video)")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model is empty: pass --model with a Hub id, a local diffusers folder or 'tiny'")
        return self


def _int_at_least(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={short_repr(value)} must be an integer >= {low}")


def _fraction(name: str, value: Any, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{name}={short_repr(value)} must be a number in {interval}")


def _choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={short_repr(value)} is not one of: {', '.join(allowed)}")


# --- presets ------------------------------------------------------------------------------

PRESETS = {
    # the original's configs/config_pnp.yaml
    "original": EditConfig(),
    # a quick look: fewer inversion and edit steps (every 10-step timestep is a 50-step one)
    "fast": EditConfig(inversion_steps=50, steps=10),
    # offline smoke test with the tiny random-weight model (outputs are noise, by design)
    "tiny": EditConfig(model="tiny", size=(128, 128), frames=16, inversion_steps=50, steps=10),
}


# --- YAML ---------------------------------------------------------------------------------

# original key -> our field (values converted by _convert_original)
ORIGINAL_KEYS = {
    "data_path": "video",
    "n_frames": "frames",
    "n_inversion_steps": "inversion_steps",
    "n_timesteps": "steps",
    "save_steps": "steps",               # preprocess.py's flag
    "batch_size": "keyframe_spacing",
    "latents_path": "cache_dir",
    "save_dir": "cache_dir",             # preprocess.py's flag
    "output_path": "output",
    "start": "sdedit_start",
    "sd_version": "model",
}


def _field_names() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EditConfig))


def from_mapping(data: dict, base: EditConfig = EditConfig(), *, source: str = "config") -> EditConfig:
    """Build a config from a dict of our keys and/or the original repository's keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = set(_field_names())
    changes: dict = {}
    data = dict(data)
    h, w = data.pop("H", None), data.pop("W", None)
    if h is not None or w is not None:
        try:
            changes["size"] = (int(w if w is not None else h), int(h if h is not None else w))
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
        if name == "device" and value is not None:
            value = str(value)
        if name == "prompt" and isinstance(value, list):
            value = tuple(value)
        if name not in fields:
            allowed = ", ".join(sorted(fields | set(ORIGINAL_KEYS)))
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: {allowed}")
        changes[name] = value
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as exc:  # pragma: no cover - dataclasses reports unknown fields this way
        raise ConfigError(f"{source}: {exc}") from None


def _size_value(value: Any, source: str) -> Tuple[int, int]:
    if not isinstance(value, (list, tuple)):
        return parse_size(str(value))
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{source}: size={short_repr(value)} must be [width, height] or 'WIDTHxHEIGHT'")
    return tuple(value)


def _model_from_sd_version(value: Any, source: str) -> str:
    key = str(value)
    if key not in SD_VERSIONS:
        raise ConfigError(
            f"{source}: sd_version={short_repr(value)} is not supported; use one of {', '.join(SD_VERSIONS)} "
            "or set `model` to a Hub id / local diffusers folder")
    return SD_VERSIONS[key]


def load_yaml(path: str, base: EditConfig = EditConfig()) -> EditConfig:
    """Read a YAML config (ours or the original repository's) on top of ``base``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path!r} is not valid YAML ({first}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r} is nested too deeply to be a config; fix the file") from None
    return from_mapping(data, base, source=f"config {path!r}")


def parse_size(text: str) -> Tuple[int, int]:
    """'672x384' -> (672, 384) as (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512 or 672x384")
    return int(parts[0]), int(parts[1])


def default_size(width: int, height: int) -> Tuple[int, int]:
    """The original's choice: 512x512 for square input, its recommended 672x384 / 384x672 otherwise."""
    if width == height:
        return 512, 512
    return (672, 384) if width > height else (384, 672)


def parse_bytes(text, name: str = "memory_budget") -> int:
    """'12GB' (10^9), '12GiB' (2^30), '800MB', '1.5e9', or an int -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{name}={text!r} is not a size: use e.g. 12GB, 16GiB or 800MB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name}={text!r} must be positive")
    return size


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
