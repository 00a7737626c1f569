"""The memory planner: how many frames each kind of call may take under a memory budget.

Inputs: the loaded model (weights, UNet/VAE configs; or, for ``--plan`` of a named version not
downloaded yet, its architecture with every weight on the ``meta`` device: ``models.architectures``
and ``MemoryPlan.made_from``), frames N and latents h x w, the compute
dtype, the number of branches B (1 source + 2 per prompt), keyframes K and the keyframe window.
Outputs (``MemoryPlan``): frames per propagation call, per inversion call and per VAE call,
keyframes per keyframe-pass call, where the keyframe store and the inverted latents live, and the
predicted peak of every stage. Peaks are

    weights + resident (store and latents on the device) + staging
            + reserved_factor x (fixed + rows * bytes_per_row + nearest-neighbour search buffers)

with bytes per row from ``memory.py`` (analytic, calibrated per device), and must fit in the
budget less ``memory.device_overheads`` (on CUDA: the context, cuBLAS/cuDNN workspaces and a
margin of 5 % of the budget; the CUDA peaks are torch's *reserved* memory, the activations x
``RESERVED_FACTOR``). With ``--backend compile`` on CUDA the CUDA graphs' pool (about the largest
captured call) stays held: the keyframe and propagation peaks count it in place of their own
call, and the VAE's beside its own. Chunk sizes are the largest that fit, one after the other
(propagation, inversion, VAE), under caps: on CPU measured ones, on GPUs ``GPU_UNET_ROWS`` rows
and ``GPU_VAE_FRAMES`` / ``GPU_VAE_ELEMENTS`` for the VAE (unmeasured on GPU), and on every device
no tensor past int32 indexing (``memory.INT32_ELEMENTS``, from the architecture's shapes; a call
that cannot be split, such as the keyframe pass, is refused). Chunk sizes never change results
(``tests/test_edit_invariance.py``), only speed and memory.

ControlNets (``Controls``: their weights beside the model's; a call's activations are the larger of
the ControlNet moment, controlled rows x (ControlNet row + previous residual sum + control image),
and the UNet moment, every row x (UNet row + summed residuals)) and a depth UNet's maps
``[N,1,h,w]`` float32 on the device are counted; their share is a line of the plan.

Host memory is planned too (``engine.host_plan.HostPlan``): before anything is decoded, and
again here with the model's numbers; on CPU the calls are sized in what each host phase leaves.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from tokenflow.engine.host_plan import HostPlan
from tokenflow.engine.memory import (
    GPU_MARGIN_FRACTION,
    GPU_MARGIN_MIN,
    INT32_ELEMENTS,
    RESERVED_FACTOR,
    SEARCH_TILE,
    Calibration,
    attention_layer_shapes,
    control_residual_elements,
    controlnet_row_elements,
    device_overheads,
    gib,
    host_available,
    module_bytes,
    search_bytes,
    search_largest_elements,
    unet_largest_row_elements,
    unet_row_elements,
    vae_decode_row_elements,
    vae_largest_frame_elements,
)
from tokenflow.engine.passes import GRAPH_PAIRS
from tokenflow.engine.store import staging_slots
from tokenflow.errors import ResourceError
from tokenflow.kernels.support import triton_missing

CPU_VAE_FRAMES = 8      # frames per VAE call on CPU (tiny model, 1 thread: 12 ms/frame at 8 vs 22 at 40)
# rows (branches x frames) per propagation call on CPU: 40-frame edits of the tiny model at 128^2,
# 1 thread, ONNX Runtime, 3 rounds interleaved: propagation 4.12 s median at 30 rows, 4.41 s at 60,
# 4.90 s at 120 (bigger calls touch more fresh memory: the first call alone took 1.2 s at 120 rows)
CPU_PROPAGATE_ROWS = 32
CPU_CAPS_NOTE = "measured on CPU: bigger calls ran slower"
# GPU caps, UNMEASURED ON GPU: bench/gpu_check.py stage 5 (call_sweep) measures where UNet rows/s and VAE
# frames/s flatten beside these (set them from its recorded result); make_plan's row_cap/vae_cap replace them.
# UNet rows per propagation or inversion call: at SD's 64x64 latents one row is already 4096
# tokens x 320 channels per layer of the widest level, so 128 rows keep every GEMM far past the
# size where an H100/H200 saturates, while the largest tensor (the GEGLU projection, 10.5M elements
# a row) stays at 1.3G elements, under int32 indexing with room (204 rows would reach it).
GPU_UNET_ROWS = 128
# VAE frames per call: the decoder's widest full-size tensor is 256 x H x W elements a frame (67M
# at 512^2), and large convolutions and group norms have int32 limits of their own; keep a call's
# largest tensor at or under 2^29 elements (8 frames at 512^2), and at most 16 frames, where a
# 512^2 frame is already seconds of convolution work.
GPU_VAE_ELEMENTS = 1 << 29
GPU_VAE_FRAMES = 16
GPU_CAPS_NOTE = "unmeasured on GPU: chosen by reasoning about tensor sizes, not timings"
STAGE_NAMES = {"keyframes": "the keyframe pass", "propagate": "a propagation call",
               "invert": "an inversion call", "vae": "a VAE call"}


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes and predicted peaks (bytes) of one edit. Print with ``describe()``.

    ``peaks`` are what each stage's largest call holds at once on the device: on CUDA torch's
    reserved memory (the calls' allocations x ``reserved_factor``), which must fit in ``usable`` =
    ``budget`` less ``overheads`` (CUDA context, library workspaces, a safety margin)."""

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
    inversion_frames: int         # frames per inversion call (rows when inversion_unit says so)
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
    latents_note: str = ""        # what the inverted latents are when not DDIM's (the DDPM inversion's noise maps too)
    inversion_unit: str = "frames"   # what an inversion call batches: DDPM's across timesteps batches rows
    # {name: bytes} taken off the budget before any call is sized (memory.device_overheads)
    overheads: Dict[str, int] = field(default_factory=dict)
    reserved_factor: float = 1.0  # predicted reserved / allocated bytes of the calls' activations
    # {cap: value} bounding the calls (None: no such cap here) and why (CALL_CAPS_NOTE)
    call_caps: Dict[str, Optional[int]] = field(default_factory=dict)
    caps_note: str = ""
    nearest: str = ""             # the nearest-neighbour search counted (memory.search_bytes kinds)
    nearest_bytes: int = 0        # its buffers in a propagation call (largest layer)
    graph_pool_bytes: int = 0     # CUDA graphs' private memory pool (--backend compile on CUDA)
    graph_pool_note: str = ""
    pinned_staging_bytes: int = 0   # pinned host buffer the staged keyframes are gathered into
    largest_tensor: Dict[str, int] = field(default_factory=dict)   # elements of each stage's largest tensor
    # ControlNets (planner.Controls) and depth maps
    controlnets: int = 0
    controlnet_note: str = ""
    controlnet_weights_bytes: int = 0
    control_row_bytes: int = 0        # one controlled row while a ControlNet runs (planner._Rows.control)
    control_residual_bytes: int = 0   # one row's summed residuals, held through the UNet call
    control_images_bytes: int = 0     # uint8 control images of every frame and ControlNet (host)
    control_share: Dict[str, int] = field(default_factory=dict)   # per stage: peak with - without the ControlNets
    depth_bytes: int = 0              # depth maps [N,1,h,w] float32 on the device (depth UNets)

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def usable(self) -> int:
        """What the calls, weights and resident tensors may take: the budget less the overheads."""
        return self.budget - sum(self.overheads.values())

    @property
    def breakdown(self) -> Dict[str, int]:
        """Named device (and pinned host) bytes beside the calls' activations, for the plan's output."""
        lines = {**self.overheads, "weights": self.weights_bytes,
                 "keyframe_store": self.store_bytes if self.store_on == "device" else 0,
                 "inverted_latents": self.latents_bytes if self.latents_on == "device" else 0,
                 "device_staging": self.staging_bytes, "pinned_host_staging": self.pinned_staging_bytes,
                 f"nearest_{self.nearest or 'search'}": self.nearest_bytes, "graph_pools": self.graph_pool_bytes}
        if self.controlnets:
            lines["controlnet_weights"] = self.controlnet_weights_bytes
            lines["controlnet_activations"] = max(self.control_share.values(), default=0) - self.controlnet_weights_bytes
        if self.depth_bytes:
            lines["depth_maps"] = self.depth_bytes
        return lines

    def as_dict(self) -> dict:
        out = asdict(dataclasses.replace(self, host=None))
        out["peak"] = self.peak
        out["usable"] = self.usable
        out["breakdown"] = self.breakdown
        out["host"] = self.host.as_dict() if self.host is not None else None
        return out

    def describe(self) -> str:
        h, w = self.latent_size
        staged = (f"; staged per chunk: device {gib(self.staging_bytes)}"
                  + (f", pinned host {gib(self.pinned_staging_bytes)}" if self.pinned_staging_bytes else "")
                  if self.store_on == "host" else "")
        rows = [
            f"memory plan on {self.device} ({self.dtype}): budget {gib(self.budget)} ({self.budget_source})",
            f"  {self.frames} frames, latents {h}x{w}, {self.branches} branches, {self.keyframes} keyframes per step",
            f"  weights {gib(self.weights_bytes)}; per UNet row {self.unet_row_bytes / 2**20:.1f} MiB; "
            f"per VAE frame {self.vae_row_bytes / 2**20:.1f} MiB ({self.calibration})",
            f"  keyframe store {gib(self.store_bytes)} on {self.store_on}{staged}",
            f"  inverted latents {gib(self.latents_bytes)} on {self.latents_on}"
            + (f" ({self.latents_note})" if self.latents_note else ""),
        ]
        if self.nearest:
            rows.append(f"  nearest-neighbour search ({NEAREST_WORDS[self.nearest]}): {gib(self.nearest_bytes)} "
                        "per propagation call")
        if self.controlnets:
            share = ", ".join(f"{STAGE_NAMES[k].split(' ', 1)[1]} {gib(v)}" for k, v in self.control_share.items() if v)
            rows.append(f"  ControlNets: {self.controlnets} ({self.controlnet_note}): weights "
                        f"{gib(self.controlnet_weights_bytes)}; per controlled row {self.control_row_bytes / 2**20:.1f} "
                        f"MiB, residuals {self.control_residual_bytes / 2**20:.1f} MiB per UNet row; control images "
                        f"{gib(self.control_images_bytes)} on the host")
            rows.append(f"  ControlNets' share of the peaks: {share}")
        if self.depth_bytes:
            rows.append(f"  depth maps {gib(self.depth_bytes)} on the device (5-channel UNet input)")
        if self.graph_pool_bytes:
            rows.append(f"  CUDA graph pool {gib(self.graph_pool_bytes)} ({self.graph_pool_note})")
        if self.call_caps:
            rows.append(f"  call caps: {_caps_words(self.call_caps, self.caps_note)}")
        rows += [
            f"  keyframe pass: {self.keyframe_call} keyframes per call -> peak {gib(self.peaks['keyframes'])}",
            f"  propagation:   {self.chunk_frames} frames per call"
            + (" (--chunk-frames)" if self.chunk_forced else "") + f" -> peak {gib(self.peaks['propagate'])}",
            f"  inversion:     {self.inversion_frames} {self.inversion_unit} per call -> peak {gib(self.peaks['invert'])}",
            f"  VAE:           {self.vae_frames} frames per call -> peak {gib(self.peaks['vae'])}",
        ]
        if self.overheads:
            taken = ", ".join(f"{OVERHEAD_NAMES[k]} {gib(v)}" for k, v in self.overheads.items())
            rows.append(f"  off the budget: {taken} -> {gib(self.usable)} usable")
            rows.append(f"  predicted peak {gib(self.peak)} reserved (activations x {self.reserved_factor:g} for the "
                        f"allocator's rounding and fragmentation) of {gib(self.usable)} usable")
        else:
            rows.append(f"  predicted peak {gib(self.peak)} of {gib(self.budget)}")
        if self.host is not None:
            rows.append(self.host.describe())
        if self.made_from:
            rows.insert(1, f"  made from {self.made_from}")
        return "\n".join(rows)


