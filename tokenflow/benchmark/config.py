"""Benchmark settings: a typed dataclass, named presets, and the variants ``--compare`` runs.

A variant is a named set of ``EditConfig`` overrides applied on top of the benchmark's base
settings; names combine with ``+`` (``triton+chunk4``):

    default    the base settings as given (kernel backends "auto" unless flags say otherwise);
               ``plain`` is the same (the name reads better beside ``controlnetN``)
    auto       both kernel backends "auto"
    torch      the torch reference kernels           triton   the Triton kernels
    faiss      FAISS nearest-neighbour search         xformers xFormers attention
    eager, compile, aot, onnx, tensorrt   how the UNet runs (EditConfig.backend, `tokenflow edit --backend`)
    attn=NAME  keyframe-attention backend NAME        nearest=NAME  nearest-neighbour backend NAME
    chunkN / chunk=N   N frames per propagation UNet call
    latents=PLACE      where inverted latents live: auto, device, host, disk
    window=W   keyframe windows of W keyframes (extended attention within each window)
    controlnetN / controlnet=N   N random-weight ControlNets (``benchmark.conditions``) on the edit's
               non-source rows at every step, random control images (N in 1..8)
    inversion=ddimN / ddimN    DDIM inversion with N steps (the original's: ddim500)
    inversion=ddpm / ddpm / ddpmN   the edit-friendly DDPM inversion on the edit's timesteps (N, when
               given, must be --steps: the DDPM inversion has no step count of its own)
    original   the original implementation's compute pattern: "original" kernel backends
               (tokenflow/benchmark/original_kernels.py), one propagation call per keyframe group
               (chunk = keyframe spacing), inverted latents re-read from disk for every group
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from tokenflow.errors import ConfigError

ARCHES = ("sd15", "sd21", "sd2-depth", "sdxl", "tiny", "tiny-depth")   # --arch (benchmark.architectures)
MAX_CONTROLNETS = 8
STAGES = ("encode", "invert", "keyframes", "propagate", "edit", "decode", "total")
STAGE_LABELS = {"encode": "encode", "invert": "inversion", "keyframes": "keyframe pass",
                "propagate": "propagation", "edit": "edit (kf+prop)", "decode": "decode", "total": "total"}


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``tokenflow bench`` invocation measures.

    size is (width, height) in pixels; dtype/device None: the device's defaults (float16 on GPUs,
    float32 on the CPU). variants: names (see the module docstring); the first is the baseline
    of the printed ratios.
    """

    arch: str = "sd21"                     # sd15, sd21, sd2-depth, sdxl (random weights), tiny, tiny-depth
    model: Optional[str] = None            # a real model instead (load_model string)
    video: Optional[str] = None            # None: a synthetic clip
    frames: int = 16
    size: Tuple[int, int] = (512, 512)
    inversion_steps: int = 20
    steps: int = 10
    keyframe_spacing: int = 8
    chunk_frames: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    attention_backend: str = "auto"
    nearest_backend: str = "auto"
    variants: Tuple[str, ...] = ("default",)
    repeats: int = 3
    warmup: int = 1
    threads: Optional[int] = None
    idle_wait_s: float = 60.0
    seed: int = 1

    def replace(self, **changes) -> "BenchConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "BenchConfig":
        for name, low in (("frames", 1), ("inversion_steps", 1), ("steps", 1), ("keyframe_spacing", 1),
                          ("repeats", 1), ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name.replace('_', '-')}={value!r} must be an integer >= {low}")
        for name in ("chunk_frames", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if not (isinstance(self.size, tuple) and len(self.size) == 2):
            raise ConfigError(f"size={self.size!r} must be (width, height)")
        for side, v in zip(("width", "height"), self.size):
            if isinstance(v, bool) or not isinstance(v, int) or v < 64 or v % 8:
                raise ConfigError(f"size {self.size[0]}x{self.size[1]}: {side} must be a multiple of 8 and at "
                                  "least 64 (Stable Diffusion works on 8x downsampled latents), e.g. 512x512")
        if isinstance(self.idle_wait_s, bool) or not isinstance(self.idle_wait_s, (int, float)) \
                or not self.idle_wait_s >= 0:
            raise ConfigError(f"idle-wait={self.idle_wait_s!r} must be a number of seconds >= 0")
        if self.arch not in ARCHES:
            raise ConfigError(f"arch={self.arch!r} is not one of: {', '.join(ARCHES)}")
        if not self.variants:
            raise ConfigError("--compare needs at least one variant name")
        for name in self.variants:
            variant_overrides(name)
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"--compare lists a variant twice: {','.join(self.variants)}")
        return self


