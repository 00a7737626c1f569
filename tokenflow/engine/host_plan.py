"""Host (CPU) memory of one job, phase by phase: ``HostPlan``.

It is planned before anything is decoded (``before_read``: ``tokenflow edit`` and ``invert``
check it right after probing the input, ``app.jobs``) and again in ``planner.make_plan`` with
the model's numbers. With E = N x 3 x H x W (frame elements), L = N x c x H/f x W/f (latent
elements, c latent channels, f the VAE factor), T inverted latents kept (edit steps + 1), P
prompts and S source pixels per frame, the bytes held at each phase are

    read    E (uint8 frames) + 4E (float32 frames) + 11 S + 4 H W (one frame in flight: decoded
            RGB, PIL copies, the resized picture)
    hash    4E + 8E (the frames' sha256 goes through two float32 copies)
    invert  4E + z0 + latents + cache + conditions + weights + max(an inversion call, a VAE encode call)
    edit    4E + z0 + latents + store + conditions + weights + max(the keyframe pass, a propagation call)
    decode  4E + z0 + latents + P (4E + 4L) + 4E (the decoded chunks and their concatenation)
            + weights + a VAE decode call
    write   4E + P (4E + 4L) + 8E (one output converted to uint8: two float32 temporaries) + weights

with z0 = 4L and latents = 4 T L when they live on the host (the CPU is the device, or
--inverted-latents host/disk), cache = 8 T L with the inversion cache (its serialised file and
a host copy while saving or loading), store = the keyframe store when it is on the host (offloaded,
or the CPU is the device) and its pinned staging buffer (off the CPU), conditions = the ControlNets'
uint8 control images (E per ControlNet; on CPU also a depth model's maps), and, on CPU only (device
memory is host memory), weights = the model's weights and a call = that call's activations (the
stage's device peak less the weights and what is counted above; a propagation call includes its
staged keyframes and search buffers). The peak
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
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from tokenflow.engine.memory import gib, host_available
from tokenflow.errors import ResourceError

LATENT_CHANNELS = 4     # SD's VAE latents, assumed before the model loads (the plan then uses the model's)
VAE_SCALE = 8
HOST_MARGIN = 512 * 2**20   # host memory left for the libraries, the interpreter and the rest of the process
PHASE_NAMES = {"read": "decoding the frames", "hash": "hashing the frames", "invert": "the inversion",
               "edit": "the edit", "decode": "decoding the edited latents", "write": "writing the outputs"}
PART_NAMES = {"frames_u8": "decoded uint8 frames", "frames": "float32 frames", "in_flight": "one frame in flight",
              "hash": "hash copies", "z0": "clean latents", "latents": "inverted latents", "cache": "cache traffic",
              "store": "keyframe store", "pinned_staging": "pinned keyframe staging",
              "conditions": "control images and depth maps",
              "calls": "one call's activations", "outputs": "edited frames",
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
    pinned_staging: int = 0       # pinned host buffer an offloaded store's staged keyframes go through
    weights: int = 0              # on CPU: the model's weights
    conditions: int = 0           # control images of every ControlNet (uint8, host), on CPU with the depth maps
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
                "pinned_staging": self.pinned_staging, "conditions": self.conditions,
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
                  "invert": pick("invert", "frames", "z0", "latents", "cache", "conditions", "weights"),
                  "edit": pick("edit", "frames", "z0", "latents", "store", "pinned_staging", "conditions", "weights")}
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