OVERHEAD_NAMES = {"cuda_context": "CUDA context", "cublas_workspace": "cuBLAS workspaces",
                  "cudnn_workspace": "cuDNN workspace", "margin": "safety margin"}
NEAREST_WORDS = {"static": "static search tiles", "torch": "torch search tile and float32 copies",
                 "faiss": "FAISS: counted as the torch search", "triton": "Triton kernel: indices only"}
CAP_WORDS = {"propagation_rows": "UNet rows per propagation call", "inversion_rows": "UNet rows per inversion call",
             "vae_frames": "VAE frames per call", "int32_unet_rows": "UNet rows", "int32_vae_frames": "VAE frames"}


def _caps_words(caps: Dict[str, Optional[int]], note: str) -> str:
    def words(*keys: str) -> str:
        return ", ".join(f"{caps[k]} {CAP_WORDS[k]}" for k in keys if caps.get(k) is not None)
    return (f"{words('propagation_rows', 'inversion_rows', 'vae_frames')} ({note}); int32 indexing allows "
            f"{words('int32_unet_rows', 'int32_vae_frames')}")


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
    layers: tuple = ()       # (tokens S, channels C) of each distinct attention layer shape
    unet_largest: int = 0    # elements of the largest tensor of one UNet row
    vae_largest: int = 0     # of one VAE frame
    # ControlNets (none: all 0): bytes of one controlled row while a ControlNet runs (its
    # activations and residuals, the sum of the previous ones' and the row's control image) and
    # of one row's summed residuals, held through the UNet call (every row: uncontrolled rows get zeros)
    control: int = 0
    residual: int = 0
    controlled_edit: int = 0     # controlled rows per frame of a TokenFlow pass (2P, or B with control_source)
    controlled_invert: int = 0   # per frame of an inversion call (1 with controls during the inversion)


