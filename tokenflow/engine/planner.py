"""The memory planner: how many frames each kind of call may take under a memory budget.

Inputs: the loaded model (weights, UNet/VAE configs), frames N and latents h x w, the compute
dtype, the number of branches B (1 source + 2 per prompt), keyframes K and the keyframe window.
Outputs (``MemoryPlan``): frames per propagation call, per inversion call and per VAE call,
keyframes per keyframe-pass call, where the keyframe store and the inverted latents live, and the
predicted peak of every stage. Peaks are

    weights + resident (store and latents on the device) + rows * bytes_per_row (+ staging)

with bytes per row from ``memory.py`` (analytic, calibrated per device). Chunk sizes never change
results (``tests/test_edit_invariance.py``), only speed and memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from tokenflow.engine.memory import (
    Calibration,
    attention_layer_shapes,
    gib,
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

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["peak"] = self.peak
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
        return "\n".join(rows)


def store_bytes_per_keyframe(unet, h: int, w: int, branches: int, element_size: int) -> int:
    """Per keyframe: the source features [S, C] and B branch outputs [S, C] of every layer."""
    return sum((1 + branches) * s * c for s, c in attention_layer_shapes(unet, h, w).values()) * element_size


def make_plan(model, *, frames: int, latent_size: tuple, branches: int, keyframes: int, window: int,
              steps: int, budget: int, budget_source: str, calibration: Calibration,
              chunk_frames: Optional[int] = None, inversion_frames: Optional[int] = None,
              keyframe_store: str = "auto", inverted_latents: str = "auto",
              max_chunk: Optional[int] = None) -> MemoryPlan:
    """Choose chunk sizes under ``budget``; raise ResourceError naming the budget that would fit."""
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