PRESETS: Dict[str, BenchConfig] = {
    # a quick GPU measurement with SD 2.1-base's shapes
    "default": BenchConfig(),
    # the paper's setting: 40 frames, 500 inversion steps, 50 edit steps
    "paper": BenchConfig(frames=40, inversion_steps=500, steps=50),
    # SD 1.5's shapes (head dims 40/80/160, 768-wide text)
    "sd15": BenchConfig(arch="sd15"),
    # seconds on a laptop CPU: the tiny model at 128x128
    "smoke": BenchConfig(arch="tiny", frames=6, size=(128, 128), inversion_steps=2, steps=2,
                         keyframe_spacing=3, repeats=1, warmup=1),
    # real architecture, small enough for a CPU
    "cpu": BenchConfig(frames=4, size=(256, 256), inversion_steps=2, steps=1, keyframe_spacing=2,
                       repeats=1, warmup=0),
}


_BACKENDS = {"torch": ("torch", "torch"), "triton": ("triton", "triton"), "faiss": (None, "faiss"),
             "xformers": ("xformers", None), "auto": ("auto", "auto"), "default": (None, None)}
_CHUNK = re.compile(r"^chunk(?:=)?(\d+)$")
_CONTROLNETS = re.compile(r"^controlnet(?:=)?(\d+)$")
_INVERSION = re.compile(r"^(?:inversion=)?(ddim|ddpm)(\d*)$")
LATENT_PLACES = ("auto", "device", "host", "disk")
UNET_BACKENDS = ("eager", "compile", "aot", "onnx", "tensorrt")   # --backend; compile/export time falls in the warm-up
KERNEL_VARIANTS = tuple(_BACKENDS)
# every variant word, as `--help` and the unknown-variant error list them
VARIANT_NAMES = (f"{', '.join(KERNEL_VARIANTS)} (kernel backends), {', '.join(UNET_BACKENDS)} (UNet backends: --backend), "
                 f"original, chunkN (or chunk=N), attn=NAME, nearest=NAME, latents={{{','.join(LATENT_PLACES)}}}, "
                 "window=W, plain, controlnetN (or controlnet=N: N random ControlNets), "
                 "ddimN / ddpm[N] (or inversion=...: the inversion)")


def variant_overrides(name: str) -> dict:
    """EditConfig overrides of a variant name (parts joined by '+'); ConfigError if unknown.

    The key ``"_original"`` marks the original pattern (the runner resolves its chunk size).
    """
    overrides: dict = {}
    for part in name.split("+"):
        part = part.strip()
        chunk = _CHUNK.match(part)
        controlnets = _CONTROLNETS.match(part)
        inversion = _INVERSION.match(part)
        if part == "plain":
            continue
        if inversion:
            kind, steps = inversion.group(1), inversion.group(2)
            if kind == "ddim" and not steps:
                raise ConfigError(f"variant {name!r}: say the DDIM inversion's steps, e.g. ddim500")
            if steps and not 1 <= int(steps) <= 1000:
                raise ConfigError(f"variant {name!r}: 1 to 1000 inversion steps")
            overrides["inversion"] = kind
            if kind == "ddim":
                overrides["inversion_steps"] = int(steps)
            elif steps:
                overrides["_ddpm_steps"] = int(steps)
            continue
        if controlnets:
            if not 1 <= int(controlnets.group(1)) <= MAX_CONTROLNETS:
                raise ConfigError(f"variant {name!r}: 1 to {MAX_CONTROLNETS} ControlNets")
            overrides["_controlnets"] = int(controlnets.group(1))
        elif part in _BACKENDS:
            attention, nearest = _BACKENDS[part]
            if attention is not None:
                overrides["attention_backend"] = attention
            if nearest is not None:
                overrides["nearest_backend"] = nearest
        elif part in UNET_BACKENDS:
            overrides["backend"] = part
        elif part == "original":
            overrides.update(attention_backend="original", nearest_backend="original", inverted_latents="disk",
                             _original=True)
        elif chunk:
            if int(chunk.group(1)) < 1:
                raise ConfigError(f"variant {name!r}: chunk size must be >= 1")
            overrides["chunk_frames"] = int(chunk.group(1))
        elif part.startswith("attn=") and len(part) > 5:
            overrides["attention_backend"] = part[5:]
        elif part.startswith("nearest=") and len(part) > 8:
            overrides["nearest_backend"] = part[8:]
        elif part.startswith("window=") and part[7:].isdigit() and int(part[7:]) >= 1:
            overrides["keyframe_window"] = int(part[7:])
        elif part.startswith("latents=") and part[8:] in LATENT_PLACES:
            overrides["inverted_latents"] = part[8:]
        else:
            raise ConfigError(f"unknown variant {part!r} in --compare; use names from: {VARIANT_NAMES}; "
                              "join with '+' (e.g. triton+chunk4)")
    return overrides


def parse_variants(text: Optional[str]) -> Tuple[str, ...]:
    if text is None:
        return ("default",)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--compare {text!r} names no variant; e.g. --compare torch,original")
    return names


@dataclass
class Variant:
    """A resolved variant: its name and the EditConfig overrides it applies."""

    name: str
    overrides: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