@dataclass(frozen=True)
class Controls:
    """The ControlNets an edit runs (``engine.conditioning.UNetConditions.controls``' nets, or
    weightless stand-ins for a plan): modules with a diffusers ``ControlNetModel`` config."""

    nets: Sequence[torch.nn.Module] = ()
    source: bool = False       # the source branch of TokenFlow passes is controlled too
    inversion: bool = False    # the inversion's calls are controlled
    note: str = ""             # what they are, for the plan's text


def _rows(model, h: int, w: int, branches: int, element_size: int, calibration: Calibration,
          controls: Controls = Controls()) -> _Rows:
    scale = model.vae_scale_factor
    shapes = attention_layer_shapes(model.unet, h, w)
    unet_largest = unet_largest_row_elements(model.unet.config, h, w)
    control = residual = 0
    if controls.nets:
        height, width = h * scale, w * scale
        configs = [net.config for net in controls.nets]
        res = max(control_residual_elements(c, h, w) for c in configs)
        net = max(controlnet_row_elements(c, h, w, height, width) for c in configs)
        images = 3 * 3 * height * width * element_size   # a row's control image: copied, cast and scaled
        control = int((net + (res if len(configs) > 1 else 0)) * element_size * calibration.unet) + images
        residual = int(res * element_size * calibration.unet)
        widths = [int((c.get("conditioning_embedding_out_channels") or (16,))[0]) for c in configs]
        unet_largest = max(unet_largest, max(widths) * height * width)
    return _Rows(unet=int(unet_row_elements(model.unet.config, h, w) * element_size * calibration.unet),
                 vae=int(vae_decode_row_elements(model.vae.config, h * scale, w * scale)
                         * (4 if getattr(model, "vae_upcast", False) else element_size) * calibration.vae),
                 keyframe=store_bytes_per_keyframe(model.unet, h, w, branches, element_size),
                 tokens=max(s for s, _ in shapes.values()), layers=tuple(sorted(set(shapes.values()))),
                 unet_largest=unet_largest,
                 vae_largest=vae_largest_frame_elements(model.vae.config, h * scale, w * scale),
                 control=control, residual=residual,
                 controlled_edit=(branches - (0 if controls.source else 1)) if controls.nets else 0,
                 controlled_invert=1 if controls.nets and controls.inversion else 0)


