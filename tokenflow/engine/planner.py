"""The memory planner: how many frames each kind of call may take under a memory budget.

Inputs: the loaded model (weights, UNet/VAE configs), frames N and latents h x w, the compute
dtype, the number of branches B (1 source + 2 per prompt), keyframes K and the keyframe window.
Outputs (``MemoryPlan``): frames per propagation call, per inversion call and per VAE call,
keyframes per keyframe-pass call, where the keyframe store and the inverted latents live, and the
predicted peak of every stage. Peaks are

    weights + resident (store and latents on the device) + rows * bytes_per_row (+ staging)

with bytes per row from ``memory.py`` (analytic, calibrated per device). Chunk sizes never change
results (``tests/test_edit_invariance.py``), only speed and memory.

Host memory (``HostPlan``) is planned too, before anything is decoded (``tokenflow edit`` and
``invert`` check it right after probing the input: ``app.jobs``) and again in ``make_plan`` with
the model's numbers. With E = N x 3 x H x W (frame elements), L = N x c x H/f x W/f (latent
elements, c latent channels, f the VAE factor), T inverted latents kept (edit steps + 1), P
prompts and S source pixels per frame, the bytes held at each phase are

    read    E (uint8 frames) + 4E (float32 frames) + 11 S + 4 H W (one frame in flight: decoded
            RGB, PIL copies, the resized picture)
    hash    4E + 8E (the frames' sha256 goes through two float32 copies)
    invert  4E + z0 + latents + cache + device
    edit    4E + z0 + latents + store + device
    decode  4E + z0 + latents + P (4E + 4L) + 4E (the decoded chunks and their concatenation) + device
    write   4E + P (4E + 4L) + 8E (one output converted to uint8: two float32 temporaries) + weights

with z0 = 4L and latents = 4 T L when they live on the host (the CPU is the device, or
--inverted-latents host/disk), cache = 8 T L with the inversion cache (its serialised file and
a host copy while saving or loading), store = the keyframe store when offloaded, and on CPU
device = the device plan's peak (weights, resident latents and store, activations). The peak
phase must fit in what the host has available (``memory.host_available``) less a margin.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from tokenflow.engine.memory import (
    Calibration,
    attention_layer_shapes,
    gib,
    host_available,
    module_bytes,
    unet_row_elements,
    vae_decode_row_elements,
)
from tokenflow.errors import ResourceError

CPU_VAE_FRAMES = 8      # frames per VAE call on CPU (tiny model, 1 thread: 12 ms/frame at 8 vs 22 at 40)
# rows (branches x frames) per propagation call on CPU: 40-frame edits of the tiny model at 128^2,
# 1 thread, ONNX Runtime, 3 rounds interleaved: propagation 4.12 s median at 30 rows, 4.41 s at 60,
# 4.90 s at 120 (bigger calls touch more fresh memory: the first call alone took 1.2 s at 120 rows)
CPU_PROPAGATE_ROWS = 32
SEARCH_TILE = 1 << 24   # similarities per tile of the torch nearest-neighbour search (kernels/nearest.py)
STAGE_NAMES = {"keyframes": "the keyframe pass", "propagate": "a propagation call",
               "invert": "an inversion call", "vae": "a VAE call"}


LATENT_CHANNELS = 4     # SD's VAE latents, assumed before the model loads (the plan then uses the model's)
VAE_SCALE = 8
HOST_MARGIN = 512 * 2**20   # host memory left for the libraries, the interpreter and the rest of the process
PHASE_NAMES = {"read": "decoding the frames", "hash": "hashing the frames", "invert": "the inversion",
               "edit": "the edit", "decode": "decoding the edited latents", "write": "writing the outputs"}
PART_NAMES = {"frames_u8": "decoded uint8 frames", "frames": "float32 frames", "in_flight": "one frame in flight",
              "hash": "hash copies", "z0": "clean latents", "latents": "inverted latents", "cache": "cache traffic",
              "store": "keyframe store", "device": "device plan (weights, activations)", "outputs": "edited frames",
              "concat": "decode concatenation", "converting": "output conversion", "weights": "weights"}


@dataclass(frozen=True)
class HostPlan:
    """Host (CPU) memory of one inversion or edit, phase by phase (module doc). Plain numbers:
    made before the model loads (``before_read``) and by ``make_plan`` with the model's."""

    frames: int                   # N selected frames (at least 1 is checked when the count is unknown)
    width: int                    # target size
    height: int
    prompts: int                  # P edits (0: only an inversion, no outputs)
    timesteps: int                # T inverted latents kept
    latents_on_host: bool
    use_cache: bool
    available: int                # host memory this process may still take
    available_source: str
    frames_source: str = ""       # where N comes from
    source_pixels: int = 0        # S, pixels of one source frame; 0 once the frames are decoded
    latent_channels: int = LATENT_CHANNELS
    vae_scale: int = VAE_SCALE
    store: int = 0                # keyframe store bytes on the host
    device: int = 0               # on CPU: the device plan's peak
    weights: int = 0              # on CPU: the model's weights
    z0_on_host: bool = False      # the CPU is the device
    held: int = 0                 # already allocated and counted in ``parts`` (the decoded frames; on CPU the weights)
    margin: int = HOST_MARGIN

    @property
    def parts(self) -> Dict[str, int]:
        """Bytes of each thing the module doc counts (per output, whole clip)."""
        e = self.frames * 3 * self.width * self.height
        latent = self.frames * self.latent_channels * (self.height // self.vae_scale) * (self.width // self.vae_scale)
        t = self.timesteps
        return {"frames_u8": e, "frames": 4 * e, "in_flight": 11 * self.source_pixels + 4 * self.width * self.height,
                "hash": 8 * e, "z0": 4 * latent if self.z0_on_host else 0,
                "latents": 4 * t * latent if self.latents_on_host else 0,
                "cache": 8 * t * latent if self.use_cache else 0, "store": self.store, "device": self.device,
                "outputs": self.prompts * (4 * e + 4 * latent), "concat": 4 * e if self.prompts else 0,
                "converting": 8 * e if self.prompts else 0, "weights": self.weights}

    @property
    def phases(self) -> Dict[str, Dict[str, int]]:
        """{phase: {part: bytes}} of every phase this run goes through (read: only before decoding)."""
        p = self.parts

        def pick(*names: str) -> Dict[str, int]:
            return {n: p[n] for n in names if p[n]}

        phases = {"hash": pick("frames", "hash"),
                  "invert": pick("frames", "z0", "latents", "cache", "device"),
                  "edit": pick("frames", "z0", "latents", "store", "device")}
        if self.source_pixels:
            phases = {"read": pick("frames_u8", "frames", "in_flight"), **phases}
        if self.prompts:
            phases["decode"] = pick("frames", "z0", "latents", "outputs", "concat", "device")
            phases["write"] = pick("frames", "outputs", "converting", "weights")
        return phases

    @property
    def peak_phase(self) -> Tuple[str, int]:
        totals = {name: sum(parts.values()) for name, parts in self.phases.items()}
        name = max(totals, key=totals.get)
        return name, totals[name]

    @property
    def need(self) -> int:
        return self.peak_phase[1]

    @property
    def usable(self) -> int:
        """What the counted parts may take: available + held - margin."""
        return max(0, self.available + self.held - self.margin)

    @property
    def fits(self) -> bool:
        return self.need <= self.usable

    def as_dict(self) -> dict:
        phase, need = self.peak_phase
        return {"need": need, "peak_phase": phase, "available": self.available, "held": self.held,
                "usable": self.usable,
                "available_source": self.available_source, "frames": self.frames,
                "frames_source": self.frames_source, "parts": {k: v for k, v in self.parts.items() if v}}

    def describe(self) -> str:
        phase, need = self.peak_phase
        parts = ", ".join(f"{PART_NAMES[k]} {gib(v)}" for k, v in self.phases[phase].items())
        return f"  host memory: peak {gib(need)} while {PHASE_NAMES[phase]} ({parts}) of {self._usable_words()}"

    def _usable_words(self) -> str:
        held = f" + {gib(self.held)} already held" if self.held else ""
        return f"{gib(self.usable)} usable ({self.available_source}{held}, less a {gib(self.margin)} margin)"

    def with_frames(self, frames: int) -> "HostPlan":
        return dataclasses.replace(self, frames=frames)

    def check(self) -> "HostPlan":
        """Raise ResourceError (numbers and the flags that fix it) unless the peak phase fits; return self."""
        if not self.fits:
            raise self.refusal()
        return self

    def check_frames(self, n: int) -> None:
        """For ``io.read.read_video(on_frame=...)``: refuse before the n-th frame when n frames cannot fit."""
        if n > self.frames and not self.with_frames(n).fits:
            raise dataclasses.replace(self, frames=n, frames_source="counted as they were decoded").refusal()

    def max_frames(self) -> int:
        """The most frames that fit at this size (0 if not even one does)."""
        low, high = 0, max(self.frames, 1)
        while self.with_frames(high).fits and high < 2**40:
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.with_frames(mid).fits else (low, mid)
        return low

    def max_size(self) -> Optional[Tuple[int, int]]:
        """The largest size of this aspect (multiples of 8, sides at least 64) at which these frames fit, or None."""
        def scaled(r: float) -> "HostPlan":
            return dataclasses.replace(self, width=max(64, int(self.width * r) // 8 * 8),
                                       height=max(64, int(self.height * r) // 8 * 8))
        if not scaled(0).fits:
            return None
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if scaled(mid).fits else (low, mid)
        best = scaled(low)
        return best.width, best.height

    def refusal(self) -> ResourceError:
        phase, need = self.peak_phase
        parts = sorted(self.phases[phase].items(), key=lambda kv: -kv[1])
        named = ", ".join(f"{PART_NAMES[k]} {gib(v)}" for k, v in parts[:4])
        fixes = []
        most = self.max_frames()
        size = self.max_size()
        if size is not None and size != (self.width, self.height):
            fixes.append(f"a smaller --size (at most about {size[0]}x{size[1]} for {self.frames} frames"
                         + ("; not even one frame fits at this size)" if not most else ")"))
        if most:
            fixes.append(f"fewer frames (--frames, --stride: at most {most} fit at {self.width}x{self.height})")
        elif size is None:
            fixes.append("a machine with more memory: not even one 64x64 frame fits")
        top = {k for k, _ in parts[:3]}
        if "latents" in top or "cache" in top:
            fixes.append("fewer --steps (fewer inverted latents are kept)")
        if "cache" in top:
            fixes.append("--no-cache")
        if "latents" in top and not self.z0_on_host:
            fixes.append("--inverted-latents device")
        if "store" in top:
            fixes.append("--keyframe-store device or a --keyframe-window")
        if "device" in top:
            fixes.append("a smaller --memory-budget or --chunk-frames (smaller UNet calls)")
        if "outputs" in top and self.prompts > 1:
            fixes.append("fewer --prompt edits per run (each holds its output frames)")
        return ResourceError(
            f"not enough host memory for {self.frames} frame{'s' if self.frames != 1 else ''} at "
            f"{self.width}x{self.height}"
            + (f" ({self.frames_source})" if self.frames_source else "")
            + f": {PHASE_NAMES[phase]} needs {gib(need)} ({named}) of {self._usable_words()}. "
            "Use " + "; or ".join(fixes))


def before_read(*, frames: Optional[int], frames_source: str, width: int, height: int, source_pixels: int,
                prompts: int, timesteps: int, device_type: str, inverted_latents: str, use_cache: bool,
                available: Optional[Tuple[int, str]] = None) -> HostPlan:
    """The host plan before anything is decoded or loaded (model-free: SD's latent shape assumed;
    weights, activations and the keyframe store are counted by ``make_plan``). ``frames`` None
    (unknown before decoding) checks one frame; check the rest with ``HostPlan.check_frames``."""
    on_cpu = device_type == "cpu"
    free, source = available or host_available()
    return HostPlan(frames=frames if frames else 1, width=width, height=height, prompts=prompts,
                    timesteps=timesteps, latents_on_host=on_cpu or inverted_latents in ("host", "disk"),
                    use_cache=use_cache, available=free, available_source=source, frames_source=frames_source,
                    source_pixels=source_pixels, z0_on_host=on_cpu)


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes and predicted peaks (bytes) of one edit. Print with ``describe()``."""

    device: str
    dtype: str
    budget: int
    budget_source: str
    frames: int
    latent_size: tuple            # (h, w)
    branches: int                 # 1 source + 2 per prompt
    keyframes: int                # K per step
    keyframe_call: int            # keyframes per keyframe-pass call (K, or the window)
    chunk_frames: int             # frames per propagation call
    inversion_frames: int         # frames per inversion call
    vae_frames: int               # frames per VAE encode/decode call
    weights_bytes: int
    unet_row_bytes: int           # activations of one UNet batch row
    vae_row_bytes: int
    store_bytes: int              # the whole keyframe store (all layers, all branches)
    store_on: str                 # "device" or "host" (pinned; a chunk's keyframes are staged)
    staging_bytes: int            # device staging for an offloaded store
    latents_bytes: int            # inverted latents of every edit timestep, float32
    latents_on: str
    peaks: Dict[str, int]         # predicted peak per stage: keyframes, propagate, invert, vae
    calibration: str
    chunk_forced: bool = False    # --chunk-frames given
    host: Optional[HostPlan] = None   # host memory, checked with the device's

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def as_dict(self) -> dict:
        out = asdict(dataclasses.replace(self, host=None))
        out["peak"] = self.peak
        out["host"] = self.host.as_dict() if self.host is not None else None
        return out

    def describe(self) -> str:
        h, w = self.latent_size
        rows = [
            f"memory plan on {self.device} ({self.dtype}): budget {gib(self.budget)} ({self.budget_source})",
            f"  {self.frames} frames, latents {h}x{w}, {self.branches} branches, {self.keyframes} keyframes per step",
            f"  weights {gib(self.weights_bytes)}; per UNet row {self.unet_row_bytes / 2**20:.1f} MiB; "
            f"per VAE frame {self.vae_row_bytes / 2**20:.1f} MiB ({self.calibration})",
            f"  keyframe store {gib(self.store_bytes)} on {self.store_on}"
            + (f" (device staging {gib(self.staging_bytes)})" if self.store_on == "host" else ""),
            f"  inverted latents {gib(self.latents_bytes)} on {self.latents_on}",
            f"  keyframe pass: {self.keyframe_call} keyframes per call -> peak {gib(self.peaks['keyframes'])}",
            f"  propagation:   {self.chunk_frames} frames per call"
            + (" (--chunk-frames)" if self.chunk_forced else "") + f" -> peak {gib(self.peaks['propagate'])}",
            f"  inversion:     {self.inversion_frames} frames per call -> peak {gib(self.peaks['invert'])}",
            f"  VAE:           {self.vae_frames} frames per call -> peak {gib(self.peaks['vae'])}",
            f"  predicted peak {gib(self.peak)} of {gib(self.budget)}",
        ]
        if self.host is not None:
            rows.append(self.host.describe())
        return "\n".join(rows)


def store_bytes_per_keyframe(unet, h: int, w: int, branches: int, element_size: int) -> int:
    """Per keyframe: the source features [S, C] and B branch outputs [S, C] of every layer."""
    return sum((1 + branches) * s * c for s, c in attention_layer_shapes(unet, h, w).values()) * element_size


def make_plan(model, *, frames: int, latent_size: tuple, branches: int, keyframes: int, window: int,
              steps: int, budget: int, budget_source: str, calibration: Calibration,
              chunk_frames: Optional[int] = None, inversion_frames: Optional[int] = None,
              keyframe_store: str = "auto", inverted_latents: str = "auto",
              max_chunk: Optional[int] = None, use_cache: bool = True,
              host: Optional[Tuple[int, str]] = None) -> MemoryPlan:
    """Choose chunk sizes under ``budget``; raise ResourceError naming the budget that would fit,
    or naming the host memory (module doc) that does not: ``host`` is (bytes available, where
    from), default ``memory.host_available()`` now; the decoded frames (and on CPU the weights)
    are already held and counted as such."""
    h, w = latent_size
    size = torch.empty((), dtype=model.dtype).element_size()
    height, width = h * model.vae_scale_factor, w * model.vae_scale_factor
    weights = module_bytes(model.unet, model.vae, model.text_encoder)
    row = int(unet_row_elements(model.unet.config, h, w) * size * calibration.unet)
    vae_row = int(vae_decode_row_elements(model.vae.config, height, width) * size * calibration.vae)
    per_kf = store_bytes_per_keyframe(model.unet, h, w, branches, size)
    store = per_kf * keyframes
    latents = steps * frames * int(model.unet.config["in_channels"]) * h * w * 4
    kf_call = min(window or keyframes, keyframes)
    cap = max_chunk or frames

    def fits(resident: int, rows_per_frame: int, per_row: int, extra_per_frame: int = 0) -> int:
        free = budget - weights - resident - calibration.unet_fixed - SEARCH_TILE * 4
        return min(cap, max(0, free // max(1, rows_per_frame * per_row + extra_per_frame)))

    # where the store and the latents live: on the device unless the keyframe pass would not fit
    def place(choice: str, nbytes: int, others: int) -> str:
        if choice != "auto":
            return choice
        need = weights + others + nbytes + branches * kf_call * row
        return "device" if need <= budget else "host"

    latents_on = place(inverted_latents, latents, 0)
    store_on = place(keyframe_store, store, latents if latents_on == "device" else 0)
    resident = (store if store_on == "device" else 0) + (latents if latents_on == "device" else 0)
    # an offloaded store stages at most two keyframes per frame of a chunk (paper: before and
    # after; original: own and previous), bounded by K
    staging_per_frame = 2 * per_kf if store_on == "host" else 0
    chunk = chunk_frames or max(1, fits(resident, branches, row, staging_per_frame))
    if chunk_frames is None and torch.device(model.device).type == "cpu":
        chunk = min(chunk, max(1, CPU_PROPAGATE_ROWS // branches))
    staging = min(2 * chunk, keyframes) * per_kf if store_on == "host" else 0
    inv = inversion_frames or max(1, fits(latents if latents_on == "device" else 0, 1, row))
    vae = max(1, fits(0, 1, vae_row))
    if torch.device(model.device).type == "cpu":  # measured: 40-frame VAE calls run ~2x slower per frame
        vae = min(vae, CPU_VAE_FRAMES)            # than 8-frame ones on CPU (caches), no memory reason
    fixed = calibration.unet_fixed
    tokens = max(s for s, _ in attention_layer_shapes(model.unet, h, w).values())
    search = min(SEARCH_TILE, chunk * tokens * tokens) * 4   # the torch search's similarity tile
    peaks = {
        # (an offloaded store receives each layer's outputs while they are alive anyway)
        "keyframes": weights + resident + fixed + branches * kf_call * row,
        "propagate": weights + resident + fixed + branches * chunk * row + staging + search,
        "invert": weights + (latents if latents_on == "device" else 0) + fixed + inv * row,
        "vae": weights + vae * vae_row,
    }
    plan = MemoryPlan(
        device=str(model.device), dtype=str(model.dtype).replace("torch.", ""), budget=budget,
        budget_source=budget_source, frames=frames, latent_size=(h, w), branches=branches,
        keyframes=keyframes, keyframe_call=kf_call, chunk_frames=chunk, inversion_frames=inv, vae_frames=vae,
        weights_bytes=weights, unet_row_bytes=row, vae_row_bytes=vae_row,
        store_bytes=store, store_on=store_on, staging_bytes=staging, latents_bytes=latents,
        latents_on=latents_on, peaks=peaks, calibration=calibration.source, chunk_forced=chunk_frames is not None)
    _check_fits(plan)
    on_cpu = torch.device(model.device).type == "cpu"
    free, source = host or host_available()
    frames_bytes = 4 * frames * 3 * height * width
    host_plan = HostPlan(
        frames=frames, width=width, height=height, prompts=max(1, (branches - 1) // 2), timesteps=steps,
        latents_on_host=latents_on == "host", use_cache=use_cache, available=free, available_source=source,
        frames_source="the decoded clip", latent_channels=int(model.unet.config["in_channels"]),
        vae_scale=model.vae_scale_factor, store=store if store_on == "host" else 0,
        device=plan.peak if on_cpu else 0, weights=weights if on_cpu else 0, z0_on_host=on_cpu,
        held=frames_bytes + (weights if on_cpu else 0))
    plan = dataclasses.replace(plan, host=host_plan)
    if torch.device(model.device).type != "meta":   # a meta-device plan is a what-if: nothing is allocated here
        host_plan.check()
    return plan


def _check_fits(plan: MemoryPlan) -> None:
    over = {stage: peak for stage, peak in plan.peaks.items() if peak > plan.budget}
    if not over:
        return
    problems = [f"{STAGE_NAMES[stage]} needs {gib(peak)}" for stage, peak in over.items()]
    if "keyframes" in over and plan.keyframe_call == plan.keyframes and plan.keyframes > 2:
        problems.append("a keyframe window (--keyframe-window W) bounds the keyframe pass")
    need = max(plan.peaks.values())
    raise ResourceError(
        f"the memory budget {gib(plan.budget)} ({plan.budget_source}) is too small: {'; '.join(problems)}. "
        f"Set --memory-budget to at least {math.ceil(need / 2**30 * 10) / 10:.1f}GiB if the device has it, "
        "or use fewer frames (--frames), a smaller --size or --dtype float16")
