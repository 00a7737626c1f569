"""Memory accounting: analytic activation sizes of the UNet and VAE, a measured calibration probe
(cached per device), the device's free memory and the host's (``host_available``: MemAvailable,
or a tighter cgroup limit).

Analytic model (elements per batch row, in the compute dtype), for latents h x w and a UNet with
``block_out_channels`` C_l at levels l = 0..L-1 (tokens S_l = ceil(h / 2^l) * ceil(w / 2^l)):

    skips    = C_0 S_0 + sum_l [layers_per_block * C_l S_l + C_l S_{l+1} (downsampling, l < L-1)]
               (every down-block output is held until the decoder consumes it)
    working  = max_l 20 C_l S_l                     (levels with attention)
               (the widest moment of a transformer block: its input and residual, and the GEGLU
               feed-forward's 8C projection, 4C gate and 4C product alive at once)
               or 4 (C_l + C_{l+1}) S_l              (levels without: SDXL's level 0)
               (a decoder ResNet's concatenated input, its norm, activation and conv output)
    unet row = skips + working

    ControlNet row = max(skips + max(working, (3 + 2 E_0) H W), 2 residuals)   (one controlled row
               through one ControlNet: its down and mid half, its conditioning embedding at full
               size H x W, or its zero-conv outputs and their scaled copies)
    residuals      = skips + C_{L-1} S_{L-1}   (12 down + 1 mid for SD; summed over the ControlNets)

    vae decode row = 10 * C_top * H * W    (C_top: the decoder's last-level width at full resolution
                                            H x W; a ResNet's input, norm, activation and conv out)

Extended attention is computed without score matrices by every backend we use (SDPA, Triton),
so it adds O(S C) per row, inside ``working``; the cosine search's own buffers (``search_bytes``:
float32 copies, similarity tiles, gathered keys, depending on the backend) are added to the
propagation peak.

The analytic numbers are multiplied by a factor measured once per device: a probe runs the UNet at
batch 1 and 2 (and the VAE decoder at 1 and 2) at 32 x 32 latents and takes the growth of the peak
per row (the factor) and its intercept (a fixed cost per call)
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU/MPS a dispatch-mode tracker of live tensor
storages). Factors are cached in ``<cache root>/memory-calibration.json`` keyed by device name,
dtype, model architecture and torch version.

Largest single tensors (for the int32-indexing guard and the GPU call caps, ``planner``):

    UNet row   = max_l 8 C_l S_l        (the GEGLU projection [S, 8C] of a transformer block;
                                     (C_l + C_{l+1}) S_l at a level without attention)
    VAE frame  = max over the decoder's resolutions of the widest tensor there: at full size,
                 the previous level's channels upsampled (SD: 256 x H x W = 67M at 512^2)

CUDA overheads the allocator's statistics do not show (``device_overheads``): the CUDA context,
library workspaces and a safety margin come off the budget; torch's reserved memory is predicted
from the allocated bytes with ``RESERVED_FACTOR`` (rounding and fragmentation). All estimates,
unverified on GPU (``tests/gpu`` compares the plan with measured reserved memory).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokenflow.engine.processors import self_attention_layers
from tokenflow.engine.state import timestep_tensor
from tokenflow.io.caches import CALIBRATION, default_cache_root
from tokenflow.io.outputs import atomic_file
from tokenflow.models.text import layout_of, unet_keywords

PROBE_LATENT = 32


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB, so small plans do not print 0.00)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- analytic sizes


def level_tokens(h: int, w: int, levels: int) -> list:
    """Tokens per UNet level: stride-2 convs with padding 1 give ceil(h / 2) per level."""
    out = []
    for _ in range(levels):
        out.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


def skip_elements(unet_config, h: int, w: int) -> int:
    """Elements of one row's down-block outputs (``skips`` of the module doc): what the decoder
    consumes, and the shapes of a ControlNet's 12 down residuals (SD)."""
    channels = list(unet_config["block_out_channels"])
    tokens = level_tokens(h, w, len(channels))
    per_block = int(unet_config["layers_per_block"])
    skips = channels[0] * tokens[0]
    for level, (c, s) in enumerate(zip(channels, tokens)):
        skips += per_block * c * s
        if level + 1 < len(channels):
            skips += c * tokens[level + 1]
    return skips


def attention_levels(unet_config) -> list:
    """Whether each UNet level has transformer blocks (SD 1.x/2.x: all but the last; SDXL: the last two)."""
    return ["CrossAttn" in str(kind) for kind in unet_config["down_block_types"]]