def _call(rows: _Rows, fixed: int, n_rows: int, controlled: int, extra: int = 0) -> int:
    """Activations of one UNet call of ``n_rows`` rows, ``controlled`` of them through the ControlNets:
    the larger of the ControlNets' moment and the UNet's (with the residuals it consumes)."""
    unet = n_rows * (rows.unet + (rows.residual if controlled else 0)) + extra
    return fixed + max(unet, controlled * rows.control)


def _per_frame(rows: _Rows, stage: str, branches: int) -> int:
    """Activation bytes one more frame adds to a call of ``stage`` (the host plan's advice, limits)."""
    if stage == "invert":
        return _call(rows, 0, 1, rows.controlled_invert)
    return _call(rows, 0, branches, rows.controlled_edit)


def _search(rows: _Rows, kind: str, frames: int, keys: int) -> int:
    """Bytes of a propagation call's nearest-neighbour search (its largest layer's)."""
    return max(search_bytes(kind, frames, keys, s, c, GRAPH_PAIRS) for s, c in rows.layers)


def _activations(rows: _Rows, fixed: int, branches: int, sizes: Dict[str, int], staging: int,
                 search: int) -> Dict[str, int]:
    """Activations of each stage's largest call: ``sizes`` {stage: frames (keyframes) per call}."""
    kf, chunk, inv = sizes["keyframes"], sizes["propagate"], sizes["invert"]
    return {"keyframes": _call(rows, fixed, branches * kf, rows.controlled_edit * kf),
            "propagate": _call(rows, fixed, branches * chunk, rows.controlled_edit * chunk, staging + search),
            "invert": _call(rows, fixed, inv, rows.controlled_invert * inv),
            "vae": sizes["vae"] * rows.vae}


def _host_calls(acts: Dict[str, int], sizes: Dict[str, int], per_frame: Dict[str, int]) -> Dict[str, tuple]:
    """HostPlan.calls: each phase's largest call (the VAE encodes in the inversion phase)."""
    def largest(*stages: str) -> tuple:
        stage = max(stages, key=acts.get)
        return stage, acts[stage], sizes[stage], per_frame[stage]
    return {"invert": largest("invert", "vae"), "edit": largest("keyframes", "propagate"), "decode": largest("vae")}


