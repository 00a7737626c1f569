"""The memory planner: how many frames each kind of call may take under a memory budget.

Inputs: the loaded model (weights, UNet/VAE configs; or, for ``--plan`` of a named version not
downloaded yet, its architecture with every weight on the ``meta`` device: ``models.architectures``
and ``MemoryPlan.made_from``), frames N and latents h x w, the compute
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
    invert  4E + z0 + latents + cache + weights + max(an inversion call, a VAE encode call)
    edit    4E + z0 + latents + store + weights + max(the keyframe pass, a propagation call)
    decode  4E + z0 + latents + P (4E + 4L) + 4E (the decoded chunks and their concatenation)
            + weights + a VAE decode call
    write   4E + P (4E + 4L) + 8E (one output converted to uint8: two float32 temporaries) + weights

with z0 = 4L and latents = 4 T L when they live on the host (the CPU is the device, or
--inverted-latents host/disk), cache = 8 T L with the inversion cache (its serialised file and
a host copy while saving or loading), store = the keyframe store when it is on the host (offloaded,
or the CPU is the device), and, on CPU only (device memory is host memory), weights = the model's
weights and a call = that call's activations (the stage's device peak less the weights and what
is counted above; a propagation call includes its staged keyframes and search tile). The peak
phase must fit in what the host has available (``memory.host_available``) less a margin.

On CPU the calls are sized in what each phase leaves (``make_plan``): the inversion and VAE calls
in the room the inversion phase (and for the VAE the decode phase) leaves after its host parts and
the weights, the propagation calls in the room the edit phase leaves; a job is refused only when
even 1 frame per call (the keyframe pass: its K or --keyframe-window keyframes, which chunking
cannot split without changing results) does not fit, and the refusal names the weights and that
call's activations.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Tuple

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
              "store": "keyframe store", "calls": "one call's activations", "outputs": "edited frames",
              "concat": "decode concatenation", "converting": "output conversion", "weights": "model weights"}
CALL_NAMES = {"keyframes": "the keyframe pass's activations", "propagate": "a propagation call's activations",
              "invert": "an inversion call's activations", "vae": "a VAE call's activations"}
CALL_UNITS = {"keyframes": "keyframes", "propagate": "frames", "invert": "frames", "vae": "frames"}
# the flag that sets a call's frames (the VAE's are not settable: 1 per call is tried anyway)
CALL_FLAGS = {"keyframes": "--keyframe-window", "propagate": "--chunk-frames", "invert": "--inversion-batch-size"}


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
    weights: int = 0              # on CPU: the model's weights
    # on CPU: {phase: (stage, activation bytes, frames per call, bytes per frame)} of the phase's
    # largest call (invert: "invert" or "vae"; edit: "keyframes" or "propagate"; decode: "vae")
    calls: Dict[str, Tuple[str, int, int, int]] = field(default_factory=dict)
    z0_on_host: bool = False      # the CPU is the device
    held: int = 0                 # already allocated and counted in ``parts`` (the decoded frames; on CPU the weights)
    margin: int = HOST_MARGIN
    dtype: str = ""               # the model's compute dtype, once known (advice: --dtype)
    # (frames, width, height) -> the model-side fields (store, calls) at the smallest calls the
    # planner would choose: what ``max_frames``/``max_size`` try. None: they stay as they are.
    rescale: Optional[Callable[[int, int, int], dict]] = field(default=None, repr=False, compare=False)

    @property
    def parts(self) -> Dict[str, int]:
        """Bytes of each thing the module doc counts (per output, whole clip; calls: the largest)."""
        e = self.frames * 3 * self.width * self.height
        latent = self.frames * self.latent_channels * (self.height // self.vae_scale) * (self.width // self.vae_scale)
        t = self.timesteps
        return {"frames_u8": e, "frames": 4 * e, "in_flight": 11 * self.source_pixels + 4 * self.width * self.height,
                "hash": 8 * e, "z0": 4 * latent if self.z0_on_host else 0,
                "latents": 4 * t * latent if self.latents_on_host else 0,
                "cache": 8 * t * latent if self.use_cache else 0, "store": self.store,
                "calls": max((call[1] for call in self.calls.values()), default=0),
                "outputs": self.prompts * (4 * e + 4 * latent), "concat": 4 * e if self.prompts else 0,
                "converting": 8 * e if self.prompts else 0, "weights": self.weights}

    @property
    def phases(self) -> Dict[str, Dict[str, int]]:
        """{phase: {part: bytes}} of every phase this run goes through (read: only before decoding)."""
        p = self.parts

        def pick(phase: str, *names: str) -> Dict[str, int]:
            out = {n: p[n] for n in names if p[n]}
            if self.calls.get(phase, ("", 0))[1]:
                out["calls"] = self.calls[phase][1]
            return out

        phases = {"hash": pick("hash", "frames", "hash"),
                  "invert": pick("invert", "frames", "z0", "latents", "cache", "weights"),
                  "edit": pick("edit", "frames", "z0", "latents", "store", "weights")}
        if self.source_pixels:
            phases = {"read": pick("read", "frames_u8", "frames", "in_flight"), **phases}
        if self.prompts:
            phases["decode"] = pick("decode", "frames", "z0", "latents", "outputs", "concat", "weights")
            phases["write"] = pick("write", "frames", "outputs", "converting", "weights")
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
                "frames_source": self.frames_source, "parts": {k: v for k, v in self.parts.items() if v},
                "calls": {ph: {"stage": stage, "bytes": nbytes, "frames_per_call": per_call}
                          for ph, (stage, nbytes, per_call, _) in self.calls.items()}}

    def describe(self) -> str:
        phase, need = self.peak_phase
        parts = ", ".join(self._part_words(phase, k, v) for k, v in self.phases[phase].items())
        return f"  host memory: peak {gib(need)} while {PHASE_NAMES[phase]} ({parts}) of {self._usable_words()}"

    def _part_words(self, phase: str, part: str, nbytes: int) -> str:
        if part != "calls":
            return f"{PART_NAMES[part]} {gib(nbytes)}"
        stage, _, per_call, _ = self.calls[phase]
        return f"{CALL_NAMES[stage]} ({_per_call(stage, per_call)}) {gib(nbytes)}"

    def _usable_words(self) -> str:
        held = f" + {gib(self.held)} already held" if self.held else ""
        return f"{gib(self.usable)} usable ({self.available_source}{held}, less a {gib(self.margin)} margin)"

    def with_frames(self, frames: int) -> "HostPlan":
        return self._resized(frames, self.width, self.height)

    def _resized(self, frames: int, width: int, height: int) -> "HostPlan":
        model = self.rescale(frames, width, height) if self.rescale else {}
        return dataclasses.replace(self, frames=frames, width=width, height=height, **model)

    def check(self) -> "HostPlan":
        """Raise ResourceError (numbers and the flags that fix it) unless the peak phase fits; return self."""
        if not self.fits:
            raise self.refusal()
        return self

    def check_frames(self, n: int) -> None:
        """For ``io.read.read_video(on_frame=...)``: refuse before the n-th frame when n frames cannot fit."""
        if n > self.frames and not self.with_frames(n).fits:
            raise dataclasses.replace(self.with_frames(n), frames_source="counted as they were decoded").refusal()

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
            return self._resized(self.frames, max(64, int(self.width * r) // 8 * 8),
                                 max(64, int(self.height * r) // 8 * 8))
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
        named = ", ".join(self._part_words(phase, k, v) for k, v in parts[:4])
        top = {k for k, _ in parts[:3]}
        fixes = []
        most = self.max_frames()
        size = self.max_size()
        # on CPU, the weights or a call among the biggest parts (or the weights alone too many)
        model_bound = bool(self.weights and (top & {"weights", "calls"} or self.weights > self.usable))
        model = self._model_words(phase) if model_bound else ""
        if size is not None and size != (self.width, self.height):
            fixes.append(f"a smaller --size (at most about {size[0]}x{size[1]} for {self.frames} frames"
                         + ("; not even one frame fits at this size)" if not most else ")"))
        if most:
            fixes.append(f"fewer frames (--frames, --stride: at most {most} fit at {self.width}x{self.height})")
        elif size is None and not self.weights:
            fixes.append("a machine with more memory: not even one 64x64 frame fits")
        if model_bound:
            fixes += self._model_fixes(phase)
        if self.weights > self.usable:   # nothing but smaller weights (or another device) can fit
            top = set()
        if "latents" in top or "cache" in top:
            fixes.append("fewer --steps (fewer inverted latents are kept)")
        if "cache" in top:
            fixes.append("--no-cache")
        if "latents" in top and not self.z0_on_host:
            fixes.append("--inverted-latents device")
        if "store" in top:
            fixes.append(("" if self.z0_on_host else "--keyframe-store device or ")
                         + "a larger --keyframe-spacing (fewer keyframes)")
        if "outputs" in top and self.prompts > 1:
            fixes.append("fewer --prompt edits per run (each holds its output frames)")
        return ResourceError(
            f"not enough host memory for {self.frames} frame{'s' if self.frames != 1 else ''} at "
            f"{self.width}x{self.height}"
            + (f" ({self.frames_source})" if self.frames_source else "")
            + f": {PHASE_NAMES[phase]} needs {gib(need)} ({named}) of {self._usable_words()}"
            + (f"; {model}" if model else "") + ". Use " + "; or ".join(fixes))

    def _model_words(self, phase: str) -> str:
        """On CPU: what the model's part of ``phase`` (the weights and its largest call) takes."""
        stage, act, per_call, _ = self.calls.get(phase, ("", 0, 0, 0))
        if not act:
            return f"the model weights alone take {gib(self.weights)} of it"
        return (f"the model weights + {CALL_NAMES[stage]} at {_per_call(stage, per_call)} alone take "
                f"{gib(self.weights + act)} ({gib(self.weights)} + {gib(act)}) of it")

    def _model_fixes(self, phase: str) -> list:
        """On CPU, where the weights or a call's activations are among the biggest parts: the
        flags that shrink them (fewer frames per call only where the call takes more than 1)."""
        stage, act, per_call, per_frame = self.calls.get(phase, ("", 0, 0, 0))
        fixes = []
        if stage in CALL_FLAGS and per_call > 1 and per_frame:
            base = act - per_call * per_frame   # what the call takes whatever its frames
            most = min(per_call - 1, (self.usable - (self.need - act) - base) // per_frame)
            if most >= 1:
                fixes.append(f"a smaller {CALL_FLAGS[stage]} (at most about {_per_call(stage, most)} fit)")
        if self.dtype in ("", "float32"):
            fixes.append("--dtype bfloat16 (half the weights and activations)")
        fixes.append("a GPU (--device cuda: the weights and activations then live in its memory)")
        return fixes


def _per_call(stage: str, n: int) -> str:
    unit = CALL_UNITS[stage]
    return f"{n} {unit if n != 1 else unit[:-1]} per call"


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
    made_from: str = ""           # "": the loaded model; else what stood in for it (an architecture, no weights)

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
        if self.made_from:
            rows.insert(1, f"  made from {self.made_from}")
        return "\n".join(rows)


def store_bytes_per_keyframe(unet, h: int, w: int, branches: int, element_size: int) -> int:
    """Per keyframe: the source features [S, C] and B branch outputs [S, C] of every layer."""
    return sum((1 + branches) * s * c for s, c in attention_layer_shapes(unet, h, w).values()) * element_size


@dataclass(frozen=True)
class _Rows:
    """Bytes per frame (per batch row) of the calls at one latent size."""

    unet: int          # activations of one UNet batch row
    vae: int           # of one VAE frame
    keyframe: int      # one keyframe's entry in the store (all layers, source + every branch)
    tokens: int        # the most tokens of an attention layer


def _rows(model, h: int, w: int, branches: int, element_size: int, calibration: Calibration) -> _Rows:
    scale = model.vae_scale_factor
    return _Rows(unet=int(unet_row_elements(model.unet.config, h, w) * element_size * calibration.unet),
                 vae=int(vae_decode_row_elements(model.vae.config, h * scale, w * scale) * element_size
                         * calibration.vae),
                 keyframe=store_bytes_per_keyframe(model.unet, h, w, branches, element_size),
                 tokens=max(s for s, _ in attention_layer_shapes(model.unet, h, w).values()))


def _activations(rows: _Rows, fixed: int, branches: int, sizes: Dict[str, int], staging: int) -> Dict[str, int]:
    """Activations of each stage's largest call: ``sizes`` {stage: frames (keyframes) per call}."""
    search = min(SEARCH_TILE, sizes["propagate"] * rows.tokens * rows.tokens) * 4   # the torch search's tile
    return {"keyframes": fixed + branches * sizes["keyframes"] * rows.unet,
            "propagate": fixed + branches * sizes["propagate"] * rows.unet + staging + search,
            "invert": fixed + sizes["invert"] * rows.unet,
            "vae": sizes["vae"] * rows.vae}


def _host_calls(acts: Dict[str, int], sizes: Dict[str, int], per_frame: Dict[str, int]) -> Dict[str, tuple]:
    """HostPlan.calls: each phase's largest call (the VAE encodes in the inversion phase)."""
    def largest(*stages: str) -> tuple:
        stage = max(stages, key=acts.get)
        return stage, acts[stage], sizes[stage], per_frame[stage]
    return {"invert": largest("invert", "vae"), "edit": largest("keyframes", "propagate"), "decode": largest("vae")}


def make_plan(model, *, frames: int, latent_size: tuple, branches: int, keyframes: int, window: int,
              steps: int, budget: int, budget_source: str, calibration: Calibration,
              chunk_frames: Optional[int] = None, inversion_frames: Optional[int] = None,
              keyframe_store: str = "auto", inverted_latents: str = "auto",
              max_chunk: Optional[int] = None, use_cache: bool = True,
              host: Optional[Tuple[int, str]] = None) -> MemoryPlan:
    """Choose chunk sizes under ``budget`` and, on CPU, in what the host leaves (module doc);
    raise ResourceError naming the budget that would fit, or naming the host memory that does
    not: ``host`` is (bytes available, where from), default ``memory.host_available()`` now; the
    decoded frames (and on CPU the weights) are already held and counted as such."""
    h, w = latent_size
    on_cpu = torch.device(model.device).type == "cpu"
    size = torch.empty((), dtype=model.dtype).element_size()
    scale = model.vae_scale_factor
    height, width = h * scale, w * scale
    weights = module_bytes(model.unet, model.vae, model.text_encoder)
    loaded = getattr(model, "weights_loaded", True)   # False: an architecture, whose weights no one holds yet
    fixed = calibration.unet_fixed
    rows = _rows(model, h, w, branches, size, calibration)
    row, vae_row, per_kf = rows.unet, rows.vae, rows.keyframe
    store = per_kf * keyframes
    latents = steps * frames * int(model.unet.config["in_channels"]) * h * w * 4
    kf_call = min(window or keyframes, keyframes)
    cap = max_chunk or frames

    def within(free: int, per_frame: int) -> int:
        return min(cap, max(0, free // max(1, per_frame)))

    def device_room(resident: int) -> int:   # what a call may take under the budget
        return budget - weights - resident - fixed - SEARCH_TILE * 4

    # where the store and the latents live: on the device unless the keyframe pass would not fit
    def place(choice: str, nbytes: int, others: int) -> str:
        if choice != "auto":
            return choice
        need = weights + others + nbytes + branches * kf_call * row
        return "device" if need <= budget else "host"

    latents_on = place(inverted_latents, latents, 0)
    store_on = place(keyframe_store, store, latents if latents_on == "device" else 0)
    latents_resident = latents if latents_on == "device" else 0
    resident = (store if store_on == "device" else 0) + latents_resident
    # an offloaded store stages at most two keyframes per frame of a chunk (paper: before and
    # after; original: own and previous), bounded by K
    staging_per_frame = 2 * per_kf if store_on == "host" else 0

    # the host: on CPU the latents and the store are host memory wherever the plan puts them
    # (the device peaks count them as resident, the host plan as its own parts: once each)
    free, source = host or host_available()
    host_plan = HostPlan(
        frames=frames, width=width, height=height, prompts=max(1, (branches - 1) // 2), timesteps=steps,
        latents_on_host=on_cpu or latents_on == "host", use_cache=use_cache, available=free,
        available_source=source, frames_source="the decoded clip", latent_channels=int(model.unet.config["in_channels"]),
        vae_scale=scale, store=store if on_cpu or store_on == "host" else 0, weights=weights if on_cpu else 0,
        z0_on_host=on_cpu, held=4 * frames * 3 * height * width + (weights if on_cpu and loaded else 0),
        dtype=str(model.dtype).replace("torch.", ""))
    # on CPU each call gets what its phase leaves after the host parts and the weights
    room = {phase: host_plan.usable - sum(parts.values()) for phase, parts in host_plan.phases.items()}

    def host_room(*phases: str) -> int:
        return min(room[p] for p in phases) - fixed - SEARCH_TILE * 4 if on_cpu else budget

    chunk = chunk_frames or max(1, within(min(device_room(resident), host_room("edit")),
                                          branches * row + staging_per_frame))
    if chunk_frames is None and on_cpu:
        chunk = min(chunk, max(1, CPU_PROPAGATE_ROWS // branches))
    staging = min(2 * chunk, keyframes) * per_kf if store_on == "host" else 0
    inv = inversion_frames or max(1, within(min(device_room(latents_resident), host_room("invert")), row))
    vae = max(1, within(min(device_room(0), host_room("invert", "decode")), vae_row))
    if on_cpu:                             # measured: 40-frame VAE calls run ~2x slower per frame
        vae = min(vae, CPU_VAE_FRAMES)     # than 8-frame ones on CPU (caches), no memory reason
    sizes = {"keyframes": kf_call, "propagate": chunk, "invert": inv, "vae": vae}
    acts = _activations(rows, fixed, branches, sizes, staging)
    # (an offloaded store receives each layer's outputs while they are alive anyway)
    peaks = {"keyframes": weights + resident + acts["keyframes"], "propagate": weights + resident + acts["propagate"],
             "invert": weights + latents_resident + acts["invert"], "vae": weights + acts["vae"]}
    per_frame = {"keyframes": branches * row, "propagate": branches * row + staging_per_frame, "invert": row,
                 "vae": vae_row}

    def rescale(n: int, px_width: int, px_height: int) -> dict:
        """The model's host parts for n frames at px_width x px_height, at 1 frame per call
        (or the forced sizes) and the keyframes scaled with the frames: for the refusal's advice."""
        k = max(1, math.ceil(keyframes * n / frames))
        r = _rows(model, max(1, px_height // scale), max(1, px_width // scale), branches, size, calibration)
        least = {"keyframes": min(window or k, k), "propagate": min(chunk_frames or 1, n),
                 "invert": min(inversion_frames or 1, n), "vae": 1}
        least_staging = min(2 * least["propagate"], k) * r.keyframe if store_on == "host" else 0
        least_per_frame = {"keyframes": branches * r.unet, "invert": r.unet, "vae": r.vae,
                           "propagate": branches * r.unet + (2 * r.keyframe if store_on == "host" else 0)}
        calls = _activations(r, fixed, branches, least, least_staging)
        return {"store": r.keyframe * k if on_cpu or store_on == "host" else 0,
                "calls": _host_calls(calls, least, least_per_frame) if on_cpu else {}}

    host_plan = dataclasses.replace(host_plan, calls=_host_calls(acts, sizes, per_frame) if on_cpu else {},
                                    rescale=rescale)
    plan = MemoryPlan(
        device=str(model.device), dtype=str(model.dtype).replace("torch.", ""), budget=budget,
        budget_source=budget_source, frames=frames, latent_size=(h, w), branches=branches,
        keyframes=keyframes, keyframe_call=kf_call, chunk_frames=chunk, inversion_frames=inv, vae_frames=vae,
        weights_bytes=weights, unet_row_bytes=row, vae_row_bytes=vae_row,
        store_bytes=store, store_on=store_on, staging_bytes=staging, latents_bytes=latents,
        latents_on=latents_on, peaks=peaks, calibration=calibration.source, chunk_forced=chunk_frames is not None,
        host=host_plan)
    real = torch.device(model.device).type != "meta"   # a meta-device plan is a what-if: nothing is allocated here
    if on_cpu and real:   # on CPU the host is the device: its check has the better numbers and advice
        host_plan.check()
    _check_fits(plan)
    if real:
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