def _resnet_width(channels: list, level: int) -> int:
    """The widest ResNet input of a level: the decoder's first ResNet there takes the level above's
    output (upsampled) concatenated with a skip of this level, C_{l+1} + C_l channels."""
    return channels[level] + channels[min(level + 1, len(channels) - 1)]


def _working(unet_config, h: int, w: int) -> int:
    channels = list(unet_config["block_out_channels"])
    tokens = level_tokens(h, w, len(channels))
    return max(20 * c * s if attention else RESNET_WORKING * _resnet_width(channels, level) * s
               for level, (c, s, attention) in enumerate(zip(channels, tokens, attention_levels(unet_config))))


def unet_row_elements(unet_config, h: int, w: int) -> int:
    """Analytic activation elements of one UNet batch row at latents h x w (see module doc)."""
    return skip_elements(unet_config, h, w) + _working(unet_config, h, w)


def control_residual_elements(controlnet_config, h: int, w: int) -> int:
    """Elements of one row's ControlNet residuals: the down residuals (the skips' shapes) and the
    mid one [C_last, S_last]. N ControlNets' residuals are summed: one such set per row."""
    channels = list(controlnet_config["block_out_channels"])
    return skip_elements(controlnet_config, h, w) + channels[-1] * level_tokens(h, w, len(channels))[-1]


def controlnet_row_elements(controlnet_config, h: int, w: int, height: int, width: int) -> int:
    """Analytic activation elements of one row through one ControlNet (latents h x w, control
    images height x width): a ControlNet is the UNet's down and mid half, so

        max(skips + max(working, embedding), 2 x residuals)

    with ``embedding`` = (3 + 2 E_0) H W, the conditioning embedding's full-size moment (the image
    and two tensors of its first width E_0, 16 in SD's ControlNets), and at the end its residuals
    twice (the zero convolutions' outputs and their copies scaled by ``conditioning_scale``)."""
    widths = list(controlnet_config.get("conditioning_embedding_out_channels") or (16,))
    embedding = (3 + 2 * int(widths[0])) * height * width
    skips = skip_elements(controlnet_config, h, w)
    return max(skips + max(_working(controlnet_config, h, w), embedding),
               2 * control_residual_elements(controlnet_config, h, w))


def vae_decode_row_elements(vae_config, height: int, width: int) -> int:
    return 10 * int(list(vae_config["block_out_channels"])[0]) * height * width


def attention_layer_shapes(unet, h: int, w: int) -> Dict[str, Tuple[int, int]]:
    """{attn1 module name: (tokens S, channels C)} for latents h x w, from the UNet's structure."""
    channels = list(unet.config["block_out_channels"])
    tokens = level_tokens(h, w, len(channels))
    last = len(channels) - 1
    shapes = {}
    for layer in self_attention_layers(unet):
        name = layer.name
        if name.startswith("down_blocks."):
            level = int(name.split(".")[1])
        elif name.startswith("up_blocks."):
            level = last - int(name.split(".")[1])
        else:  # mid block
            level = last
        shapes[name] = (tokens[level], unet.get_submodule(name).inner_dim)
    return shapes


# a level without attention (SDXL's level 0): a decoder ResNet's input, its group norm and its
# activation at the input width (``_resnet_width``), and the conv's output beside them: ~4 x the input
RESNET_WORKING = 4
INT32_ELEMENTS = 2**31 - 1   # kernels index with int32: no single tensor of a planned call may exceed it


def unet_largest_row_elements(unet_config, h: int, w: int) -> int:
    """Elements of the largest tensor of one UNet batch row at latents h x w: the GEGLU
    projection [S_l, 8 C_l] of the widest attention level (SD 2.1, 64x64: 8 x 320 x 4096 = 10.5M), or
    a level without attention's widest ResNet input [C_l + C_{l+1}, S_l] (SDXL's level 0)."""
    channels = list(unet_config["block_out_channels"])
    tokens = level_tokens(h, w, len(channels))
    return max(8 * c * s if attention else _resnet_width(channels, level) * s
               for level, (c, s, attention) in enumerate(zip(channels, tokens, attention_levels(unet_config))))


def vae_largest_frame_elements(vae_config, height: int, width: int) -> int:
    """Elements of the largest tensor of one frame through the VAE decoder at height x width.

    The decoder runs ``block_out_channels`` reversed from 1/2^(L-1) of the size up to full size;
    each level's output is upsampled before the next level narrows it, so level r holds
    max(C_{r-1}, C_r) channels. The encoder has the same widths at the same sizes, never wider."""
    channels = list(vae_config["block_out_channels"])[::-1]
    levels = len(channels)
    largest = 0
    for r, c in enumerate(channels):
        scale = 2 ** (levels - 1 - r)
        wide = max(c, channels[r - 1]) if r else c
        largest = max(largest, wide * math.ceil(height / scale) * math.ceil(width / scale))
    return largest