def nearest_kind(backend: str, nearest: str, device: torch.device, dtype: torch.dtype) -> str:
    """The nearest-neighbour search a propagation call runs, as the kernel dispatch and
    ``engine.backends`` choose it: eager ``auto`` runs Triton on CUDA where it is installed, else
    the torch search (FAISS on large CPU searches is counted as the torch search, its upper bound);
    graph backends run ``static`` (``compile`` runs ``triton`` on CUDA in fp16/bf16 with Triton).
    (Should Triton's startup self-check fail, the torch search's float32 copies run instead.)"""
    triton = device.type == "cuda" and triton_missing() is None
    if backend == "eager":
        if nearest == "auto":
            return "triton" if triton else "torch"
        return "torch" if nearest == "faiss" else nearest
    fast = backend == "compile" and triton and dtype in (torch.float16, torch.bfloat16)
    if nearest == "auto":
        return "triton" if fast else "static"
    return "static" if nearest == "torch" else nearest


def call_caps(device_type: str, rows: _Rows, branches: int, row_cap: Optional[int] = None,
              vae_cap: Optional[int] = None) -> Dict[str, Optional[int]]:
    """Caps on rows and frames per call (module doc); ``row_cap``/``vae_cap`` replace the device's."""
    int32_rows = INT32_ELEMENTS // max(1, rows.unet_largest)
    int32_vae = INT32_ELEMENTS // max(1, rows.vae_largest)
    if device_type == "cpu":
        caps = {"propagation_rows": row_cap or CPU_PROPAGATE_ROWS, "inversion_rows": row_cap,
                "vae_frames": vae_cap or CPU_VAE_FRAMES}
    else:
        vae = vae_cap or min(GPU_VAE_FRAMES, max(1, GPU_VAE_ELEMENTS // max(1, rows.vae_largest)))
        caps = {"propagation_rows": row_cap or GPU_UNET_ROWS, "inversion_rows": row_cap or GPU_UNET_ROWS,
                "vae_frames": vae}
    return {**caps, "int32_unet_rows": int32_rows, "int32_vae_frames": int32_vae}


def _largest(n: int, limit: int, fits: Callable[[int], bool]) -> int:
    """The largest n' in [1, limit] with fits(n') (fits grows false with n'); 1 when none fits
    (the plan's check then refuses); ``n`` given (a forced size): n."""
    if n:
        return n
    low, high = 1, max(1, limit)
    if fits(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def make_plan(model, *, frames: int, latent_size: tuple, branches: int, keyframes: int, window: int,
              steps: int, budget: int, budget_source: str, calibration: Calibration,
              chunk_frames: Optional[int] = None, inversion_frames: Optional[int] = None,
              keyframe_store: str = "auto", inverted_latents: str = "auto",
              max_chunk: Optional[int] = None, use_cache: bool = True,
              host: Optional[Tuple[int, str]] = None, backend: str = "eager", nearest_backend: str = "auto",
              row_cap: Optional[int] = None, vae_cap: Optional[int] = None,
              controls: Controls = Controls(), inversion_rows: Optional[int] = None) -> MemoryPlan:
    """Choose chunk sizes under ``budget`` (less the device's overheads) and, on CPU, in what the
    host leaves (module doc); raise ResourceError naming the budget that would fit, or naming the
    host memory that does not: ``host`` is (bytes available, where from), default
    ``memory.host_available()`` now; the decoded frames (and on CPU the weights) are already held
    and counted as such. ``backend``/``nearest_backend``: the run's (what the search and CUDA
    graphs hold); ``row_cap``/``vae_cap`` replace the device's call caps (for sweeps). ``controls``: the
    ControlNets every controlled UNet call runs (weights on the device, activations per controlled
    row, residuals per row, control images on the host); a depth UNet (more input than latent
    channels) keeps its depth maps ``[N,1,h,w]`` float32 on the device. ``inversion_rows``: the UNet rows
    an inversion call may batch when it is not one call per timestep (the DDPM inversion's frames x
    timesteps; default the frames): ``inversion_frames`` is then rows per call."""
    h, w = latent_size
    device = torch.device(model.device)
    on_cpu = device.type == "cpu"
    size = torch.empty((), dtype=model.dtype).element_size()
    scale = model.vae_scale_factor
    height, width = h * scale, w * scale
    # every module the edit keeps on the device: SDXL's second text encoder too, its VAE in float32
    # when upcast (module_bytes counts each parameter at its own dtype)
    model_weights = module_bytes(model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None))
    control_weights = module_bytes(*controls.nets)
    loaded = getattr(model, "weights_loaded", True)   # False: an architecture, whose weights no one holds yet
    nets_loaded = not any(p.is_meta for net in controls.nets for p in net.parameters())
    fixed = calibration.unet_fixed
    rows = _rows(model, h, w, branches, size, calibration, controls)
    row, vae_row, per_kf = rows.unet, rows.vae, rows.keyframe
    store = per_kf * keyframes
    channels = int(model.vae.config["latent_channels"])   # latents; a depth UNet takes one channel more
    latents = steps * frames * channels * h * w * 4
    depth = frames * h * w * 4 if int(model.unet.config["in_channels"]) > channels else 0
    images = len(controls.nets) * frames * 3 * height * width   # uint8 control images, on the host
    # what the device holds through every stage: the weights (model and ControlNets), the depth maps
    weights = model_weights + control_weights + depth
    kf_call = min(window or keyframes, keyframes)
    caps = call_caps(device.type, rows, branches, row_cap, vae_cap)
    overheads = device_overheads(device.type, budget)
    usable = budget - sum(overheads.values())
    factor = RESERVED_FACTOR if device.type == "cuda" else 1.0
    nearest = nearest_kind(backend, nearest_backend, device, model.dtype)
    pooled = backend == "compile" and device.type == "cuda"   # mode="reduce-overhead": CUDA graphs

    # where the store and the latents live: on the device unless the keyframe pass would not fit
    def place(choice: str, nbytes: int, others: int) -> str:
        if choice != "auto":
            return choice
        need = weights + others + nbytes + factor * _call(rows, fixed, branches * kf_call,
                                                          rows.controlled_edit * kf_call)
        return "device" if need <= usable else "host"

    # an offloaded store stages the slots a chunk of consecutive frames can read, padded to the
    # fixed count the store allocates (``store.staging_slots``; the spacing rounded down, so never
    # fewer); off the CPU they are gathered into a pinned host buffer of the same size first
    spacing = max(1, frames // max(1, keyframes))
    latents_on = place(inverted_latents, latents, 0)
    store_on = place(keyframe_store, store, latents if latents_on == "device" else 0)
    if inverted_latents == "auto" and latents_on == "device" and store_on == "host":
        # the offloaded store's staging (at least one frame's slots) is on the device beside the
        # latents: at SDXL's sizes a slot is 0.8 GiB, so the latents must leave room for it
        latents_on = place("auto", latents, staging_slots(1, spacing, keyframes) * per_kf)
    latents_resident = latents if latents_on == "device" else 0
    resident = (store if store_on == "device" else 0) + latents_resident
    offloaded = store_on == "host"

    def staged(chunk: int) -> int:
        return staging_slots(chunk, spacing, keyframes) if offloaded else keyframes

    def costs(sizes: Dict[str, int]) -> Tuple[Dict[str, int], Dict[str, int], int, int, int]:
        """(peaks, raw activations, staging, search, graph pool) at these call sizes."""
        chunk = sizes["propagate"]
        staging = staged(chunk) * per_kf if offloaded else 0
        search = _search(rows, nearest, chunk, staged(chunk))
        acts = _activations(rows, fixed, branches, sizes, 0, search)
        held = {k: math.ceil(v * factor) for k, v in acts.items()}
        # CUDA graph trees give the captured graphs one private pool per device, reused between
        # them (the runner copies outputs out): about the largest graph's call, held from its
        # capture on, beside the ordinary allocator's memory (the VAE's)
        pool = max(held["invert"], held["keyframes"], held["propagate"]) if pooled else 0
        peaks = {"keyframes": weights + resident + staging + max(pool, held["keyframes"]),
                 "propagate": weights + resident + staging + max(pool, held["propagate"]),
                 "invert": weights + latents_resident + held["invert"],
                 "vae": weights + pool + held["vae"]}
        return peaks, {**acts, "propagate": acts["propagate"] + staging}, staging, search, pool

    def largest_tensor(sizes: Dict[str, int]) -> Dict[str, int]:
        chunk = sizes["propagate"]
        search = max(search_largest_elements(nearest, chunk, s, c, GRAPH_PAIRS) for s, c in rows.layers)
        return {"keyframes": branches * sizes["keyframes"] * rows.unet_largest,
                "propagate": max(branches * chunk * rows.unet_largest, search),
                "invert": sizes["invert"] * rows.unet_largest, "vae": sizes["vae"] * rows.vae_largest}

    def fits(sizes: Dict[str, int]) -> bool:
        return (max(costs(sizes)[0].values()) <= usable
                and max(largest_tensor(sizes).values()) <= INT32_ELEMENTS)

    # the host: on CPU the latents and the store are host memory wherever the plan puts them
    # (the device peaks count them as resident, the host plan as its own parts: once each)
    free, source = host or host_available()
    host_plan = HostPlan(
        frames=frames, width=width, height=height, prompts=max(1, (branches - 1) // 2), timesteps=steps,
        latents_on_host=on_cpu or latents_on == "host", use_cache=use_cache, available=free,
        available_source=source, frames_source="the decoded clip", latent_channels=channels,
        vae_scale=scale, store=store if on_cpu or offloaded else 0,
        weights=model_weights + control_weights if on_cpu else 0,
        conditions=images + (depth if on_cpu else 0), z0_on_host=on_cpu,
        held=4 * frames * 3 * height * width + (model_weights + depth if on_cpu and loaded else 0)
        + (control_weights if on_cpu and nets_loaded else 0) + (images if nets_loaded else 0),
        dtype=str(model.dtype).replace("torch.", ""))
    # on CPU each call gets what its phase leaves after the host parts and the weights
    room = {phase: host_plan.usable - sum(parts.values()) for phase, parts in host_plan.phases.items()}

    def host_limit(per_frame: int, *phases: str, most: int = frames) -> int:
        if not on_cpu:
            return most
        free_room = min(room[p] for p in phases) - fixed - SEARCH_TILE * 4
        return max(1, min(most, free_room // max(1, per_frame)))

    def rows_limit(cap: Optional[int], per_row: int) -> int:   # frames per call under a rows cap
        return frames if cap is None else max(1, cap // per_row)

    # sized in this order, each in what the previous ones leave (the later ones at 1 meanwhile)
    sizes = {"keyframes": kf_call, "propagate": chunk_frames or 1, "invert": inversion_frames or 1, "vae": 1}
    prop_limit = min(max_chunk or frames, rows_limit(caps["propagation_rows"], branches),
                     host_limit(_per_frame(rows, "propagate", branches) + (2 * per_kf if offloaded else 0), "edit"))
    sizes["propagate"] = _largest(chunk_frames, prop_limit, lambda n: fits({**sizes, "propagate": n}))
    inv_rows = max(frames, inversion_rows or frames)
    inv_limit = min(inv_rows if caps["inversion_rows"] is None else caps["inversion_rows"],
                    host_limit(_per_frame(rows, "invert", branches), "invert", most=inv_rows))
    sizes["invert"] = _largest(inversion_frames, inv_limit, lambda n: fits({**sizes, "invert": n}))
    vae_limit = min(frames, caps["vae_frames"], host_limit(vae_row, "invert", "decode"))
    sizes["vae"] = _largest(0, vae_limit, lambda n: fits({**sizes, "vae": n}))
    peaks, acts, staging, search, pool = costs(sizes)
    share = {}
    if controls.nets:   # the ControlNets' part of each stage's peak: their weights and what they add to the call
        bare = dataclasses.replace(rows, control=0, residual=0, controlled_edit=0, controlled_invert=0)
        with_nets = _activations(rows, fixed, branches, sizes, 0, search)
        without = _activations(bare, fixed, branches, sizes, 0, search)
        share = {k: control_weights + math.ceil((with_nets[k] - without[k]) * factor) for k in with_nets}
    chunk, inv, vae = sizes["propagate"], sizes["invert"], sizes["vae"]
    per_frame = {"keyframes": _per_frame(rows, "keyframes", branches),
                 "propagate": _per_frame(rows, "propagate", branches) + (2 * per_kf if offloaded else 0),
                 "invert": _per_frame(rows, "invert", branches), "vae": vae_row}
    pinned = staging if offloaded and not on_cpu else 0

    def rescale(n: int, px_width: int, px_height: int) -> dict:
        """The model's host parts for n frames at px_width x px_height, at 1 frame per call
        (or the forced sizes) and the keyframes scaled with the frames: for the refusal's advice."""
        k = max(1, math.ceil(keyframes * n / frames))
        r = _rows(model, max(1, px_height // scale), max(1, px_width // scale), branches, size, calibration, controls)
        least = {"keyframes": min(window or k, k), "propagate": min(chunk_frames or 1, n),
                 "invert": min(inversion_frames or 1, n), "vae": 1}
        least_staged = staging_slots(least["propagate"], max(1, n // k), k) if offloaded else k
        least_staging = least_staged * r.keyframe if offloaded else 0
        least_per_frame = {"keyframes": _per_frame(r, "keyframes", branches), "vae": r.vae,
                           "invert": _per_frame(r, "invert", branches),
                           "propagate": _per_frame(r, "propagate", branches) + (2 * r.keyframe if offloaded else 0)}
        calls = _activations(r, fixed, branches, least, least_staging,
                             _search(r, nearest, least["propagate"], least_staged))
        return {"store": r.keyframe * k if on_cpu or offloaded else 0,
                "conditions": len(controls.nets) * n * 3 * px_width * px_height
                + (n * (px_height // scale) * (px_width // scale) * 4 if depth and on_cpu else 0),
                "pinned_staging": least_staging if offloaded and not on_cpu else 0,
                "calls": _host_calls(calls, least, least_per_frame) if on_cpu else {}}

    host_plan = dataclasses.replace(host_plan, calls=_host_calls(acts, sizes, per_frame) if on_cpu else {},
                                    pinned_staging=pinned, rescale=rescale)
    graphs = (f"one pool shared by the captured graphs, about the largest one's call: inversion "
              f"{inv} rows, keyframe pass {branches * kf_call}, propagation {branches * chunk}; "
              "estimate, unverified on GPU")
    plan = MemoryPlan(
        device=str(model.device), dtype=str(model.dtype).replace("torch.", ""), budget=budget,
        budget_source=budget_source, frames=frames, latent_size=(h, w), branches=branches,
        keyframes=keyframes, keyframe_call=kf_call, chunk_frames=chunk, inversion_frames=inv, vae_frames=vae,
        inversion_unit="rows (a frame at a timestep)" if (inversion_rows or 0) > frames else "frames",
        weights_bytes=model_weights, unet_row_bytes=row, vae_row_bytes=vae_row,
        store_bytes=store, store_on=store_on, staging_bytes=staging, latents_bytes=latents,
        latents_on=latents_on, peaks=peaks, calibration=calibration.source, chunk_forced=chunk_frames is not None,
        host=host_plan, overheads=overheads, reserved_factor=factor, call_caps=caps,
        caps_note=CPU_CAPS_NOTE if on_cpu else GPU_CAPS_NOTE, nearest=nearest, nearest_bytes=search,
        graph_pool_bytes=pool, graph_pool_note=graphs if pooled else "", pinned_staging_bytes=pinned,
        largest_tensor=largest_tensor(sizes), controlnets=len(controls.nets), controlnet_note=controls.note,
        controlnet_weights_bytes=control_weights, control_row_bytes=rows.control,
        control_residual_bytes=rows.residual, control_images_bytes=images, control_share=share, depth_bytes=depth)
    real = device.type != "meta"   # a meta-device plan is a what-if: nothing is allocated here
    if on_cpu and real:   # on CPU the host is the device: its check has the better numbers and advice
        host_plan.check()
    _check_int32(plan)
    _check_fits(plan)
    if real:
        host_plan.check()
    return plan


def _check_int32(plan: MemoryPlan) -> None:
    """Refuse a call with a tensor past int32 indexing (kernels would fail or index wrongly)."""
    over = {stage: n for stage, n in plan.largest_tensor.items() if n > INT32_ELEMENTS}
    if not over:
        return
    fixes = {"keyframes": "a keyframe window (--keyframe-window W) or fewer --prompt edits per run",
             "propagate": "a smaller --chunk-frames", "invert": "a smaller --inversion-batch-size",
             "vae": "a smaller --size"}
    said = "; ".join(f"{STAGE_NAMES[stage]} would hold a tensor of {n:,} elements" for stage, n in over.items())
    raise ResourceError(f"{said}, past the {INT32_ELEMENTS:,} that int32 indexing allows. Use "
                        + "; or ".join(dict.fromkeys(fixes[stage] for stage in over)))


def _budget_for(need: int, device_type: str) -> int:
    """The smallest budget whose usable part (less ``device_overheads``) holds ``need``."""
    fixed = sum(v for k, v in device_overheads(device_type, need).items() if k != "margin")
    if device_type != "cuda":
        return need
    return max(need + fixed + GPU_MARGIN_MIN, math.ceil((need + fixed) / (1 - GPU_MARGIN_FRACTION)))


def _check_fits(plan: MemoryPlan) -> None:
    over = {stage: peak for stage, peak in plan.peaks.items() if peak > plan.usable}
    if not over:
        return
    problems = [f"{STAGE_NAMES[stage]} needs {gib(peak)}" for stage, peak in over.items()]
    if "keyframes" in over and plan.keyframe_call == plan.keyframes and plan.keyframes > 2:
        problems.append("a keyframe window (--keyframe-window W) bounds the keyframe pass")
    need = _budget_for(max(plan.peaks.values()), torch.device(plan.device).type)
    usable = (f" ({gib(plan.usable)} usable once the CUDA context, library workspaces and a margin are "
              "taken off)" if plan.overheads else "")
    raise ResourceError(
        f"the memory budget {gib(plan.budget)} ({plan.budget_source}){usable} is too small: {'; '.join(problems)}. "
        f"Set --memory-budget to at least {math.ceil(need / 2**30 * 10) / 10:.1f}GiB if the device has it, "
        "or use fewer frames (--frames)" + (", a smaller --size or --dtype float16" if plan.dtype == "float32"
                                           else " or a smaller --size"))