def search_bytes(kind: str, frames: int, keys: int, tokens: int, channels: int, pairs: int) -> int:
    """Bytes one cosine nearest-neighbour search of an attention layer allocates (``kernels.nearest``):
    ``frames`` F frames of ``tokens`` N tokens searched in ``pairs`` P of ``keys`` K keyframes of N
    tokens, ``channels`` C wide.

    - ``static`` (graph backends): float32 copies of the frames and keys (2 each: cast and
      normalised), the paired keys gathered [F, P, C, N], one block of queries broadcast to the
      pairs [F, P, block, C] and its similarities [F, P, block, N] (at most 2^22 a frame, or one
      query row), and the int64 indices [F, P, N] (the blocks, their concatenation, the masked
      result and its zeros).
    - ``torch``/``faiss``: the float32 copies and one 2^24-similarity tile (FAISS: its own blocked
      search, no larger), and the indices.
    - ``triton``: fused normalise + matmul + argmax: the indices only.
    """
    indices = frames * pairs * tokens * 8
    if kind == "triton":
        return indices
    copies = 2 * 4 * (frames + keys) * tokens * channels
    if kind == "static":
        block = max(1, min(tokens, STATIC_SIM_PER_FRAME // max(1, pairs * tokens)))
        return (copies + 4 * frames * pairs * channels * tokens + 4 * frames * pairs * block * (channels + tokens)
                + 4 * indices)
    return copies + 4 * min(SEARCH_TILE, frames * tokens * tokens) + indices


def search_largest_elements(kind: str, frames: int, tokens: int, channels: int, pairs: int) -> int:
    """Elements of the largest tensor of that search (``search_bytes``'s shapes): the static
    search's gathered keys [F, P, C, N] or similarities [F, P, block, N], the torch search's tile,
    the indices [F, P, N]."""
    indices = frames * pairs * tokens
    if kind == "static":
        block = max(1, min(tokens, STATIC_SIM_PER_FRAME // max(1, pairs * tokens)))
        return frames * pairs * tokens * max(channels, block)
    if kind == "triton":
        return indices
    return max(indices, frames * tokens * channels, min(SEARCH_TILE, frames * tokens * tokens))


SEARCH_TILE = 1 << 24            # similarities per tile of the torch search (kernels.nearest._SIM_ELEMENTS)
STATIC_SIM_PER_FRAME = 1 << 22   # similarities per frame of the static search (kernels.nearest._STATIC_SIM_PER_FRAME)


def module_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()))


# --------------------------------------------------------------------------- measuring


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block (any device, including CPU).

    Storages are counted once when an op first returns them and released when their Python storage
    object is collected; ops whose results alias an input (views such as a weight's ``t()``,
    in-place ops) allocate nothing and are not counted. Kernel workspaces outside tensors are not seen; the CUDA probe uses the
    allocator's own statistics instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out   # a view or an in-place result: an input's storage (a weight's ``t()``), nothing new
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._seen:
                    self._seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


def measure_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = LiveTensorTracker()
    with tracker:
        fn()
    return tracker.peak


@dataclass(frozen=True)
class Calibration:
    """measured / analytic bytes per batch row, for the UNet and the VAE decoder."""

    unet: float = 1.0
    vae: float = 1.0
    unet_fixed: int = 0       # bytes per UNet call whatever the batch (timestep and text projections, ...)
    measured: bool = False
    source: str = "analytic only"


def calibration_key(model, device: torch.device) -> str:
    def shape_only(config) -> dict:  # not the paths and bookkeeping fields ("_name_or_path", ...)
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    arch = json.dumps([shape_only(model.unet.config), shape_only(model.vae.config)], sort_keys=True, default=str)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|{str(model.dtype).replace('torch.', '')}|{torch.__version__}|" \
           f"{hashlib.sha256(arch.encode()).hexdigest()[:16]}"


UNCALIBRATED = ("uncalibrated: the analytic sizes x 1.0, as no probe of this device, dtype and architecture "
                "is cached; a run with the weights measures it")


def calibrate(model, cache_root: Optional[Path] = None, use_cache: bool = True) -> Calibration:
    """The device's calibration for ``model`` (cached per device; measured on first use; a model
    whose weights are on the ``meta`` device gets the cached factor or ``UNCALIBRATED``'s 1.0)."""
    device, dtype = model.device, model.dtype
    path = (cache_root or default_cache_root()) / CALIBRATION
    key = calibration_key(model, device)
    table = _read_json(path) if use_cache else {}
    if key in table:
        entry = table[key]
        return Calibration(entry["unet"], entry["vae"], int(entry.get("unet_fixed", 0)), True, f"cached probe ({path})")
    if any(p.is_meta for p in model.unet.parameters()):   # an architecture without weights cannot be probed
        return Calibration(source=UNCALIBRATED)
    unet_factor, vae_factor, fixed = _probe(model, device, dtype)
    if use_cache:
        table[key] = {"unet": unet_factor, "vae": vae_factor, "unet_fixed": fixed}
        _write_json(path, table)
    return Calibration(unet_factor, vae_factor, fixed, True, "probe measured now")


@torch.no_grad()
def _probe(model, device: torch.device, dtype: torch.dtype) -> Tuple[float, float, int]:
    side = PROBE_LATENT
    layout = layout_of(model.unet.config)
    channels = int(model.unet.config["in_channels"])

    def unet(b: int):
        x = torch.zeros(b, channels, side, side, device=device, dtype=dtype)
        text = torch.zeros(b, layout.rows_tokens, layout.dim, device=device, dtype=dtype)
        return lambda: model.unet(x, timestep_tensor(1, device), **unet_keywords(model.unet, text))

    def vae(b: int):
        z = torch.zeros(b, int(model.vae.config["latent_channels"]), side, side, device=device, dtype=vae_dtype)
        return lambda: model.vae.decode(z)

    vae_dtype = next(model.vae.parameters()).dtype   # float32 for an upcast SDXL VAE (SDModel.vae_upcast)
    size, vae_size = (torch.empty((), dtype=d).element_size() for d in (dtype, vae_dtype))
    unet(1)(), vae(1)()  # warm-up: lazy one-time allocations are not a per-call cost
    unet_rows = [measure_peak(unet(b), device) for b in (1, 2)]
    vae_rows = [measure_peak(vae(b), device) for b in (1, 2)]
    pixels = side * model.vae_scale_factor
    unet_factor = (unet_rows[1] - unet_rows[0]) / (unet_row_elements(model.unet.config, side, side) * size)
    vae_factor = (vae_rows[1] - vae_rows[0]) / (vae_decode_row_elements(model.vae.config, pixels, pixels) * vae_size)
    fixed = max(0, 2 * unet_rows[0] - unet_rows[1])   # the intercept of peak = fixed + rows * per_row
    return max(unet_factor, 0.1), max(vae_factor, 0.1), int(fixed)


# --------------------------------------------------------------------------- budget


# CUDA: what takes device memory beside torch's reserved memory, and how reserved exceeds allocated.
# Estimates (unverified on GPU: tests/gpu compares the plan with measured reserved memory).
CUDA_CONTEXT = 512 * 2**20         # the driver's context and torch's lazily loaded kernel modules
                                   # (CUDA 12 with lazy loading: typically 0.3-0.6 GiB)
CUBLAS_WORKSPACE = 2 * 32 * 2**20  # cuBLAS + cuBLASLt workspaces: torch's default is 32 MiB each on Hopper
CUDNN_WORKSPACE = 256 * 2**20      # a convolution algorithm's scratch (the VAE's full-size convs choose
                                   # among algorithms by workspace; torch allocates it per call)
RESERVED_FACTOR = 1.2              # torch reserved / allocated for the calls' activations: 2 MiB block
                                   # rounding and split blocks that later sizes cannot reuse
GPU_MARGIN_FRACTION = 0.05         # of the budget, never planned: the probe is extrapolated from 32x32
GPU_MARGIN_MIN = 256 * 2**20       # latents, and other processes' memory can change


def device_overheads(device_type: str, budget: int) -> Dict[str, int]:
    """{name: bytes} the planner takes off ``budget`` before sizing calls: on CUDA the context,
    library workspaces and a safety margin (the budget is all the device memory the process may
    occupy); elsewhere nothing (the CPU budget has its margin already, ``cpu_budget``)."""
    if device_type != "cuda":
        return {}
    return {"cuda_context": CUDA_CONTEXT, "cublas_workspace": CUBLAS_WORKSPACE, "cudnn_workspace": CUDNN_WORKSPACE,
            "margin": max(GPU_MARGIN_MIN, math.ceil(GPU_MARGIN_FRACTION * budget))}


def default_budget(device: torch.device) -> Tuple[int, str]:
    """All the device memory this process may occupy: on CUDA, what is free + what torch already
    reserved + this process's CUDA context (already taken out of the free memory, and taken off
    again with the other overheads by the planner: ``device_overheads``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        total = free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT
        return total, (f"free on {torch.cuda.get_device_name(device)} + torch's reserved + this process's "
                       f"CUDA context (est. {gib(CUDA_CONTEXT)})")
    return cpu_budget(_meminfo("MemAvailable"), _rss())


def cpu_budget(available: int, rss: int) -> Tuple[int, str]:
    """The CPU's device budget: what the host has available plus what this process holds (its
    RSS: the weights, the decoded frames, the libraries), less 10 % (at least 512 MiB). Only an
    upper bound: the planner sizes CPU calls in what the host plan leaves (``planner.make_plan``)."""
    total = available + rss
    margin = max(512 * 2**20, int(0.10 * total))
    return max(total - margin, 0), f"available host memory minus {gib(margin)}"


def proc_bytes(path: str, field: str) -> Optional[int]:
    """A "Field:  N kB" line of a Linux /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


NO_LIMIT = 2**60   # cgroup v1 says "no limit" with a huge number (9223372036854771712)


def host_available(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
                   proc_cgroup: str = "/proc/self/cgroup") -> Tuple[int, str]:
    """(bytes of host memory this process can still take, where the number comes from).

    ``MemAvailable`` of /proc/meminfo, or less when a cgroup memory limit leaves less headroom
    (v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` - ``memory.usage_in_bytes``,
    reclaimable page cache (``inactive_file``) counted as free), for this process's cgroup and
    every one above it. Without /proc (not Linux): the free physical pages (``os.sysconf``), else
    an assumed 8 GiB. The paths are parameters so that tests can point them at made-up files.
    """
    found = proc_bytes(meminfo, "MemAvailable")
    if found is not None:
        best, source = found, f"MemAvailable {gib(found)}"
    else:
        try:
            best = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = f"free physical memory {gib(best)}"
        except (ValueError, OSError, AttributeError):
            best, source = 8 * 2**30, "unknown platform: assumed 8.00 GiB"
    for folder, names in _cgroup_folders(cgroup_root, proc_cgroup):
        headroom = _cgroup_headroom(folder, *names)
        if headroom is not None and headroom[0] < best:
            best, source = headroom[0], f"cgroup {folder}: {headroom[1]}"
    return max(best, 0), source


_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_folders(root: str, proc_cgroup: str):
    """(folder, file names) of this process's memory cgroups and their ancestors, v2 and v1."""
    paths = {"v2": "/", "v1": "/"}
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    paths["v2"] = parts[2] or "/"
                elif len(parts) == 3 and "memory" in parts[1].split(","):
                    paths["v1"] = parts[2] or "/"
    except OSError:
        pass
    out = []
    for version, base, names in (("v2", root, _CGROUP_V2), ("v1", os.path.join(root, "memory"), _CGROUP_V1)):
        relative = Path(paths[version].lstrip("/"))
        for depth in range(len(relative.parts), -1, -1):
            folder = os.path.join(base, *relative.parts[:depth])
            if (folder, names) not in out:
                out.append((folder, names))
    return out


def _cgroup_headroom(folder: str, limit_name: str, usage_name: str, cache_name: str) -> Optional[Tuple[int, str]]:
    """(limit - usage + reclaimable cache, in words) of one cgroup folder; None without a limit."""
    try:
        with open(os.path.join(folder, limit_name)) as f:
            text = f.read().strip()
        if text == "max" or int(text) >= NO_LIMIT:
            return None
        limit = int(text)
        with open(os.path.join(folder, usage_name)) as f:
            usage = int(f.read().strip())
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        with open(os.path.join(folder, "memory.stat")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == cache_name:
                    cache = int(value)
    except (OSError, ValueError):
        pass
    headroom = limit - usage + min(cache, usage)
    return headroom, f"limit {gib(limit)}, {gib(usage - min(cache, usage))} in use"


def _meminfo(field: str) -> int:
    found = proc_bytes("/proc/meminfo", field)
    return 8 * 2**30 if found is None else found  # unknown platform: assume a modest machine


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:
        with atomic_file(path, make_parents=True) as f:
            json.dump(data, f, indent=1, sort_keys=True)
    except OSError:
        pass  # an unwritable cache only costs a probe next time
